"""The native per-step gradient read (alsals_fused._host.GradReader, csrc/host_reader.cpp).

The reader replaces the parameter plan's Python read of the gradients when the helper is built
(``pip install --no-build-isolation -e .``, as the README's test command does).  Its contract:
status 0/1 (+2 for a misaligned address) with the addresses written into the backend's table,
or -1 whenever anything differs from what the plan was built on, and then the Python path
decides.  The plan-level tests run the same scenarios with native and with Python reads and
require the same decisions and bit-identical trajectories.
"""
import os

import pytest
import torch

from alsals_fused import ALSALS, host_ext
from alsals_fused.backends import available_backends
from helpers import OddModel, make_data

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GradReader = host_ext.grad_reader_class()
needs_reader = pytest.mark.skipif(GradReader is None, reason=f"grad reads: {host_ext.status()}")
TRITON = available_backends(DEVICE)["triton"] is None


def test_the_readme_install_builds_the_native_reader():
    """CI runs the README's test command with ALSALS_FUSED_EXPECT_HOST_EXT=1: a build that
    silently skipped the helper would leave every test below skipped."""
    if os.environ.get("ALSALS_FUSED_EXPECT_HOST_EXT") != "1":
        pytest.skip("only where the install is expected to have built the helper (CI)")
    assert GradReader is not None, host_ext.status()


# -- the reader itself ---------------------------------------------------------------------------
def _params(shapes=((7, 13), (13,), (1,), (0,), (3, 5, 2), (129, 3))):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(6, 4, generator=gen).t()))  # dense, transposed
    return params


def _backward(params):
    sum((p * p).sum() for p in params).backward()


def _reader(params):
    table = torch.zeros(len(params), 8, dtype=torch.int64)
    return GradReader(params, table.data_ptr() + 8, 8), table


@needs_reader
def test_reader_writes_the_grad_addresses_and_reports_what_moved():
    params = _params()
    _backward(params)
    reader, table = _reader(params)
    assert len(reader) == len(params)
    assert reader.read() == 1                           # the column was zero
    assert table[:, 1].tolist() == [p.grad.data_ptr() for p in params]
    assert table[:, [0] + list(range(2, 8))].eq(0).all(), "only the grad column is written"
    assert reader.read() == 0
    held = [p.grad for p in params]                     # keep them alive: new addresses
    for p in params:
        p.grad = None
    _backward(params)
    assert reader.read() == 1 and table[:, 1].tolist() == [p.grad.data_ptr() for p in params]
    del held
    # a gradient that is a 4-byte-offset view: still dense, not 16-byte aligned
    base = torch.zeros(params[1].numel() + 1)
    params[1].grad = base[1:]
    assert reader.read() == 3


@needs_reader
@pytest.mark.parametrize("change", ["grad None", "new storage", "view in place", "transposed in place",
                                    "grad layout", "swapped tensor", "sparse grad"])
def test_reader_hands_anything_unusual_to_the_python_path(change):
    params = _params()
    _backward(params)
    reader, table = _reader(params)
    assert reader.read() == 1
    square = torch.nn.Parameter(torch.randn(4, 4))
    params.append(square)
    square.grad = torch.randn(4, 4)
    reader, table = _reader(params)
    assert reader.read() == 1
    if change == "grad None":
        params[2].grad = None
    elif change == "new storage":
        params[0].data = params[0].data.clone()
    elif change == "view in place":
        params[1].data = params[1].data.view(13, 1)
    elif change == "transposed in place":
        square.data = square.data.t()
    elif change == "grad layout":
        square.grad = torch.randn(4, 4).t()
    elif change == "swapped tensor":
        other = torch.nn.Parameter(torch.randn(7, 13))
        other.grad = torch.randn(7, 13)
        torch.utils.swap_tensors(params[0], other)
    elif change == "sparse grad":
        params[1].grad = torch.randn(13).to_sparse()
    assert reader.read() == -1


@needs_reader
def test_reader_refuses_bad_arguments_and_keeps_its_params_alive():
    with pytest.raises(TypeError, match="tensors"):
        GradReader([1.0], torch.zeros(1, dtype=torch.int64).data_ptr(), 1)
    with pytest.raises(ValueError, match="dest_address"):
        GradReader([torch.zeros(2)], 0, 1)
    with pytest.raises(ValueError, match="dest_stride"):
        GradReader([torch.zeros(2)], torch.zeros(1, dtype=torch.int64).data_ptr(), 0)
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.ones(3)
    reader, table = _reader(params)
    del params                                          # the reader holds its own references
    assert reader.read() == 1 and table[0, 1] != 0



# -- gradient marks (the integration checks' watch on p.grad) -------------------------------------
MARKS = [pytest.param("native", marks=needs_reader), "python"]


def _marks(kind, params):
    from alsals_fused.user_gradients import PyGradMarks
    return host_ext.module().GradMarks(params) if kind == "native" else PyGradMarks(params)


@pytest.mark.parametrize("kind", MARKS)
def test_gradient_marks_report_every_kind_of_gradient_write(kind):
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    marks = _marks(kind, [p, q])
    assert marks.changed() == -1, "no gradient anywhere"
    p.sum().backward()
    assert marks.changed() == 1, "a gradient and no record yet"
    marks.record()
    assert marks.changed() == 0
    p.grad.add_(1)
    assert marks.changed() == 1, "written in place"
    marks.record()
    p.grad = None
    assert marks.changed() == -1, "set to None: nothing can accumulate into it"
    q.sum().backward()
    assert marks.changed() == 1, "a gradient where none was recorded"
    marks.record()
    q.grad = q.grad.detach().clone()
    assert marks.changed() == 1, "another tensor, same values"
    marks.record()
    recorded = q.grad
    q.grad = None
    del recorded                       # the recorded gradient is freed: a weak reference
    q.sum().backward()
    assert marks.changed() == 1, "a new gradient after the recorded one was freed"


@pytest.mark.parametrize("kind", MARKS)
def test_the_integration_checks_fire_alike_with_either_marks(kind, monkeypatch):
    monkeypatch.setenv("ALSALS_FUSED_PYTHON_READS", "1" if kind == "python" else "0")
    w = torch.nn.Parameter(torch.ones(4))
    opt = ALSALS([w], backend="foreach")
    marks = opt._gradient_marks()
    assert type(marks).__name__ == ("GradMarks" if kind == "native" else "PyGradMarks")
    closure = lambda: (w * w).sum()  # noqa: E731
    opt.zero_grad()
    opt.step(closure)
    (w * w).sum().backward()                            # a backward outside step()
    with pytest.raises(RuntimeError, match="already holds gradients computed"):
        opt.step(closure)
    opt.zero_grad()

    def runs_backward():
        loss = (w * w).sum()
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="ran backward itself"):
        opt.step(runs_backward)
    opt.zero_grad()
    opt.step(closure)
    with pytest.warns(UserWarning, match="previous step's gradient"):
        opt.step(closure)                                # no zero_grad() since the last step



@pytest.mark.parametrize("kind", MARKS)
def test_a_failed_record_keeps_the_previous_marks(kind):
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    (p.sum() + q.sum()).backward()
    marks = _marks(kind, [p, q])
    marks.record()
    with torch.inference_mode():
        p.grad = torch.ones(3)             # an inference tensor has no version counter
    with pytest.raises(RuntimeError, match="version counter"):
        marks.record()
    p.grad = None
    assert marks.changed() == 0, "q's gradient is as recorded before the failed record"


@pytest.mark.parametrize("kind", MARKS)
@pytest.mark.parametrize("then", ["add_param_group", "load_state_dict"])
def test_a_backward_before_new_groups_or_a_load_is_still_seen(kind, then, monkeypatch):
    monkeypatch.setenv("ALSALS_FUSED_PYTHON_READS", "1" if kind == "python" else "0")
    w, extra = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))
    opt = ALSALS([w], backend="foreach")
    closure = lambda: (w * w).sum()  # noqa: E731
    opt.zero_grad()
    opt.step(closure)
    saved = opt.state_dict()
    opt.zero_grad()
    (w * w).sum().backward()                            # a backward outside step()
    if then == "add_param_group":
        opt.add_param_group({"params": [extra]})
    else:
        opt.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="already holds gradients computed"):
        opt.step(closure)


# -- the plan with native and with Python reads ---------------------------------------------------
READS = [pytest.param("native", marks=needs_reader), "python"]


@pytest.fixture(params=READS)
def reads(request, monkeypatch):
    monkeypatch.setenv("ALSALS_FUSED_PYTHON_READS", "1" if request.param == "python" else "0")
    return request.param


needs_triton = pytest.mark.skipif(not TRITON, reason=f"triton: {available_backends(DEVICE)['triton']}")


def _opt(model, **kw):
    return ALSALS(model.groups(), backend="triton", **kw)


def _step(opt, model, x, y, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    return opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y.float()))


def _model():
    model = OddModel().to(DEVICE)
    x, y = make_data()
    return model, x.to(DEVICE), y.to(DEVICE)


@needs_triton
def test_native_reads_are_used_by_the_triton_plan(reads):
    model, x, y = _model()
    opt = _opt(model)
    _step(opt, model, x, y)
    assert (opt._plan.readers is not None) == (reads == "native")
    model, x, y = _model()
    ref = ALSALS(model.parameters(), backend="reference")
    _step(ref, model, x, y)
    assert ref._plan.readers is None, "the reference backend has no grad sink"


@needs_reader
@needs_triton
def test_native_and_python_reads_give_bit_identical_trajectories(monkeypatch):
    runs = {}
    for mode in ("native", "python"):
        monkeypatch.setenv("ALSALS_FUSED_PYTHON_READS", "0" if mode == "native" else "1")
        torch.manual_seed(0)                            # the model has dropout
        model, x, y = _model()
        opt = _opt(model, line_search_every=3)
        losses = []
        for k in range(9):
            # alternate fresh gradients (new addresses) and accumulated-into ones
            losses.append(float(_step(opt, model, x, y, set_to_none=k % 3 != 2).detach()))
        assert (opt._plan.readers is not None) == (mode == "native")
        runs[mode] = (losses, [p.detach().clone() for p in model.parameters()], opt.counters)
    assert runs["native"][0] == runs["python"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["native"][1], runs["python"][1]))
    assert runs["native"][2] == runs["python"][2]


@needs_triton
def test_the_plan_decides_alike_with_either_read(reads):
    model, x, y = _model()
    opt = _opt(model)
    _step(opt, model, x, y)
    plan, version = opt._plan, opt._plan.buckets[0].grads_version
    _step(opt, model, x, y, set_to_none=False)          # the same gradient tensors
    assert opt._plan is plan and plan.buckets[0].grads_version == version
    held = [p.grad for p in model.parameters()]
    _step(opt, model, x, y)                             # fresh gradients at new addresses
    assert opt._plan is plan and plan.buckets[0].grads_version == version + 1
    del held
    model.w1.data = model.w1.data.clone()               # same Parameter, new storage: rebuild
    _step(opt, model, x, y)
    assert opt._plan is not plan
    plan = opt._plan
    opt.zero_grad()
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y) + model.unused.sum() ** 2)
    assert opt._plan is not plan and model.unused in opt.state   # a param gained a gradient


@needs_triton
def test_a_reshaped_parameter_fails_before_any_write_with_either_read(reads):
    a = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    b = torch.nn.Parameter(torch.ones(2, device=DEVICE))
    opt = ALSALS([a, b], backend="triton")
    opt.step(lambda: (a.sum() + b.sum()) ** 2)
    a0 = a.detach().clone()
    b.data = b.data.view(2, 1)
    opt.zero_grad()
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        opt.step(lambda: (a.sum() + b.sum()) ** 2)
    assert torch.equal(a.detach(), a0)


@needs_triton
def test_a_user_gradient_that_is_misaligned_is_handled_alike(reads, monkeypatch):
    """step() on gradients the user computed: one of them a 4-byte-offset view."""
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(33, device=DEVICE))
        opt = ALSALS([w], backend="triton", line_search_every=10 ** 6)
        for _ in range(3):
            with opt.micro_batch(lambda w=w: (w * w).sum()) as mb:
                loss = (w * w).sum()
                base = torch.zeros(34, device=DEVICE)
                base[1:] = 2 * w.detach()
                w.grad = base[1:]
                mb.loss = loss
            opt.step()
        finals.append(w.detach().clone())
    assert torch.equal(finals[0], finals[1])
    torch.testing.assert_close(finals[0], finals[0])    # finite and defined


# -- CPU random-number snapshots ---------------------------------------------------------------------
@needs_reader
def test_cpu_rng_state_round_trips_everything_get_rng_state_encodes():
    from alsals_fused import _host
    torch.manual_seed(7)
    torch.randn(3, dtype=torch.float64)
    torch.normal(0.0, 1.0, size=(1,))                   # may leave a cached normal sample
    state = _host.CpuRngState()
    with pytest.raises(RuntimeError, match="before capture"):
        state.restore()
    state.capture()
    expected = torch.get_rng_state()
    draws = (torch.rand(5), torch.randn(3), torch.normal(0.0, 1.0, size=(1,)), torch.randint(9, (4,)))
    state.restore()
    assert torch.equal(torch.get_rng_state(), expected)
    again = (torch.rand(5), torch.randn(3), torch.normal(0.0, 1.0, size=(1,)), torch.randint(9, (4,)))
    assert all(torch.equal(a, b) for a, b in zip(draws, again))


@needs_reader
def test_rng_snapshots_are_reused_and_not_restored_after_release(monkeypatch):
    from alsals_fused._types import _RngState
    monkeypatch.setattr(_RngState, "free", [])
    first = _RngState((), host_ext.module())
    native = first.cpu
    assert not isinstance(native, torch.Tensor)
    first.release()
    second = _RngState((), host_ext.module())
    assert second.cpu is native, "a released snapshot is reused: no allocation per step"
    with pytest.raises(RuntimeError, match="after its release"):
        first.restore()


def test_dropout_replay_is_exact_with_either_rng_snapshot(reads):
    w = torch.nn.Parameter(torch.ones(4))
    opt = ALSALS([w], backend="foreach", init_step_size=20.0)   # several trials
    draws = []

    def closure():
        draws.append(torch.rand(4))
        return ((w - draws[-1]) ** 2).sum()

    torch.manual_seed(123)
    opt.step(closure)
    assert opt.last_step.trials > 2 and all(torch.equal(d, draws[0]) for d in draws)
    after = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(4)
    assert torch.equal(torch.rand(1), after), "the generator continues after one forward's draws"
