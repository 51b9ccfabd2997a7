"""The plateau test of the alsals_plateau variant (alsals_fused/plateau.py): the incremental
regression test against a direct two-pass one, what it keeps and forgets, and its cost (one read
per test, none in between).  Its backends' decisions are in the contract suite (test_contract.py:
the alsals_plateau trajectories and round trips)."""
import dataclasses
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from alsals_fused import ALSALS
from alsals_fused.config import VARIANT_DEFAULTS
from alsals_fused.plateau import LEAK_RATIO, PlateauTest, t_cdf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def direct_plateau(points, significance):
    """The two-pass test of the harness's prototype (benchmarks/quality/rules.py)."""
    from benchmarks.quality.rules import _still_decreasing
    return not _still_decreasing(points, significance)


def test_t_cdf_matches_known_quantiles():
    # Student's t quantiles (dof: q with P(T <= q) = 0.95), from the standard tables
    for dof, q in ((1, 6.3138), (5, 2.0150), (30, 1.6973), (1000, 1.6464)):
        assert t_cdf(q, dof) == pytest.approx(0.95, abs=2e-5)
        assert t_cdf(-q, dof) == pytest.approx(0.05, abs=2e-5)


@pytest.mark.parametrize("seed", range(6))
def test_the_incremental_test_decides_as_the_two_pass_test(seed):
    """Random losses (falling, flat, or noisy with a big offset), kept with the leak, tested at
    every step: the same verdict as the two-pass regression test on the same kept points."""
    rng = random.Random(seed)
    slope, offset, noise = rng.choice([-1e-3, -1e-4, 0.0, 1e-4]), rng.choice([0.0, 2.0, 1e4]), 0.05
    test = PlateauTest()
    kept, total, agree, drops = [], 0, 0, 0
    for t in range(1, 400):
        loss = offset + slope * t + noise * rng.gauss(0, 1)
        test.add(t, torch.tensor(loss, dtype=torch.float64))
        kept.append((t, loss))
        total += 1
        keep = math.ceil(total / LEAK_RATIO)
        kept = kept[-keep:]
        if len(kept) > 10:
            test.read()
            assert [p for p, _ in test.kept] == [p for p, _ in kept]
            got, want = test.plateaued(0.05), direct_plateau(kept, 0.05)
            assert got == want, f"step {t}: {got} != {want}"
            agree += 1
            if got and rng.random() < 0.3:       # a drop resets both
                test.reset()
                kept, total, drops = [], 0, drops + 1
    assert agree > 30


def test_losses_that_do_not_vary_are_no_plateau_and_non_finite_ones_are_skipped():
    test = PlateauTest()
    for t in range(1, 200):
        test.add(t, torch.tensor(0.0))
    test.read()
    assert len(test) == 100 and not test.plateaued(0.05), "a fitted batch's exact 0 measured nothing"
    test = PlateauTest()
    for t in range(1, 41):
        test.add(t, torch.tensor(math.nan if t % 5 == 0 else 1.0 / t))
    test.read()
    assert all(math.isfinite(v) for _, v in test.kept) and len(test) == 16   # 20 kept, 4 NaN
    assert not test.plateaued(0.05), "1/t still falls"


def test_losses_are_read_once_per_test_and_the_searches_end_at_the_first_drop():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)        # noise: the loss soon stops falling
    opt = ALSALS(model.parameters(), variant="alsals_plateau")
    reads_between_tests = []
    for t in range(1, 301):
        before = opt.reads
        opt.zero_grad()
        opt.step(lambda t=t: torch.nn.functional.mse_loss(model(x[t % 8 * 8:][:8]), y[t % 8 * 8:][:8]))
        extra = opt.reads - before - opt.last_step.trials
        if t % opt.hyper.drop_every:
            reads_between_tests.append(extra)
        else:
            assert extra in (0, 1)
    assert set(reads_between_tests) == {0}
    assert opt._plateau.drops > 0 and opt.counters["searches"] < 300 // opt.hyper.line_search_every


def test_the_cooldown_owns_eta_once_it_has_begun():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = ALSALS(model.parameters(), variant="alsals_plateau", total_steps=400, cooldown_fraction=0.5)
    drops_at = []
    for t in range(1, 401):
        opt.zero_grad()
        drops = opt._plateau.drops
        opt.step(lambda t=t: torch.nn.functional.mse_loss(model(x[t % 8 * 8:][:8]), y[t % 8 * 8:][:8]))
        if opt._plateau.drops > drops:
            drops_at.append(t)
    assert drops_at and max(drops_at) <= 200


def test_the_sums_do_not_depend_on_when_the_losses_were_read():
    """A checkpoint reads the losses early: reading at every step, or only at the tests, leaves
    the same exact sums, so a resumed run tests the same numbers as an uninterrupted one."""
    from fractions import Fraction

    rng = random.Random(3)
    eager, lazy = PlateauTest(), PlateauTest()
    for t in range(1, 300):
        loss = rng.choice([1e-3, 1.0, 1e4]) * (1 + 0.1 * rng.random())
        for test in (eager, lazy):
            test.add(t, torch.tensor(loss, dtype=torch.float64))
        eager.read()
        if t % 10 == 0:
            lazy.read()
            exact = [(test.st, test.stt, Fraction(test.sv) * Fraction(2) ** test.unit,
                      Fraction(test.svv) * Fraction(4) ** test.unit, Fraction(test.stv) * Fraction(2) ** test.unit)
                     for test in (eager, lazy)]
            assert exact[0] == exact[1], t
            assert eager.plateaued(0.05) == lazy.plateaued(0.05)


def _least_squares(seed=0):
    """Linear least squares: the loss is exactly quadratic along any line."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g)
    w = torch.zeros(6, 1, requires_grad=True)
    return w, lambda: ((x @ w - y) ** 2).mean()


def _first_search(on_rise, init_step_size, nan_above=None, seed=0):
    """One alsals_plateau step; the trial step sizes (|w - w0| over the step-1 direction's norm,
    which is eta: the trial points lie on one line) and whether each trial's loss rose above L0."""
    w, closure = _least_squares(seed)
    opt = ALSALS([w], variant="alsals_plateau", init_step_size=init_step_size)
    opt.hyper = dataclasses.replace(opt.hyper, first_backtrack_on_rise=on_rise)   # None: halving only
    w0, calls = w.detach().clone(), []

    def logged():
        loss = closure()
        calls.append((torch.linalg.vector_norm(w.detach() - w0).item(), loss.item()))
        return loss if nan_above is None or loss.item() <= nan_above else loss * math.nan

    opt.step(logged)
    loss0 = calls[0][1]
    trials = calls[1:]                     # calls[0] is the gradient forward
    unit = trials[0][0] / (init_step_size * opt.hyper.growth)
    return opt, w.detach().clone(), [d / unit for d, _ in trials], [not (v <= loss0) for _, v in trials]


@pytest.mark.parametrize("init_step_size", [50.0, 3.0, 0.9])
@pytest.mark.parametrize("nan_above", [None, 10.0], ids=["finite", "nan-when-far"])
def test_the_first_search_quarters_after_a_rise_and_lands_where_halving_does(init_step_size, nan_above):
    """alsals_plateau's first search: 0.25 after a trial whose loss rose above L0 (NaN included),
    0.5 otherwise; on a quadratic profile it accepts the eta that halving accepts, in fewer trials,
    and the step is the same to the bit."""
    assert VARIANT_DEFAULTS["alsals_plateau"].first_backtrack_on_rise == 0.25
    opt, w, etas, rose = _first_search(0.25, init_step_size, nan_above)
    halving, w_halving, etas_halving, _ = _first_search(None, init_step_size, nan_above)
    assert opt.last_step.accepted and halving.last_step.accepted
    assert opt.last_step.eta == halving.last_step.eta and torch.equal(w, w_halving)
    for k in range(len(etas) - 1):
        assert etas[k + 1] / etas[k] == pytest.approx(0.25 if rose[k] else 0.5, rel=1e-4), (etas, rose)
    assert any(rose[:-1]) and not all(rose[:-1]), f"one kind of failed trial only: {rose}"
    assert len(etas) < len(etas_halving)
    assert all(b / a == pytest.approx(0.5, rel=1e-4) for a, b in zip(etas_halving, etas_halving[1:]))


def test_first_backtrack_on_rise_applies_until_a_search_accepts_and_is_validated():
    from alsals_fused.config import make_hyper
    assert make_hyper("alsals", first_backtrack_on_rise=None).first_backtrack_on_rise is None
    for variant, value in (("alsals", 0.25), ("alsals_plateau", 0.6), ("alsals_plateau", 0.0)):
        with pytest.raises(ValueError, match="first_backtrack_on_rise"):
            make_hyper(variant, first_backtrack_on_rise=value)
    opt, *_ = _first_search(0.25, 50.0)
    assert opt._backtrack_factor(loss_rose=True) == opt.hyper.backtrack == 0.9   # a scale was found
