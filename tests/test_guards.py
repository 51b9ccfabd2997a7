"""The guards of the accept test (docs/algorithm.md section 1.3).

1. A trial whose loss equals L0 exactly is accepted (in the smoothed test and in the fallback's
   plain test alike): the loss cannot resolve the step.
2. A rejected step returns eta to its value before the step (no growth, no backtracking left over).
3. (tests/test_contract.py, on every backend) A search on a zero gradient does not grow eta.

The tiny-loss problems below are the collapse the guards prevent: in fp32, ``1 + 1e-9 * f(w)`` is
exactly 1 for every w near the start, so every trial's loss equals L0; without the guards the
plain Armijo test can never pass (its right side is positive), every step is rejected after
max_trials trials and eta shrinks by backtrack**max_trials per step, underflowing within a few
dozen steps.  Without the guards these tests fail.
"""
import math

import pytest
import torch

from alsals_fused import ALSALS

BACKENDS = ["reference", "foreach"]
VARIANTS = ["alsals", "adam_sls", "salsa"]


def tiny_loss(w, center=0.0):
    # fp32: 1 + 1e-9*x == 1 exactly for |x| < ~0.06, yet the gradient 2e-9*(w - center) is nonzero
    return 1.0 + 1e-9 * ((w - center) ** 2).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_equal_losses_are_accepted_and_eta_does_not_collapse(backend, variant):
    w = torch.nn.Parameter(torch.full((4,), 0.1))
    opt = ALSALS([w], variant=variant, backend=backend, line_search_every=1)
    eta0 = opt.eta
    for _ in range(40):
        opt.zero_grad()
        loss = opt.step(lambda: tiny_loss(w))
        assert loss.item() == 1.0, "the problem must keep the loss at exactly 1 in fp32"
        info = opt.last_step
        assert info.accepted and info.trials == 1, info
        assert info.loss_trial == info.loss
    assert opt.counters["rejected"] == 0
    assert opt.eta == pytest.approx(eta0 * opt.hyper.growth ** 40, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equality_guard_applies_to_the_fallbacks_plain_test(backend):
    # Step 1 moves w towards 0; step 2's minimum is far to the right, so g < 0 while m_hat > 0:
    # with no smoothing the slope along m_hat*p is negative and the step falls back to g*p with
    # the plain test, whose right side c*eta*sum(g*g*p) is positive while L0 - L_try is 0.
    w = torch.nn.Parameter(torch.tensor([0.1]))
    opt = ALSALS([w], backend=backend, smoothing=0.0, init_step_size=0.01)
    for center in (-0.1, 0.2):
        opt.zero_grad()
        opt.step(lambda center=center: tiny_loss(w, center))
    info = opt.last_step
    assert info.fallback, "the second step must fall back"
    assert info.accepted and info.trials == 1 and info.loss_trial == info.loss
    assert opt.counters["fallbacks"] == 1 and opt.counters["rejected"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rejected_steps_leave_eta_where_it_was(backend, variant):
    w = torch.nn.Parameter(torch.ones(3))
    opt = ALSALS([w], variant=variant, backend=backend, max_trials=4, line_search_every=1)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = (w ** 2).sum()
        return loss if torch.is_grad_enabled() else loss + 1.0   # every trial looks worse

    for k in range(5):
        before = w.detach().clone()
        opt.zero_grad()
        opt.step(closure)
        assert not opt.last_step.accepted and opt.last_step.trials == 4
        assert opt.eta == opt.hyper.init_step_size, f"step {k}: eta moved to {opt.eta}"
        assert opt.last_step.eta == opt.param_groups[0]["lr"] == opt.eta
        assert torch.equal(w.detach(), before), "params back at w0"
    assert opt.counters["rejected"] == 5 and opt.t == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_trial_is_not_accepted_by_the_equality_guard(backend):
    # L0 is finite and the trial nan: nan == L0 is false, and the finiteness check rejects it.
    w = torch.nn.Parameter(torch.ones(2))
    opt = ALSALS([w], backend=backend, max_trials=2)

    def closure():
        loss = (w ** 2).sum()
        return loss if torch.is_grad_enabled() else loss * math.nan

    opt.step(closure)
    assert not opt.last_step.accepted and opt.last_step.trials == 2
    assert torch.equal(w.detach(), torch.ones(2))


def test_step_under_cuda_graph_capture_is_refused_with_what_is_supported(monkeypatch):
    """A captured step would bake eta and the bias corrections into the graph's kernel arguments
    (and a searching step reads the device per trial): step() refuses before doing anything."""
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    opt = ALSALS([w], backend="foreach")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def loss():
        calls.append(1)
        return (w ** 2).sum()

    with pytest.raises(RuntimeError, match="CUDA graph capture") as info:
        opt.step(loss)
    assert "make_graphed_callables" in str(info.value) and "outside the capture" in str(info.value)
    assert calls == [] and opt.t == 0 and w.tolist() == [0.5, -0.25]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    opt.step(loss)
    assert opt.t == 1
