"""The device decisions (``backends/decisions.py``) against the contract's formulas in scalar
Python, on ordinary and edge-case inputs; and every CPU backend's verdict against them.

``check_verdict``/``check_finish_grad``/``check_finish_slope`` take the function under test, so
a fused backend's kernels can be checked with the same cases.
"""
import itertools
import math

import pytest
import torch

from alsals_fused.backends import decisions, get_backend
from alsals_fused.backends.base import CTL_SIZE, VERDICT_SIZE, Ctl, DecisionScalars, Verdict, new_ctl

NAN, INF = math.nan, math.inf


def spec_verdict(ctl, loss_try, eta, c, smoothing):
    """PLAN.md / base.py's verdict, in Python floats: (out, ctl after)."""
    ctl = list(ctl)
    l0, loss = ctl[Ctl.LOSS0], float(loss_try)
    diff = l0 - loss
    fb, finite = ctl[Ctl.FALLBACK] != 0, ctl[Ctl.SKIP] == 0
    h_new = smoothing * ctl[Ctl.H] + (1 - smoothing) * diff
    test = diff >= c * eta * ctl[Ctl.SLOPE_GRAD] if fb else h_new >= c * eta * ctl[Ctl.S_NEW]
    ok = finite and math.isfinite(loss) and (loss == l0 or test)
    out = [float(ok), float(finite), float(fb), l0, loss,
           ctl[Ctl.SLOPE_GRAD] if fb else ctl[Ctl.SLOPE], ctl[Ctl.PENDING], h_new]
    ctl[Ctl.PENDING] = 0.0
    if ok and not fb:
        ctl[Ctl.H], ctl[Ctl.S] = h_new, ctl[Ctl.S_NEW]
    return out, ctl


def same(a, b):
    return all((x == y) or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-12 * max(abs(x), abs(y))
               for x, y in zip(a, b))


def make_ctl(**slots):
    ctl = new_ctl("cpu")
    ctl[Ctl.SCALE] = 1.0
    for name, value in slots.items():
        ctl[Ctl[name]] = value
    return ctl


VERDICT_CASES = [
    # (ctl slots, loss_try, eta)
    (dict(LOSS0=2.0, SLOPE=1.0, SLOPE_GRAD=1.5, S_NEW=0.5, H=0.3, S=0.4), 1.0, 0.1),     # accept
    (dict(LOSS0=2.0, SLOPE=1.0, SLOPE_GRAD=1.5, S_NEW=0.5, H=0.0, S=0.4), 1.999, 10.0),  # reject
    (dict(LOSS0=1.0, SLOPE=1.0, SLOPE_GRAD=1.5, S_NEW=50.0, H=-1.0), 1.0, 5.0),          # guard 1
    (dict(LOSS0=1.0, FALLBACK=1.0, SLOPE=-1.0, SLOPE_GRAD=2.0, S_NEW=-0.1), 1.0, 5.0),   # guard 1, fb
    (dict(LOSS0=2.0, FALLBACK=1.0, SLOPE=-1.0, SLOPE_GRAD=2.0, S_NEW=-0.1), 1.5, 0.1),   # fb accept
    (dict(LOSS0=2.0, FALLBACK=1.0, SLOPE=-1.0, SLOPE_GRAD=2.0, S_NEW=-0.1), 1.99, 1.0),  # fb reject
    (dict(LOSS0=2.0, SLOPE=1.0, SLOPE_GRAD=1.0, S_NEW=0.5), NAN, 0.1),                   # nan trial
    (dict(LOSS0=2.0, SLOPE=1.0, SLOPE_GRAD=1.0, S_NEW=0.5), -INF, 0.1),                  # -inf trial
    (dict(LOSS0=NAN, SKIP=1.0, PENDING=3.0), NAN, 0.1),                                  # skipped
    (dict(LOSS0=INF, SKIP=1.0, PENDING=1.0), INF, 0.1),                                  # inf == inf
    (dict(LOSS0=2.0, SKIP=1.0, PENDING=1.0), 2.0, 0.1),                                  # skipped, equal
    (dict(LOSS0=2.0, SLOPE=1.0, SLOPE_GRAD=1.0, S_NEW=0.5, PENDING=2.0), 1.0, 0.1),      # pending
]


def check_verdict(verdict_fn, device="cpu"):
    for (slots, loss_try, eta), smoothing, c in itertools.product(VERDICT_CASES, (0.0, 0.99), (0.1, 0.5)):
        ctl = make_ctl(**slots).to(device)
        out = torch.full((VERDICT_SIZE,), -7.0, dtype=torch.float64, device=device)
        for dtype in (torch.float32, torch.float64):
            loss = torch.tensor(loss_try, dtype=dtype, device=device)
            want_out, want_ctl = spec_verdict(ctl.tolist(), loss.item(), eta, c, smoothing)
            c_ = ctl.clone()
            verdict_fn(c_, loss, DecisionScalars(eta=eta, c=c, smoothing=smoothing), out)
            got = out.tolist()
            assert same(got, want_out), (slots, loss_try, eta, smoothing, c, got, want_out)
            assert same(c_.tolist(), want_ctl), (slots, loss_try, c_.tolist(), want_ctl)


def check_finish_grad(fn, device="cpu"):
    for loss0, sumsq, mgn, pending in itertools.product(
            (1.5, NAN, INF, -INF), (4.0, 0.0, NAN, INF), (None, 1.0, 10.0), (0.0, 2.0)):
        ctl = make_ctl(FALLBACK=1.0, PENDING=pending, SCALE=0.3, H=0.25, S=0.5).to(device)
        fn(ctl, torch.tensor(sumsq, dtype=torch.float64, device=device),
           torch.tensor(loss0, dtype=torch.float64, device=device), mgn)
        finite = math.isfinite(loss0) and math.isfinite(sumsq)
        scale = min(1.0, mgn / (math.sqrt(sumsq) + 1e-6)) if finite and mgn else 1.0
        got = ctl.tolist()
        assert got[Ctl.SKIP] == float(not finite) and got[Ctl.FALLBACK] == 0.0
        assert got[Ctl.PENDING] == pending + (not finite)
        assert got[Ctl.SCALE] == pytest.approx(scale, rel=1e-15)
        assert same([got[Ctl.LOSS0]], [loss0])
        assert (got[Ctl.H], got[Ctl.S]) == (0.25, 0.5), "persistent slots untouched"


def check_finish_slope(fn, device="cpu"):
    for skip, slope, slope_grad, s, smoothing in itertools.product(
            (0.0, 1.0), (2.0, -3.0, 0.0, NAN), (1.0, 0.0), (0.0, 1.0, -5.0), (0.0, 0.99)):
        ctl = make_ctl(SKIP=skip, S=s, H=0.25, PENDING=1.0).to(device)
        fn(ctl, torch.tensor([slope, slope_grad], dtype=torch.float64, device=device), smoothing)
        s_new = smoothing * s + (1 - smoothing) * slope
        got = ctl.tolist()
        assert same([got[Ctl.SLOPE], got[Ctl.SLOPE_GRAD], got[Ctl.S_NEW]], [slope, slope_grad, s_new])
        assert got[Ctl.FALLBACK] == float(skip == 0 and s_new <= 0), (skip, slope, s, smoothing)
        assert (got[Ctl.H], got[Ctl.S], got[Ctl.PENDING]) == (0.25, s, 1.0)


def test_verdict_matches_the_contract():
    check_verdict(decisions.verdict)


def test_finish_grad_matches_the_contract():
    check_finish_grad(decisions.finish_grad)


def test_finish_slope_matches_the_contract():
    check_finish_slope(decisions.finish_slope)


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_cpu_backends_decide_as_decisions_does(backend):
    check_verdict(get_backend(backend, "cpu").verdict)


def test_slot_layout_is_the_contracts():
    assert [s.name for s in Ctl] == ["SCALE", "SKIP", "FALLBACK", "LOSS0", "SLOPE", "SLOPE_GRAD",
                                     "S_NEW", "H", "S", "PENDING", "UNDO"] and list(Ctl) == list(range(11))
    assert [s.name for s in Verdict] == ["ACCEPT", "FINITE", "FALLBACK", "LOSS0", "LOSS_TRY",
                                         "SLOPE_USED", "PENDING", "H_NEW"]
    assert CTL_SIZE == 16 and VERDICT_SIZE == 8
