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
- ``foreach`` on CPU (and on the GPU): the reference's operations in the same order, so fp32/fp64
  state agrees to the bit on CPU; only the order of the fp64 sums differs.
- ``triton``: under Triton's CPU interpreter without a GPU (``TRITON_INTERPRET=1``, set by
  conftest.py), compiled on a GPU.  The interpreter is slow: its sizes and trajectories are small.
- ``cuda``: the C++/CUDA extension, on a GPU only.

Tolerances (pass parity is measured from identical inputs, so nothing compounds):

- ``state``: m, v, fp32/fp64 params and backups, element-wise ``|a - b| <= rtol*|b| + atol``.
  Fused kernels may contract to FMAs where torch does not (or divide where torch multiplies by a
  reciprocal), hence a few fp32 ulps.
- 16-bit params: at most one ulp of the dtype (``rtol = finfo.eps``).
- ``sum_rtol``: the fp64 sums (slopes, gradient sum of squares) relative to the sum of the
  magnitudes of their terms (fp32 per-chunk partials added in another order).
- ``traj``: params and moments after a whole trajectory (rounding differences drift through the
  steps); the decisions (trials, accepted, skipped, fallback, eta) must be identical.
"""
from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

from alsals_fused import ALSALS
from alsals_fused.backends import available_backends, get_backend
from alsals_fused.backends.base import Bucket, Ctl, Dir, StepScalars, new_ctl
from helpers import OddModel, make_data

HAS_CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
# With its index: tensors on "cuda" report "cuda:0", and torch.device("cuda") != "cuda:0".
GPU = torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else None
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # fp64 is routed to foreach

# Sizes: empty, one element, primes, and (except under the interpreter) more than one CHUNK.
SIZES = (0, 1, 2, 7, 31, 127, 1000, 4099)
SMALL_SIZES = (0, 1, 7, 31, 130)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class BackendInfo:
    name: str                                    # the backend= argument
    device: torch.device
    dtypes: Tuple[torch.dtype, ...]              # dtypes it runs itself
    state_rtol: float = 1e-6
    state_atol: float = 1e-7
    sum_rtol: float = 1e-6
    traj_rtol: float = 1e-4
    traj_atol: float = 1e-5
    sizes: Tuple[int, ...] = SIZES
    traj_steps: int = 16
    slow: bool = False                           # an interpreter: the suite runs fewer cases
    marks: Tuple[Any, ...] = ()
    notes: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}-{self.device.type}"

    @property
    def is_oracle(self) -> bool:
        return self.name == "reference"

    def unavailable(self) -> Optional[str]:
        reason = available_backends(self.device)[self.name]
        if reason is not None:
            return f"backend {self.name!r} cannot run on {self.device}: {reason}"
        return None

    def backend(self):
        return get_backend(self.name, self.device)

    def reference(self):
        return get_backend("reference", self.device)

    # tolerance helpers --------------------------------------------------------------------------
    def tol(self, dtype: torch.dtype) -> Dict[str, float]:
        """Element-wise tolerance for a tensor of ``dtype`` after one pass."""
        if dtype in (torch.bfloat16, torch.float16):
            return dict(rtol=torch.finfo(dtype).eps, atol=1e-7)
        if dtype == torch.float64:
            return dict(rtol=1e-12, atol=1e-14)
        return dict(rtol=self.state_rtol, atol=self.state_atol)


def _cuda_marks() -> Tuple[Any, ...]:
    return (pytest.mark.cuda,)


def _registry() -> List[BackendInfo]:
    infos = [
        BackendInfo("reference", CPU, ALL_DTYPES, state_rtol=0, state_atol=0, notes="the oracle"),
        BackendInfo("foreach", CPU, ALL_DTYPES, notes="same ops as the reference, multi-tensor"),
    ]
    if HAS_CUDA:
        assert GPU is not None
        infos += [
            BackendInfo("reference", GPU, ALL_DTYPES, state_rtol=0, state_atol=0, marks=_cuda_marks()),
            BackendInfo("foreach", GPU, ALL_DTYPES, marks=_cuda_marks()),
            BackendInfo("triton", GPU, FUSED_DTYPES, state_rtol=1e-6, state_atol=1e-7, sum_rtol=1e-6,
                        marks=_cuda_marks()),
            BackendInfo("cuda", GPU, FUSED_DTYPES, state_rtol=1e-5, state_atol=1e-6, sum_rtol=1e-5,
                        marks=_cuda_marks(), notes="the kernels divide where torch may multiply"),
        ]
    else:
        infos += [
            BackendInfo("triton", CPU, FUSED_DTYPES, sizes=SMALL_SIZES, traj_steps=10, slow=True,
                        notes="Triton's CPU interpreter (TRITON_INTERPRET=1)"),
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


def random_bucket(device: torch.device, dtype: torch.dtype, sizes: Sequence[int], *, seed: int = 0,
                  backups: bool = True, grad_scale: float = 0.1) -> Bucket:
    """Random params, grads and moments (v > 0) of the given sizes; backups hold a sentinel (7.0)
    so that a pass that should not write them is caught."""
    gen = torch.Generator().manual_seed(seed)
    mt = math_dtype(dtype)
    b = Bucket(device=device, dtype=dtype)
    for i, n in enumerate(sizes):
        b.params.append(torch.randn(n, generator=gen).to(dtype).to(device))
        b.grads.append((torch.randn(n, generator=gen) * grad_scale).to(dtype).to(device))
        b.exp_avgs.append((torch.randn(n, generator=gen) * 0.01).to(mt).to(device))
        b.exp_avg_sqs.append((torch.rand(n, generator=gen) * 1e-3 + 1e-6).to(mt).to(device))
        if backups:
            b.backups.append(torch.full((n,), 7.0, dtype=dtype, device=device))
        b.weight_decays.append(WDS[i % len(WDS)])
    return b


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
    """Same values in fresh tensors and a new bucket identity (its own backend caches)."""
    def copies(ts: List[Tensor]) -> List[Tensor]:
        return [t.clone() for t in ts]

    return Bucket(device=b.device, dtype=b.dtype, weight_decays=list(b.weight_decays),
                  params=copies(b.params), grads=copies(b.grads), exp_avgs=copies(b.exp_avgs),
                  exp_avg_sqs=copies(b.exp_avg_sqs), backups=copies(b.backups))


def clone_all(buckets: Sequence[Bucket]) -> List[Bucket]:
    return [clone_bucket(b) for b in buckets]


def assert_buckets_close(got: Sequence[Bucket], want: Sequence[Bucket], info: BackendInfo, what: str = "") -> None:
    for bi, (a, b) in enumerate(zip(got, want, strict=True)):
        for name in ("params", "exp_avgs", "exp_avg_sqs", "backups"):
            xs, ys = getattr(a, name), getattr(b, name)
            assert len(xs) == len(ys), f"{what} bucket {bi} {name}: lengths differ"
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                tol = info.tol(x.dtype)
                where = f"{what} bucket {bi} ({a.dtype}) {name}[{i}]"
                assert_close(x, y, rtol=tol["rtol"], atol=tol["atol"], where=where)


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

    decisions: List[Tuple] = field(default_factory=list)   # (trials, accepted, searched, skipped, fallback, eta)
    params: List[List[Tensor]] = field(default_factory=list)
    moments: List[List[Tensor]] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)
    model: Any = None
    opt: Any = None


def run_trajectory(backend: str, device: torch.device, *, steps: int, dtype=torch.float32, variant="alsals",
                   seed: int = 0, batches: int = 4, poison_at: Sequence[int] = (), mixed: bool = False,
                   **opt_kwargs) -> Run:
    """Train OddModel (two param groups, odd shapes, an empty and an unused parameter, dropout).

    ``mixed``: one parameter is fp64, so the plan has two buckets and, on a fused backend, two
    backends (fp64 runs on foreach): the driver then takes the decisions from partial sums."""
    model = OddModel(dtype, seed).to(device)
    if mixed:
        model.big.data = model.big.data.double()
    opt = ALSALS(model.groups(), variant=variant, backend=backend, **opt_kwargs)
    data = [tuple(t.to(device) for t in make_data(dtype=dtype, seed=seed + 10 + i)) for i in range(batches)]
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    run = Run(model=model, opt=opt)
    for k in range(steps):
        x, y = data[k % batches]
        poison = float("nan") if k in poison_at else 1.0

        def closure(x=x, y=y, poison=poison):
            return torch.nn.functional.mse_loss(model(x).float(), y.float()) * poison

        opt.zero_grad()
        opt.step(closure)
        info = opt.last_step
        assert info is not None
        run.decisions.append((info.trials, info.accepted, info.searched, info.skipped, info.fallback, opt.eta))
        run.params.append([p.detach().clone() for p in model.parameters()])
        run.moments.append([opt.state[p][n].clone() for p in model.parameters() if p in opt.state
                            for n in ("exp_avg", "exp_avg_sq")])
    run.counters = dict(opt.counters)
    return run


def assert_same_run(got: Run, want: Run, *, rtol: float, atol: float,
                    param_tol: Optional[Dict[str, float]] = None) -> None:
    """Identical host decisions at every step; tensors within the tolerances."""
    assert len(got.decisions) == len(want.decisions)
    for step, (a, b) in enumerate(zip(got.decisions, want.decisions, strict=True)):
        assert a == b, f"step {step}: (trials, accepted, searched, skipped, fallback, eta) {a} != {b}"
    assert got.counters == want.counters
    for step in range(len(got.params)):
        for key in ("params", "moments"):
            xs, ys = getattr(got, key)[step], getattr(want, key)[step]
            assert len(xs) == len(ys), f"{key} at step {step}: different tensor counts"
            for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
                tol = param_tol if key == "params" and param_tol is not None else dict(rtol=rtol, atol=atol)
                where = f"{key}[{i}] at step {step}"
                assert_close(x, y, rtol=tol["rtol"], atol=tol["atol"], where=where)


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
