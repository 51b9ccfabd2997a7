"""The Triton backend against the reference backend (on CPU: Triton's interpreter, see conftest).

Tolerances (each pass is compared from identical inputs, so errors do not compound):
- fp32 state (m, v, fp32 params, backups): |a - b| <= 1e-6 * |b| + 1e-7 * max|b| per tensor
  (a few fp32 ulps; the reference may use FMAs where the kernels do not, and vice versa).
- bf16/fp16 params: at most one ulp of the 16-bit format at the value's magnitude.
- fp64 reductions: slopes and the gradient sum of squares rtol 1e-6 (fp32 per-chunk partials,
  fp64 across chunks; the reference sums each tensor in fp32 too, in another order).
Trajectories (24 optimizer steps, every variant): identical trial counts, accept/skip flags and
eta (exact: host decisions) at every step, identical counters; fp32 params and moments within
|a - b| <= 1e-4 * (|b| + 0.1 * max|b|) (rounding differences drift through the steps: the largest
seen is 2.4e-5 in those units), plus 4 fp32 ulps of the largest eta for in-place
(memory_efficient) params; 16-bit params within one ulp (bit-identical in practice).
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from alsals_fused import ALSALS  # noqa: E402
from alsals_fused.backends import triton_backend as tb  # noqa: E402
from alsals_fused.backends.base import FALLBACK, Bucket, Dir, StepScalars  # noqa: E402
from alsals_fused.backends.reference import ReferenceBackend  # noqa: E402

# With its index: tensors on "cuda" report "cuda:0", and torch.device("cuda") != "cuda:0".
DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
if tb.unavailable_reason(DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {tb.unavailable_reason(DEVICE)}", allow_module_level=True)

from alsals_fused.triton_kernels import kernels as K  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REF = ReferenceBackend()
# Shapes: empty, one element, primes, above BLOCK (1024) and above one chunk (4096).
SHAPES_DEFAULT = [(0,), (1,), (7,), (13, 17), (1031,), (4099,), (3, 0)]
# A small configuration (16-element blocks, 2 per program) reaches many programs, the unmasked
# and the masked paths and multi-block loops with small tensors.
TINY = dict(block=16, iters=2)
SHAPES_TINY = [(0,), (1,), (31,), (32,), (33,), (5, 13), (97,)]


# -- helpers ------------------------------------------------------------------------------------
def _offset_view(t):
    """The same values in a view one element into a fresh buffer: not 16-byte aligned."""
    big = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    big[1:].copy_(t.reshape(-1))
    return big[1:].view(t.shape)


def make_bucket(dtype, shapes, *, backups=True, seed=0, wds=None, unaligned=False):
    gen = torch.Generator().manual_seed(seed)
    b = Bucket(device=DEVICE, dtype=dtype)

    def put(lst, t):
        lst.append(_offset_view(t) if unaligned else t)

    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        put(b.params, p)
        put(b.grads, torch.randn(shape, generator=gen).to(dtype).to(DEVICE))
        put(b.exp_avgs, (torch.randn(shape, generator=gen) * 0.1).to(DEVICE))
        put(b.exp_avg_sqs, (torch.rand(shape, generator=gen) * 0.01).to(DEVICE))
        if backups:
            put(b.backups, torch.full_like(p, 7.0))
        b.weight_decays.append(wds[i] if wds else [0.0, 0.01, 0.1, 0.0, 0.05, 0.2, 0.3][i % 7])
    return b


def clone_bucket(b):
    c = Bucket(device=b.device, dtype=b.dtype, weight_decays=list(b.weight_decays))
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups"):
        setattr(c, name, [_offset_view(t) if t.data_ptr() % 16 else t.clone()
                          for t in getattr(b, name)])
    return c


def resync(dst, src):
    """Copy src's tensors into dst's (same addresses: the table cache stays valid)."""
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups"):
        for x, y in zip(getattr(dst, name), getattr(src, name)):
            x.copy_(y)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at |x|, as float64."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)).double() - a.double())


def assert_close_state(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    if actual.dtype == torch.float32:
        tol = 1e-6 * e.abs() + 1e-7 * e.abs().max()
    else:  # one ulp of the 16-bit format
        tol = torch.maximum(ulp(actual), ulp(expected))
    bad = (a - e).abs() > tol
    if bad.any():
        i = int(bad.nonzero()[0][0])
        af, ef = a.reshape(-1), e.reshape(-1)
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements off, e.g. [{i}] "
                             f"{af[i].item()!r} vs {ef[i].item()!r}")


def assert_buckets_close(tri, ref, what):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "backups"):
        for i, (x, y) in enumerate(zip(getattr(tri, name), getattr(ref, name))):
            assert_close_state(x, y, f"{what}: {name}[{i}]")


def assert_unchanged(bucket, snapshot, what):
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups"):
        for i, (x, y) in enumerate(zip(getattr(bucket, name), getattr(snapshot, name))):
            assert torch.equal(x, y), f"{what}: {name}[{i}] changed"


def scalars(t, momentum_search, eta=0.05):
    b1, b2 = 0.9, 0.999
    return StepScalars(eta=eta, beta1=b1, beta2=b2, eps=1e-8, bias_correction1=1 - b1 ** t,
                       bias_correction2=1 - b2 ** t, momentum_search=momentum_search)


def make_ctrl(scale=1.0, skip=0.0, fallback=0.0):
    return torch.tensor([scale, skip, fallback], dtype=torch.float32, device=DEVICE)


class Pair:
    """A reference bucket and a Triton bucket run through the same passes."""

    def __init__(self, backend, dtype, shapes, memory_efficient=False, **kw):
        self.tri_backend = backend
        self.ref = make_bucket(dtype, shapes, backups=not memory_efficient, **kw)
        self.tri = clone_bucket(self.ref)
        self.from_backup = not memory_efficient

    def step(self, hp, ctrl, searching, write_backup=None, check=True):
        wb = self.from_backup and searching if write_backup is None else write_backup
        r = REF.step_pass(self.ref, hp, ctrl, searching=searching, write_backup=wb)
        t = self.tri_backend.step_pass(self.tri, hp, ctrl, searching=searching, write_backup=wb)
        if searching:
            assert t.dtype == torch.float64 and t.shape == (2,) and t.device == DEVICE
            # Relative to the slopes' magnitude (sum(g*g*p) ~ sum|g*d|): the momentum slope can
            # cancel, and fp32 partial sums (with FMA on a GPU) err relative to sum|g*d|.
            torch.testing.assert_close(t, r, rtol=1e-6, atol=1e-6 * float(r.abs().max()) + 1e-9)
        else:
            assert t is None and r is None
        if check:
            self.check(f"step(searching={searching}, backup={wb})")
        return t

    def move(self, hp, ctrl, what, **kw):
        kw.setdefault("from_backup", self.from_backup)
        REF.move_pass(self.ref, hp, ctrl, **kw)
        self.tri_backend.move_pass(self.tri, hp, ctrl, **kw)
        self.check(what)

    def check(self, what):
        assert_buckets_close(self.tri, self.ref, what)
        resync(self.tri, self.ref)


VARIANTS = [(dt, ms, me) for dt in DTYPES for ms in (True, False) for me in (False, True)
            if not (me and dt != torch.float32)]


def _ids(v):
    dt, ms, me = v
    return f"{str(dt)[6:]}-{'momentum' if ms else 'grad'}-{'inplace' if me else 'backup'}"


# -- the passes, one by one, as the driver calls them ---------------------------------------------
@pytest.mark.parametrize("config", ["default", "tiny"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_passes_match_reference(variant, config):
    dtype, momentum_search, memory_efficient = variant
    backend = tb.TritonBackend(**TINY) if config == "tiny" else tb.TritonBackend()
    shapes = SHAPES_TINY if config == "tiny" else SHAPES_DEFAULT
    pair = Pair(backend, dtype, shapes, memory_efficient)
    hp = scalars(3, momentum_search)
    eta = hp.eta
    ctrl = make_ctrl(scale=0.37)   # a clip coefficient != 1

    torch.testing.assert_close(backend.grad_sumsq(pair.tri), REF.grad_sumsq(pair.ref),
                               rtol=1e-6, atol=0)
    pair.step(hp, ctrl, searching=True)
    # The driver's fallback check after the step pass: a no-op unless ctrl[FALLBACK] is set.
    snap = clone_bucket(pair.tri)
    fallback_move = dict(src_eta=eta, src_dir=Dir.MOMENTUM, dst_eta=eta, dst_dir=Dir.SEARCH,
                         only_if_fallback=True)
    pair.move(hp, ctrl, "fallback move, fallback=0", **fallback_move)
    assert_unchanged(pair.tri, snap, "only_if_fallback with fallback=0")
    # Trials, accept (UPDATE re-step) and reject (restore), without and with the fallback flag.
    for fb in (0.0, 1.0):
        ctrl[FALLBACK] = fb
        if fb:
            pair.move(hp, ctrl, "fallback move, fallback=1", **fallback_move)
        e1, e2 = eta * 0.9, eta * 0.81
        pair.move(hp, ctrl, f"trial 1 fb={fb}", src_eta=eta, src_dir=Dir.SEARCH, dst_eta=e1,
                  dst_dir=Dir.SEARCH)
        pair.move(hp, ctrl, f"trial 2 fb={fb}", src_eta=e1, src_dir=Dir.SEARCH, dst_eta=e2,
                  dst_dir=Dir.SEARCH)
        pair.move(hp, ctrl, f"update fb={fb}", src_eta=e2, src_dir=Dir.SEARCH, dst_eta=e2,
                  dst_dir=Dir.UPDATE)
        pair.move(hp, ctrl, f"restore fb={fb}", src_eta=e2, src_dir=Dir.UPDATE, dst_eta=0.0,
                  dst_dir=Dir.SEARCH)
        # explicit directions, including in-place moves between different directions
        pair.move(hp, ctrl, f"grad->momentum fb={fb}", src_eta=0.0, src_dir=Dir.GRAD, dst_eta=e1,
                  dst_dir=Dir.MOMENTUM)
        pair.move(hp, ctrl, f"momentum->grad fb={fb}", src_eta=e1, src_dir=Dir.MOMENTUM,
                  dst_eta=e2, dst_dir=Dir.GRAD)
        pair.move(hp, ctrl, f"grad->search fb={fb}", src_eta=e2, src_dir=Dir.GRAD, dst_eta=eta,
                  dst_dir=Dir.SEARCH)
    # A step that does not search (no backup, momentum direction, no slope).
    ctrl[FALLBACK] = 0.0
    pair.step(scalars(4, momentum_search), make_ctrl(), searching=False)
    torch.testing.assert_close(backend.grad_sumsq(pair.tri), REF.grad_sumsq(pair.ref),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_unaligned_views_and_write_backup_variants(dtype):
    """Misaligned storage offsets take the masked path; step without search may write a backup."""
    backend = tb.TritonBackend()
    pair = Pair(backend, dtype, [(5,), (4097,), (1,), (1030,)], unaligned=True)
    assert any(p.data_ptr() % 16 for p in pair.tri.params)
    hp = scalars(2, True)
    ctrl = make_ctrl(scale=1.0)
    torch.testing.assert_close(backend.grad_sumsq(pair.tri), REF.grad_sumsq(pair.ref),
                               rtol=1e-6, atol=0)
    pair.step(hp, ctrl, searching=True, write_backup=True)
    pair.step(hp, ctrl, searching=False, write_backup=True)
    pair.step(hp, ctrl, searching=True, write_backup=False)
    pair.move(hp, ctrl, "restore", src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.0,
              dst_dir=Dir.SEARCH)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_skip_flag_writes_nothing(memory_efficient):
    backend = tb.TritonBackend(**TINY)
    b = make_bucket(torch.float32, SHAPES_TINY, backups=not memory_efficient)
    snap = clone_bucket(b)
    hp = scalars(1, True)
    for fallback in (0.0, 1.0):
        ctrl = make_ctrl(scale=0.5, skip=1.0, fallback=fallback)
        dots = backend.step_pass(b, hp, ctrl, searching=True, write_backup=not memory_efficient)
        assert torch.equal(dots, torch.zeros(2, dtype=torch.float64, device=DEVICE))
        assert backend.step_pass(b, hp, ctrl, searching=False, write_backup=False) is None
        for oif in (False, True):
            backend.move_pass(b, hp, ctrl, src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.5 * hp.eta,
                              dst_dir=Dir.UPDATE, from_backup=not memory_efficient,
                              only_if_fallback=oif)
        assert_unchanged(b, snap, f"skip, fallback={fallback}")


@pytest.mark.filterwarnings("ignore:overflow encountered")   # numpy, in the interpreter
def test_nonfinite_grad_sumsq():
    backend = tb.TritonBackend(**TINY)
    b = make_bucket(torch.bfloat16, SHAPES_TINY)
    assert torch.isfinite(backend.grad_sumsq(b))
    b.grads[5].view(-1)[3] = float("inf")
    assert backend.grad_sumsq(b).item() == math.inf
    b.grads[6].view(-1)[40] = float("nan")
    assert math.isnan(backend.grad_sumsq(b).item())
    # |g| = 1e30 overflows the fp32 accumulation: inf, as in the reference (read as non-finite)
    b32 = make_bucket(torch.float32, [(3,)])
    b32.grads[0].fill_(1e30)
    assert backend.grad_sumsq(b32).item() == REF.grad_sumsq(b32).item() == math.inf


def test_reductions_are_reproducible():
    backend = tb.TritonBackend(**TINY)
    b = make_bucket(torch.float32, SHAPES_TINY * 3, backups=True)
    hp = scalars(5, True)
    ctrl = make_ctrl()
    snap = clone_bucket(b)
    first = backend.step_pass(b, hp, ctrl, searching=True, write_backup=True)
    resync(b, snap)
    second = backend.step_pass(b, hp, ctrl, searching=True, write_backup=True)
    assert torch.equal(first, second)
    assert torch.equal(backend.grad_sumsq(b), backend.grad_sumsq(b))


def test_weight_decays_per_tensor_in_one_bucket():
    backend = tb.TritonBackend()
    wds = [0.0, 0.5, 0.01, 1e-4]
    pair = Pair(backend, torch.float32, [(1031,), (1031,), (17,), (4099,)], wds=wds)
    # the same gradient and state everywhere: only the weight decay differs per tensor
    for bucket in (pair.ref, pair.tri):
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
            for t in getattr(bucket, name)[1:2]:
                t.copy_(getattr(bucket, name)[0])
    hp = scalars(2, True, eta=0.1)
    ctrl = make_ctrl()
    pair.step(hp, ctrl, searching=True)
    w0, w1 = pair.tri.params[0], pair.tri.params[1]
    assert not torch.equal(w0, w1)
    pair.move(hp, ctrl, "trial", src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.05,
              dst_dir=Dir.SEARCH)


# -- tables: cache, rebuild, layouts ----------------------------------------------------------------
def test_table_cache_reuse_and_rebuild():
    backend = tb.TritonBackend(**TINY)
    pair = Pair(backend, torch.float32, SHAPES_TINY)
    hp, ctrl = scalars(1, True), make_ctrl()
    pair.step(hp, ctrl, searching=True)
    pair.move(hp, ctrl, "trial", src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.01, dst_dir=Dir.SEARCH)
    backend.grad_sumsq(pair.tri)
    assert backend.table_builds == 1                      # built once, reused by every pass
    plan = next(iter(backend._plans.values()))
    # A new gradient tensor at a new address (the old one is kept alive): rebuild.
    old = pair.tri.grads[3]
    pair.tri.grads[3] = old.clone() * 1.5
    pair.ref.grads[3] = pair.ref.grads[3] * 1.5
    assert pair.tri.grads[3].data_ptr() != old.data_ptr()
    pair.step(hp, ctrl, searching=True)
    assert backend.table_builds == 2
    # Same addresses again: the cached table, no rebuild.
    pair.step(hp, ctrl, searching=False)
    assert backend.table_builds == 2
    # A weight decay change is a new table too.
    pair.ref.weight_decays[2] = pair.tri.weight_decays[2] = 0.3
    pair.step(hp, ctrl, searching=True)
    assert backend.table_builds == 3
    # Going back to an earlier set of tensors hits the cache.
    pair.tri.grads[3] = old
    pair.ref.grads[3] = old.clone()
    pair.tri.weight_decays[2] = pair.ref.weight_decays[2] = 0.1
    backend.grad_sumsq(pair.tri)
    assert backend.table_builds == 3 and plan in backend._plans.values()


def test_dense_noncontiguous_params_are_handled():
    """A transposed (dense) parameter whose grad and state share its strides works."""
    backend = tb.TritonBackend(**TINY)
    ref = Bucket(device=DEVICE, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    for shape in ((9, 7), (33, 5)):
        p = torch.randn(shape, generator=gen).to(DEVICE).t()
        assert not p.is_contiguous()
        ref.params.append(p)
        ref.grads.append(torch.randn(shape, generator=gen).to(DEVICE).t())
        ref.exp_avgs.append(torch.zeros_like(p))
        ref.exp_avg_sqs.append(torch.zeros_like(p))
        ref.backups.append(torch.empty_like(p))
        ref.weight_decays.append(0.1)
    tri = Bucket(device=DEVICE, dtype=torch.float32, weight_decays=list(ref.weight_decays))
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups"):
        setattr(tri, name, [t.clone() for t in getattr(ref, name)])   # clone keeps the strides
    assert tri.params[0].stride() == ref.params[0].stride()
    hp, ctrl = scalars(1, True), make_ctrl()
    torch.testing.assert_close(backend.step_pass(tri, hp, ctrl, searching=True, write_backup=True),
                               REF.step_pass(ref, hp, ctrl, searching=True, write_backup=True),
                               rtol=1e-6, atol=1e-9)
    assert_buckets_close(tri, ref, "transposed params")


def test_non_dense_params_are_rejected():
    backend = tb.TritonBackend(**TINY)
    b = make_bucket(torch.float32, [(4, 6)])
    base = torch.randn(4, 12, device=DEVICE)
    b.params[0] = base[:, ::2]                              # gapped view
    with pytest.raises(ValueError, match=r"shape \(4, 6\) has strides \(12, 2\)"):
        backend.step_pass(b, scalars(1, True), make_ctrl(), searching=True, write_backup=True)
    b = make_bucket(torch.float32, [(4, 6)])
    b.grads[0] = torch.randn(6, 4, device=DEVICE).t()       # dense, but not the param's layout
    with pytest.raises(ValueError, match=r"strides \(6, 1\) but its grad has strides \(1, 4\)"):
        backend.grad_sumsq(b)


def test_misuse_is_reported():
    backend = tb.TritonBackend(**TINY)
    b = make_bucket(torch.bfloat16, [(5,)], backups=False)
    hp = scalars(1, True)
    with pytest.raises(ValueError, match="fp32"):
        backend.move_pass(b, hp, make_ctrl(), src_eta=0.1, src_dir=Dir.SEARCH, dst_eta=0.0,
                          dst_dir=Dir.SEARCH, from_backup=False)
    with pytest.raises(ValueError, match="no backups"):
        backend.step_pass(b, hp, make_ctrl(), searching=True, write_backup=True)
    with pytest.raises(ValueError, match="ctrl"):
        backend.step_pass(b, hp, make_ctrl().double(), searching=False, write_backup=False)


def test_empty_bucket_and_all_empty_tensors():
    backend = tb.TritonBackend()
    hp, ctrl = scalars(1, True), make_ctrl()
    empty = Bucket(device=DEVICE, dtype=torch.float32)
    assert backend.grad_sumsq(empty).item() == 0.0
    assert torch.equal(backend.step_pass(empty, hp, ctrl, searching=True, write_backup=False),
                       torch.zeros(2, dtype=torch.float64, device=DEVICE))
    b = make_bucket(torch.float16, [(0,), (2, 0)])
    assert backend.grad_sumsq(b).item() == 0.0
    assert backend.step_pass(b, hp, ctrl, searching=True, write_backup=True).abs().sum() == 0
    backend.move_pass(b, hp, ctrl, src_eta=0.1, src_dir=Dir.SEARCH, dst_eta=0.0,
                      dst_dir=Dir.SEARCH, from_backup=True)


def test_no_host_reads(monkeypatch):
    """Nothing in the backend reads a tensor on the host (no .item(), bool(), .tolist())."""
    backend = tb.TritonBackend(**TINY)
    b = make_bucket(torch.float32, SHAPES_TINY)
    hp = scalars(1, True)
    ctrl = make_ctrl(fallback=1.0)

    def forbidden(*_args, **_kw):
        raise AssertionError("host read of a tensor")

    def passes():
        backend.grad_sumsq(b)
        backend.step_pass(b, hp, ctrl, searching=True, write_backup=True)
        backend.move_pass(b, hp, ctrl, src_eta=hp.eta, src_dir=Dir.MOMENTUM, dst_eta=hp.eta,
                          dst_dir=Dir.SEARCH, from_backup=True, only_if_fallback=True)
        backend.move_pass(b, hp, ctrl, src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.0,
                          dst_dir=Dir.SEARCH, from_backup=True)

    if DEVICE.type == "cpu":
        # The interpreter itself converts its arguments on the host: check the backend's own
        # code by patching around the kernel launches (table builds included).
        for kernel in K.KERNELS:
            monkeypatch.setattr(type(kernel), "__getitem__",
                                lambda self, grid: (lambda *a, **k: None))
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    passes()


# -- the bf16 rounding helper ---------------------------------------------------------------------
@triton.jit
def _round_kernel(x_ptr, y_ptr, n, DT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, K._to_param(x, DT), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_downcast_rounds_to_nearest_even(dtype):
    one = 1.0
    special = [0.0, -0.0, one, one + 2 ** -8, one + 3 * 2 ** -8, one + 2 ** -8 + 2 ** -20,
               one + 2 ** -11, one + 3 * 2 ** -11, -(one + 2 ** -8), 3.0e38, 3.4e38, 65504.0,
               65520.0, 1e-40, 6e-8, 2.0 ** -25, math.inf, -math.inf, math.nan]
    x = torch.cat([torch.tensor(special), torch.randn(200) * 100]).float().to(DEVICE)
    y = torch.empty(x.numel(), dtype=dtype, device=DEVICE)
    tl_dt = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    _round_kernel[(1,)](x, y, x.numel(), DT=tl_dt, BLOCK=256)
    expected = x.to(dtype)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert bool(same.all()), (x[~same], y[~same], expected[~same])


# -- registry, dtypes ---------------------------------------------------------------------------------
def test_unavailable_reason_and_supports():
    assert tb.unavailable_reason(DEVICE) is None
    reason = tb.unavailable_reason(torch.device("meta"))
    assert isinstance(reason, str) and "CUDA" in reason
    backend = tb.TritonBackend()
    for dt in DTYPES:
        assert backend.supports(DEVICE, dt)
    assert not backend.supports(DEVICE, torch.float64)   # the registry routes fp64 to foreach


def test_fp64_params_route_to_foreach():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, device=DEVICE))
    v = torch.nn.Parameter(torch.randn(5, dtype=torch.float32, device=DEVICE))
    opt = ALSALS([w, v], backend="triton")
    opt.step(lambda: (w.square().sum() + v.double().square().sum()))
    names = {key[1]: backend.name for key, backend in opt._resolved.items()}
    assert names == {torch.float64: "foreach", torch.float32: "triton"}


# -- the AOT list covers every kernel and every launch variant -------------------------------------
def test_aot_specializations_cover_every_launch():
    from alsals_fused.triton_kernels import aot   # importable without compiling
    if os.environ.get("TRITON_INTERPRET") == "1":   # refuses to run under the interpreter
        assert aot.main(["--arch", "80"]) == 2
    specs = K.specializations()
    module_kernels = {name for name, obj in vars(K).items()
                      if not name.startswith("_") and hasattr(obj, "arg_names")}
    assert module_kernels == {k.__name__ for k in K.KERNELS}
    assert {s[0].__name__ for s in specs} == module_kernels
    have = {(s[0].__name__, tuple(sorted((k, str(v)) for k, v in s[2].items()))) for s in specs}

    def key(kernel, cx):
        return (kernel.__name__, tuple(sorted((k, str(v)) for k, v in cx.items())))

    hp_variants = [scalars(1, ms) for ms in (True, False)]
    for name in ("fp32", "bf16", "fp16"):
        for hp in hp_variants:
            for searching in (True, False):
                for wb in (True, False):
                    assert key(K.step_kernel, K.step_constexprs(
                        name, searching, hp.momentum_search, wb)) in have
            for from_backup in (True, False) if name == "fp32" else (True,):
                for src in Dir:
                    for dst in Dir:
                        cx = K.move_constexprs(name, from_backup, tb._direction_mode(src, hp),
                                               tb._direction_mode(dst, hp))
                        assert key(K.move_kernel, cx) in have
        assert key(K.grad_sumsq_kernel, K.sumsq_constexprs(name)) in have
    for k in (1, 2):
        assert key(K.finish_kernel, K.finish_constexprs(k)) in have
    # every specialization names every argument of its kernel
    for kernel, sig, cx, _ in specs:
        assert set(sig) | set(cx) == set(kernel.arg_names), kernel.__name__


# -- full trajectories through the optimizer --------------------------------------------------------
def _problem(dtype, seed=0, n=96, d_in=6, d_hidden=12):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    Y = torch.sin(X @ torch.randn(d_in, 1, generator=gen, dtype=torch.float64))
    init = [torch.randn(d_in, d_hidden, generator=gen) * 0.5, torch.zeros(d_hidden),
            torch.randn(d_hidden, 1, generator=gen) * 0.5, torch.zeros(1)]
    batches = [torch.randperm(n, generator=gen)[:32] for _ in range(64)]
    return X.to(DEVICE), Y.to(DEVICE), [t.to(dtype).to(DEVICE) for t in init], batches


def _run(backend, dtype, steps, nan_at=None, **opt_kw):
    X, Y, init, batches = _problem(dtype)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    groups = [{"params": [params[0], params[2]], "weight_decay": opt_kw.pop("weight_decay", 0.0)},
              {"params": [params[1], params[3]], "weight_decay": 0.0}]
    opt = ALSALS(groups, backend=backend, **opt_kw)
    history = []
    for step in range(steps):
        idx = batches[step % len(batches)]

        def closure():
            # fp64 math: loss differences do not drown in fp32 rounding of the forward
            W1, b1, W2, b2 = (p.double() for p in params)
            h = torch.tanh(X[idx] @ W1 + b1)
            loss = ((h @ W2 + b2 - Y[idx]) ** 2).mean()
            if step == nan_at:
                loss = loss * float("nan")
            return loss

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        info = opt.last_step
        history.append(dict(
            eta=opt.eta, trials=info.trials, accepted=info.accepted, skipped=info.skipped,
            params=[p.detach().clone() for p in params],
            m=[opt.state[p]["exp_avg"].clone() for p in params],
            v=[opt.state[p]["exp_avg_sq"].clone() for p in params]))
    return history, opt


HARD = dict(smoothing=0.0, betas=(0.95, 0.999), init_step_size=3.0, max_trials=4)
TRAJECTORIES = [
    dict(variant="alsals"),
    dict(variant="alsals", memory_efficient=True, weight_decay=0.01),
    dict(variant="alsals", max_grad_norm=0.05, weight_decay=0.1),
    # large steps: backtracking, rejected steps and the non-descent fallback
    dict(variant="alsals", **HARD, expect=("fallbacks", "rejected")),
    dict(variant="alsals", **HARD, memory_efficient=True, weight_decay=0.01,
         expect=("fallbacks", "rejected")),
    dict(variant="adam_sls"),
    dict(variant="adam_sls", memory_efficient=True, weight_decay=0.01, init_step_size=3.0,
         max_trials=2, expect=("rejected",)),
    dict(variant="salsa", weight_decay=0.01),
    dict(variant="salsa", memory_efficient=True),
    dict(variant="alsals", line_search_every=3, nan_at=5, expect=("skipped",)),
    dict(variant="alsals", dtype=torch.bfloat16, **HARD, weight_decay=0.01,
         expect=("fallbacks", "rejected")),
    dict(variant="adam_sls", dtype=torch.float16),
    dict(variant="salsa", dtype=torch.bfloat16, max_grad_norm=0.05),
]


def _traj_id(kw):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in kw.items())


@pytest.mark.parametrize("kw", TRAJECTORIES, ids=_traj_id)
def test_trajectory_matches_reference(kw):
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.float32)
    nan_at = kw.pop("nan_at", None)
    expect = kw.pop("expect", ())
    steps = 24
    ref, ref_opt = _run("reference", dtype, steps, nan_at=nan_at, **dict(kw))
    tri, tri_opt = _run("triton", dtype, steps, nan_at=nan_at, **dict(kw))
    assert any(type(b).__name__ == "TritonBackend" for b in tri_opt._resolved.values())
    searched_trials = 0
    # In-place moves (memory_efficient) leave a few ulps of the step eta*d behind (ALGORITHM.md
    # section 7), in both backends but rounded differently: allow 4 ulps of the largest eta.
    inplace = kw.get("memory_efficient", False)
    inplace_atol = 4 * 2.0 ** -23 * max(max(h["eta"] for h in ref), kw.get("init_step_size", 0.1))
    for step, (r, t) in enumerate(zip(ref, tri)):
        for name in ("trials", "accepted", "skipped", "eta"):
            assert t[name] == r[name], f"step {step}: {name} {t[name]} != {r[name]}"
        searched_trials += r["trials"]
        for name in ("params", "m", "v"):
            for i, (a, e) in enumerate(zip(t[name], r[name])):
                if a.dtype == torch.float32:
                    err = (a.double() - e.double()).abs()
                    scale = e.double().abs()
                    tol = 1e-4 * (scale + 0.1 * scale.max())
                    if name == "params" and inplace:
                        tol = tol + inplace_atol
                    assert bool((err <= tol).all()), \
                        f"step {step} {name}[{i}]: max error {err.max().item():.3g}"
                else:   # 16-bit params: one ulp
                    tol = torch.maximum(ulp(a), ulp(e))
                    assert bool(((a.double() - e.double()).abs() <= tol).all()), \
                        f"step {step} {name}[{i}]"
    assert ref_opt.counters == tri_opt.counters
    for name in expect:
        assert ref_opt.counters[name] > 0, (name, ref_opt.counters)
    assert searched_trials > steps // 3     # the line search really ran (and backtracked)


@pytest.mark.parametrize("variant,memory_efficient", [("alsals", False), ("alsals", True),
                                                      ("adam_sls", False), ("salsa", True)])
def test_shared_odd_model_trajectory(variant, memory_efficient):
    """The shared test model: dropout replay, an empty and an unused parameter, fp32 losses."""
    from helpers import assert_same_trajectory, trajectory
    ref = trajectory("reference", variant=variant, memory_efficient=memory_efficient, steps=22)
    tri = trajectory("triton", variant=variant, memory_efficient=memory_efficient, steps=22)
    assert_same_trajectory(tri, ref, rtol=1e-5, atol=1e-6)
    assert tri["opt"].counters == ref["opt"].counters


def test_offsets_beyond_int32():
    """A tensor of 2**31 + 5000 elements, of which only the last two chunks exist in memory: the
    table points its base 'start' elements before a small buffer, so any int32 offset arithmetic
    in the kernels would read and write the wrong place (or crash)."""
    numel = 2 ** 31 + 5000
    chunk = K.BLOCK * K.ITERS
    last = (numel - 1) // chunk
    first = last - 1                      # a full chunk (unmasked path) and the tail (masked)
    start = first * chunk
    assert start >= 2 ** 31   # every element offset overflows int32
    ref = make_bucket(torch.float32, [(numel - start,)], wds=[0.05])
    tri = clone_bucket(ref)
    rows = [[t.data_ptr() - start * t.element_size()
             for t in (tri.params[0], tri.grads[0], tri.exp_avgs[0], tri.exp_avg_sqs[0],
                       tri.backups[0])]]
    wd_bits = torch.tensor([0.05], dtype=torch.float64).view(torch.int64).tolist()[0]
    table = torch.tensor([rows[0] + [numel, wd_bits, 0]], dtype=torch.int64, device=DEVICE)
    sched = torch.tensor([[0, first], [0, last]], dtype=torch.int32, device=DEVICE)
    partials = torch.empty((2, 2), dtype=torch.float32, device=DEVICE)
    dots = torch.empty(2, dtype=torch.float64, device=DEVICE)
    hp, ctrl = scalars(2, True), make_ctrl(scale=0.5)
    K.step_kernel[(2,)](table, sched, ctrl, partials, hp.eta, hp.beta1, hp.beta2, 1 - hp.beta1,
                        1 - hp.beta2, hp.eps, hp.bias_correction1, hp.bias_correction2,
                        num_warps=K.NUM_WARPS, **K.step_constexprs("fp32", True, True, True))
    K.finish_kernel[(1,)](partials, dots, 2, num_warps=K.FINISH_WARPS, **K.finish_constexprs(2))
    expected = REF.step_pass(ref, hp, ctrl, searching=True, write_backup=True)
    torch.testing.assert_close(dots, expected, rtol=1e-6, atol=0)
    assert_buckets_close(tri, ref, "beyond 2**31: step")
    K.move_kernel[(2,)](table, sched, ctrl, 0, hp.eta, 0.5 * hp.eta, -0.5 * hp.eta, hp.eps,
                        hp.bias_correction1, hp.bias_correction2, num_warps=K.NUM_WARPS,
                        **K.move_constexprs("fp32", True, 0, K.MODE_FALLBACK))
    REF.move_pass(ref, hp, ctrl, src_eta=hp.eta, src_dir=Dir.SEARCH, dst_eta=0.5 * hp.eta,
                  dst_dir=Dir.SEARCH, from_backup=True)
    assert_buckets_close(tri, ref, "beyond 2**31: move")
    sums = torch.empty(2, dtype=torch.float32, device=DEVICE)
    out = torch.empty((), dtype=torch.float64, device=DEVICE)
    K.grad_sumsq_kernel[(2,)](table, sched, sums, num_warps=K.NUM_WARPS,
                              **K.sumsq_constexprs("fp32"))
    K.finish_kernel[(1,)](sums, out, 2, num_warps=K.FINISH_WARPS, **K.finish_constexprs(1))
    torch.testing.assert_close(out, REF.grad_sumsq(ref), rtol=1e-6, atol=0)
