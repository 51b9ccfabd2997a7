"""The backends the contract suite runs on, and the fixtures it builds for them.

In the spirit of torch's ``OptimizerInfo`` and apex's fused-optimizer test base: one ``BackendInfo``
per backend and device says what the backend runs itself (its dtypes), how closely it must match
the reference backend, and how large the test inputs may be; ``tests/test_contract.py`` is written
once against the contract (``alsals_fused/backends/base.py``, contract v2) and parametrized over
``INFOS``.  A backend that cannot run here is still collected and skipped with the reason
``alsals_fused.available_backends`` gives, so the skip list says what did not run and why
(``ALSALS_FUSED_REQUIRE_EXTENSION=1`` on a GPU makes a missing CUDA extension fail instead, as in
test_cuda.py; ``ALSALS_SUITE_BACKENDS=foreach,triton`` narrows a run to some backends).

Registry (``INFOS``):

- ``reference`` on CPU (and on the GPU when there is one): the oracle.  Parity tests compare
  every other backend with the reference *on the same device*, from identical inputs.
- ``foreach`` on CPU (and on the GPU): the reference's operations in the same order, so its state
  agrees to the bit on CPU; only the order of the fp64 sums differs.  Its CPU row keeps the
  tolerances of the suite it replaced (1e-6 / 1e-7, also for 16-bit params and trajectories).
- ``triton``: under Triton's CPU interpreter without a GPU (``TRITON_INTERPRET=1``, set by
  conftest.py), compiled on a GPU.  The interpreter is slow: it runs a subset of the trajectories.
  ``triton-tiny``: the same backend with 16-element blocks, 2 per program (``TRITON_TINY``): many
  programs, the masked and unmasked paths and multi-block loops on small tensors; the pass tests
  only (``ALSALS(backend=...)`` builds the default configuration).
- ``cuda``: the C++/CUDA extension, on a GPU only (``CUDA_TOL``).

Tolerances (pass parity is measured from identical inputs, so nothing compounds; ``Chain`` runs
a sequence of passes, setting both sides to the reference's values after each):

- ``state``: m, v, fp32/fp64 params, element-wise ``|a - b| <= rtol*|b| + atol`` (and relative to
  the tensor's largest magnitude where ``state_max_rtol`` is set).  Fused kernels may contract to
  FMAs where torch does not (or divide where torch multiplies by a reciprocal), hence a few fp32
  ulps.  Backups are copies: exact.
- 16-bit params: one ulp of the dtype (``half``: "ulp", "eps" or an explicit (rtol, atol)).
- ``sum_rtol``: the fp64 sums (slopes, gradient sum of squares) relative to the sum of the
  magnitudes of their terms (fp32 per-chunk partials added in another order).  The finishers'
  ctl slots are then ``decisions.finish_grad`` / ``finish_slope`` of those sums, to the bit, and
  the verdict is ``decisions.verdict``, to the bit.
- ``traj``: params and moments after each step of a trajectory (rounding differences drift
  through the steps, in-place moves by a few ulps of eta per move); the decisions (trials,
  accepted, searched, skipped, fallback, eta) and the counters must be identical.  Where a deleted
  copy checked a run more closely for some steps, ``assert_same_run(strict_steps=, strict=)``
  holds those steps to its tolerance as well (no allowances).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

from alsals_fused import ALSALS
from alsals_fused.backends import available_backends, get_backend
from alsals_fused.backends.base import CHUNK, Bucket, Ctl, Dir, StepScalars, new_ctl
from helpers import OddModel, make_data

HAS_CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
# With its index: tensors on "cuda" report "cuda:0", and torch.device("cuda") != "cuda:0".
GPU = torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else None
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # fp64 is routed to foreach

# Sizes (numels or shapes): empty, one element, primes, more than one BLOCK and than one CHUNK.
SIZES = (0, 1, 2, 3, 7, 31, 127, 1000, 4099)
INTERPRETER_SIZES = (0, 1, 7, (13, 17), 1031, 4099, (3, 0))
CUDA_SIZES = (0, 1, 7, (13, 17), CHUNK - 1, CHUNK, CHUNK + 1, (5, 4099), (3, 3, 8209))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class BackendInfo:
    name: str                                    # the backend= argument
    device: torch.device
    dtypes: Tuple[torch.dtype, ...]              # dtypes it runs itself
    # One pass (fp32 state): |a - b| <= state_rtol*|b| + state_atol, and where state_max_rtol is
    # set also <= state_rtol*|b| + state_max_rtol*max|b| (per tensor); moments within moment_atol
    # where set.  16-bit params (``half``): "eps" (rtol = the dtype's eps, atol 1e-7), "ulp" (one
    # ulp of the dtype at the larger magnitude) or (rtol, atol).  Backups are copies: exact.
    state_rtol: float = 1e-6
    state_atol: float = 1e-7
    state_max_rtol: Optional[float] = None
    moment_atol: Optional[float] = None
    half: Any = "eps"
    # The fp64 sums: within sum_rtol of the sum of the magnitudes of their terms, and where
    # sum_atol is set also within sum_rtol*|sum| (the larger |sum| if sum_max) + sum_atol;
    # the gradient sum of squares within sumsq_rtol (default sum_rtol).
    sum_rtol: float = 1e-6
    sum_atol: Optional[float] = None
    sum_max: bool = False
    sumsq_rtol: Optional[float] = None
    # Trajectories: fp32 params and moments as above with traj_rtol / traj_atol / traj_max_rtol;
    # fp64 (rtol, atol); 16-bit params as ``half`` ("eps": atol = traj_atol).
    traj_rtol: float = 1e-4
    traj_atol: float = 1e-5
    traj_max_rtol: Optional[float] = None
    traj_f64: Tuple[float, float] = (1e-10, 1e-12)
    traj_half: Any = "eps"
    # Clipped runs: the clipping norm is summed in another order, and its rounding drifts through
    # the run; where set, these fields replace the trajectory tolerances then.
    traj_clip: Tuple[Tuple[str, Any], ...] = ()
    traj_inplace: Tuple[Tuple[str, Any], ...] = ()   # likewise for in-place (memory_efficient) runs
    sizes: Tuple[Any, ...] = SIZES
    traj_steps: int = 24
    slow: bool = False                           # an interpreter: the suite runs fewer cases
    config: str = ""                             # a named configuration: constructor options
    options: Tuple[Tuple[str, Any], ...] = ()    # (the passes only: ALSALS builds the default)
    marks: Tuple[Any, ...] = ()
    notes: str = ""

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.name, self.config, self.device.type) if x)

    @property
    def whole_optimizer(self) -> bool:
        """ALSALS(backend=name) builds the default configuration: option rows test the passes only."""
        return not self.options

    @property
    def is_oracle(self) -> bool:
        return self.name == "reference"

    def unavailable(self) -> Optional[str]:
        reason = available_backends(self.device)[self.name]
        if reason is not None:
            return f"backend {self.name!r} cannot run on {self.device}: {reason}"
        return None

    def backend(self):
        default = get_backend(self.name, self.device)
        if not self.options:
            return default
        if self.id not in _CONFIGURED:
            _CONFIGURED[self.id] = type(default)(**dict(self.options))
        return _CONFIGURED[self.id]

    def reference(self):
        return get_backend("reference", self.device)

    # tolerance helpers --------------------------------------------------------------------------
    def assert_state_close(self, x: Tensor, y: Tensor, where: str, *, kind: str = "params",
                           trajectory: bool = False, extra_atol: float = 0.0) -> None:
        """x (this backend) against y (the reference): one pass, or a trajectory's tensors
        (``extra_atol``: what in-place moves leave behind, fp32 params)."""
        if kind == "backups":
            assert torch.equal(x, y), f"{where}: a backup is a copy and must be exact"
            return
        if x.dtype in (torch.bfloat16, torch.float16):
            half = self.traj_half if trajectory else self.half
            if half == "ulp":
                assert_within_ulp(x, y, where)
                return
            if half == "eps":
                half = (torch.finfo(x.dtype).eps, self.traj_atol if trajectory else 1e-7)
            assert_close(x, y, rtol=half[0], atol=half[1], where=where)
            return
        if x.dtype == torch.float64:
            rtol, atol = self.traj_f64 if trajectory else (1e-12, 1e-14)
            assert_close(x, y, rtol=rtol, atol=atol, where=where)
            return
        rtol, atol = (self.traj_rtol, self.traj_atol) if trajectory else (self.state_rtol, self.state_atol)
        if kind == "moments" and self.moment_atol is not None and not trajectory:
            atol = self.moment_atol
        max_rtol = self.traj_max_rtol if trajectory else self.state_max_rtol
        if max_rtol is not None and y.numel():
            atol = min(atol, max_rtol * float(y.double().abs().max()))
        assert_close(x, y, rtol=rtol, atol=atol + extra_atol, where=where)

    def assert_sums_close(self, got: Tensor, want: Tensor, mag: Tensor, what: str) -> None:
        """fp64 sums (slopes) against the reference's, ``mag`` the sums of the terms' magnitudes."""
        biggest = max(abs(float(w)) for w in want)
        for k in range(len(want)):
            g, w = float(got[k]), float(want[k])
            bound = self.sum_rtol * float(mag[k]) + 1e-300
            if self.sum_atol is not None:
                bound = min(bound, self.sum_rtol * (biggest if self.sum_max else abs(w)) + self.sum_atol)
            assert abs(g - w) <= bound, f"{what}[{k}]: {g!r} vs {w!r} (bound {bound:.3g})"


def assert_within_ulp(x: Tensor, y: Tensor, where: str) -> None:
    """16-bit values at most one ulp apart (the ulp of the larger magnitude)."""
    assert x.dtype == y.dtype and x.shape == y.shape, f"{where}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
    if x.numel() == 0:
        return
    tol = torch.maximum(_ulp(x), _ulp(y))
    err = (x.double() - y.double()).abs()
    bad = ~(err <= tol) & ~(x.isnan() & y.isnan())
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0][0])
        raise AssertionError(f"{where}: {int(bad.sum())}/{x.numel()} elements more than one ulp apart, e.g. "
                             f"[{i}] {x.reshape(-1)[i].item()!r} vs {y.reshape(-1)[i].item()!r}")


def _ulp(x: Tensor) -> Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)).double() - a.double()


_CONFIGURED: Dict[str, Any] = {}
# Triton's small chunk (16-element blocks, 2 per program): many programs, the masked and unmasked
# paths and multi-block loops on small tensors.  benchmarks/warm_triton.py compiles it on a GPU too.
TRITON_TINY = (("block", 16), ("iters", 2))
TINY_SIZES = (0, 1, 31, 32, 33, (5, 13), 97)
CUDA_TOL: Dict[str, Any] = dict(state_rtol=1e-5, state_atol=1e-6, moment_atol=1e-8, sum_rtol=1e-5, sumsq_rtol=4e-6,
                                sizes=CUDA_SIZES)
TRITON_TOL: Dict[str, Any] = dict(state_max_rtol=1e-7, sum_atol=0.0, sum_max=True, half="ulp", traj_rtol=1e-5,
                                  traj_atol=1e-6, traj_max_rtol=1e-5, traj_half="ulp",
                                  traj_clip=(("traj_rtol", 1e-4), ("traj_atol", 2e-5), ("traj_max_rtol", None)),
                                  traj_inplace=(("traj_rtol", 1e-4), ("traj_atol", 1e-5), ("traj_max_rtol", 1e-5)))


def _cuda_marks() -> Tuple[Any, ...]:
    return (pytest.mark.cuda,)


def _registry() -> List[BackendInfo]:
    infos = [
        BackendInfo("reference", CPU, ALL_DTYPES, state_rtol=0, state_atol=0, notes="the oracle"),
        # The reference's operations in the same order: its tolerances are those of its old
        # dedicated suite (the trajectories are bit-identical in practice; clipped runs keep the
        # contract's general tolerances).
        BackendInfo("foreach", CPU, ALL_DTYPES, half=(1e-6, 1e-7), sum_atol=1e-12, traj_rtol=1e-6, traj_atol=1e-7,
                    traj_f64=(1e-12, 1e-14), traj_half=(1e-6, 1e-7),
                    traj_clip=(("traj_rtol", 1e-4), ("traj_atol", 1e-5), ("traj_half", "eps")),
                    notes="same ops as the reference, multi-tensor"),
    ]
    if HAS_CUDA:
        assert GPU is not None
        infos += [
            BackendInfo("reference", GPU, ALL_DTYPES, state_rtol=0, state_atol=0, marks=_cuda_marks()),
            BackendInfo("foreach", GPU, ALL_DTYPES, marks=_cuda_marks()),
            BackendInfo("triton", GPU, FUSED_DTYPES, **TRITON_TOL, marks=_cuda_marks()),
            BackendInfo("triton", GPU, FUSED_DTYPES, **TRITON_TOL, sizes=TINY_SIZES, config="tiny",
                        options=TRITON_TINY, marks=_cuda_marks()),
            BackendInfo("cuda", GPU, FUSED_DTYPES, **CUDA_TOL, marks=_cuda_marks(),
                        notes="the kernels divide where torch may multiply"),
        ]
    else:
        infos += [
            BackendInfo("triton", CPU, FUSED_DTYPES, **TRITON_TOL, sizes=INTERPRETER_SIZES, slow=True,
                        notes="Triton's CPU interpreter (TRITON_INTERPRET=1)"),
            BackendInfo("triton", CPU, FUSED_DTYPES, **TRITON_TOL, sizes=TINY_SIZES, slow=True, config="tiny",
                        options=TRITON_TINY),
            # Collected so that the skip says why it did not run.
            BackendInfo("cuda", torch.device("cuda"), FUSED_DTYPES, marks=_cuda_marks()),
        ]
    only = os.environ.get("ALSALS_SUITE_BACKENDS")   # e.g. "foreach,triton" to narrow a run
    if only:
        wanted = {n.strip() for n in only.split(",")}
        infos = [i for i in infos if i.name in wanted]
    return infos


INFOS: List[BackendInfo] = _registry()


def params(*, oracle: bool = True, where: Callable[[BackendInfo], bool] = lambda i: True) -> List[Any]:
    """``INFOS`` as pytest params (skipped with the reason where unavailable)."""
    out = []
    for info in INFOS:
        if (not oracle and info.is_oracle) or not where(info):
            continue
        marks = list(info.marks)
        if not (info.device.type == "cuda" and not HAS_CUDA):   # conftest skips those already
            reason = info.unavailable()
            required = info.name == "cuda" and os.environ.get("ALSALS_FUSED_REQUIRE_EXTENSION") == "1"
            if reason is not None and not required:   # required: the tests fail with the reason
                marks.append(pytest.mark.skip(reason=reason))
        out.append(pytest.param(info, id=info.id, marks=marks))
    return out


def with_dtypes(*, oracle: bool = True, dtypes: Sequence[torch.dtype] = ALL_DTYPES,
                where: Callable[[BackendInfo], bool] = lambda i: True) -> List[Any]:
    """(info, dtype) pairs: every dtype in ``dtypes`` the backend runs itself."""
    out = []
    for p in params(oracle=oracle, where=where):
        info = p.values[0]
        for dtype in dtypes:
            if dtype in info.dtypes:
                out.append(pytest.param(info, dtype, id=f"{info.id}-{_dtype_name(dtype)}", marks=p.marks))
    return out


# -- buckets ------------------------------------------------------------------------------------

def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


WDS = (0.0, 0.01, 0.1)


def random_bucket(device: torch.device, dtype: torch.dtype, sizes: Sequence[Any], *, seed: int = 0,
                  backups: bool = True, grad_scale: float = 0.1, misaligned: bool = False,
                  wds: Sequence[float] = WDS) -> Bucket:
    """Random params, grads and moments (v > 0) of the given sizes (numels or shapes); backups hold
    a sentinel (7.0) so that a pass that should not write them is caught.  ``misaligned``: every
    tensor is a view one element into its storage (not 16-byte aligned: the kernels' masked or
    scalar paths)."""
    gen = torch.Generator().manual_seed(seed)
    mt = math_dtype(dtype)
    b = Bucket(device=device, dtype=dtype)

    def put(t: Tensor) -> Tensor:
        return offset_view(t.to(device), 1) if misaligned else t.to(device)

    for i, n in enumerate(sizes):
        shape = (n,) if isinstance(n, int) else tuple(n)
        b.params.append(put(torch.randn(shape, generator=gen).to(dtype)))
        b.grads.append(put((torch.randn(shape, generator=gen) * grad_scale).to(dtype)))
        b.exp_avgs.append(put((torch.randn(shape, generator=gen) * 0.01).to(mt)))
        b.exp_avg_sqs.append(put((torch.rand(shape, generator=gen) * 1e-3 + 1e-6).to(mt)))
        if backups:
            b.backups.append(put(torch.full(shape, 7.0, dtype=dtype)))
        b.weight_decays.append(wds[i % len(wds)])
    return b


def offset_view(t: Tensor, offset: int) -> Tensor:
    """The same values in a view ``offset`` elements into a fresh buffer."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = base[offset:].view(t.shape)
    view.copy_(t)
    return view


TENSOR_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "backups")


def assert_close(x: Tensor, y: Tensor, *, rtol: float, atol: float, where: str) -> None:
    """torch.testing.assert_close, with a cheap check first (assert_close is slow on large CPU tensors)."""
    if x.shape == y.shape and x.dtype == y.dtype and x.device == y.device:
        xd, yd = x.double(), y.double()
        if bool(((xd - yd).abs() <= atol + rtol * yd.abs()).all()):
            return
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=_prefixed(where))


def _prefixed(where: str) -> Callable[[str], str]:
    """An assert_close ``msg`` that says which tensor differed."""
    return lambda message: f"{where}: {message}"


def clone_bucket(b: Bucket) -> Bucket:
    """Same values in fresh tensors (at the same storage offsets, with the same strides) and a new
    bucket identity (its own backend caches)."""
    def copies(ts: List[Tensor]) -> List[Tensor]:
        return [offset_view(t, t.storage_offset()) if t.storage_offset() else t.clone() for t in ts]

    return Bucket(device=b.device, dtype=b.dtype, weight_decays=list(b.weight_decays),
                  params=copies(b.params), grads=copies(b.grads), exp_avgs=copies(b.exp_avgs),
                  exp_avg_sqs=copies(b.exp_avg_sqs), backups=copies(b.backups))


def clone_all(buckets: Sequence[Bucket]) -> List[Bucket]:
    return [clone_bucket(b) for b in buckets]


KINDS = {"params": "params", "exp_avgs": "moments", "exp_avg_sqs": "moments", "backups": "backups"}


def assert_buckets_close(got: Sequence[Bucket], want: Sequence[Bucket], info: BackendInfo, what: str = "") -> None:
    for bi, (a, b) in enumerate(zip(got, want, strict=True)):
        for name, kind in KINDS.items():
            xs, ys = getattr(a, name), getattr(b, name)
            assert len(xs) == len(ys), f"{what} bucket {bi} {name}: lengths differ"
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                info.assert_state_close(x, y, f"{what} bucket {bi} ({a.dtype}) {name}[{i}]", kind=kind)


def assert_buckets_equal(got: Sequence[Bucket], want: Sequence[Bucket], what: str = "") -> None:
    for bi, (a, b) in enumerate(zip(got, want, strict=True)):
        for name in TENSOR_LISTS:
            for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name), strict=True)):
                assert torch.equal(x, y), f"{what} bucket {bi} {name}[{i}] changed"


# -- scalars and control vectors ------------------------------------------------------------------

def step_scalars(*, eta: float = 0.05, t: int = 3, search_dir: Dir = Dir.MOMENTUM, smoothing: float = 0.99,
                 max_grad_norm: Optional[float] = None) -> StepScalars:
    b1, b2 = 0.9, 0.999
    return StepScalars(eta=eta, beta1=b1, beta2=b2, eps=1e-8, bias_correction1=1 - b1 ** t,
                       bias_correction2=1 - b2 ** t, smoothing=smoothing, search_dir=search_dir,
                       max_grad_norm=max_grad_norm)


def make_ctl(device: torch.device, **slots: float) -> Tensor:
    """A control vector with the named ``Ctl`` slots set (SCALE defaults to 1)."""
    ctl = new_ctl(device)
    ctl[Ctl.SCALE] = 1.0
    for name, value in slots.items():
        ctl[Ctl[name]] = value
    return ctl


def direction(d: Dir, fallback: bool, g: Tensor, m: Tensor, v: Tensor, hp: StepScalars) -> Tensor:
    """d in the math type, written out here (independently of the backends)."""
    resolved = (Dir.GRAD if fallback else Dir.MOMENTUM) if d is Dir.UPDATE else d
    denom = (v / hp.bias_correction2).sqrt() + hp.eps
    return (m / hp.bias_correction1) / denom if resolved is Dir.MOMENTUM else g / denom


def candidate(w0: Tensor, eta: float, d: Tensor, wd: float) -> Tensor:
    return w0 - eta * (d + wd * w0)


def loss0(device: torch.device, value: float = 1.25) -> Tensor:
    return torch.tensor(value, dtype=torch.float64, device=device)


def slope_magnitudes(bucket, hp, scale, search_dir):
    """sum |g*d_search| and sum |g*g*p| from the bucket's (updated) moments: the scale of the sums."""
    mag = torch.zeros(2, dtype=torch.float64)
    for g, m, v in zip(bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, strict=True):
        gm = g.to(m.dtype) * scale
        d = direction(search_dir, False, gm, m, v, hp)
        dg = direction(Dir.GRAD, False, gm, m, v, hp)
        mag[0] += (gm * d).abs().double().sum().cpu()
        mag[1] += (gm * dg).abs().double().sum().cpu()
    return mag


class Chain:
    """The backend and the reference through the same sequence of passes, compared after each one
    and then set to the reference's values (so that each pass starts from identical inputs, the
    backend's tensors keeping their addresses).  ``backend``: an instance to use instead of the
    info's (a backend test that counts what that instance does)."""

    def __init__(self, info: BackendInfo, buckets: List[Bucket], ctl: Tensor, backend: Any = None):
        self.info, self.ref = info, info.reference()
        self.be = info.backend() if backend is None else backend
        self.b, self.r = buckets, clone_all(buckets)
        self.c, self.cr = ctl.clone(), ctl.clone()

    def set_ctl(self, **slots):
        for name, value in slots.items():
            self.cr[Ctl[name]] = value
        self.c.copy_(self.cr)

    def grad(self, what, hp, **kw):
        got = self.be.grad_pass(self.b, self.c, loss0(self.info.device), hp, **kw)
        want = self.ref.grad_pass(self.r, self.cr, loss0(self.info.device), hp, **kw)
        if got is not None:
            exact = sum(float(g.double().square().sum()) for x in self.r for g in x.grads)
            assert abs(float(got) - float(want)) <= (self.info.sumsq_rtol or self.info.sum_rtol) * exact, what
        self._check(what, got, want)

    def step(self, what, hp, **kw):
        got = self.be.step_pass(self.b, hp, self.c, **kw)
        want = self.ref.step_pass(self.r, hp, self.cr, **kw)
        if got is not None and want is not None:
            mag = sum(slope_magnitudes(x, hp, float(self.cr[Ctl.SCALE]), hp.search_dir) for x in self.r)
            self.info.assert_sums_close(got, want, mag, what)
        self._check(what, got, want)

    def move(self, what, hp, **kw):
        got = self.be.move_pass(self.b, hp, self.c, **kw)
        want = self.ref.move_pass(self.r, hp, self.cr, **kw)
        self._check(what, got, want)

    def _check(self, what, got, want):
        assert (got is None) == (want is None), f"{what}: returned {got!r}, the reference {want!r}"
        assert_buckets_close(self.b, self.r, self.info, what)
        for slot in Ctl:   # flags and copied values exactly; the slots computed from sums relative to the slopes
            a, w = float(self.c[slot]), float(self.cr[slot])
            if slot in (Ctl.SCALE, Ctl.SLOPE, Ctl.SLOPE_GRAD, Ctl.S_NEW):
                ok = abs(a - w) <= self.info.sum_rtol * max(abs(float(self.cr[Ctl.SLOPE_GRAD])), abs(w), 1e-30)
            else:
                ok = a == w
            assert ok or (math.isnan(a) and math.isnan(w)), f"{what}: ctl[{slot.name}] {a!r} vs {w!r}"
        for x, y in zip(self.b, self.r, strict=True):   # identical inputs for the next pass
            for name in TENSOR_LISTS:
                for t, u in zip(getattr(x, name), getattr(y, name), strict=True):
                    t.copy_(u)
        self.c.copy_(self.cr)


# -- whole-optimizer runs ---------------------------------------------------------------------------

def model_on(info: BackendInfo, dtype: torch.dtype = torch.float32, seed: int = 0) -> OddModel:
    return OddModel(dtype, seed).to(info.device)


def data_on(info: BackendInfo, dtype: torch.dtype = torch.float32, seed: int = 1, n: int = 24):
    x, y = make_data(n=n, dtype=dtype, seed=seed)
    return x.to(info.device), y.to(info.device)


def mse_closure(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x).float(), y.float())


@dataclass
class Run:
    """What a trajectory recorded: host decisions per step, and the tensors at the end of each."""

    # (trials, accepted, searched, skipped, fallback, plateau drops so far, eta)
    decisions: List[Tuple] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    params: List[List[Tensor]] = field(default_factory=list)
    moments: List[List[Tensor]] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)
    model: Any = None
    opt: Any = None


class TanhMLP(torch.nn.Module):
    """The problem test_triton's trajectories ran on (kept to run those cases as they were): a tanh
    MLP (6 -> 12 -> 1) with its loss computed in fp64, so loss differences do not drown in the
    fp32 rounding of the forward; batches of 32 drawn from 96 samples."""

    def __init__(self, dtype=torch.float32, seed: int = 0, n: int = 96, d_in: int = 6, d_hidden: int = 12):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        self.register_buffer("x", x)
        self.register_buffer("y", torch.sin(x @ torch.randn(d_in, 1, generator=gen, dtype=torch.float64)))
        self.W1 = torch.nn.Parameter((torch.randn(d_in, d_hidden, generator=gen) * 0.5).to(dtype))
        self.b1 = torch.nn.Parameter(torch.zeros(d_hidden, dtype=dtype))
        self.W2 = torch.nn.Parameter((torch.randn(d_hidden, 1, generator=gen) * 0.5).to(dtype))
        self.b2 = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.batches = [torch.randperm(n, generator=gen)[:32] for _ in range(64)]

    def groups(self, decay: float = 0.0):
        return [{"params": [self.W1, self.W2], "weight_decay": decay},
                {"params": [self.b1, self.b2], "weight_decay": 0.0}]

    def loss(self, step: int) -> Tensor:
        idx = self.batches[step % len(self.batches)]
        x, y = self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)]
        w1, b1, w2, b2 = (p.double() for p in (self.W1, self.b1, self.W2, self.b2))
        return ((torch.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()


class LinearNet(torch.nn.Module):
    """The network test_cuda's trajectories ran on (kept to run those cases as they were): two
    Linear layers (19 -> 37 -> 3) and a parameter of CHUNK + 11 elements that enters the output
    through its sum of squares; batches of 32."""

    def __init__(self, dtype=torch.float32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(19, 37).to(dtype)
        self.l2 = torch.nn.Linear(37, 3).to(dtype)
        self.big = torch.nn.Parameter((torch.randn(CHUNK + 11, generator=gen) * 0.01).to(dtype))
        with torch.no_grad():
            for p in (*self.l1.parameters(), *self.l2.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x))) + self.big[:3] * self.big.square().sum()

    def groups(self, decay: float = 0.0):
        return [{"params": [self.l1.weight, self.l2.weight, self.big], "weight_decay": decay},
                {"params": [self.l1.bias, self.l2.bias], "weight_decay": 0.0}]


def run_trajectory(backend: str, device: torch.device, *, steps: int, dtype=torch.float32, variant="alsals",
                   seed: int = 0, batches: int = 4, poison_at: Sequence[int] = (), mixed: bool = False,
                   big: bool = False, model: str = "odd", **opt_kwargs) -> Run:
    """Train OddModel (two param groups, odd shapes, an empty and an unused parameter, dropout).

    ``mixed``: one parameter is fp64, so the plan has two buckets and, on a fused backend, two
    backends (fp64 runs on foreach): the driver then takes the decisions from partial sums.
    ``big``: one parameter has more than one CHUNK of elements.
    ``model="mlp"``: ``TanhMLP`` instead (test_triton's problem), ``model="linear"``: ``LinearNet``
    (test_cuda's, fp32 targets); for both, ``weight_decay`` is their weight matrices' group's, and
    ``batches``, ``mixed`` and ``big`` do not apply."""
    loss_at: Callable[[int], Tensor]
    if model == "mlp":
        assert not (mixed or big), "TanhMLP has no big or fp64 parameter"
        mlp = TanhMLP(dtype, seed).to(device)
        net: torch.nn.Module = mlp
        groups = mlp.groups(opt_kwargs.pop("weight_decay", 0.0))
        loss_at = mlp.loss
    elif model == "linear":
        assert not (mixed or big), "LinearNet has its own big parameter and no fp64 one"
        lin = LinearNet(dtype, seed).to(device)
        net = lin
        groups = lin.groups(opt_kwargs.pop("weight_decay", 0.0))
        gen = torch.Generator().manual_seed(seed + 1)
        batches_xy = [(torch.randn(32, 19, generator=gen).to(device, dtype),
                       torch.randn(32, 3, generator=gen).to(device)) for _ in range(4)]

        def loss_at(k: int) -> Tensor:
            x, y = batches_xy[k % len(batches_xy)]
            return torch.nn.functional.mse_loss(lin(x).float(), y)
    else:
        assert model == "odd", f"unknown trajectory model {model!r}"
        odd = OddModel(dtype, seed).to(device)
        if big:
            gen = torch.Generator().manual_seed(seed)
            odd.big.data = (torch.randn(CHUNK // 3 + 5, 3, generator=gen) * 0.05).to(dtype).to(device)
        if mixed:
            odd.big.data = odd.big.data.double()
        net = odd
        groups = odd.groups()
        data = [tuple(t.to(device) for t in make_data(dtype=dtype, seed=seed + 10 + i)) for i in range(batches)]

        def loss_at(k: int) -> Tensor:
            x, y = data[k % batches]
            return torch.nn.functional.mse_loss(odd(x).float(), y.float())
    plateau = opt_kwargs.pop("plateau", None)
    opt = ALSALS(groups, variant=variant, backend=backend, **opt_kwargs)
    if plateau:                  # the plateau test's fields are not constructor arguments
        opt.hyper = dataclasses.replace(opt.hyper, **plateau)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    run = Run(model=net, opt=opt)
    for k in range(steps):
        poison = float("nan") if k in poison_at else 1.0

        def closure(k=k, poison=poison):
            return loss_at(k) * poison

        opt.zero_grad()
        run.losses.append(float(opt.step(closure).detach()))
        info = opt.last_step
        assert info is not None
        drops = opt._plateau.drops if opt._plateau is not None else 0
        run.decisions.append((info.trials, info.accepted, info.searched, info.skipped, info.fallback, drops,
                              opt.eta))
        run.params.append([p.detach().clone() for p in net.parameters()])
        run.moments.append([opt.state[p][n].clone() for p in net.parameters() if p in opt.state
                            for n in ("exp_avg", "exp_avg_sq")])
    run.counters = dict(opt.counters)
    return run


def assert_same_run(got: Run, want: Run, info: BackendInfo, *, memory_efficient: bool = False,
                    init_step_size: float = 0.1, clipped: bool = False, f64_run: bool = False,
                    strict_steps: int = 0, strict: Optional[BackendInfo] = None) -> None:
    """Identical host decisions at every step; losses, params and moments within the backend's
    trajectory tolerances.  In-place (memory_efficient) moves leave a few fp32 ulps of eta*d
    behind, rounded differently by each backend, and a rejected step keeps its eta: the params may
    drift by 4 ulps of the largest eta plus one per move (trial) and step so far.

    ``strict_steps``: the first steps are also held to ``strict``'s trajectory tolerances (default:
    the row's own, without ``traj_clip`` / ``traj_inplace``), with no drift allowance: where a
    deleted copy checked that run so closely for that many steps."""
    assert len(got.decisions) == len(want.decisions)
    for step, (a, b) in enumerate(zip(got.decisions, want.decisions, strict=True)):
        assert a == b, f"step {step}: (trials, accepted, searched, skipped, fallback, eta) {a} != {b}"
    assert got.counters == want.counters
    loose = info
    if clipped:
        loose = replace(loose, **dict(info.traj_clip))
    if memory_efficient:
        loose = replace(loose, **dict(info.traj_inplace))
    eta_ulp = 2.0 ** -23 * max([d[-1] for d in want.decisions] + [init_step_size])
    trials = 0
    for step in range(len(got.params)):
        trials += want.decisions[step][0]
        assert got.losses[step] == pytest.approx(want.losses[step], rel=loose.traj_rtol, abs=1e-6, nan_ok=True), \
            f"loss at step {step}"
        rules = [(loose, eta_ulp * (4 + trials + step) if memory_efficient else 0.0, "")]
        if step < strict_steps:
            rules.append((info if strict is None else strict, 0.0, f" (the first {strict_steps} steps' tolerance)"))
        for key in ("params", "moments"):
            xs, ys = getattr(got, key)[step], getattr(want, key)[step]
            assert len(xs) == len(ys), f"{key} at step {step}: different tensor counts"
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                if x.dtype == torch.float64 and not f64_run:   # its gradient goes through fp32 params
                    x, y = x.float(), y.float()
                for tol, drift, what in rules:
                    tol.assert_state_close(x, y, f"{key}[{i}] at step {step}{what}", kind=key, trajectory=True,
                                           extra_atol=drift if key == "params" else 0.0)


def state_dict_copy(opt) -> dict:
    """A state_dict that shares no storage with the optimizer (as if saved to disk and loaded)."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def deep_state(opt) -> dict:
    return copy.deepcopy(opt.state_dict()["state"])


def flat(model) -> Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def assert_same_extra_state(a, b, path: str = "state_dict") -> None:
    """The optimizer's own state_dict entries (eta, t, counters, device state...) are identical."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            assert_same_extra_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_extra_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
