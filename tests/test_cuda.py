"""The CUDA extension backend (``alsals_fused._C``) against the reference, on the GPU.

Tests marked ``cuda`` need a GPU (conftest skips them otherwise) and the built extension (they
skip with the reason when it is missing, unless ALSALS_FUSED_REQUIRE_EXTENSION=1 makes that a
failure).  The last tests run anywhere: backend="cuda" off a GPU must say why it cannot run.

Tolerances: fp32 params and all moments within 1e-5 relative (fp32 rounding of a few ops, the
kernels divide where torch may multiply by a reciprocal); bf16/fp16 params within one ulp of their
dtype; the fp64 slope sums within 1e-5 relative (sums of fp32 products, in another order).
"""
from __future__ import annotations

import os

import pytest
import torch

from alsals_fused import ALSALS, BackendUnavailable, available_backends
from alsals_fused.backends import get_backend
from alsals_fused.backends.base import Bucket, Dir, StepScalars
from alsals_fused.backends.foreach import ForeachBackend
from alsals_fused.backends.reference import ReferenceBackend

CHUNK = 8192  # csrc/launch_table.h kChunk
SHAPES = [(0,), (1,), (7,), (13, 17), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (5, 4099), (3, 3, 8209)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WDS = [0.0, 0.01, 0.1]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5),
       torch.float16: dict(rtol=2 ** -10, atol=1e-5)}
MOMENT_TOL = dict(rtol=1e-5, atol=1e-8)


def _extension():
    from alsals_fused.backends import cuda_backend
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        if os.environ.get("ALSALS_FUSED_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the CUDA extension is required: {reason}")
        pytest.skip(reason)
    return cuda_backend.load_extension()


@pytest.fixture
def ext():
    return _extension()


@pytest.fixture
def cuda():
    _extension()
    return get_backend("cuda", torch.device("cuda"))


# -- buckets ------------------------------------------------------------------------------------
def make_bucket(dtype, shapes=SHAPES, *, seed=0, backups=True, misaligned=False, wds=WDS) -> Bucket:
    """Random params/grads/moments on the GPU; misaligned=True makes every tensor a view at a
    one-element storage offset (the kernels' scalar path)."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    b = Bucket(device=dev, dtype=dtype)

    def place(x, dt):
        x = x.to(dt)
        if not misaligned:
            return x.to(dev)
        base = torch.empty(x.numel() + 1, dtype=dt, device=dev)
        view = base[1:].view(x.shape)
        view.copy_(x)
        return view

    for i, shape in enumerate(shapes):
        b.params.append(place(torch.randn(shape, generator=gen), dtype))
        b.grads.append(place(torch.randn(shape, generator=gen) * 0.1, dtype))
        b.exp_avgs.append(place(torch.randn(shape, generator=gen) * 0.01, torch.float32))
        b.exp_avg_sqs.append(place(torch.rand(shape, generator=gen) * 1e-3, torch.float32))
        if backups:
            b.backups.append(place(torch.zeros(shape), dtype))
        b.weight_decays.append(wds[i % len(wds)])
    return b


def clone_bucket(b: Bucket) -> Bucket:
    c = lambda ts: [t.clone() for t in ts]  # noqa: E731
    return Bucket(device=b.device, dtype=b.dtype, params=c(b.params), grads=c(b.grads),
                  exp_avgs=c(b.exp_avgs), exp_avg_sqs=c(b.exp_avg_sqs), backups=c(b.backups),
                  weight_decays=list(b.weight_decays))


def scalars(t=3, eta=0.05, momentum_search=True) -> StepScalars:
    b1, b2 = 0.9, 0.999
    return StepScalars(eta=eta, beta1=b1, beta2=b2, eps=1e-8, bias_correction1=1 - b1 ** t,
                       bias_correction2=1 - b2 ** t, momentum_search=momentum_search)


def ctrl_of(scale=1.0, skip=0.0, fallback=0.0) -> torch.Tensor:
    return torch.tensor([scale, skip, fallback], dtype=torch.float32, device="cuda")


def assert_bucket_close(a: Bucket, b: Bucket, *, backups=True, param_tol=None):
    tol = param_tol or TOL[a.dtype]
    for i, (x, y) in enumerate(zip(a.params, b.params)):
        torch.testing.assert_close(x.float(), y.float(), **tol, msg=lambda s: f"param {i}: {s}")
    for name in ("exp_avgs", "exp_avg_sqs"):
        for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            torch.testing.assert_close(x, y, **MOMENT_TOL, msg=lambda s: f"{name} {i}: {s}")
    if backups:
        for x, y in zip(a.backups, b.backups):
            assert torch.equal(x, y)


def assert_bucket_equal(a: Bucket, b: Bucket):
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name


# -- the extension is there ---------------------------------------------------------------------
@pytest.mark.cuda
def test_ops_registered(ext):
    for op in ("grad_sumsq", "step_pass", "move_pass"):
        assert hasattr(torch.ops.alsals_fused, op)
    assert ext.CHUNK == CHUNK
    from alsals_fused.backends import cuda_backend
    assert cuda_backend.unavailable_reason(torch.device("cuda")) is None
    assert get_backend("auto", torch.device("cuda")).name == "cuda"


# -- grad_sumsq ---------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_grad_sumsq(cuda, dtype, misaligned):
    b = make_bucket(dtype, misaligned=misaligned)
    got = cuda.grad_sumsq(b)
    want = ReferenceBackend().grad_sumsq(b)
    assert got.dtype == torch.float64 and got.shape == () and got.device == b.device
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the reference sums in fp32 per tensor
    assert torch.equal(cuda.grad_sumsq(b), got)  # deterministic


@pytest.mark.cuda
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_grad_sumsq_not_finite(cuda, bad):
    b = make_bucket(torch.float32)
    b.grads[-1].view(-1)[1234] = bad
    got = cuda.grad_sumsq(b)
    assert not torch.isfinite(got)
    if bad != bad:
        assert torch.isnan(got)


@pytest.mark.cuda
def test_grad_sumsq_empty_only(cuda):
    b = make_bucket(torch.float32, shapes=[(0,), (0, 3)])
    assert float(cuda.grad_sumsq(b)) == 0.0


# -- step pass ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("searching,momentum_search", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("misaligned", [False, True])
def test_step_pass(cuda, dtype, searching, momentum_search, scale, misaligned):
    b = make_bucket(dtype, misaligned=misaligned, seed=1)
    r = clone_bucket(b)
    hp = scalars(momentum_search=momentum_search)
    ctrl = ctrl_of(scale=scale)
    dots = cuda.step_pass(b, hp, ctrl, searching=searching, write_backup=searching)
    want = ReferenceBackend().step_pass(r, hp, ctrl.clone(), searching=searching, write_backup=searching)
    assert_bucket_close(b, r, backups=searching)
    if not searching:
        assert dots is None
        return
    assert dots.dtype == torch.float64 and dots.shape == (2,)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-12)
    if not momentum_search:
        assert torch.equal(dots[0], dots[1])


@pytest.mark.cuda
def test_step_pass_memory_efficient_no_backup(cuda):
    b = make_bucket(torch.float32, backups=False, seed=2)
    r = clone_bucket(b)
    hp, ctrl = scalars(), ctrl_of()
    dots = cuda.step_pass(b, hp, ctrl, searching=True, write_backup=False)
    want = ReferenceBackend().step_pass(r, hp, ctrl, searching=True, write_backup=False)
    assert_bucket_close(b, r, backups=False)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_pass_skip_writes_nothing(cuda, dtype):
    b = make_bucket(dtype)
    before = clone_bucket(b)
    dots = cuda.step_pass(b, scalars(), ctrl_of(skip=1.0), searching=True, write_backup=True)
    assert_bucket_equal(b, before)
    assert torch.equal(dots, torch.zeros(2, dtype=torch.float64, device="cuda"))
    assert cuda.step_pass(b, scalars(), ctrl_of(skip=1.0), searching=False, write_backup=False) is None
    assert_bucket_equal(b, before)


@pytest.mark.cuda
def test_step_pass_deterministic_and_launch_split(cuda, ext):
    """Bit-identical sums run to run, and however the tiles are split across launches."""
    b = make_bucket(torch.float32, seed=3)
    runs = []
    old = ext._set_max_blocks_per_launch(1 << 30)
    try:
        for max_blocks in (1 << 30, 1 << 30, 3, 1):
            ext._set_max_blocks_per_launch(max_blocks)
            c = clone_bucket(b)
            runs.append((cuda.step_pass(c, scalars(), ctrl_of(), searching=True, write_backup=True), c))
    finally:
        ext._set_max_blocks_per_launch(old)
    for dots, c in runs[1:]:
        assert torch.equal(dots, runs[0][0])
        assert_bucket_equal(c, runs[0][1])


@pytest.mark.cuda
def test_many_tensors_several_launches(cuda):
    """More tensors than one launch table holds (48 segments)."""
    shapes = [(n,) for n in range(1, 120)] + [(CHUNK * 2 + 3,)]
    b = make_bucket(torch.bfloat16, shapes=shapes, seed=4)
    r = clone_bucket(b)
    hp, ctrl = scalars(), ctrl_of(scale=0.5)
    dots = cuda.step_pass(b, hp, ctrl, searching=True, write_backup=True)
    want = ReferenceBackend().step_pass(r, hp, ctrl, searching=True, write_backup=True)
    assert_bucket_close(b, r)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(cuda.grad_sumsq(b), ReferenceBackend().grad_sumsq(r), rtol=1e-6, atol=0)


# -- move pass ----------------------------------------------------------------------------------
MOVES = [  # (src_eta factor, src_dir, dst_eta factor, dst_dir, only_if_fallback)
    (1.0, Dir.MOMENTUM, 1.0, Dir.SEARCH, True),   # the driver's fix-up after a fallback
    (1.0, Dir.SEARCH, 0.9, Dir.SEARCH, False),    # backtrack
    (1.0, Dir.SEARCH, 0.0, Dir.SEARCH, False),    # restore to w0
    (1.0, Dir.SEARCH, 1.0, Dir.UPDATE, False),    # adam_sls/salsa: update from w0
    (1.0, Dir.GRAD, 0.5, Dir.MOMENTUM, False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,from_backup", [(torch.float32, True), (torch.float32, False),
                                               (torch.bfloat16, True), (torch.float16, True)])
@pytest.mark.parametrize("move", MOVES)
@pytest.mark.parametrize("fallback", [0.0, 1.0])
@pytest.mark.parametrize("momentum_search", [True, False])
def test_move_pass(cuda, dtype, from_backup, move, fallback, momentum_search):
    src_f, src_dir, dst_f, dst_dir, only_if_fallback = move
    hp = scalars(momentum_search=momentum_search, eta=0.05)
    b = make_bucket(dtype, backups=from_backup, seed=5)
    cuda.step_pass(b, hp, ctrl_of(scale=0.8), searching=True, write_backup=from_backup)
    # Put the params at cand(src_eta, src_dir) exactly as the driver would have them (from w0 the
    # step pass wrote the nominal direction; move there along the resolved source direction).
    r = clone_bucket(b)
    ref = ReferenceBackend()
    ctrl = ctrl_of(scale=0.8, fallback=fallback)
    src_eta, dst_eta = hp.eta * src_f, hp.eta * dst_f
    kwargs = dict(src_eta=src_eta, src_dir=src_dir, dst_eta=dst_eta, dst_dir=dst_dir,
                  from_backup=from_backup, only_if_fallback=only_if_fallback)
    before = clone_bucket(b)
    cuda.move_pass(b, hp, ctrl, **kwargs)
    ref.move_pass(r, hp, ctrl.clone(), **kwargs)
    tol = TOL[dtype] if from_backup else dict(rtol=1e-5, atol=1e-6)
    assert_bucket_close(b, r, backups=from_backup, param_tol=tol)
    if only_if_fallback and not fallback:
        assert_bucket_equal(b, before)


@pytest.mark.cuda
@pytest.mark.parametrize("from_backup", [True, False])
def test_move_pass_skip_writes_nothing(cuda, from_backup):
    b = make_bucket(torch.float32, backups=from_backup)
    before = clone_bucket(b)
    cuda.move_pass(b, scalars(), ctrl_of(skip=1.0, fallback=1.0), src_eta=0.05, src_dir=Dir.SEARCH,
                   dst_eta=0.0, dst_dir=Dir.SEARCH, from_backup=from_backup)
    assert_bucket_equal(b, before)


@pytest.mark.cuda
def test_in_place_restore_recovers_w0(cuda):
    """memory_efficient: step, backtrack twice, restore: back at w0 within a few ulps."""
    b = make_bucket(torch.float32, backups=False, seed=6)
    w0 = [p.clone() for p in b.params]
    hp, ctrl = scalars(eta=0.1), ctrl_of()
    cuda.step_pass(b, hp, ctrl, searching=True, write_backup=False)
    eta = hp.eta
    for _ in range(2):
        cuda.move_pass(b, hp, ctrl, src_eta=eta, src_dir=Dir.SEARCH, dst_eta=eta * 0.9,
                       dst_dir=Dir.SEARCH, from_backup=False)
        eta *= 0.9
    cuda.move_pass(b, hp, ctrl, src_eta=eta, src_dir=Dir.SEARCH, dst_eta=0.0, dst_dir=Dir.SEARCH,
                   from_backup=False)
    for p, q in zip(b.params, w0):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_layout_fallback_to_foreach(cuda):
    """A gradient with other strides than its parameter: the bucket runs on foreach."""
    b = make_bucket(torch.float32, shapes=[(64, 32)], seed=7)
    b.grads[0] = b.grads[0].t().contiguous().t()  # column-major
    r = clone_bucket(b)
    hp, ctrl = scalars(), ctrl_of()
    dots = cuda.step_pass(b, hp, ctrl, searching=True, write_backup=True)
    want = ReferenceBackend().step_pass(r, hp, ctrl, searching=True, write_backup=True)
    assert_bucket_close(b, r)
    torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-12)


@pytest.mark.cuda
def test_bad_arguments_have_clear_errors(ext):
    b = make_bucket(torch.float32, shapes=[(5,)])
    ops = torch.ops.alsals_fused
    with pytest.raises((ValueError, RuntimeError), match="ctrl"):
        ops.step_pass(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.backups, b.weight_decays,
                      torch.zeros(3, dtype=torch.float64, device="cuda"), 0.1, 0.9, 0.999, 1e-8, 0.1, 0.001,
                      True, True, True)
    with pytest.raises((ValueError, RuntimeError), match="ctrl"):
        ops.step_pass(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.backups, b.weight_decays,
                      torch.zeros(2, device="cuda"), 0.1, 0.9, 0.999, 1e-8, 0.1, 0.001, True, True, True)
    with pytest.raises((TypeError, RuntimeError), match="float64"):
        ops.grad_sumsq([torch.zeros(4, dtype=torch.float64, device="cuda")])


# -- no host synchronization --------------------------------------------------------------------
@pytest.mark.cuda
def test_no_sync(cuda):
    b = make_bucket(torch.bfloat16, seed=8)
    b32 = make_bucket(torch.float32, backups=False, seed=9)
    hp, ctrl = scalars(), ctrl_of(scale=0.9, fallback=1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda.grad_sumsq(b)
        cuda.step_pass(b, hp, ctrl, searching=True, write_backup=True)
        cuda.step_pass(b, hp, ctrl, searching=False, write_backup=False)
        cuda.move_pass(b, hp, ctrl, src_eta=hp.eta, src_dir=Dir.MOMENTUM, dst_eta=hp.eta,
                       dst_dir=Dir.SEARCH, from_backup=True, only_if_fallback=True)
        cuda.move_pass(b, hp, ctrl, src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.0,
                       dst_dir=Dir.SEARCH, from_backup=True)
        cuda.step_pass(b32, hp, ctrl, searching=True, write_backup=False)
        cuda.move_pass(b32, hp, ctrl, src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=hp.eta * 0.9,
                       dst_dir=Dir.SEARCH, from_backup=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_non_searching_step_has_no_sync(ext):
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 4).cuda()
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 4, device="cuda")
    opt = ALSALS(model.parameters(), backend="cuda", line_search_every=4)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    opt.zero_grad()
    opt.step(closure)                      # t=1 searches (reads are expected)
    reads = opt.reads
    opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(closure)                  # t=2 does not search
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.reads == reads and not opt.last_step.searched


# -- trajectories through the optimizer ---------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(19, 37).to(dtype)
        self.l2 = torch.nn.Linear(37, 3).to(dtype)
        self.big = torch.nn.Parameter((torch.randn(CHUNK + 11, generator=gen) * 0.01).to(dtype))
        self.empty = torch.nn.Parameter(torch.zeros(0, dtype=dtype))
        with torch.no_grad():
            for p in (*self.l1.parameters(), *self.l2.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) + self.big[:3] * self.big.square().sum() + self.empty.sum()


def run_trajectory(backend, *, dtype=torch.float32, steps=24, variant="alsals", wd=0.0, **kw):
    model = Net(dtype).cuda()
    groups = [{"params": [model.l1.weight, model.l2.weight, model.big], "weight_decay": wd},
              {"params": [model.l1.bias, model.l2.bias, model.empty], "weight_decay": 0.0}]
    opt = ALSALS(groups, variant=variant, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 19, generator=gen).to("cuda", dtype), torch.randn(32, 3, generator=gen).cuda())
            for _ in range(4)]
    rec = {"eta": [], "trials": [], "accepted": [], "loss": []}
    for k in range(steps):
        x, y = data[k % len(data)]

        def closure():
            return torch.nn.functional.mse_loss(model(x).float(), y)

        opt.zero_grad()
        loss = opt.step(closure)
        rec["loss"].append(float(loss))
        rec["eta"].append(opt.eta)
        rec["trials"].append(opt.last_step.trials)
        rec["accepted"].append(opt.last_step.accepted)
    rec["params"] = [p.detach().clone() for p in model.parameters()]
    rec["state"] = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
                    for p in model.parameters() if p in opt.state]
    rec["opt"] = opt
    return rec


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["alsals", "adam_sls", "salsa"])
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_trajectory_matches_reference(cuda, variant, memory_efficient, wd, max_grad_norm):
    kw = dict(variant=variant, memory_efficient=memory_efficient, wd=wd, max_grad_norm=max_grad_norm)
    a = run_trajectory("cuda", **kw)
    b = run_trajectory("reference", **kw)
    assert a["trials"] == b["trials"] and a["accepted"] == b["accepted"]
    assert a["eta"] == pytest.approx(b["eta"], rel=1e-12)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    for x, y in zip(a["params"], b["params"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for (ma, va), (mb, vb) in zip(a["state"], b["state"]):
        torch.testing.assert_close(ma, mb, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-9)
    assert all(type(be).__name__ == "CudaBackend" for be in a["opt"]._resolved.values())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["alsals", "adam_sls", "salsa"])
def test_trajectory_16bit(cuda, dtype, variant):
    """16-bit params: one ulp per write, so decisions may part late; the runs stay close."""
    a = run_trajectory("cuda", dtype=dtype, variant=variant, steps=20)
    b = run_trajectory("reference", dtype=dtype, variant=variant, steps=20)
    assert a["trials"][:3] == b["trials"][:3]
    assert a["loss"][-1] == pytest.approx(b["loss"][-1], rel=0.05)
    assert a["loss"][-1] < a["loss"][0]


@pytest.mark.cuda
def test_fp64_routes_to_foreach(cuda):
    a = run_trajectory("cuda", dtype=torch.float64, steps=6)
    b = run_trajectory("foreach", dtype=torch.float64, steps=6)
    assert all(isinstance(be, ForeachBackend) for be in a["opt"]._resolved.values())
    assert a["eta"] == b["eta"]
    for x, y in zip(a["params"], b["params"]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.cuda
def test_skip_step_through_optimizer(cuda):
    """A non-finite gradient: nothing moves, t does not advance."""
    model = torch.nn.Linear(8, 2).cuda()
    opt = ALSALS(model.parameters(), backend="cuda")
    x = torch.randn(4, 8, device="cuda")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        return model(x).sum() * float("inf")

    opt.zero_grad()
    opt.step(closure)
    assert opt.t == 0 and opt.last_step.skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


# -- off the GPU --------------------------------------------------------------------------------
def test_cuda_backend_on_cpu_raises_with_reason():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ALSALS([p], backend="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        opt.step(lambda: (p ** 2).sum())
    reason = available_backends("cpu")["cuda"]
    assert reason and "CUDA" in reason
    with pytest.raises(BackendUnavailable, match="cannot run on cpu"):
        get_backend("cuda", torch.device("cpu"))


def test_unavailable_reason_says_how_to_build():
    from alsals_fused.backends import cuda_backend
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if torch.cuda.is_available() and cuda_backend.load_extension() is not None:
        assert reason is None
    elif not torch.cuda.is_available():
        assert "CUDA GPU" in reason
    else:
        assert "pip install --no-build-isolation" in reason or "JIT" in reason


def test_build_settings_target_sm80_sm90(monkeypatch):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "csrc_build.py"
    spec = importlib.util.spec_from_file_location("csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    kw = mod.extension_kwargs()
    flags = " ".join(kw["extra_compile_args"]["nvcc"])
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=sm_90" in flags
    assert "-O3" in flags and "use_fast_math" not in flags
    assert all((path.parent / s).is_file() for s in kw["sources"])
