"""Driver behaviour shared by every backend: errors, safety, schedules, replay and state.

Parametrized over the CPU backends; the fused backends' test modules reuse these checks.
"""
import copy
import io
import math

import pytest
import torch

from alsals_fused import ALSALS, BackendUnavailable
from helpers import OddModel, make_data

CPU_BACKENDS = ["reference", "foreach"]


def mse_closure(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def flat(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


# -- argument validation --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"variant": "adam"}, "variant"), ({"init_step_size": 0}, "init_step_size"),
    ({"init_step_size": math.inf}, "init_step_size"), ({"c": 1.0}, "c"), ({"c": 0}, "c"),
    ({"betas": (0.9, 1.0)}, "betas"), ({"betas": (0.9,)}, "betas"), ({"eps": 0.0}, "eps"),
    ({"smoothing": 1.0}, "smoothing"), ({"growth": 0.99}, "growth"), ({"backtrack": 1.0}, "backtrack"),
    ({"max_trials": 0}, "max_trials"), ({"max_trials": 2.5}, "max_trials"),
    ({"line_search_every": 0}, "line_search_every"), ({"line_search_every": "sometimes"}, "line_search_every"),
    ({"weight_decay": -1e-3}, "weight_decay"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"memory_efficient": "yes"}, "memory_efficient"), ({"backend": "cudnn"}, "backend"),
])
def test_invalid_arguments_name_the_argument_and_the_range(kwargs, name):
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=rf"{name}=.*accepted"):
        ALSALS([w], **kwargs)


def test_invalid_group_weight_decay():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="weight_decay"):
        ALSALS([{"params": [w], "weight_decay": -1.0}])


def test_variant_defaults_and_explicit_overrides():
    w = torch.nn.Parameter(torch.zeros(3))
    assert ALSALS([w]).hyper.c == 0.5 and ALSALS([w]).hyper.smoothing == 0.99
    sls = ALSALS([w], variant="adam_sls")
    assert (sls.hyper.c, sls.hyper.smoothing, sls.hyper.growth) == (0.1, 0.0, 2 ** (1 / 500))
    assert ALSALS([w], variant="salsa").hyper.line_search_every == "auto"
    assert ALSALS([w], variant="salsa", line_search_every=3, c=0.2).hyper.line_search_every == 3


def test_memory_efficient_rejects_16_bit_params():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="memory_efficient=True supports fp32 and fp64"):
        ALSALS([w], memory_efficient=True)


def test_integer_params_rejected():
    with pytest.raises(ValueError, match="real floating point"):
        ALSALS([torch.zeros(3, dtype=torch.int64)])


def test_step_without_closure_shows_the_pattern():
    opt = ALSALS([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="def closure"):
        opt.step()


@pytest.mark.parametrize("value, exc, match", [
    (1.5, TypeError, "must return the loss as a torch.Tensor"),
    (torch.ones(2, requires_grad=True), ValueError, "scalar loss"),
])
def test_closure_must_return_a_scalar_tensor(value, exc, match):
    opt = ALSALS([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(exc, match=match):
        opt.step(lambda: value)


def test_loss_without_grad_is_explained():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w])
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda: w.detach().sum())


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ALSALS(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum())


def test_unavailable_backend_says_why():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w], backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend='cuda' cannot run on cpu"):
        opt.step(lambda: (w ** 2).sum())


# -- non-finite losses and gradients, raising closures ---------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_non_finite_step_is_skipped_entirely(backend, poison):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend)
    opt.step(mse_closure(model, x, y))
    state = copy.deepcopy(opt.state_dict()["state"])
    before, eta, t = flat(model), opt.eta, opt.t

    def bad():
        loss = torch.nn.functional.mse_loss(model(x), y)
        if poison == "loss":
            return loss + float("nan")
        # A finite loss with an infinite gradient: d sqrt(x)/dx at x = 0.
        return loss + torch.sqrt(model.scale - model.scale.detach()).sum()

    opt.zero_grad()
    if poison == "grad":
        assert torch.isfinite(bad()) and not torch.isfinite(torch.autograd.grad(bad(), model.scale)[0]).all()
        opt.zero_grad()
    opt.step(bad)
    assert torch.equal(flat(model), before)
    assert (opt.eta, opt.t, opt.counters["skipped"]) == (eta, t, 1)
    assert opt.last_step.skipped and not opt.last_step.accepted
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[n], state[k][n]) for n in ("exp_avg", "exp_avg_sq"))
    opt.zero_grad()
    opt.step(mse_closure(model, x, y))     # and training goes on
    assert opt.t == t + 1 and not torch.equal(flat(model), before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_on_a_non_searching_step_is_absorbed_at_the_next_search(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend, line_search_every=2)
    opt.step(mse_closure(model, x, y))                  # t=1 searches
    before, reads = flat(model), opt.reads
    opt.zero_grad()
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y) * float("nan"))   # t=2: no search
    assert torch.equal(flat(model), before) and opt.reads == reads   # skipped on the device, no read
    opt.zero_grad()
    opt.step(mse_closure(model, x, y))                  # t=3 (host); learns of the skip
    assert opt.counters["skipped"] == 1 and opt.t == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_trial_losses_backtrack_and_never_stay(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend, init_step_size=0.05)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss * float("nan") if calls["n"] in (2, 3) else loss   # trials 1 and 2 are NaN

    opt.step(closure)
    assert opt.last_step.trials == 3 and opt.last_step.accepted
    assert opt.eta == pytest.approx(0.05 / 0.999 * 0.9 ** 2)
    assert torch.isfinite(flat(model)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("raise_at", [1, 3])
def test_closure_raising_mid_search_restores_w0_eta_and_rng(backend, raise_at):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend)
    opt.step(mse_closure(model, x, y))
    before, eta, t = flat(model), opt.eta, opt.t
    torch.manual_seed(5)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 1 + raise_at:
            raise KeyError("data loader died")
        loss = torch.nn.functional.mse_loss(model(x), y)   # dropout draws from the CPU generator
        return loss if calls["n"] == 1 else loss + 1.0     # trials look worse: keep backtracking

    opt.zero_grad()
    with pytest.raises(KeyError, match="data loader died"):
        opt.step(closure)
    assert torch.equal(flat(model), before)
    assert opt.eta == eta and opt.param_groups[0]["lr"] == eta
    assert opt.t == t + 1, "m, v and t keep this step's update"
    # The generator is where the gradient forward left it.
    torch.manual_seed(5)
    model(x)
    expected = torch.rand(3)
    torch.manual_seed(5)
    opt.zero_grad()
    calls["n"] = 0
    with pytest.raises(KeyError):
        opt.step(closure)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_rejected_search_returns_to_w0(backend, memory_efficient):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend, max_trials=3, memory_efficient=memory_efficient)
    before = flat(model)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss if calls["n"] == 1 else loss + 1.0    # every trial looks worse

    opt.step(closure)
    assert not opt.last_step.accepted and opt.last_step.trials == 3
    assert opt.counters["rejected"] == 1 and opt.t == 1
    assert opt.eta == 0.1, "spec guard 2: a rejected step returns eta to its pre-step value"
    assert opt.param_groups[0]["lr"] == opt.last_step.eta == 0.1
    torch.testing.assert_close(flat(model), before, rtol=0, atol=0 if not memory_efficient else 1e-6)
    assert any(s["exp_avg"].abs().sum() > 0 for s in opt.state.values())


# -- reads, schedules, telemetry --------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_read_per_trial_and_none_without_search(backend):
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), backend=backend, line_search_every=2, init_step_size=5.0)
    for _ in range(4):
        reads = opt.reads
        opt.zero_grad()
        opt.step(mse_closure(model, x, y))
        info = opt.last_step
        assert opt.reads - reads == info.trials
        assert info.searched == (info.trials > 0)
        assert opt.param_groups[0]["lr"] == opt.eta == info.eta
    assert [opt.counters[k] for k in ("steps", "searches")] == [4, 2]


def test_a_deferred_skip_does_not_make_two_searches_in_a_row():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), line_search_every=3)
    searched = []
    for k in range(8):
        opt.zero_grad()
        nan = float("nan") if k == 1 else 1.0   # the second step is skipped on the device
        opt.step(lambda nan=nan: torch.nn.functional.mse_loss(model(x), y) * nan)
        searched.append(opt.last_step.searched)
    assert opt.counters["skipped"] == 1
    assert not any(a and b for a, b in zip(searched, searched[1:])), searched
    assert searched == [True, False, False, True, False, False, True, False]


def test_memory_efficient_refuses_an_unrecoverable_eta_times_weight_decay():
    w = torch.nn.Parameter(torch.ones(3))
    opt = ALSALS([w], memory_efficient=True, weight_decay=1.0, init_step_size=1.0)
    with pytest.raises(ValueError, match="eta\\*weight_decay"):
        opt.step(lambda: (w ** 2).sum())
    assert torch.equal(w.detach(), torch.ones(3))


def test_line_search_every_k_searches_at_1_k_plus_1():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), line_search_every=3)
    searched = []
    for _ in range(7):
        eta = opt.eta
        opt.step(mse_closure(model, x, y))
        searched.append(opt.last_step.searched)
        if not opt.last_step.searched:
            assert opt.eta == eta, "no growth without a search"
    assert searched == [True, False, False, True, False, False, True]


def test_auto_interval_formula():
    opt = ALSALS([torch.nn.Parameter(torch.zeros(1))])
    for fast, slow, want in [(1.0, 1.0, 10), (1.1, 1.0, 10), (1.5, 1.0, 2), (1.0, 1.5, 2),
                             (1.25, 1.0, 4), (3.0, 1.0, 1), (1.0001, 1.0, 10)]:
        opt._fast, opt._slow = fast, slow
        assert opt._auto_interval() == want, (fast, slow)


def test_auto_schedule_searches_every_step_up_to_t_10_then_by_the_rule():
    model = OddModel()
    x, y = make_data()
    opt = ALSALS(model.parameters(), variant="salsa")
    pattern, etas = [], []
    for _ in range(40):
        opt.zero_grad()
        opt.step(mse_closure(model, x, y))
        pattern.append(opt.last_step.searched)
        etas.append(opt.eta)
    # Re-derive the pattern from the recorded step sizes with section 3's rule, by hand.
    fast = slow = None
    last, want = 0, []
    for t, eta in enumerate(etas, start=1):
        if t <= 10 or fast is None:
            search = True
        else:
            r = fast / slow
            r = 1 / r if r < 1 else r
            interval = 10 if r == 1 else min(10, max(1, int(1 / (r - 1) + 0.5)))
            search = t - last >= interval
        want.append(search)
        if search:
            fast = eta if fast is None else 0.9 * fast + 0.1 * eta
            slow = eta if slow is None else 0.99 * slow + 0.01 * eta
            last = t
    assert pattern == want
    assert all(pattern[:10]) and not all(pattern[10:]), "a steady eta should thin the searches out"
    assert opt.counters["searches"] == sum(pattern)


# -- RNG replay, buffers ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trial_forwards_see_the_gradient_forwards_random_numbers(backend):
    w = torch.nn.Parameter(torch.ones(4))
    opt = ALSALS([w], backend=backend, init_step_size=20.0)   # several trials
    draws = []

    def closure():
        r = torch.rand(4)
        draws.append(r)
        return ((w - r) ** 2).sum()

    torch.manual_seed(123)
    opt.step(closure)
    assert opt.last_step.trials > 2
    assert all(torch.equal(d, draws[0]) for d in draws)
    after = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(4)
    assert torch.equal(torch.rand(1), after), "the generator continues after one forward's draws"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batchnorm_running_stats_see_only_the_gradient_forward(backend):
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))

    x, y = torch.randn(16, 5), torch.randn(16, 1)
    model = make()
    opt = ALSALS(model.parameters(), backend=backend, init_step_size=20.0, buffers=model)
    opt.step(mse_closure(model, x, y))
    assert opt.last_step.trials > 1
    reference = make()
    reference(x)                                    # one training-mode forward
    for got, want in zip(model.buffers(), reference.buffers()):
        assert torch.equal(got, want)
    unprotected = make()
    ALSALS(unprotected.parameters(), backend=backend, init_step_size=20.0).step(mse_closure(unprotected, x, y))
    assert not torch.equal(unprotected[1].running_mean, reference[1].running_mean)


# -- state_dict ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["alsals", "salsa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(backend, variant, dtype):
    data = [make_data(dtype=dtype, seed=s) for s in range(3)]

    def train(model, opt, steps, start):
        for k in range(start, start + steps):
            x, y = data[k % 3]
            opt.zero_grad()
            opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x).float(), y.float()))

    torch.manual_seed(0)
    model = OddModel(dtype)
    opt = ALSALS(model.groups(), backend=backend, variant=variant, init_step_size=1.0)
    train(model, opt, 12, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    train(model, opt, 12, 12)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = OddModel(dtype, seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = ALSALS(resumed.groups(), backend=backend, variant=variant, init_step_size=1.0)
    opt2.load_state_dict(saved["opt"])
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt2.state.values()), "moments stay fp32"
    torch.set_rng_state(saved["rng"])
    train(resumed, opt2, 12, 12)
    assert torch.equal(flat(model), flat(resumed))
    assert (opt.eta, opt.t, opt.counters) == (opt2.eta, opt2.t, opt2.counters)
    assert torch.equal(opt._ctl, opt2._ctl), "h, s, pending skips and the step's slots agree"


def test_load_state_dict_restores_hyperparameters_as_torch_optimizers_do():
    w = torch.nn.Parameter(torch.ones(3))
    saved = ALSALS([w], c=0.2, max_trials=7, betas=(0.8, 0.99)).state_dict()
    opt = ALSALS([w])
    opt.load_state_dict(saved)
    assert (opt.hyper.c, opt.hyper.max_trials, opt.hyper.betas) == (0.2, 7, (0.8, 0.99))


def test_load_state_dict_rejects_foreign_or_mismatched_dicts():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = ALSALS([w])
    with pytest.raises(ValueError, match="not saved by ALSALS"):
        opt.load_state_dict(torch.optim.Adam([w]).state_dict())
    with pytest.raises(ValueError, match="variant"):
        opt.load_state_dict(ALSALS([w], variant="salsa").state_dict())


# -- dtypes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, moment", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_moment_dtypes(dtype, moment):
    model = OddModel(dtype)
    x, y = make_data(dtype=dtype)
    opt = ALSALS(model.parameters())
    opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y.float()))
    assert all(s["exp_avg"].dtype == moment == s["exp_avg_sq"].dtype for s in opt.state.values())
    assert all(p.dtype == dtype for p in model.parameters())


def test_gradient_clipping_matches_clip_grad_norm():
    # One step without a search: params = w0 - eta * m_hat*p, and at t=1 m_hat*p = g/(|g|+eps)
    # is invariant to scaling g, so compare moments instead: m = (1-b1) * clipped g.
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = ALSALS([w], max_grad_norm=1.0)
    opt.step(lambda: (w * torch.tensor([1.0, 1.0])).pow(2).sum() / 2)   # g = w, |g| = 5
    want = torch.tensor([3.0, -4.0]) / (5 + 1e-6) * 0.1
    torch.testing.assert_close(opt.state[w]["exp_avg"], want)
