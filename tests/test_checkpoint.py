"""Checkpoints that cannot be corrupted, and settings that cannot corrupt the parameters.

Every corruption must raise a ValueError naming what is wrong and leave the optimizer exactly as
it was; format-1 checkpoints (the first release) still load and resume bit-identically; no step
leaves a non-finite parameter; no backend half-updates the parameters before failing.
"""
import copy
import dataclasses
import math
import os

import pytest
import torch

from alsals_fused import ALSALS
from helpers import OddModel, make_data

CPU_BACKENDS = ["reference", "foreach"]
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def host_of(sd):
    """The host state wherever the format keeps it (param_groups[0] now, top level in format 1)."""
    return sd["param_groups"][0].get("alsals") or sd["alsals"]


def trained(backend="foreach", steps=4, variant="salsa", plateau=None, **kwargs):
    torch.manual_seed(0)
    model = OddModel()
    opt = ALSALS(model.groups(), backend=backend, variant=variant, init_step_size=1.0, **kwargs)
    if plateau:                  # the plateau test's fields are not constructor arguments
        opt.hyper = dataclasses.replace(opt.hyper, **plateau)
    x, y = make_data()
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    return model, opt


def snapshot(opt):
    """Everything load_state_dict may change."""
    return {"state": {p: {n: v.clone() for n, v in s.items()} for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "hyper": opt.hyper, "eta": opt.eta, "t": opt.t, "counters": dict(opt.counters),
            "fast": opt._fast, "slow": opt._slow, "last": opt._last_search_t,
            "h": None if opt._h is None else opt._h.clone(), "s": None if opt._s is None else opt._s.clone()}


def assert_unchanged(opt, snap):
    now = snapshot(opt)
    assert set(now["state"]) == set(snap["state"]), "the set of parameters with state changed"
    for p, s in snap["state"].items():
        assert set(now["state"][p]) == set(s)
        for n, v in s.items():
            assert now["state"][p][n].dtype == v.dtype and torch.equal(now["state"][p][n], v), n
    for key in ("groups", "hyper", "eta", "t", "counters", "fast", "slow", "last"):
        assert now[key] == snap[key], key
    for key in ("h", "s"):
        assert (now[key] is None and snap[key] is None) or torch.equal(now[key], snap[key]), key


def _param_key(sd, group, i):
    return sd["param_groups"][group]["params"][i]


def corrupt_unknown_index(sd):
    sd["state"][12345] = copy.deepcopy(next(iter(sd["state"].values())))


def corrupt_missing_h(sd):
    del host_of(sd)["h"]


def corrupt_missing_fast(sd):
    del host_of(sd)["fast"]


def corrupt_second_group_size(sd):
    sd["param_groups"][0]["weight_decay"] = 0.5          # would change first...
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:-1]   # ...then fail


def corrupt_moment_shape(sd):
    k = _param_key(sd, 0, 0)
    sd["state"][k]["exp_avg"] = sd["state"][k]["exp_avg"].reshape(-1)


def corrupt_moment_dtype(sd):
    k = _param_key(sd, 0, 0)
    sd["state"][k]["exp_avg"] = sd["state"][k]["exp_avg"].half()


def corrupt_missing_exp_avg_sq(sd):
    del sd["state"][_param_key(sd, 0, 0)]["exp_avg_sq"]


def corrupt_c(sd):
    host_of(sd)["hyper"]["c"] = 5.0


def corrupt_eta_nan(sd):
    host_of(sd)["eta"] = math.nan


def corrupt_eta_negative(sd):
    host_of(sd)["eta"] = -0.1


def corrupt_t_float(sd):
    host_of(sd)["t"] = 3.5


def corrupt_meta_device(sd):
    k = _param_key(sd, 0, 1)
    sd["state"][k]["exp_avg_sq"] = torch.empty_like(sd["state"][k]["exp_avg_sq"], device="meta")


def corrupt_nan_moment(sd):
    k = _param_key(sd, 1, 0)
    sd["state"][k]["exp_avg_sq"] = torch.full_like(sd["state"][k]["exp_avg_sq"], math.nan)


def corrupt_future_format(sd):
    host_of(sd)["format"] = 99


def corrupt_unknown_state_key(sd):
    sd["state"][_param_key(sd, 0, 0)]["step"] = torch.tensor(3.0)     # e.g. an Adam checkpoint


def corrupt_group_weight_decay(sd):
    sd["param_groups"][1]["weight_decay"] = -1.0


def corrupt_counters(sd):
    del host_of(sd)["counters"]["rejected"]


def corrupt_duplicate_index(sd):
    g = sd["param_groups"][1]["params"]
    g[0] = sd["param_groups"][0]["params"][0]


def corrupt_growth(sd):
    host_of(sd)["hyper"]["growth"] = 1e300


def corrupt_host_dropped(sd):
    sd["param_groups"][0].pop("alsals", None)            # e.g. torch.optim.Optimizer.state_dict
    sd.pop("alsals", None)


CORRUPTIONS = {
    "host state dropped": (corrupt_host_dropped, "not saved by ALSALS"),
    "unknown parameter index": (corrupt_unknown_index, "12345"),
    "missing h": (corrupt_missing_h, "'h'"),
    "missing fast": (corrupt_missing_fast, "'fast'"),
    "second group of another size": (corrupt_second_group_size, r"param_groups\[1\]"),
    "moment of another shape": (corrupt_moment_shape, "shape"),
    "fp16 moment": (corrupt_moment_dtype, "float16"),
    "missing exp_avg_sq": (corrupt_missing_exp_avg_sq, "exp_avg_sq"),
    "c=5.0": (corrupt_c, "c=5.0"),
    "eta=NaN": (corrupt_eta_nan, "eta=nan"),
    "eta<0": (corrupt_eta_negative, "eta="),
    "t=3.5": (corrupt_t_float, "t=3.5"),
    "meta-device moment": (corrupt_meta_device, "meta"),
    "NaN moment": (corrupt_nan_moment, "non-finite"),
    "format from the future": (corrupt_future_format, "format 99"),
    "unknown state key": (corrupt_unknown_state_key, "'step'"),
    "negative group weight_decay": (corrupt_group_weight_decay, "weight_decay"),
    "counter missing": (corrupt_counters, "rejected"),
    "parameter listed twice": (corrupt_duplicate_index, "twice"),
    "unrepresentable growth": (corrupt_growth, "growth"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_raises_and_changes_nothing(name):
    corrupt, match = CORRUPTIONS[name]
    _, source = trained(weight_decay=0.01)
    sd = copy.deepcopy(source.state_dict())
    corrupt(sd)
    _, opt = trained(steps=2)                       # a different, live state
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("where", ["param_groups[0] (format 2)", "top level (format 1)"])
def test_a_host_state_that_is_not_a_dict_is_refused_in_either_format(where):
    _, source = trained()
    sd = copy.deepcopy(source.state_dict())
    if where.startswith("top"):
        sd["param_groups"][0].pop("alsals")
        sd["alsals"] = [("eta", 0.1)]                  # dict() would accept a list of pairs
    else:
        sd["param_groups"][0]["alsals"] = [("eta", 0.1)]
    _, opt = trained(steps=2)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="the host state is a list, not a dict"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


def test_the_format_is_versioned_and_the_host_state_lives_in_param_groups():
    _, opt = trained()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    host = sd["param_groups"][0]["alsals"]
    assert host["format"] == 2 and host["t"] == opt.t and host["eta"] == opt.eta
    assert isinstance(host["h"], float) and host["h"] == float(opt._h)


def _resume_from(saved, backend="foreach"):
    resumed = OddModel(seed=99)
    resumed.load_state_dict(saved["model"])
    opt = ALSALS(resumed.groups(), variant="salsa", backend=backend, init_step_size=1.0)
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    data = [make_data(seed=s) for s in range(3)]
    for k in range(6, 12):
        x, y = data[k % 3]
        opt.zero_grad()
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(resumed(x), y))
    return resumed, opt


def test_a_format_1_checkpoint_of_the_first_release_resumes_as_it_did():
    """The first release's run continued from its checkpoint (``after``, written on another
    machine): the same decisions (eta, t, counters exactly) and the same parameters up to the
    last-bit differences of CPU kernels between machines (oneDNN/ATen pick their kernels by CPU
    model, so float results are not bit-portable; seen: 1 ulp on an AMD EPYC)."""
    saved = torch.load(os.path.join(DATA, "ckpt_v1.pt"), weights_only=False)
    assert "alsals" in saved["opt"] and "format" not in saved["opt"]["alsals"]   # really format 1
    model, opt = _resume_from(saved)
    after = saved["after"]
    for a, b in zip(model.parameters(), after["params"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)
    assert (opt.eta, opt.t, opt.counters) == (after["eta"], after["t"], after["counters"])


def test_a_format_1_checkpoint_resumes_bit_identically_to_its_format_2_resave():
    """On one machine: loading the format-1 checkpoint gives exactly the state that its
    format-2 re-save carries (every later step bit-identical)."""
    saved = torch.load(os.path.join(DATA, "ckpt_v1.pt"), weights_only=False)
    probe = ALSALS(OddModel(seed=99).groups(), variant="salsa", backend="foreach", init_step_size=1.0)
    probe.load_state_dict(saved["opt"])
    resaved = dict(saved, opt=probe.state_dict())
    assert resaved["opt"]["param_groups"][0]["alsals"]["format"] == 2
    from_v1, opt_v1 = _resume_from(saved)
    from_v2, opt_v2 = _resume_from(resaved)
    for a, b in zip(from_v1.parameters(), from_v2.parameters()):
        assert torch.equal(a, b)
    assert (opt_v1.eta, opt_v1.t, opt_v1.counters) == (opt_v2.eta, opt_v2.t, opt_v2.counters)


def test_step_without_a_closure_on_zero_gradients_only_creates_state():
    """What torch.distributed.checkpoint's get/set_optimizer_state_dict do to a fresh optimizer."""
    model = OddModel()
    opt = ALSALS(model.groups(), init_step_size=0.3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert len(opt.state) == len(list(model.parameters()))
    assert all(torch.equal(s["exp_avg"], torch.zeros_like(s["exp_avg"])) for s in opt.state.values())
    assert (opt.t, opt.eta, opt.counters["steps"]) == (0, 0.3, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    for p in model.parameters():            # any other step() without a closure still explains
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="def closure"):
        opt.step()


# -- extreme settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_non_searching_step_that_would_overflow_does_not_write(backend):
    w = torch.nn.Parameter(torch.full((4,), 50000.0, dtype=torch.float16))
    opt = ALSALS([w], backend=backend, init_step_size=1e4, line_search_every=1000)
    for _ in range(4):                      # t=1 searches (its trial overflows: rejected); then none
        opt.zero_grad()
        opt.step(lambda: (w.float() - 1e6).pow(2).sum() * 1e-12)
        assert torch.isfinite(w).all(), w
    assert opt.counters["skipped"] == 0     # and training is not stuck skipping every step


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_searching_candidate_that_overflows_is_never_accepted(backend):
    # A loss that reads an overflowed element as its target: the trial loss is finite and lower
    # although the candidate holds inf.
    w = torch.nn.Parameter(torch.tensor([1.0, 60000.0], dtype=torch.float16))
    opt = ALSALS([w], backend=backend, init_step_size=1e4, max_trials=3)
    target = torch.tensor([0.0, 1e6])

    def closure():
        finite = torch.where(torch.isfinite(w), w.float(), target)
        return ((finite - target) ** 2).sum() * 1e-12

    opt.step(closure)
    assert torch.isfinite(w).all(), w


@pytest.mark.parametrize("kwargs, name", [
    ({"growth": 1e38}, "growth"), ({"init_step_size": 1e38}, "init_step_size"),
    ({"init_step_size": 1e-40}, "init_step_size"), ({"init_step_size": 1e29, "growth": 100.0}, "growth"),
])
def test_step_sizes_a_search_cannot_represent_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}=.*accepted"):
        ALSALS([torch.nn.Parameter(torch.zeros(3))], memory_efficient=True, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_memory_efficient_with_the_largest_step_size_never_leaves_nan(backend):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = ALSALS(m.parameters(), backend=backend, memory_efficient=True, max_trials=3,
                 init_step_size=9e29, growth=1.1)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(m(x), y))
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert opt.counters["rejected"] >= 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("change", ["new storage", "view in place"])
def test_a_parameter_whose_shape_changed_fails_before_any_write(backend, change):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = ALSALS([a, b], backend=backend)
    opt.step(lambda: (a.sum() + b.sum()) ** 2)
    a0, state0 = a.detach().clone(), copy.deepcopy(opt.state[a])
    b.data = torch.ones(4) if change == "new storage" else b.data.view(2, 1)
    opt.zero_grad()
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        opt.step(lambda: (a.sum() + b.sum()) ** 2)
    assert torch.equal(a.detach(), a0)
    assert all(torch.equal(opt.state[a][n], state0[n]) for n in state0)


def plateau_trained(steps=15):
    """alsals_plateau with a plateau test every 2 steps, so that its state holds drops and losses."""
    return trained(steps=steps, variant="alsals_plateau", plateau=dict(drop_min_samples=3, drop_every=2))


def _plateau(sd):
    return host_of(sd)["plateau"]


PLATEAU_CORRUPTIONS = {
    "missing total": (lambda sd: _plateau(sd).pop("total"), "missing keys \\['total'\\]"),
    "NaN loss": (lambda sd: _plateau(sd)["losses"][0].__setitem__(1, math.nan), r"plateau\['losses'\]\[0\]\[1\]"),
    "steps out of order": (lambda sd: _plateau(sd)["losses"].reverse(), "steps must increase"),
    "a loss after t": (lambda sd: _plateau(sd)["losses"][-1].__setitem__(0, 10 ** 6), "steps must increase"),
    "more losses than counted": (lambda sd: _plateau(sd).__setitem__("total", 1), "at most"),
    "a loss that is not a pair": (lambda sd: _plateau(sd)["losses"].__setitem__(0, [1.0]), r"\[step, loss\]"),
    "drops=-1": (lambda sd: _plateau(sd).__setitem__("drops", -1), "drops"),
    "drop_factor=1": (lambda sd: host_of(sd)["hyper"].__setitem__("drop_factor", 1.0), "drop_factor"),
    # a saved None is read as None, not replaced by the variant's default (2.0)
    "drop_factor=None": (lambda sd: host_of(sd)["hyper"].__setitem__("drop_factor", None),
                         "plateau test, and its hyperparameters have drop_factor=None"),
    "first_backtrack_on_rise above first_backtrack": (
        lambda sd: host_of(sd)["hyper"].__setitem__("first_backtrack_on_rise", 0.75), "first_backtrack_on_rise"),
}


@pytest.mark.parametrize("name", list(PLATEAU_CORRUPTIONS))
def test_a_corrupt_plateau_test_raises_and_changes_nothing(name):
    corrupt, match = PLATEAU_CORRUPTIONS[name]
    _, source = plateau_trained()
    sd = copy.deepcopy(source.state_dict())
    assert _plateau(sd)["drops"] > 0 and len(_plateau(sd)["losses"]) > 2
    corrupt(sd)
    _, opt = plateau_trained(steps=5)
    snap, plateau = snapshot(opt), copy.deepcopy(opt._plateau.state())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    assert opt._plateau.state() == plateau


def test_a_plateau_checkpoint_without_its_test_resumes_with_an_empty_one():
    """A checkpoint without the "plateau" entry (as written before the variant had one) loads
    with no loss kept and no drop; the searches go on until the first drop."""
    _, source = plateau_trained(steps=3)
    sd = copy.deepcopy(source.state_dict())
    del host_of(sd)["plateau"]
    _, opt = plateau_trained(steps=1)
    opt.load_state_dict(sd)
    assert opt._plateau.drops == 0 and len(opt._plateau) == 0 and opt.t == 3


def test_a_plateau_test_on_a_variant_without_drops_is_refused():
    _, source = plateau_trained()
    sd = copy.deepcopy(source.state_dict())
    _, opt = trained(steps=2)
    with pytest.raises(ValueError, match="variant='alsals_plateau'"):
        opt.load_state_dict(sd)


def test_a_checkpoint_of_another_variant_is_refused_with_the_variant_to_pass():
    """A run saved under another variant (for example the previous default) names the
    variant= that resumes it, and the optimizer is left as it was."""
    _, source = trained()                                       # variant="salsa"
    sd = copy.deepcopy(source.state_dict())
    _, opt = plateau_trained(steps=3)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"ALSALS\(\.\.\., variant='salsa'\)"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
