"""The quality harness's CI smoke subset (seconds) and the "adaptive" variant's host rules."""
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from alsals_fused import ALSALS
from alsals_fused.config import VARIANT_DEFAULTS, VARIANTS, make_hyper

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # benchmarks/ is not installed; plain `pytest` runs from tests/
    sys.path.insert(0, str(REPO))


@pytest.mark.slow   # a whole quality-harness run
def test_harness_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.quality import run
    from benchmarks.quality.methods import PEERS, peer_status, salsa_package_status

    peers = [p for p in PEERS if peer_status(p) is None]
    if not peers and "CI" in __import__("os").environ:
        pytest.fail("the learning-rate-free peers are test dependencies: " + "; ".join(
            peer_status(p) or "" for p in PEERS))
    methods = ["adam@0.001", "adam@0.01", "alsals/every", "adaptive/auto", "salsa/auto"] + peers
    if salsa_package_status() is None:
        methods.append("salsa_pkg")
    out = run.main(["--quick", "--steps-scale", "0.06", "--workloads", "cnn_bn,spirals",
                    "--methods", ",".join(methods), "--out", str(tmp_path), "--tag", "smoke", "--quiet"])
    summary = out["summary"]
    assert set(summary) == {"cnn_bn", "spirals"}
    for wl, ms in summary.items():
        assert set(ms) - {"_best_adam", "_best_peer"} == set(methods), wl
        assert ms["_best_adam"]["method"] in ("adam@0.001", "adam@0.01")
        assert ms["_best_peer"]["method"] in (peers or [None])
        assert ms["adam@0.001"]["vs_adam_1e-3"] == pytest.approx(1.0)
        for m in methods:
            a = ms[m]
            assert math.isfinite(a["final_train_loss"]), (wl, m)
            assert a["forwards_per_step"] >= 1
        assert ms["alsals/every"]["forwards_per_step"] >= 2      # every step searches
        assert ms["adaptive/auto"]["first_step_trials"] <= 10
        # One forward per step: the loss at an equal number of forwards is the final loss.
        assert ms["adam@0.01"]["final_train_loss_eqf"] == pytest.approx(ms["adam@0.01"]["final_train_loss"])
    md = (tmp_path / "smoke-results.md").read_text()
    assert "## Targets" in md and "## Verdict at an equal number of forward passes" in md
    assert "| adaptive/auto |" in md and "(confirm)" in md and "(tune)" in md
    report = json.loads((tmp_path / "smoke-results.json").read_text())
    assert all(len(r["etas"]) == r["steps"] == len(r["fwds"]) for r in report["runs"])
    for wl in ("cnn_bn", "spirals"):
        assert (tmp_path / f"smoke-{wl}.png").read_bytes().startswith(PNG_MAGIC)
    # --merge: another seed run later; the merged report names both runs' dates and both seeds.
    later = dict(report, meta=dict(report["meta"], date="2999-01-01 00:00 UTC"),
                 runs=[dict(r, seed=r["seed"] + 1) for r in report["runs"]])
    (tmp_path / "later.json").write_text(json.dumps(later))
    run.main(["--merge", str(tmp_path / "smoke-results.json"), str(tmp_path / "later.json"),
              "--out", str(tmp_path / "merged"), "--tag", "m", "--no-plot"])
    merged = (tmp_path / "merged" / "m-results.md").read_text()
    assert f"seeds [{report['runs'][0]['seed']}, {report['runs'][0]['seed'] + 1}]" in merged
    assert f"generated {report['meta']['date']} to 2999-01-01 00:00 UTC" in merged


def test_harness_writes_no_committed_file_unless_asked():
    from benchmarks.quality import run
    for argv in ([], ["--quick"]):
        out = Path(run.parse_args(argv).out).resolve()
        assert out != (REPO / "benchmarks" / "quality" / "results").resolve()
        assert out.name == "out"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/benchmarks/quality/out/" in ignored


def test_loss_at_an_equal_number_of_forwards():
    from benchmarks.quality.run import _final_at_forwards
    losses = [float(i) for i in range(20)]
    # One forward per step: the last 10% of 20 steps.
    assert _final_at_forwards(losses, [1] * 20, 20) == pytest.approx((18 + 19) / 2)
    # Two forwards per step: the budget of 20 forwards ends after step 10; its window (forwards
    # 19-20) holds step 10 only (index 9).
    assert _final_at_forwards(losses, [2] * 20, 20) == pytest.approx(9.0)
    # A run that stops before the window reports NaN instead of a loss from another budget.
    assert math.isnan(_final_at_forwards(losses[:5], [1] * 5, 20))


def test_eta_collapse_is_a_fall_of_1000x_or_a_step_below_1e_6():
    from benchmarks.quality.run import _eta_collapse
    assert not _eta_collapse([1e-2, 1e-3, 2e-5, 1e-2])
    assert _eta_collapse([1e-2, 5e-6])                      # 2000x below the running peak
    assert _eta_collapse([5e-7])
    assert not _eta_collapse([1e-3, math.nan, 1e-3])


def test_paper_variants_keep_their_definitions():
    for v in ("alsals", "adam_sls", "salsa"):
        h = VARIANT_DEFAULTS[v]
        assert h.first_backtrack is None and h.first_backtrack_on_rise is None and h.growth_boost == 1.0, v
    assert VARIANTS[0] == "alsals" and ALSALS([torch.zeros(1, requires_grad=True)]).hyper.variant == "alsals"
    h = make_hyper("adaptive")
    assert (h.c, h.smoothing, h.growth, h.backtrack, h.first_backtrack, h.line_search_every) == \
        (0.3, 0.99, 1.01, 0.9, 0.3, "auto")
    assert not h.momentum_search and not h.update_is_trial_point
    with pytest.raises(ValueError):
        make_hyper("adaptive", first_backtrack=1.5)


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1].sin()
    return model, lambda: torch.nn.functional.mse_loss(model(x), y)


def test_adaptive_first_step_backtracks_fast_then_normally():
    model, closure = _problem()
    opt = ALSALS(model.parameters(), variant="adaptive", init_step_size=10.0)
    opt.step(closure)
    first = opt.last_step
    assert first.accepted and first.trials <= 10
    # 10 * 1.01 * 0.3**(trials-1): the first search used first_backtrack.
    assert first.eta == pytest.approx(10.0 * 1.01 * 0.3 ** (first.trials - 1))
    assert opt._backtrack_factor(loss_rose=True) == 0.9      # a scale was found
    for _ in range(5):
        opt.zero_grad()
        opt.step(closure)
    assert opt.counters["rejected"] == 0


def test_growth_boost_grows_while_first_trials_pass_and_resets():
    model, closure = _problem(1)
    opt = ALSALS(model.parameters(), variant="adaptive")
    opt.hyper = make_hyper("adaptive", growth_boost=1.01, growth_max=1.035, line_search_every=1)
    opt._adapt_growth(True, 1)
    assert opt._growth == pytest.approx(1.01 ** 2)
    opt._adapt_growth(True, 1)
    assert opt._growth == pytest.approx(1.01 ** 3)
    opt._adapt_growth(True, 1)
    assert opt._growth == pytest.approx(1.035)                # capped
    opt._adapt_growth(True, 3)
    assert opt._growth == pytest.approx(1.01)                 # a backtrack resets it
    eta = opt.eta
    assert opt._first_trial_eta(True) == pytest.approx(eta * 1.01)


def test_adaptive_state_round_trips():
    model, closure = _problem(2)
    opt = ALSALS(model.parameters(), variant="adaptive")
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["alsals"]["scale_found"] is True
    other = ALSALS(model.parameters(), variant="adaptive")
    other.load_state_dict(sd)
    assert other._scale_found and other._growth == opt._growth and other.eta == opt.eta


def test_statistical_drop_quantiles_and_interval_test():
    from benchmarks.quality.rules import _LeakyBucket, _stationary, _still_decreasing, _t_quantile
    for p, dof, table in ((0.975, 1, 12.706), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.95, 30, 1.697)):
        assert _t_quantile(p, dof) == pytest.approx(table, abs=1e-3)
    assert _t_quantile(0.05, 30) == pytest.approx(-1.697, abs=1e-3)
    bucket = _LeakyBucket(4)                 # keeps the most recent ceil(n / 4) samples
    for i in range(9):
        bucket.add(i)
    assert bucket.values == [6, 7, 8]
    noise = torch.randn(200, generator=torch.Generator().manual_seed(3)).tolist()
    # mean 0.1 + noise: inside the interval (its halves' means share a sign); mean 1: outside
    for composite in (False, True):
        assert [_stationary([x + shift for x in noise], 0.05, composite) for shift in (0.1, 1.0)] == [True, False]
    assert not _stationary([x + (0.5 if i < 100 else -0.5) for i, x in enumerate(noise)], 0.05, False)
    noise = torch.randn(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert _still_decreasing([(i, 1 - 0.002 * i + 0.1 * x) for i, x in enumerate(noise)], 0.05)
    assert not _still_decreasing([(i, 1 + 0.1 * x) for i, x in enumerate(noise)], 0.05)


def test_statistical_drop_searches_as_the_driver_until_it_switches():
    from benchmarks.quality.rules import StatisticalDrop
    model, closure = _problem(3)
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(64, 8)
    y = x[:, :1].sin()
    rule = StatisticalDrop(model.parameters(), line_search_every=2, min_samples=10 ** 6)
    plain = ALSALS(twin.parameters(), line_search_every=2)
    for _ in range(6):
        for opt, net in ((rule, model), (plain, twin)):
            opt.zero_grad()
            opt.step(lambda net=net: torch.nn.functional.mse_loss(net(x), y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert rule.switched_at is None and rule._samples.total == 6     # one sample per step
    rule.switched_at = rule.t                 # after the switch: constant eta, no trial forwards
    eta = rule.eta
    for _ in range(3):
        rule.zero_grad()
        rule.step(closure)
        assert rule.last_step.trials == 0 and rule.eta == eta


def test_welch_test_of_a_lower_mean():
    from benchmarks.quality.rules import _significantly_lower
    noise = torch.randn(60, generator=torch.Generator().manual_seed(1)).tolist()
    before, after = noise[:40], noise[40:]
    assert _significantly_lower([x - 1.0 for x in after], before, 0.05)
    assert not _significantly_lower(after, before, 0.05)
    assert not _significantly_lower([x + 1.0 for x in after], before, 0.05)


def _level_problem(rule_box, slope):
    """A loss flat in the parameters (zero gradient): slope * eta + small noise drawn per step,
    so that a drop lowers it (slope > 0) or leaves it where it was (slope 0, a plateau)."""
    w = torch.nn.Parameter(torch.zeros(3))
    noise = (0.01 * torch.randn(400, generator=torch.Generator().manual_seed(2))).tolist()

    def closure():
        rule = rule_box[0]
        return (w * 0).sum() + 1.0 + slope * rule.eta + noise[rule.t]
    return w, closure


@pytest.mark.parametrize("slope, kept", [(10.0, True), (0.0, False)])
def test_statistical_drop_check_keeps_a_drop_only_if_the_loss_falls_after_it(slope, kept):
    from benchmarks.quality.rules import StatisticalDrop
    box: list = []
    w, closure = _level_problem(box, slope)
    rule = StatisticalDrop([w], drop_test="loss", drop_factor=2.0, min_samples=10, test_every=5,
                           leak_ratio=1, loss_switch=False, drop_check=10, line_search_every=10 ** 9)
    box.append(rule)
    for _ in range(60):
        rule.zero_grad()
        rule.step(closure)
        if rule.drops:
            break
    (at, eta_dropped), = rule.drops
    eta0 = 2.0 * eta_dropped
    for _ in range(10):
        rule.zero_grad()
        rule.step(closure)
    assert (rule.reverted == []) is kept
    assert rule.eta == (eta_dropped if kept else eta0)
    assert (rule.switched_at is not None) is kept      # an undone first drop resumes the searches


def test_per_unit_search_units_first_step_and_one_unit_per_search():
    from benchmarks.quality.rules import PerUnitSearch
    model, closure = _problem(4)
    layers = PerUnitSearch(model.parameters(), line_search_every=2)
    assert [[tuple(p.shape) for p in u] for u in layers.units] == [[(16, 8), (16,)], [(1, 16), (1,)]]
    assert len(PerUnitSearch(model.parameters(), units="global").units) == 1
    before = [p.detach().clone() for p in model.parameters()]
    layers.step(closure)                       # step 1: one search of every unit together
    eta = layers.etas[0]
    assert layers.etas == [eta, eta] and layers.last_step.trials >= 1
    for p, w in zip(model.parameters(), before):    # Adam's first direction: g / (|g| + eps)
        expected = w - eta * p.grad / (p.grad.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    layers.zero_grad()
    layers.step(closure)                       # step 2 searches unit 0 alone
    assert layers.searched_at == [2, 1] and layers.etas[1] == eta and layers.next_unit == 1


def test_relative_standard_error_over_seeds():
    from benchmarks.quality.run import _relative_se
    assert _relative_se([1.0]) is None and _relative_se([1.0, math.nan]) is None
    assert _relative_se([1.0, 3.0]) == pytest.approx(0.5)         # sd sqrt(2), se 1, mean 2
    assert _relative_se([2.0, 2.0, 2.0]) == 0.0


@pytest.mark.parametrize("alternate, drops", [(True, True), (False, False)])
def test_pflug_drop_fires_on_gradients_that_point_against_each_other(alternate, drops):
    from benchmarks.quality.rules import StatisticalDrop
    w = torch.nn.Parameter(torch.zeros(3))
    direction = torch.tensor([1.0, -2.0, 0.5])
    box: list = []

    def closure():                   # a linear loss: its gradient is +-direction
        sign = -1.0 if alternate and box[0].t % 2 else 1.0
        return (w * direction).sum() * sign
    rule = StatisticalDrop([w], drop_test="pflug", drop_factor=2.0, min_samples=10, test_every=5,
                           leak_ratio=1, loss_switch=False, line_search_every=10 ** 9)
    box.append(rule)
    for _ in range(20):
        rule.zero_grad()
        rule.step(closure)
    assert bool(rule.drops) is drops
    assert rule._samples.values[0] == pytest.approx(-1.0 if alternate else 1.0)


def test_every_workload_builds_and_trains_a_step():
    """Each workload's data (seeded: the same twice), model and loss give a finite loss whose
    gradient reaches every parameter; what the harness's full runs start from."""
    from benchmarks.quality.workloads import WORKLOADS

    for name, wl in WORKLOADS.items():
        data, again = wl.make_data(0), wl.make_data(0)
        assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_train, again.y_train), name
        torch.manual_seed(0)
        model = wl.make_model()
        x, y = data.get(torch.arange(min(wl.batch_size, data.n_train)))
        loss = wl.loss_fn(model(x), y)
        loss.backward()
        assert math.isfinite(loss.item()), name
        assert all(p.grad is not None for p in model.parameters()), name


def test_calibrate_reports_one_rate_tuned_halves_and_each_method(tmp_path):
    """benchmarks.quality.calibrate on hand-made finals whose every figure is worked out here."""
    from benchmarks.quality.calibrate import main
    losses = {("w1", "adam@0.1"): [1.0] * 4, ("w1", "adam@1"): [2.0] * 4, ("w1", "x"): [1.05] * 4,
              ("w2", "adam@0.1"): [3.0] * 4, ("w2", "adam@1"): [1.0, 1.0, 1.5, 1.5], ("w2", "x"): [1.5] * 4}
    runs = [{"workload": w, "method": m, "seed": s, "final_train_loss": v, "forwards_per_step": 1.0}
            for (w, m), values in losses.items() for s, v in enumerate(values)]
    # A method run on fewer seeds (or workloads) than the grid is left out, and said so.
    runs += [{"workload": "w1", "method": m, "seed": 0, "final_train_loss": 9.0, "forwards_per_step": 1.0}
             for m in ("y", "adam_cd@1")]
    results = tmp_path / "r-results.json"
    results.write_text(json.dumps({"runs": runs}))
    finals = tmp_path / "finals.json"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main([str(results), "--write-finals", str(finals)])
    text = printed.getvalue()
    assert "| adam@0.1 | 1/2 | 2.40 |" in text and "| adam@1 | 1/2 | 2.00 |" in text   # w2's best: 1.25
    assert "3 splits of seeds [0, 1, 2, 3]" in text and "on 2-2 of 2 workloads (mean 2.0); missed: none" in text
    # x: w1 within (1.05), w2 1.5/1.25; on two seeds w2 is within only where adam@1 read 1.5 (seeds 2, 3)
    assert "| x | 1/2 | 1-2, 1.2 | 1.20 | 1.05 | 1.12 |" in text
    assert "Left out (not run on every one of these seeds and workloads): y." in text and "| y |" not in text
    assert json.loads(finals.read_text())["runs"] == runs
