"""Where users train: one test (at least) per framework and way of computing the gradients
(closure, micro-batches, GradScaler, Lightning, the Hugging Face Trainer, accelerate), plus the API.

Every framework test uses the real package (lightning, transformers, accelerate: the `test`
extra installs them) on CPU with tiny models built from configs and in-memory data.
"""
import warnings

import pytest
import torch
from torch import nn

from alsals_fused import ALSALS


def tiny(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))


def data(n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=gen)


def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- gradients the optimizer did not compute (item 1) ------------------------------------------

def test_micro_batch_accumulation_equals_one_full_batch_step():
    x, y = data(24)
    full, acc = tiny(), tiny()
    opt_full, opt_acc = ALSALS(full.parameters()), ALSALS(acc.parameters())
    chunks = list(zip(x.chunk(3), y.chunk(3)))
    for _ in range(5):
        opt_full.zero_grad()
        opt_full.step(lambda: mse(full, x, y))
        opt_acc.zero_grad()
        for xb, yb in chunks:
            with opt_acc.micro_batch(lambda xb=xb, yb=yb: mse(acc, xb, yb), scale=1 / 3) as mb:
                loss = mse(acc, xb, yb)
                (loss / 3).backward()
                mb.loss = loss
        loss = opt_acc.step()
        assert isinstance(loss, torch.Tensor)
        torch.testing.assert_close(loss, mse(acc, x, y).detach() * 0 + loss)   # a 0-dim tensor
        assert opt_acc.last_step.trials == opt_full.last_step.trials
        assert opt_acc.eta == pytest.approx(opt_full.eta, rel=1e-9)
    torch.testing.assert_close(flat(acc), flat(full), rtol=1e-5, atol=1e-6)


def test_window_api_steps_as_micro_batch_does_and_discard_drops_the_window():
    """open_window / GradientWindow.add (what the framework adapters use) step exactly as
    micro_batch does; discard_window leaves no window, so step() without a closure refuses."""
    x, y = data(16)
    a, b = tiny(), tiny()
    opt_a, opt_b = ALSALS(a.parameters()), ALSALS(b.parameters())
    for _ in range(3):
        opt_a.zero_grad()
        with opt_a.micro_batch(lambda: mse(a, x, y)) as mb:
            mb.loss = mse(a, x, y)
            mb.loss.backward()
        opt_a.step()
        opt_b.zero_grad()
        window = opt_b.open_window()
        assert opt_b.open_window() is window          # one window until step/zero_grad/discard
        loss = mse(b, x, y)
        loss.backward()
        window.add(lambda: mse(b, x, y), loss.detach())
        opt_b.step()
        assert opt_b.last_step.trials == opt_a.last_step.trials
    assert torch.equal(flat(a), flat(b))
    opt_b.zero_grad()
    window = opt_b.open_window()
    loss = mse(b, x, y)
    loss.backward()
    window.add(lambda: mse(b, x, y), loss.detach())
    opt_b.discard_window()
    with pytest.raises(TypeError, match="micro_batch"):
        opt_b.step()


def test_micro_batch_trials_replay_each_micro_batchs_dropout_without_autograd():
    model = tiny(dropout=0.5)
    opt = ALSALS(model.parameters(), init_step_size=50.0)      # several trials
    x, y = data(16)
    chunks = list(zip(x.chunk(2), y.chunk(2)))
    masks = {0: [], 1: []}
    grad_enabled = []

    def loss_of(i, xb, yb):
        grad_enabled.append(torch.is_grad_enabled())
        masks[i].append(torch.rand(3))             # stands for the dropout draws
        return mse(model, xb, yb)

    torch.manual_seed(7)
    opt.zero_grad()
    for i, (xb, yb) in enumerate(chunks):
        with opt.micro_batch(lambda i=i, xb=xb, yb=yb: loss_of(i, xb, yb), scale=0.5) as mb:
            loss = loss_of(i, xb, yb)
            (loss * 0.5).backward()
            mb.loss = loss
    opt.step()
    trials = opt.last_step.trials
    assert trials > 1
    for i in (0, 1):
        assert len(masks[i]) == 1 + trials, "every micro-batch is evaluated by every trial"
        assert all(torch.equal(m, masks[i][0]) for m in masks[i])
    assert not torch.equal(masks[0][0], masks[1][0])
    assert grad_enabled == [True, True] + [False] * (2 * trials), "trials run without autograd"


def test_own_clipping_through_micro_batch_is_the_gradient_used():
    w = nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = ALSALS([w], line_search_every=10 ** 6)
    with opt.micro_batch(lambda: (w ** 2).sum() / 2) as mb:
        mb.loss = (w ** 2).sum() / 2
        mb.loss.backward()                         # g = w, |g| = 5
    torch.nn.utils.clip_grad_norm_([w], 1.0)
    opt.step()
    torch.testing.assert_close(opt.state[w]["exp_avg"], torch.tensor([3.0, -4.0]) / (5 + 1e-6) * 0.1)


def test_step_without_closure_or_gradients_shows_both_ways():
    opt = ALSALS([nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="(?s)def closure.*micro_batch"):
        opt.step()


def test_grad_scaler_unscaled_gradients_and_skipped_inf_steps():
    x, y = data(16)
    plain, scaled = tiny(), tiny()
    opt_p, opt_s = ALSALS(plain.parameters()), ALSALS(scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(3):
        opt_p.zero_grad()
        opt_p.step(lambda: mse(plain, x, y))
        opt_s.zero_grad()
        with opt_s.micro_batch(lambda: mse(scaled, x, y)) as mb:
            mb.loss = mse(scaled, x, y)
            scaler.scale(mb.loss).backward()
        scaler.step(opt_s)
        scaler.update()
    assert torch.equal(flat(plain), flat(scaled)), "power-of-two unscaling is exact"
    before, t = flat(scaled), opt_s.t
    opt_s.zero_grad()
    with opt_s.micro_batch(lambda: mse(scaled, x, y)) as mb:
        mb.loss = mse(scaled, x, y)
        scaler.scale(mb.loss * float("inf")).backward()
    scaler.step(opt_s)                             # inf gradients: the scaler skips the step
    scaler.update()
    assert torch.equal(flat(scaled), before) and opt_s.t == t
    opt_s.zero_grad()                              # ... and the open window is dropped
    assert opt_s._window is None


def test_grad_scaler_step_without_a_window_says_to_open_one():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(mse(model, x, y)).backward()       # no micro_batch: no trial forward to run
    before = flat(model)
    with pytest.raises(TypeError, match="(?s)GradScaler.step.*without a gradient window.*micro_batch"):
        scaler.step(opt)
    assert torch.equal(flat(model), before) and opt.t == 0


# -- windows that must not outlive their gradients, and what micro_batch accepts -----------------

@pytest.mark.parametrize("failure", ["raises", "no mb.loss"])
def test_a_first_micro_batch_that_fails_drops_its_window_and_rng_snapshot(failure):
    """The failed block's window (no parts) goes: the next micro-batch's trials replay the random
    numbers its own gradient forward drew, not those from before the failed block."""
    model = tiny(dropout=0.5)
    opt = ALSALS(model.parameters(), init_step_size=50.0)      # several trials
    x, y = data(16)
    masks = []

    def loss_of():
        masks.append(torch.rand(3))                # stands for the dropout draws
        return mse(model, x, y)

    torch.manual_seed(3)
    with pytest.raises(ZeroDivisionError if failure == "raises" else TypeError):
        with opt.micro_batch(loss_of) as mb:
            torch.rand(5)                          # the failed block's own draws
            if failure == "raises":
                raise ZeroDivisionError
    assert opt._window is None
    with opt.micro_batch(loss_of) as mb:
        mb.loss = loss_of()
        mb.loss.backward()
    opt.step()
    assert opt.last_step.trials > 1
    assert len(masks) == 1 + opt.last_step.trials
    assert all(torch.equal(m, masks[0]) for m in masks), "trials replay the gradient forward's draws"


def _window_part(opt, model, x, y, fail=None):
    """One micro_batch block; ``fail`` = "before backward" | "after backward" | "no mb.loss"."""
    with opt.micro_batch(lambda: mse(model, x, y)) as mb:
        if fail == "before backward":
            raise ZeroDivisionError
        loss = mse(model, x, y)
        loss.backward()
        if fail == "after backward":
            raise ZeroDivisionError
        if fail != "no mb.loss":
            mb.loss = loss


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("fail", ["after backward", "no mb.loss"])
def test_a_micro_batch_that_fails_after_its_backward_breaks_the_window_until_zero_grad(first, fail):
    """p.grad then holds a gradient no loss of the window accounts for: step() refuses the window
    (nothing moves) until zero_grad() starts over, whatever micro-batch of the window it was."""
    model = tiny()
    opt = ALSALS(model.parameters())
    x, y = data(24)
    halves = list(zip(x.chunk(2), y.chunk(2)))
    opt.zero_grad()
    if not first:
        _window_part(opt, model, *halves[0])
    with pytest.raises(ZeroDivisionError if fail == "after backward" else TypeError):
        _window_part(opt, model, *halves[1], fail=fail)
    _window_part(opt, model, *halves[1])           # a retry does not mend p.grad
    before = flat(model)
    error = "ZeroDivisionError" if fail == "after backward" else "TypeError"
    with pytest.raises(RuntimeError, match=f"(?s)micro_batch block.*raised {error}.*zero_grad"):
        opt.step()
    with pytest.raises(RuntimeError, match="micro_batch block"):
        opt.step()                                 # still refused: the window is kept
    assert torch.equal(flat(model), before) and opt.t == 0
    opt.zero_grad()
    for xb, yb in halves:
        _window_part(opt, model, xb, yb)
    opt.step()
    assert opt.t == 1


def test_a_micro_batch_that_fails_before_its_backward_leaves_the_window_as_it_was():
    """Nothing of the failed block is in p.grad: the window keeps its parts and steps as if the
    block had not run (the same step as a window of the first part alone)."""
    x, y = data(24)
    halves = list(zip(x.chunk(2), y.chunk(2)))
    runs = []
    for inject in (False, True):
        model = tiny()
        opt = ALSALS(model.parameters())
        opt.zero_grad()
        _window_part(opt, model, *halves[0])
        if inject:
            with pytest.raises(ZeroDivisionError):
                _window_part(opt, model, *halves[1], fail="before backward")
        opt.step()
        runs.append((flat(model), opt.eta, opt.last_step.trials))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]


def test_model_zero_grad_drops_a_broken_window():
    model = tiny()
    opt = ALSALS(model.parameters())
    x, y = data(24)
    opt.zero_grad()
    with pytest.raises(ZeroDivisionError):
        _window_part(opt, model, x, y, fail="after backward")
    model.zero_grad()                              # set_to_none: nothing of the block remains
    _window_part(opt, model, x, y)
    opt.step()
    assert opt.t == 1


def _scaled_window(opt, model, scaler, x, y, calls, factor=1.0):
    def trial():
        calls.append(factor)
        return mse(model, x, y)

    with opt.micro_batch(trial) as mb:
        mb.loss = mse(model, x, y)
        scaler.scale(mb.loss * factor).backward()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad_after_grad_scaler_skipped_a_window_drops_it(set_to_none):
    """GradScaler skips opt.step() on inf gradients; the user then zeroes through the model.  The
    skipped micro-batch must not reach the next step's L0 or its trials."""
    x, y = data(16)
    model = tiny()
    opt = ALSALS(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    calls = []
    x2, y2 = data(16, seed=5)
    _scaled_window(opt, model, scaler, x2, y2, calls, factor=float("inf"))
    scaler.step(opt)                               # skipped: opt.step() is not called
    scaler.update()
    assert opt.t == 0
    model.zero_grad(set_to_none=set_to_none)       # not opt.zero_grad()
    _scaled_window(opt, model, scaler, x, y, calls)
    current = mse(model, x, y).detach()
    scaler.step(opt)
    scaler.update()
    assert opt.t == 1
    torch.testing.assert_close(opt.last_step.loss, current)
    assert float("inf") not in calls, "the skipped micro-batch's trial ran"


def test_a_backward_outside_the_window_between_micro_batches_keeps_the_window():
    """The documented subset: a backward run outside micro_batch between two parts changes the
    gradients without resetting them; both parts stay in the window."""
    x, y = data(16)
    model = tiny()
    opt = ALSALS(model.parameters())
    (xa, ya), (xb, yb), (xc, yc) = zip(x.chunk(3), y.chunk(3))
    opt.zero_grad()
    with opt.micro_batch(lambda: mse(model, xa, ya)) as mb:
        mb.loss = mse(model, xa, ya)
        mb.loss.backward()
    mse(model, xb, yb).backward()                  # outside the window
    with opt.micro_batch(lambda: mse(model, xc, yc)) as mb:
        mb.loss = mse(model, xc, yc)
        mb.loss.backward()
    expected = (mse(model, xa, ya) + mse(model, xc, yc)).detach()
    opt.step()
    torch.testing.assert_close(opt.last_step.loss, expected)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0, 0.0, -0.5, True,
                                   False, "0.5", None, torch.tensor(0.5)])
def test_micro_batch_scale_must_be_a_finite_positive_number(scale):
    model = tiny()
    opt = ALSALS(model.parameters())
    with pytest.raises(ValueError, match="scale=.*finite number > 0"):
        opt.micro_batch(lambda: mse(model, *data()), scale=scale)
    window = opt.open_window()
    with pytest.raises(ValueError, match="scale=.*finite number > 0"):
        window.add(lambda: mse(model, *data()), torch.tensor(1.0), scale)
    assert not window.parts


def test_micro_batch_scale_takes_ints_and_floats():
    model = tiny()
    opt = ALSALS(model.parameters())
    for scale in (2, 0.25, 1e-12):
        assert opt.micro_batch(lambda: mse(model, *data()), scale=scale).mb.scale == float(scale)


# -- no silent no-ops (item 3) -------------------------------------------------------------------

def test_own_backward_then_step_closure_raises_with_the_fix():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    opt.zero_grad()
    mse(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="(?s)already holds gradients.*micro_batch"):
        opt.step(lambda: mse(model, x, y))


def test_backward_after_model_zero_grad_is_detected_too():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    opt.step(lambda: mse(model, x, y))
    model.zero_grad()                               # not the optimizer's: grads -> None
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="already holds gradients"):
        opt.step(lambda: mse(model, x, y))


def test_forgotten_zero_grad_warns_once():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    opt.step(lambda: mse(model, x, y))
    with pytest.warns(UserWarning, match="zero_grad"):
        opt.step(lambda: mse(model, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: mse(model, x, y))


@pytest.mark.parametrize("retain", [False, True, "attached"])
def test_closure_that_runs_backward_gets_a_clear_error(retain):
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())

    def lbfgs_closure():
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward(retain_graph=bool(retain))
        return loss.detach() if retain is True else loss

    with pytest.raises(RuntimeError, match="(?s)ran backward itself.*micro_batch"):
        opt.step(lbfgs_closure)


def test_lr_keyword_points_to_init_step_size():
    with pytest.raises(TypeError, match="init_step_size"):
        ALSALS([nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_unknown_param_group_keys_are_rejected():
    w, v = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="unknown param-group key.*momentum"):
        ALSALS([{"params": [w], "momentum": 0.9}])
    with pytest.raises(ValueError, match="'lr'.*init_step_size"):
        ALSALS([{"params": [w], "lr": 1e-3}])
    opt = ALSALS([w])
    with pytest.raises(ValueError, match="unknown param-group key.*amsgrad"):
        opt.add_param_group({"params": [v], "amsgrad": True})
    with pytest.raises(ValueError, match="betas are global"):
        opt.add_param_group({"params": [v], "betas": (0.8, 0.9)})
    opt.add_param_group({"params": [v], "weight_decay": 0.1})       # the one per-group key


SCHEDULERS = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "linear": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=4),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.9 ** k),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "swalr": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.01, anneal_epochs=2),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=0.1),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_fail_loudly_at_the_next_step(name):
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    sched = SCHEDULERS[name](opt)                  # OneCycleLR / CyclicLR: no missing-beta1 error
    opt.zero_grad()
    try:
        opt.step(lambda: mse(model, x, y))
        sched.step()
        opt.zero_grad()
        opt.step(lambda: mse(model, x, y))
    except RuntimeError as exc:
        assert "Likely cause" in str(exc) and "init_step_size" in str(exc), exc
    else:
        pytest.fail(f"{name}: a scheduler's write to lr was silently ignored")


def test_manual_lr_write_fails_loudly():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    opt.step(lambda: mse(model, x, y))
    assert opt.param_groups[0]["lr"] == opt.eta
    opt.param_groups[0]["lr"] = 1e-3
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['lr'\] was set to 0.001"):
        opt.step(lambda: mse(model, x, y))


def test_a_hand_written_eta_gets_its_own_error_not_the_lr_one():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    for _ in range(2):                             # before and after the optimizer wrote eta
        eta = opt.eta
        opt.eta = 0.5
        opt.zero_grad()
        with pytest.raises(RuntimeError, match=rf"(?s)opt.eta was set to 0.5.*read-only.*init_step_size.*"
                                               rf"opt.eta back to {eta!r}") as info:
            opt.step(lambda: mse(model, x, y))
        assert "lr' was set" not in str(info.value)
        opt.eta = eta                               # what the message says: the next step runs
        opt.step(lambda: mse(model, x, y))


def test_messages_that_end_with_the_user_gradients_help_read_as_sentences():
    from alsals_fused import user_gradients as ug
    for name in ("ACCUMULATED_BEFORE_STEP", "CLOSURE_RAN_BACKWARD"):
        text = getattr(ug, name)
        head, help_ = text[:-len(ug.USER_GRADIENTS_HELP)], text[-len(ug.USER_GRADIENTS_HELP):]
        assert help_ == ug.USER_GRADIENTS_HELP and head.endswith(". "), (name, head[-60:])


# -- buffers follow the model (item 4) -----------------------------------------------------------

def test_buffers_model_follows_the_model_after_it_moves():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    model = make()
    opt = ALSALS(model.parameters(), init_step_size=20.0, buffers=model)
    model.double()                                  # a move after construction: new buffer tensors
    opt.step(lambda: mse(model, x, y))
    assert opt.last_step.trials > 1
    reference = make().double()
    reference(x)                                    # one training-mode forward
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=0, atol=0)


# -- visible state (item 5) ------------------------------------------------------------------------

def test_chosen_backends_and_repr():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters(), c=0.3, max_grad_norm=1.0)
    text = repr(opt)
    assert "variant='alsals'" in text and "c=0.3" in text and "max_grad_norm=1.0" in text
    assert "smoothing" not in text, "defaults are not repeated"
    opt.step(lambda: mse(model, x, y))
    assert opt.chosen_backends == {(torch.device("cpu"), torch.float32): "foreach"}
    assert "cpu/float32: foreach" in repr(opt)


def test_last_step_loss_is_a_tensor_on_every_step():
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters(), line_search_every=2)
    kinds = []
    for _ in range(4):
        opt.zero_grad()
        reads = opt.reads
        loss = opt.step(lambda: mse(model, x, y))
        assert opt.reads - reads == opt.last_step.trials, "no extra device read"
        kinds.append((opt.last_step.searched, type(opt.last_step.loss)))
        # step() returns the loss as the closure returned it (torch's convention: the caller
        # releases its spent graph); last_step.loss is that value, detached
        assert loss.grad_fn is not None and opt.last_step.loss.grad_fn is None
        assert opt.last_step.loss.data_ptr() == loss.data_ptr()
    assert kinds == [(True, torch.Tensor), (False, torch.Tensor)] * 2


@pytest.mark.parametrize("between", ["nothing", "zero_grad(set_to_none=False)", "zero_grad()"])
def test_stepping_again_on_the_same_gradients_warns_once(between):
    """Only a step that would add to the previous step's gradient warns; gradients zeroed in
    place are not stale."""
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    opt.zero_grad()
    opt.step(lambda: mse(model, x, y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            if between == "zero_grad(set_to_none=False)":
                opt.zero_grad(set_to_none=False)
            elif between == "zero_grad()":
                opt.zero_grad()
            opt.step(lambda: mse(model, x, y))
    stale = [w for w in caught if "still holds the previous step's gradient" in str(w.message)]
    assert len(stale) == (1 if between == "nothing" else 0), [str(w.message) for w in caught]
    if stale:
        assert stale[0].filename == __file__, "the warning points at the caller's step()"


def test_step_fires_torch_step_hooks_and_the_profiler_range():
    """ALSALS wraps step() itself (torch's wrapper would enter a profiler range on every call):
    the hooks still run in torch's order, a pre hook can replace the arguments, and a profiler
    sees the usual Optimizer.step#ALSALS.step range."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    model = tiny()
    x, y = data()
    opt = ALSALS(model.parameters())
    calls = []
    other = lambda: mse(model, x, y)                           # noqa: E731
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: (calls.append("pre"), ((o, other), k))[1]),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[1] is other))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        opt.zero_grad()
        opt.step(lambda: pytest.fail("the pre hook replaced this closure"))
        assert calls == ["global pre", "pre", ("post", True), "global post"]
        opt.register_step_pre_hook(lambda o, a, k: "not a pair")
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step(other)
    finally:
        for h in handles:
            h.remove()
    opt = ALSALS(model.parameters())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
        opt.step(lambda: mse(model, x, y))
    assert "Optimizer.step#ALSALS.step" in {e.name for e in prof.events()}
    assert type(opt).step.hooked, "Optimizer.__init__ must not wrap step() a second time"


def test_load_state_dict_fires_torch_hooks():
    w = nn.Parameter(torch.ones(3))
    saved = ALSALS([w], c=0.2).state_dict()
    opt = ALSALS([w])
    calls = []
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append(("pre", o is opt, "alsals" in sd["param_groups"][0])))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o.hyper.c)))
    opt.load_state_dict(saved)
    assert calls == [("pre", True, True), ("post", 0.2)]


# -- Lightning --------------------------------------------------------------------------------------

def _lightning_module(**opt_kwargs):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(),
                                     nn.Dropout(0.2), nn.Linear(16, 1))
            self.backwards = 0
            self.logged = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            self.logged += 1
            return loss

        def on_after_backward(self):
            self.backwards += 1

        def configure_optimizers(self):
            return ALSALS(self.parameters(), **opt_kwargs)

    return Module()


def _loader(n=64, batch=16):
    x, y = data(n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _pl_trainer(tmp_path, steps, **kwargs):
    import lightning.pytorch as pl
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kwargs)


def test_lightning_automatic_optimization_trains_checkpoints_and_resumes(tmp_path):
    module = _lightning_module()
    trainer = _pl_trainer(tmp_path, 4)
    before = flat(module)
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, ALSALS) and opt.t == 4 and opt.counters["trials"] >= 4
    assert not torch.equal(flat(module), before)
    assert module.backwards == 4, "one backward per step, none per trial"
    assert module.logged == 4 + opt.counters["trials"] and trainer.logged_metrics["train_loss"] is not None
    assert isinstance(opt.last_step.loss, torch.Tensor)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    eta, counters = opt.eta, dict(opt.counters)

    resumed = _lightning_module()
    trainer2 = _pl_trainer(tmp_path, 6)
    trainer2.fit(resumed, _loader(), ckpt_path=ckpt)
    opt2 = trainer2.optimizers[0]
    assert opt2.t == 6 and opt2.counters["steps"] == counters["steps"] + 2
    assert opt2.last_step is not None and eta > 0


def test_lightning_trials_do_not_log_and_batchnorm_sees_one_forward(tmp_path):
    module = _lightning_module(init_step_size=50.0)        # several trials on the first step
    trainer = _pl_trainer(tmp_path, 1)
    x, y = data(16)
    torch.manual_seed(0)
    reference = _lightning_module().net
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    opt = trainer.optimizers[0]
    assert opt.last_step.trials > 1
    reference.train()
    reference(x)
    torch.testing.assert_close(module.net[1].running_mean, reference[1].running_mean)
    assert trainer.logged_metrics["train_loss"].item() == pytest.approx(opt.last_step.loss.item())


def test_lightning_fp16_mixed_precision_is_refused_with_the_fix(tmp_path):
    # Lightning's fp16 plugin (a GradScaler; on a GPU precision="16-mixed") runs the closure
    # itself and then steps without one: a clear error, not the generic "needs a closure".
    from lightning.pytorch.plugins.precision import MixedPrecision
    module = _lightning_module()
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = _pl_trainer(tmp_path, 2, plugins=[plugin])
    before = flat(module)
    with pytest.raises(TypeError, match="(?s)16-bit mixed precision.*bf16-mixed"):
        trainer.fit(module, _loader())
    assert torch.equal(flat(module), before) and trainer.optimizers[0].t == 0


def test_fabric_step_without_a_closure_gets_the_generic_help_not_the_fp16_one():
    # Fabric's precision plugins are on the stack too, but they leave backward to the user.
    from lightning.fabric import Fabric
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    net = tiny()
    model, opt = fabric.setup(net, ALSALS(net.parameters()))
    x, y = data()
    fabric.backward(mse(model, x, y))
    with pytest.raises(TypeError) as caught:
        opt.step()
    assert "16-bit mixed precision" not in str(caught.value)
    assert "micro_batch" in str(caught.value)


def test_lightning_accumulate_grad_batches_steps_on_the_window(tmp_path):
    module = _lightning_module()
    trainer = _pl_trainer(tmp_path, 2, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer.fit(module, _loader(n=64, batch=16))
    opt = trainer.optimizers[0]
    assert opt.t == 2 and module.backwards == 4
    # the trials evaluate the window's last micro-batch (documented subset)
    assert module.logged == 4 + opt.counters["trials"]


def test_lightning_resumed_inside_an_accumulation_window_warns_and_continues(tmp_path):
    """A checkpoint saved after a window's first micro-batch holds the optimizer's state but no
    gradients: the resumed run steps on the window's remaining micro-batch, with a warning, from
    exactly the saved optimizer state; a checkpoint at a window boundary resumes silently."""
    import lightning.pytorch as pl

    saved = {}

    class SaveInsideWindow(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx in (1, 2):                   # after a step; inside the next window
                opt = trainer.optimizers[0]
                trainer.save_checkpoint(tmp_path / f"b{batch_idx}.ckpt")
                saved[batch_idx] = (opt.t, opt.eta, flat(module))

    module = _lightning_module()
    _pl_trainer(tmp_path, 2, accumulate_grad_batches=2, callbacks=[SaveInsideWindow()]).fit(
        module, _loader(n=64, batch=16))
    assert saved[1][0] == saved[2][0] == 1

    for batch_idx, inside in ((1, False), (2, True)):
        resumed = _lightning_module()
        seen = {}

        class Before(pl.Callback):
            def __init__(self, seen):
                self.seen = seen

            def on_before_optimizer_step(self, trainer, module, optimizer):
                opt = trainer.optimizers[0]
                self.seen.setdefault("state", (opt.t, opt.eta, flat(module)))

        trainer = _pl_trainer(tmp_path, 2, accumulate_grad_batches=2, callbacks=[Before(seen)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(resumed, _loader(n=64, batch=16), ckpt_path=tmp_path / f"b{batch_idx}.ckpt")
        ours = [w for w in caught if "ALSALS" in str(w.message)]
        assert [("inside the window" in str(w.message)) for w in ours] == ([True] if inside else []), ours
        t, eta, params = seen["state"]
        assert (t, eta) == saved[batch_idx][:2] and torch.equal(params, saved[batch_idx][2])
        assert trainer.optimizers[0].t == 2 and resumed.backwards == (1 if inside else 2)



def test_lightning_step_budget_from_estimated_stepping_batches_ends_the_run_cooled(tmp_path):
    """The README's line: total_steps=self.trainer.estimated_stepping_batches in
    configure_optimizers (epochs and accumulation counted by Lightning)."""
    import lightning.pytorch as pl
    module = _lightning_module()
    module.configure_optimizers = lambda: ALSALS(module.parameters(),
                                                 total_steps=module.trainer.estimated_stepping_batches)
    trainer = pl.Trainer(max_epochs=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _loader(n=64, batch=16))            # 4 batches per epoch: 2 steps
    opt = trainer.optimizers[0]
    assert opt.hyper.total_steps == 6 == opt.t and opt._cooldown_from is not None
    assert opt.eta == pytest.approx(opt._cooldown_from / 2)      # the last step of a 1-step cooldown
    assert not [w for w in caught if "past total_steps" in str(w.message)]

# -- Hugging Face Trainer -----------------------------------------------------------------------------

def _hf_setup(tmp_path, **args):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (32, 12), generator=gen)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    defaults = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                    dataloader_num_workers=0, disable_tqdm=True)
    defaults.update(args)
    return model, dataset, TrainingArguments(**defaults)


def test_hf_trainer_runs_the_line_search_and_logs_eta(tmp_path):
    from alsals_fused.integrations.transformers import ALSALSTrainer
    model, dataset, args = _hf_setup(tmp_path, gradient_accumulation_steps=2)
    forwards = []
    model.register_forward_pre_hook(lambda m, a, k: forwards.append(torch.is_grad_enabled()), with_kwargs=True)
    etas = []

    trainer = ALSALSTrainer(model=model, args=args, train_dataset=dataset)
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            etas.append(trainer.optimizer.optimizer.eta if hasattr(trainer.optimizer, "optimizer")
                        else trainer.optimizer.eta)

    trainer.add_callback(Record())
    trainer.train()
    from alsals_fused.integrations.accelerate import unwrap
    opt = unwrap(trainer.optimizer)
    assert opt.t == 3
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == etas and len(logged) == 3
    # every micro-batch seen by the gradient and by every trial forward, no backward per trial
    assert forwards.count(True) == 3 * 2
    assert forwards.count(False) == 2 * opt.counters["trials"]


def test_hf_trainer_clips_before_the_search_and_accepts_a_passed_optimizer(tmp_path):
    from alsals_fused.integrations.transformers import ALSALSTrainer, EtaSchedule
    model, dataset, args = _hf_setup(tmp_path, max_steps=1, max_grad_norm=1e-3)
    opt = ALSALS(model.parameters(), line_search_every=10 ** 6)
    trainer = ALSALSTrainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None))
    trainer.train()
    assert isinstance(trainer.lr_scheduler, EtaSchedule)
    m = torch.cat([s["exp_avg"].reshape(-1) for s in opt.state.values()])
    assert (m / 0.1).norm().item() == pytest.approx(1e-3, rel=1e-3), "the search used the clipped gradient"


def test_hf_trainer_warns_about_the_schedule_arguments_it_does_not_use(tmp_path):
    """learning_rate, lr_scheduler_type and warmup set by the user are not used (the line search
    sets the step size): one warning names them; TrainingArguments' defaults warn nothing."""
    from alsals_fused.integrations.transformers import ALSALSTrainer, EtaSchedule
    for args_given, expected in (({}, []),
                                 (dict(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2),
                                  ["learning_rate=0.001", "lr_scheduler_type='cosine'", "warmup_steps=2"])):
        model, dataset, args = _hf_setup(tmp_path, **args_given)
        trainer = ALSALSTrainer(model=model, args=args, train_dataset=dataset)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.create_optimizer_and_scheduler(num_training_steps=3)
        ours = [str(w.message) for w in caught if "ALSALSTrainer" in str(w.message)]
        assert isinstance(trainer.lr_scheduler, EtaSchedule)
        if not expected:
            assert ours == []
        else:
            assert len(ours) == 1 and all(name in ours[0] for name in expected), ours


def _hf_cooldown_run(tmp_path, checkpoint=None, **args):
    """An ALSALSTrainer(cooldown=True) run: its optimizer, (eta, trial forwards) per step, and
    ALSALS's warnings."""
    from transformers import TrainerCallback

    from alsals_fused.integrations.accelerate import unwrap
    from alsals_fused.integrations.transformers import ALSALSTrainer
    model, dataset, targs = _hf_setup(tmp_path, **args)
    trainer = ALSALSTrainer(model=model, args=targs, train_dataset=dataset, cooldown=True)
    steps = []

    class Record(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            opt = unwrap(trainer.optimizer)
            steps.append((opt.eta, opt.last_step.trials))

    trainer.add_callback(Record())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=checkpoint)
    return unwrap(trainer.optimizer), steps, [str(w.message) for w in caught if "ALSALS" in str(w.message)]


def test_hf_trainer_cooldown_takes_the_step_budget_of_an_epoch_run(tmp_path):
    """cooldown=True with num_train_epochs (max_steps unset): total_steps is the epochs' optimizer
    steps, and the last 20% cool down without trial forwards."""
    opt, steps, ours = _hf_cooldown_run(tmp_path, max_steps=-1, num_train_epochs=2)
    assert opt.hyper.total_steps == 16 == opt.t == len(steps) and ours == []   # 32 rows / batch 4, 2 epochs
    searched = steps[12][0]                                                   # cooldown: steps 14-16
    assert steps[13:] == [(searched * 3 / 4, 0), (searched * 2 / 4, 0), (searched * 1 / 4, 0)]


def test_hf_trainer_cooldown_refuses_a_second_budget_or_schedule(tmp_path):
    from alsals_fused.integrations.transformers import ALSALSTrainer
    model, dataset, args = _hf_setup(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        ALSALSTrainer(model=model, args=args, train_dataset=dataset, cooldown=True,
                      alsals_kwargs={"total_steps": 3})
    with pytest.raises(ValueError, match="has its own; pass one of them"):
        ALSALSTrainer(model=model, args=args, train_dataset=dataset, cooldown=True,
                      optimizers=(ALSALS(model.parameters(), total_steps=3), None))
    opt = ALSALS(model.parameters())
    with pytest.raises(ValueError, match=r"optimizers=\(optimizer, None\)"):
        ALSALSTrainer(model=model, args=args, train_dataset=dataset, cooldown=True,
                      optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)))
    with pytest.raises(TypeError, match="cooldown='yes' is invalid"):
        ALSALSTrainer(model=model, args=args, train_dataset=dataset, cooldown="yes")


def test_hf_trainer_cooldown_resumes_with_the_new_budget_until_the_cooldown_began(tmp_path):
    """A run resumed with a larger max_steps cools down at its own end if the checkpoint was
    saved before the cooldown; one saved inside it keeps its budget and says so."""
    opt, _, ours = _hf_cooldown_run(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    assert opt.hyper.total_steps == 6 and ours == []                         # cooldown: step 6
    opt, steps, ours = _hf_cooldown_run(tmp_path, checkpoint=str(tmp_path / "checkpoint-2"), max_steps=10)
    assert opt.hyper.total_steps == 10 and opt.t == 10 and ours == []
    assert [trials == 0 for _, trials in steps] == [False] * 6 + [True] * 2   # steps 3-8, 9-10
    opt, _, ours = _hf_cooldown_run(tmp_path, checkpoint=str(tmp_path / "checkpoint-6"), max_steps=10)
    assert opt.hyper.total_steps == 6 and opt.t == 10
    assert len(ours) == 2 and "keeps the checkpoint's total_steps=6, not this run's 10" in ours[0]
    assert "past total_steps=6" in ours[1]


def test_hf_trainer_checkpoint_resumes_the_optimizer_and_schedule(tmp_path):
    from alsals_fused.integrations.accelerate import unwrap
    from alsals_fused.integrations.transformers import ALSALSTrainer
    model, dataset, args = _hf_setup(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    first = ALSALSTrainer(model=model, args=args, train_dataset=dataset)
    first.train()
    opt = unwrap(first.optimizer)
    eta, t = opt.eta, opt.t
    model2, dataset, args2 = _hf_setup(tmp_path, max_steps=3, save_strategy="no")
    second = ALSALSTrainer(model=model2, args=args2, train_dataset=dataset)
    second.train(resume_from_checkpoint=True)
    opt2 = unwrap(second.optimizer)
    assert t == 2 and opt2.t == 3 and opt2.counters["steps"] == 3
    logged = [h["learning_rate"] for h in second.state.log_history if h.get("step") == 3 and "learning_rate" in h]
    assert logged == [opt2.eta] and eta > 0


def test_hf_trainer_resumes_an_accumulating_run_bit_identically(tmp_path):
    """gradient_accumulation_steps=2: a save asked for inside a window lands at the window's end
    (Trainer saves after optimizer steps only), and the run resumed from it matches the
    uninterrupted one bit for bit (the resumed first window starts afresh: no stale window)."""
    from transformers import TrainerCallback

    from alsals_fused.integrations.accelerate import unwrap
    from alsals_fused.integrations.transformers import ALSALSTrainer

    class SaveInsideWindow(TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step == 1

    model, dataset, args = _hf_setup(tmp_path / "a", max_steps=3, gradient_accumulation_steps=2,
                                     save_strategy="no")
    full = ALSALSTrainer(model=model, args=args, train_dataset=dataset, callbacks=[SaveInsideWindow()])
    full.train()
    assert [p.name for p in (tmp_path / "a").glob("checkpoint-*")] == ["checkpoint-2"]
    model2, dataset, args2 = _hf_setup(tmp_path / "b", max_steps=3, gradient_accumulation_steps=2,
                                       save_strategy="no")
    resumed = ALSALSTrainer(model=model2, args=args2, train_dataset=dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    opt, opt2 = unwrap(full.optimizer), unwrap(resumed.optimizer)
    assert opt2.t == opt.t == 3 and opt2.eta == opt.eta
    assert torch.equal(flat(model2), flat(model))


def test_plain_hf_trainer_with_alsals_explains_the_adapter(tmp_path):
    from transformers import Trainer
    model, dataset, args = _hf_setup(tmp_path, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      optimizers=(ALSALS(model.parameters()), None))
    with pytest.raises((TypeError, RuntimeError), match="ALSALSTrainer"):
        trainer.train()


# -- accelerate ------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_step_closure_and_the_loss(fresh_accelerate):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model = tiny()
    opt = ALSALS(model.parameters())
    model, aopt = accelerator.prepare(model, opt)
    x, y = data()
    for _ in range(2):
        aopt.zero_grad()
        assert aopt.step(lambda: mse(model, x, y)) is None     # accelerate's wrapper
        assert isinstance(opt.last_step.loss, torch.Tensor)     # the step's loss, as the README says
    assert opt.t == 2


def test_accelerate_accumulate_sees_every_micro_batch(fresh_accelerate):
    from accelerate import Accelerator

    from alsals_fused.integrations.accelerate import micro_batch
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny()
    opt = ALSALS(model.parameters())
    model, aopt = accelerator.prepare(model, opt)
    x, y = data(32)
    seen = []

    def loss_of(i, xb, yb):
        seen.append((i, torch.is_grad_enabled()))
        return mse(model, xb, yb)

    for i, (xb, yb) in enumerate(zip(x.chunk(4), y.chunk(4))):
        with accelerator.accumulate(model):
            with micro_batch(accelerator, aopt, lambda i=i, xb=xb, yb=yb: loss_of(i, xb, yb)) as mb:
                loss = loss_of(i, xb, yb)
                accelerator.backward(loss)
                mb.loss = loss
            aopt.step()
            aopt.zero_grad()
    assert opt.t == 2
    for i in range(4):
        trials = [s for s in seen if s == (i, False)]
        assert (i, True) in seen and len(trials) >= 1, f"micro-batch {i} not seen by the trials"
    # the same result as one step over each pair of micro-batches
    ref = tiny()
    ref_opt = ALSALS(ref.parameters())
    for k in range(2):
        ref_opt.zero_grad()
        ref_opt.step(lambda k=k: mse(ref, x[16 * k:16 * k + 16], y[16 * k:16 * k + 16]))
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)


def test_accelerate_accumulate_with_a_step_closure_is_refused(fresh_accelerate):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny()
    model, aopt = accelerator.prepare(model, ALSALS(model.parameters()))
    x, y = data()
    with pytest.raises(RuntimeError, match="integrations.accelerate.micro_batch"):
        for _ in range(2):
            with accelerator.accumulate(model):
                aopt.step(lambda: mse(model, x, y))
                aopt.zero_grad()


def test_a_group_added_after_steps_mirrors_the_current_eta():
    """add_param_group after eta moved: the new group's lr mirror is eta (not init_step_size,
    which the next step would take for a scheduler's write)."""
    w, extra = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))
    opt = ALSALS([w], backend="foreach")
    opt.zero_grad()
    opt.step(lambda: (w * w).sum())
    assert opt.eta != opt.hyper.init_step_size
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[1]["lr"] == opt.eta
    opt.zero_grad()
    opt.step(lambda: (w * w).sum() + (extra * extra).sum())
