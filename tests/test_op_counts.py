"""Device operations per step, counted (structure, not timing) with benchmarks/hot_path.py's
counter: aten ops dispatched during ``opt.step()`` outside the closure and its backward (views
excluded), plus backend launches, plus device-to-host reads.

foreach: a constant number of ops whatever the tensor count (one multi-tensor op per quantity);
reference: a per-tensor loop plus a constant (the decisions).  On both, a non-searching step
makes one read (the backend's ctl flags on the host; free on CPU) and each trial one verdict read.
"""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "hot_path.py")
_spec = importlib.util.spec_from_file_location("hot_path", _PATH)
hot_path = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hot_path)

SMALL = hot_path.gpt2_shapes(n_layer=1, d=8, vocab=16, ctx=8)      # 16 tensors
LARGER = hot_path.gpt2_shapes(n_layer=4, d=8, vocab=16, ctx=8)     # 52 tensors


def reads(counts, kind):
    return counts["detail"][kind].get("<device-to-host read>", 0)


def test_foreach_op_count_does_not_grow_with_the_tensor_count():
    small, larger = hot_path.op_counts("foreach", SMALL), hot_path.op_counts("foreach", LARGER)
    for key in ("ops_searching_step", "ops_extra_trial", "ops_nonsearching_step"):
        assert small[key] == larger[key], (key, small[key], larger[key])
    # Budgets (today: 69, 37, 27): a regression that adds per-step ops shows up here.
    assert small["ops_searching_step"] <= 70
    assert small["ops_extra_trial"] <= 40
    assert small["ops_nonsearching_step"] <= 28
    assert reads(small, "nonsearching") == 1     # the step pass's ctl flags
    assert reads(small, "searching") == 3        # step pass, fix-up move, one verdict


def test_reference_ops_are_a_per_tensor_loop_plus_a_constant():
    small, larger = hot_path.op_counts("reference", SMALL), hot_path.op_counts("reference", LARGER)
    n_small, n_larger = len(SMALL), len(LARGER)
    for key in ("ops_searching_step", "ops_nonsearching_step", "ops_extra_trial"):
        per_tensor = (larger[key] - small[key]) / (n_larger - n_small)
        assert per_tensor == int(per_tensor) and per_tensor > 0, (key, per_tensor)
        constant = small[key] - per_tensor * n_small
        assert 0 < constant <= 60, (key, constant)


@pytest.mark.parametrize("backend, move_reads", [("reference", 3), ("foreach", 1)])
def test_an_extra_trial_is_a_move_and_one_verdict_read(backend, move_reads):
    extra = hot_path.op_counts(backend, SMALL)["detail"]["extra_trial"]
    assert extra.get("<device-to-host read>") == move_reads + 1   # the move's ctl flags + verdict


@pytest.mark.parametrize("reads_env, variant", [("0", "alsals"), ("1", "alsals"),   # native, Python reads
                                               ("0", "alsals_plateau")])
def test_triton_steps_are_a_handful_of_launches_and_no_torch_op(monkeypatch, reads_env, variant):
    """With the launches stubbed (hot_path's stubs, undone by monkeypatch): a searching step is
    grad, step, fix-up move and verdict launches plus the one read; an extra trial a move, a
    verdict and a read; a non-searching step the grad and step launches.  No torch op runs.
    alsals_plateau's steps between plateau tests are alsals's (hot_path.py --variant)."""
    monkeypatch.setenv("ALSALS_FUSED_PYTHON_READS", reads_env)
    why = hot_path.stub_triton(hot_path.COUNTER, setattr=monkeypatch.setattr)
    if why is not None:
        pytest.skip(why)
    small = hot_path.op_counts("triton", SMALL, variant=variant)
    larger = hot_path.op_counts("triton", LARGER, variant=variant)
    for counts in (small, larger):
        assert counts["variant"] == variant
        assert (counts["ops_searching_step"], counts["ops_extra_trial"],
                counts["ops_nonsearching_step"]) == (5, 3, 2), counts["detail"]
        assert counts["detail"]["nonsearching"] == {"<launch grad_kernel>": 1, "<launch step_kernel>": 1}
        assert counts["detail"]["extra_trial"] == {"<launch move_kernel>": 1, "<launch verdict_kernel>": 1,
                                                   "<device-to-host read>": 1}


def test_alsals_plateau_searching_row_searches_at_every_timed_step():
    """hot_path.py --variant alsals_plateau: the harness's loss keeps falling, so the plateau
    test (which runs from the 50th loss on) never ends the searches of the searching row, and
    host_times' check that every timed step searched holds."""
    times = hot_path.host_times("foreach", SMALL, steps=200, variant="alsals_plateau")
    assert set(times) == {"host_us_searching_step", "host_us_nonsearching_step"}
