"""Odd inputs that must raise a clear error with nothing changed, or continue correctly.

Loss values the line search cannot compare (int, bool, complex, meta) on every path; checkpoints
the constructor would refuse, corrupt format-1 scalars, moments that carry autograd history; the
shape of ``last_step.loss``.
"""
import copy
import importlib.util
import os
import warnings

import pytest
import torch

from alsals_fused import ALSALS
from alsals_fused._types import check_loss_value
from alsals_fused.checkpoint import CheckpointError
from helpers import OddModel

CPU_BACKENDS = ["reference", "foreach"]
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
NO_TRITON = importlib.util.find_spec("triton") is None


BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(
    NO_TRITON, reason="triton not installed"))]

BAD_LOSSES = {
    "int": lambda loss: loss.detach().round().long(),
    "bool": lambda loss: loss.detach() > 0,
    "complex": lambda loss: torch.complex(loss.detach(), torch.zeros_like(loss.detach())),
    "meta": lambda loss: torch.empty((), device="meta"),
}
BAD_MATCH = r"(floating-point|meta device)"


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    gen = torch.Generator().manual_seed(seed)
    return model, torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- loss values the search cannot compare ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(BAD_LOSSES))
def test_a_trial_loss_of_a_bad_type_is_refused_with_the_parameters_at_w0(backend, kind):
    model, x, y = _model_and_data()
    opt = ALSALS(model.parameters(), backend=backend, init_step_size=10.0)
    w0 = _params(model)
    eta0 = opt.eta
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss if calls["n"] == 1 else BAD_LOSSES[kind](loss)

    opt.zero_grad()
    with pytest.raises(TypeError, match=BAD_MATCH) as info:
        opt.step(closure)
    assert "trial forward" in str(info.value)
    assert calls["n"] == 2, "refused at the first trial"
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert opt.eta == eta0


@pytest.mark.parametrize("kind", list(BAD_LOSSES))
def test_a_gradient_forward_loss_of_a_bad_type_gets_the_same_error(kind):
    model, x, y = _model_and_data()
    opt = ALSALS(model.parameters(), backend="foreach")
    w0 = _params(model)

    opt.zero_grad()
    closure = lambda: BAD_LOSSES[kind](torch.nn.functional.mse_loss(model(x), y))  # noqa: E731
    with pytest.raises(TypeError, match=BAD_MATCH) as info:
        opt.step(closure)
    assert "gradient forward" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert opt.t == 0 and not opt.state


@pytest.mark.parametrize("kind", list(BAD_LOSSES))
def test_check_loss_value_refuses_what_the_search_cannot_compare(kind):
    """The check mb.loss gets too (the user-gradient path calls it)."""
    with pytest.raises(TypeError, match=BAD_MATCH):
        check_loss_value(BAD_LOSSES[kind](torch.tensor(1.5)), "mb.loss")
    check_loss_value(torch.tensor(1.5, dtype=torch.bfloat16), "mb.loss")      # accepted


@pytest.mark.parametrize("kind", ["int", "bool", "complex"])
def test_a_bad_mb_loss_is_refused_and_its_gradient_breaks_the_window(kind):
    """The block's backward has run: p.grad holds a gradient without a loss, so step() refuses
    the window until zero_grad() (a retried block would add its gradient a second time)."""
    model, x, y = _model_and_data()
    opt = ALSALS(model.parameters(), backend="foreach")
    opt.zero_grad()
    with pytest.raises(TypeError, match=BAD_MATCH):
        with opt.micro_batch(trial=lambda: torch.nn.functional.mse_loss(model(x), y)) as mb:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            mb.loss = BAD_LOSSES[kind](loss)
    with pytest.raises(RuntimeError, match="micro_batch block of this gradient window raised TypeError"):
        opt.step()
    opt.zero_grad()
    assert opt._window is None          # a later micro-batch captures its own random numbers


@pytest.mark.parametrize("kind", ["int", "bool"])
def test_a_micro_batch_trial_of_a_bad_type_is_refused_before_its_scale_hides_it(kind):
    model, x, y = _model_and_data()
    opt = ALSALS(model.parameters(), backend="foreach", init_step_size=10.0)
    w0 = _params(model)

    def trial():
        return BAD_LOSSES[kind](torch.nn.functional.mse_loss(model(x), y))
    opt.zero_grad()
    with opt.micro_batch(trial=trial, scale=0.5) as mb:   # an int times 0.5 is a float
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mb.loss = loss
    with pytest.raises(TypeError, match=BAD_MATCH):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


# -- last_step.loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_last_step_loss_is_0_dim_for_a_1x1_loss(backend):
    model, x, y = _model_and_data()
    opt = ALSALS(model.parameters(), backend=backend, line_search_every=2)
    for _ in range(2):                                  # a searching and a non-searching step
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y).reshape(1, 1))
        assert opt.last_step.loss.shape == ()


# -- checkpoints ----------------------------------------------------------------------------------

def _trained(dtype=torch.float32, steps=3, **kw):
    model, x, y = _model_and_data()
    model = model.to(dtype)
    opt = ALSALS(model.parameters(), backend="foreach", **kw)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).float())
    return model, opt


def _state(opt):
    return (copy.deepcopy(opt.state_dict()), opt.eta, opt.t, opt.hyper)


def _assert_same(opt, before):
    sd, eta, t, hyper = before
    now = opt.state_dict()
    assert (opt.eta, opt.t, opt.hyper) == (eta, t, hyper)
    for k, s in sd["state"].items():
        for n, v in s.items():
            assert torch.equal(now["state"][k][n], v), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_memory_efficient_checkpoint_is_refused_for_low_precision_params(dtype):
    _, source = _trained(memory_efficient=True)
    _, opt = _trained(dtype)
    before = _state(opt)
    with pytest.raises(CheckpointError, match="memory_efficient=True"):
        opt.load_state_dict(source.state_dict())
    _assert_same(opt, before)
    assert not opt.hyper.memory_efficient


@pytest.mark.parametrize("corrupt", ["meta", "complex", "bool", "two values"])
@pytest.mark.parametrize("key", ["h", "s", "pending_skips"])
def test_corrupt_format_1_scalars_raise_the_checkpoint_error_naming_them(key, corrupt):
    saved = torch.load(os.path.join(DATA, "ckpt_v1.pt"), weights_only=False)["opt"]
    value = {"meta": torch.empty((), dtype=torch.float64, device="meta"),
             "complex": torch.tensor(0.5 + 1j), "bool": torch.tensor(True),
             "two values": torch.zeros(2, dtype=torch.float64)}[corrupt]
    saved = dict(saved, alsals=dict(saved["alsals"], **{key: value}))
    opt = ALSALS(OddModel(seed=99).groups(), variant="salsa", backend="foreach", init_step_size=1.0)
    with pytest.raises(CheckpointError, match=rf"\b{key}\b"):
        opt.load_state_dict(saved)
    assert opt.t == 0 and not opt.state


def test_moments_that_require_grad_are_loaded_detached():
    model, opt = _trained()
    _, x, y = _model_and_data()
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        for v in s.values():
            v.requires_grad_(True)
    opt.load_state_dict(sd)
    for s in opt.state.values():
        for v in s.values():
            assert v.grad_fn is None and not v.requires_grad
    copy.deepcopy(opt.state_dict())                     # raised for a non-leaf tensor
    opt.zero_grad()
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))


# -- Lightning manual optimization: the message for a closure the adapter does not know ---------

def _manual_module(through_wrapper):
    import lightning.pytorch as pl

    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 2)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers() if through_wrapper else self.optimizers().optimizer
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return ALSALS(self.parameters())

    return Manual()


@pytest.mark.parametrize("through_wrapper", [True, False])
def test_lightning_manual_optimization_gets_a_fix_that_works(tmp_path, through_wrapper):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    _, x, y = _model_and_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    module = _manual_module(through_wrapper)
    if through_wrapper:
        with pytest.raises(RuntimeError, match="manual optimization") as info:
            trainer.fit(module, loader)
        assert "use manual optimization" not in str(info.value)      # the user already does
        assert "self.optimizers().optimizer" in str(info.value)
    else:                                                            # the fix the message gives
        trainer.fit(module, loader)
        assert trainer.optimizers[0].t == 2


# -- memory layouts on the fused backends ---------------------------------------------------------

def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(64, 2))


def _conv_steps(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)
    trials = []
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        trials.append(opt.last_step.trials)
    return trials


@pytest.mark.skipif(NO_TRITON, reason="no triton")
@pytest.mark.parametrize("how", ["model.to(channels_last) mid-run", "contiguous checkpoint"])
def test_triton_moments_follow_the_parameters_memory_layout(how):
    runs = {}
    for backend in ("triton", "foreach"):
        model = _conv_net()
        opt = ALSALS(model.parameters(), backend=backend, init_step_size=1.0)
        trials = _conv_steps(model, opt, 2)
        if how == "contiguous checkpoint":
            saved = opt.state_dict()
            model = _conv_net().to(memory_format=torch.channels_last)
            with torch.no_grad():
                for p, q in zip(model.parameters(), _conv_net().parameters()):
                    p.copy_(q)
            opt = ALSALS(model.parameters(), backend=backend, init_step_size=1.0)
            opt.load_state_dict(saved)
            _conv_steps(model, opt, 2)                       # the same 2 steps again from the start
        else:
            model.to(memory_format=torch.channels_last)
        assert model[0].weight.stride() != (27, 9, 3, 1), "the layout really changed"
        trials += _conv_steps(model, opt, 3, seed=1)
        assert opt.state[model[0].weight]["exp_avg"].stride() == model[0].weight.stride()
        runs[backend] = (trials, [p.detach().clone() for p in model.parameters()], opt.chosen_backends)
    (t_tri, p_tri, chosen), (t_fe, p_fe, _) = runs["triton"], runs["foreach"]
    assert set(chosen.values()) == {"triton"}, "the fused backend kept the bucket"
    assert t_tri == t_fe
    for a, b in zip(p_tri, p_fe):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(NO_TRITON, reason="no triton")
def test_what_triton_cannot_take_runs_on_foreach_with_one_warning():
    def strided():                                       # a non-dense view: no kernel walks it
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(6, 8)[:, ::2])

    runs = {}
    for backend in ("triton", "foreach"):
        w = strided()
        assert w.stride() == (8, 2)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
        opt = ALSALS([w], backend=backend, init_step_size=1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                opt.step(lambda x=x, w=w: ((x @ w) ** 2).mean())
        runs[backend] = (w.detach().clone(), opt.chosen_backends,
                         [str(c.message) for c in caught if "cannot take" in str(c.message)])
    (w_tri, chosen, warned), (w_fe, _, none) = runs["triton"], runs["foreach"]
    assert set(chosen.values()) == {"foreach"}
    assert len(warned) == 1 and "backend='triton'" in warned[0] and not none
    torch.testing.assert_close(w_tri, w_fe, rtol=0, atol=0)


# -- a closure that changes the model during a trial ---------------------------------------------

@pytest.mark.parametrize("switch", ["eval", "train"])
def test_a_closure_that_switches_train_eval_in_a_trial_is_refused_at_w0(switch):
    """With buffers=model the optimizer knows the model: a trial forward that runs another mode
    (dropout off, batch statistics) than the gradient forward would be compared with L0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    model.train(switch == "eval")
    model[1].train()                   # dropout active either way: the gradient forward's mode
    _, x, y = _model_and_data()
    opt = ALSALS(model.parameters(), backend="foreach", buffers=model, init_step_size=10.0)
    w0, calls = _params(model), {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            getattr(model, switch)()
        return torch.nn.functional.mse_loss(model(x), y)

    opt.zero_grad()
    with pytest.raises(RuntimeError, match="switched between train"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert opt.eta == 10.0


# -- a compiled model, and a long "auto" run -----------------------------------------------------

def test_a_compiled_model_that_recompiles_inside_trials_follows_the_eager_trajectory():
    """torch.compile guards on the grad mode and the input shapes, so the first no-grad trial and
    every new batch shape recompile inside step(); the dropout replay and the decisions must not
    notice (aot_eager: dynamo's guards and recompiles without a C++ build)."""
    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 1))
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = ALSALS(model.parameters(), backend="foreach")
        x = torch.randn(32, 8)
        y = x[:, :1].sin()
        torch.manual_seed(1)
        seen = []
        for i in range(6):
            n = 32 if i % 2 == 0 else 16
            opt.zero_grad()
            opt.step(lambda n=n: torch.nn.functional.mse_loss(forward(x[:n]), y[:n]))
            seen.append((float(opt.last_step.loss), opt.eta, opt.last_step.trials))
        return seen, [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    eager, eager_params = run(False)
    compiled, compiled_params = run(True)
    assert compiled == eager
    assert all(torch.equal(a, b) for a, b in zip(eager_params, compiled_params))


@pytest.mark.slow   # 10^5 steps, about a minute
def test_a_long_auto_run_keeps_its_state_bounded_and_its_counters_exact():
    import gc
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = ALSALS([w], variant="salsa", backend="foreach")          # line_search_every="auto"
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0])
    steps, sizes = 100_000, []
    for i in range(1, steps + 1):
        idx = torch.randint(0, 64, (8,))
        opt.zero_grad()
        opt.step(lambda idx=idx: ((x[idx] @ w - y[idx]) ** 2).mean())
        if i in (1_000, steps):
            gc.collect()
            sizes.append((len(gc.get_objects()), len(repr(opt.state_dict()["param_groups"][0]["alsals"]))))
    c = opt.counters
    assert opt.t == c["steps"] == steps and c["skipped"] == c["rejected"] == 0
    assert c["trials"] >= c["searches"] > 0 and c["searches"] < steps / 2      # "auto" searched rarely
    assert sizes[1][0] - sizes[0][0] < 100            # no per-step growth of live Python objects
    assert sizes[1][1] - sizes[0][1] < 32             # the host state stays a few numbers
    resumed = ALSALS([torch.nn.Parameter(w.detach().clone())], variant="salsa", backend="foreach")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.t == steps and resumed.counters == c
