"""The reference backend against values derived by hand on a one-dimensional quadratic.

Every expectation is recomputed here in scalar float64 arithmetic straight from docs/algorithm.md, so a
mistake in the driver or the reference cannot hide in a shared helper.
"""
import math

import pytest
import torch

from alsals_fused import ALSALS

EPS = 1e-8


def quadratic(w, a=1.0, center=0.0):
    return 0.5 * a * (w - center) ** 2


def run(variant, steps, centers, init=5.0, **kw):
    """Steps on L_k(w) = 0.5*(w - centers[k])^2 (one 'mini-batch' per step), fp64 params."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = ALSALS([w], variant=variant, init_step_size=init, backend="reference", **kw)
    infos = []
    for k in range(steps):
        opt.zero_grad()
        opt.step(lambda k=k: quadratic(w, center=centers[k]).sum())
        infos.append((w.item(), opt.eta, opt.last_step.trials, opt.last_step.accepted,
                      opt.last_step.fallback))
    return infos, opt


def by_hand(variant, steps, centers, init=5.0, c=None, smoothing=None, growth=None):
    """docs/algorithm.md section 1 for one scalar parameter, in plain floats."""
    defaults = {"alsals": (0.5, 0.99, 1 / 0.999), "adam_sls": (0.1, 0.0, 2 ** (1 / 500)),
                "salsa": (0.3, 0.99, 2 ** (1 / 500))}[variant]
    c = defaults[0] if c is None else c
    b3 = defaults[1] if smoothing is None else smoothing
    growth = defaults[2] if growth is None else growth
    b1, b2, backtrack = 0.9, 0.999, 0.9
    w, m, v, eta, h, s = 1.0, 0.0, 0.0, init, 0.0, 0.0
    out = []
    for t in range(1, steps + 1):
        center = centers[t - 1]
        loss = lambda x, center=center: 0.5 * (x - center) ** 2  # noqa: E731
        g = w - center
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = 1 / (math.sqrt(v / (1 - b2 ** t)) + EPS)
        m_hat = m / (1 - b1 ** t)
        d_search = m_hat * p if variant == "alsals" else g * p
        d_update = m_hat * p
        eta *= growth
        slope = g * d_search
        s_new = b3 * s + (1 - b3) * slope
        fallback = s_new <= 0
        if fallback:
            d_search = d_update = g * p
            slope = g * g * p
        trials, accepted = 0, False
        while trials < 100:
            trials += 1
            diff = loss(w) - loss(w - eta * d_search)
            if fallback:
                ok = diff >= c * eta * slope
            else:
                h_new = b3 * h + (1 - b3) * diff
                ok = h_new >= c * eta * s_new
            if ok:
                accepted = True
                break
            eta *= backtrack
        if accepted:
            if not fallback:
                h, s = h_new, s_new
            w = w - eta * d_update if variant != "alsals" else w - eta * d_search
        out.append((w, eta, trials, accepted, fallback))
    return out


@pytest.mark.parametrize("variant", ["alsals", "adam_sls", "salsa"])
def test_first_step_backtracks_to_the_armijo_bound(variant):
    # At t=1, m_hat*p = g*p = g/(|g|+eps) ~ 1, so the test is 0.5 - 0.5(1-eta)^2 >= c*eta, i.e.
    # eta <= 2(1-c): from 5*growth the search must backtrack k times with k the smallest integer
    # such that 5*growth*0.9^k <= 2(1-c) (up to the eps in p).
    c = {"alsals": 0.5, "adam_sls": 0.1, "salsa": 0.3}[variant]
    growth = 1 / 0.999 if variant == "alsals" else 2 ** (1 / 500)
    k = math.ceil(math.log(5 * growth / (2 * (1 - c))) / math.log(1 / 0.9))
    eta = 5 * growth * 0.9 ** k
    infos, opt = run(variant, 1, [0.0])
    w, got_eta, trials, accepted, _ = infos[0]
    assert accepted and trials == k + 1
    assert got_eta == pytest.approx(eta, rel=1e-12)
    assert w == pytest.approx(1 - eta / (1 + EPS), rel=1e-12)
    assert opt.param_groups[0]["lr"] == got_eta


@pytest.mark.parametrize("variant", ["alsals", "adam_sls", "salsa"])
def test_six_steps_match_the_scalar_derivation(variant):
    # Moving centers make momentum and gradient directions differ, so the variants diverge.
    centers = [0.0, 0.3, -0.2, 0.5, 0.1, -0.4]
    got, _ = run(variant, 6, centers, line_search_every=1)
    want = by_hand(variant, 6, centers)
    for step, (g_row, w_row) in enumerate(zip(got, want)):
        assert g_row[2:] == w_row[2:], f"step {step}: trials/accepted/fallback differ"
        assert g_row[0] == pytest.approx(w_row[0], rel=1e-12, abs=1e-14), f"step {step}: w"
        assert g_row[1] == pytest.approx(w_row[1], rel=1e-12), f"step {step}: eta"


def test_non_descent_momentum_falls_back_to_the_gradient_direction():
    # Step 1 pulls w from 1 towards 0; step 2's mini-batch has its minimum far to the right, so
    # g < 0 while m_hat > 0: slope = g*m_hat*p < 0 and, with no smoothing, s_new < 0.
    centers = [0.0, 1.5]
    got, opt = run("alsals", 2, centers, init=0.1, smoothing=0.0)
    want = by_hand("alsals", 2, centers, init=0.1, smoothing=0.0)
    assert want[1][4] and got[1][4], "the derivation and the optimizer both fall back"
    assert got[1][0] == pytest.approx(want[1][0], rel=1e-12)
    assert got[1][0] > got[0][0], "the fallback step moves along -g (to the right)"
    assert opt.counters["fallbacks"] == 1
