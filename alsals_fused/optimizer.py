"""ALSALS: ADAM direction with momentum, step size by a stochastic Armijo line search.

This module is the line-search driver shared by every backend (``docs/algorithm.md`` describes
the algorithm it implements, and its section 9 every deviation from the papers' algorithm with
the reason; section numbers below refer to that page).
It runs the closure, replays the RNG, keeps the host state (eta, t, the "auto" schedule,
counters) and runs the search loop; the element-wise passes and the device decisions between them
are the backend's (contract v2, ``backends/base.py``; the reference decisions in torch ops are
``backends/decisions.py``).

A step, in named parts: ``_refresh_plan`` (the persistent parameter plan), ``_passes`` (the grad
pass: the gradient norm and the non-finite check, all on the device; then the step pass: moments,
backup, candidate, slope), ``_search`` (the trial loop: one verdict and one device-to-host read per trial)
and ``_commit`` (accept, reject or skip; host state).

The parameter plan: buckets (one per device and dtype), backups, the backend of each bucket and
the backends' cached tables are built once and reused.  It is rebuilt only when the set of
parameters with gradients, a parameter's storage (hence dtype or device), the param groups or
their weight decays, or the optimizer state (``load_state_dict``) change; moments then follow
their parameters' device and dtype (fp32, fp64 for fp64 params: section 1).  Gradients are read
afresh every step and released after it; when one comes back at another address (e.g.
``zero_grad(set_to_none=True)``), only its bucket's gradient entries are refreshed
(``Bucket.grads_version``).

Host/device split (section 5): eta and t are host doubles/ints; the slope, h, s, the losses and
the accept test stay on the device in one float64 control vector (``ctl``).  A searching step
makes one verdict call and one device-to-host read per trial (a pinned buffer and a non-blocking
copy on CUDA); a step that does not search reads nothing.
"""
from __future__ import annotations

import functools
import math
import operator
import os
import sys
import types
import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union, cast

import torch
from torch import Tensor

from . import backends as _backends
from . import checkpoint as _checkpoint
from . import distributed as _dist
from . import host_ext
from ._types import CLOSURE_HELP, StepInfo, _RngState, check_loss_value
from .backends import decisions
from .backends.base import (
    GRAPH_CAPTURE_HELP,
    VERDICT_SIZE,
    Backend,
    Bucket,
    Ctl,
    DecisionScalars,
    Dir,
    StepScalars,
    Verdict,
    math_dtype,
    new_ctl,
)
from .config import (
    BACKENDS,
    DEFAULT_VARIANT,
    ETA_MAX,
    ETA_MIN,
    VARIANT_DEFAULTS,
    Hyper,
    cooldown_steps,
    make_hyper,
    require_budget_for_fraction,
    validate_weight_decay,
    with_budget,
)
from .frameworks import is_framework_closure
from .plateau import PlateauTest
from .user_gradients import UserGradientsMixin

TRAINING_MODE_CHANGED = (
    "ALSALS: a module of the model switched between train() and eval() during a line-search "
    "trial forward; the trials must evaluate the loss the gradient forward did (same dropout, "
    "same normalization), so the closure must not call model.eval()/train(). The parameters are "
    "back at w0; the modes are left as the closure set them."
)


def _training_modes(module: torch.nn.Module) -> List[bool]:
    return [m.training for m in module.modules()]


def _as_loss(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"ALSALS: the closure must return the loss as a torch.Tensor ({what}); "
                        f"got {type(value).__name__}.\n{CLOSURE_HELP}")
    if value.numel() != 1:
        raise ValueError(f"ALSALS: the closure must return a scalar loss ({what}); "
                         f"got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point() or value.is_meta:
        check_loss_value(value, f"the closure's loss ({what})")
    return value



_data_ptr = Tensor.data_ptr
_weight_decay_of = operator.itemgetter("weight_decay")
# The grad mode switches of step(): torch.enable_grad()/no_grad() as context managers run about
# 10 us of cold Python per step right after a backward; the flag they set is this one.
_set_grad_enabled = torch._C._set_grad_enabled
_shape = operator.attrgetter("shape")
_stride = Tensor.stride
_is_contiguous = Tensor.is_contiguous
_new_tuple = tuple.__new__    # StepScalars without its generated __new__ (see _step_scalars)


class _Derived(NamedTuple):
    """What every step reads from a Hyper, computed once per Hyper (``ALSALS.hyper``)."""

    betas: Tuple[float, float]
    eps: float
    smoothing: float
    search_dir: Dir
    max_grad_norm: Optional[float]
    cooldown_start: float          # the last step before the cooldown (inf: no cooldown)
    cooldown_steps: int

    @classmethod
    def of(cls, hyper: Hyper) -> "_Derived":
        steps = cooldown_steps(hyper)
        start = hyper.total_steps - steps if hyper.total_steps is not None else math.inf
        b1, b2 = hyper.betas
        return cls((b1, b2), hyper.eps, hyper.smoothing, Dir.MOMENTUM if hyper.momentum_search else Dir.GRAD,
                   hyper.max_grad_norm, start, steps)
# _search unpacks the verdict by position (one unpacking instead of an enum lookup per slot)
_VERDICT_ORDER = ("ACCEPT", "FINITE", "FALLBACK", "LOSS0", "LOSS_TRY", "SLOPE_USED", "PENDING", "H_NEW")
if tuple(v.name for v in sorted(Verdict)) != _VERDICT_ORDER or VERDICT_SIZE != len(_VERDICT_ORDER):
    raise RuntimeError("alsals_fused: Verdict's slots changed; update _search's unpacking")


def _partials(parts: List[Optional[Tensor]]) -> List[Tensor]:
    """The partial sums of passes run with ``finish=False``, which always return them (base.py)."""
    out = []
    for part in parts:
        assert part is not None, "a backend pass with finish=False returned no partial sums"
        out.append(part)
    return out


def _check_grad(p: Tensor, g: Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError("ALSALS does not support sparse gradients (the line search "
                           "needs the full direction); use dense embeddings")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise RuntimeError(f"ALSALS: a gradient of shape {tuple(g.shape)}, {g.dtype} on "
                           f"{g.device} does not match its parameter ({tuple(p.shape)}, "
                           f"{p.dtype} on {p.device})")


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel, called from the warning function, that names the first frame
    outside this package (the user's step() call, whichever path it took)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame: Optional[types.FrameType] = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def _step_hooks(step):
    """What torch.optim.Optimizer wraps every step() in, for less: the global and per-optimizer
    step pre/post hooks (same order and semantics; a pre hook may return new (args, kwargs)),
    and, only while a profiler records, the ``Optimizer.step#ALSALS.step`` range and the
    ``_optimizer_step_code`` marker call the profiler's Python tracer looks for.  torch's own
    wrapper enters that range on every call, which costs about 5 us of host time per step with
    no profiler; ``hooked = True`` tells Optimizer.__init__ not to wrap step() again."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    profiler_enabled = torch._C._autograd._profiler_enabled

    def hooked(self, args, kwargs, profiling: bool):
        for hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, "
                                       f"new_kwargs), but got {result}.")
                args, kwargs = result
        out = step(*args, **kwargs)
        if profiling:
            self._optimizer_step_code()
        for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        if profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return hooked(self, args, kwargs, True)
        if _global_optimizer_pre_hooks or self._optimizer_step_pre_hooks \
                or self._optimizer_step_post_hooks or _global_optimizer_post_hooks:
            return hooked(self, args, kwargs, False)
        return step(*args, **kwargs)

    wrapper.hooked = True         # Optimizer.__init__ checks this attribute
    return wrapper


class _Plan:
    """The persistent parameter plan: buckets, their backends and what the step re-checks.

    ``groups`` pairs each backend with the buckets it runs (all on ``device``); ``generic`` is
    True when the decisions must be taken by the driver (``decisions.py``) from partial sums:
    several backends, or parameters sharded across ranks.
    """

    def __init__(self, device: torch.device, buckets: List[Bucket],
                 groups: List[Tuple[Backend, Tuple[Bucket, ...]]],
                 others: List[Tensor], config: tuple, sharded: bool,
                 owners: Optional[List[List[Tensor]]] = None,
                 group_keys: Optional[List[_dist.ShardKey]] = None):
        self.device = device
        self.buckets = buckets
        self.groups = groups
        # Distributed (distributed.py): ``owners[i]`` are bucket i's parameters as the user holds
        # them (DTensors under FSDP2; the bucket holds their local shards); ``group_keys[j]`` is
        # the shard group of groups[j]'s partial sums (None: replicated, no reduction).
        self.owners = owners if owners is not None else [b.params for b in buckets]
        self.local_shards = owners is not None and any(
            o is not p for b, os_ in zip(buckets, self.owners) for o, p in zip(os_, b.params))
        self.group_keys: List[_dist.ShardKey] = group_keys if group_keys is not None else [None] * len(groups)
        sharded = sharded or any(k is not None for k in self.group_keys)
        self.others = others                  # params without a grad when the plan was built
        self.config = config                  # param-group structure and weight decays
        self.generic = len(groups) > 1 or sharded
        self.params = [p for b in buckets for p in b.params]
        self.param_ptrs = self._current_param_ptrs()
        for b in buckets:
            b.grad_ptrs = tuple(map(_data_ptr, b.grads))
        self.shapes = [[m.shape for m in b.exp_avgs] for b in buckets]
        # The grads' layout as the backends were chosen with (ALSALS._backend_for): a gradient
        # in another layout later makes a new plan, which asks that rule again.
        self.grads_contiguous = [all(map(_is_contiguous, b.grads)) for b in buckets]
        self.grad_strides = [None if c else list(map(_stride, b.grads))
                             for c, b in zip(self.grads_contiguous, buckets)]
        self.max_wd = max((wd for b in buckets for wd in b.weight_decays), default=0.0)
        # groups holding fp16 buckets, whose candidates can overflow (see _non_finite_params)
        self.guarded = [j for j, (_, bs) in enumerate(groups)
                        if any(b.dtype == torch.float16 and b.params for b in bs)]
        self.cuda_devices = (device.index or 0,) if device.type == "cuda" else ()
        self.host = host_ext.module()         # the native helper, or None: decided once per plan
        self.readers = self._native_readers()
        # The backend's grad and step passes in one call (optional in the contract, base.py).
        self.update_pass = None if self.generic else getattr(groups[0][0], "update_pass", None)
        # FSDP2 modules to reshard after the parameters are written (set by _build_plan)
        self.fsdp: tuple = ()

    def _native_readers(self) -> Optional[List[Any]]:
        """One host_ext.GradReader per bucket, writing into its backend's grad_sink, when the
        native helper is built and every bucket's backend has a sink; else None (Python reads)."""
        if self.host is None or self.local_shards or not self.buckets:
            return None
        reader_cls = self.host.GradReader
        readers = []
        for backend, buckets in self.groups:
            sink_of = getattr(backend, "grad_sink", None)
            for b in buckets:
                sink = sink_of(b) if sink_of is not None else None
                if sink is None:
                    return None
                table, col = sink
                assert table.dtype == torch.int64 and table.device.type == "cpu" and table.is_contiguous()
                # The table outlives the reader: both live as long as this plan's buckets.
                readers.append((b, reader_cls(b.params, table.data_ptr() + col * table.element_size(),
                                              table.stride(0))))
        return readers

    def _read_native(self) -> Optional[bool]:
        """refresh_grads by the native readers: True/False as refresh_grads; None when a reader
        saw anything unusual (then the Python path runs, and reports or rebuilds)."""
        assert self.readers is not None
        if self.others and any(p.grad is not None for p in self.others):
            return False                      # a parameter without a grad has one now
        for b, reader in self.readers:
            status = reader.read()
            b.grad_ptrs = ()                  # the Python path, if it runs, rewrites everything
            if status < 0:
                for other in self.buckets:
                    other.native_grads = False
                return None
            if status & 1:
                b.grads_version += 1
            b.grads_misaligned = bool(status & 2)
            b.native_grads = True
        return True

    def refresh_grads(self) -> bool:
        """Read this step's gradients into the buckets; False if the plan no longer fits.

        This runs on every step, so it is a few C-level walks over the lists and nothing per
        tensor in Python: the params' addresses, their grads, the grads' addresses, and only
        when those moved (a fresh ``set_to_none`` gradient) the grads' shapes.  With the native
        helper (host_ext) all of it is one C++ walk per bucket that writes the gradients'
        addresses into the backend's table and creates no Python objects."""
        if self.readers is not None:
            fits = self._read_native()
            if fits is not None:
                return fits
        if self._current_param_ptrs() != self.param_ptrs:
            return False                      # a parameter's storage moved (.to(), .data = ...)
        if self.others and any(p.grad is not None for p in self.others):
            return False                      # a parameter without a grad has one now
        try:
            for i, b in enumerate(self.buckets):
                # A None among them (a grad went away) makes _data_ptr raise TypeError below, which
                # ends this plan: past that line every entry is a Tensor, which mypy cannot follow.
                grads = cast(List[Tensor], [p.grad for p in self.owners[i]])
                if self.local_shards:             # FSDP2: the local shards of DTensor grads
                    grads = [_dist.local(g) for g in grads]
                # TypeError if a grad is None now; RuntimeError for one without storage (sparse).
                # dtype and device need no check: autograd refuses a .grad that differs.
                ptrs = tuple(map(_data_ptr, grads))
                if ptrs != b.grad_ptrs:
                    # A parameter reshaped in place (p.data = p.data.view(...)) keeps its address:
                    # rebuild (which refuses the stale moments) before any pass.
                    if list(map(_shape, grads)) != self.shapes[i]:
                        self.release_grads()
                        return False
                    contiguous = all(map(_is_contiguous, grads))
                    if contiguous != self.grads_contiguous[i] or (
                            not contiguous and list(map(_stride, grads)) != self.grad_strides[i]):
                        self.release_grads()          # another layout: choose the backend again
                        return False
                    b.grad_ptrs = ptrs
                    b.grads_version += 1
                b.grads = grads
                b.native_grads = False
        except (TypeError, RuntimeError):   # a grad went away, or one without storage (sparse)
            self.release_grads()
            return False
        return True

    def _current_param_ptrs(self) -> tuple:
        if self.local_shards:
            return tuple(_data_ptr(_dist.local(o)) for os_ in self.owners for o in os_)
        return tuple(map(_data_ptr, self.params))

    def release_grads(self) -> None:
        for b in self.buckets:
            b.grads = []


class _Search:
    """What the trial loop found (host values from the verdicts)."""

    __slots__ = ("eta", "eta_at_params", "trials", "accepted", "skipped", "fallback", "loss0",
                 "loss_try", "slope")

    def __init__(self, eta: float):
        self.eta = eta                  # the step size of the last trial (then backtracked)
        self.eta_at_params = eta        # params are at cand(eta_at_params) along the search dir
        self.trials = 0
        self.accepted = self.skipped = self.fallback = False
        self.loss0 = self.loss_try = self.slope = math.nan


class ALSALS(UserGradientsMixin, torch.optim.Optimizer):
    """Automated Large Scale ADAM Line Search.

    ``loss = opt.step(closure)``: the closure returns the mini-batch loss and must not call
    backward.  See README.md for the arguments; defaults depend on ``variant``
    ("alsals" | "adam_sls" | "salsa" | "adaptive" | "alsals_plateau") and explicit arguments
    override them.
    """

    def __init__(self, params, *, variant: str = DEFAULT_VARIANT, init_step_size: Optional[float] = None,
                 c: Optional[float] = None, betas: Optional[Tuple[float, float]] = None,
                 eps: Optional[float] = None, smoothing: Optional[float] = None,
                 growth: Optional[float] = None, backtrack: Optional[float] = None,
                 max_trials: Optional[int] = None, line_search_every: Union[int, str, None] = None,
                 weight_decay: Optional[float] = None, max_grad_norm: Optional[float] = None,
                 memory_efficient: Optional[bool] = None,
                 total_steps: Optional[int] = None, cooldown_fraction: Optional[float] = None,
                 buffers: Union[Iterable[Tensor], torch.nn.Module, None] = None,
                 backend: str = "auto", process_group=None, sharded: bool = False, lr=None):
        self._reject_adamw_arguments(lr)                 # lr= points to init_step_size
        require_budget_for_fraction(total_steps, cooldown_fraction)
        hyper = make_hyper(variant, init_step_size=init_step_size, c=c, betas=betas, eps=eps,
                           smoothing=smoothing, growth=growth, backtrack=backtrack,
                           max_trials=max_trials, line_search_every=line_search_every,
                           weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                           memory_efficient=memory_efficient, total_steps=total_steps,
                           cooldown_fraction=cooldown_fraction)
        if backend not in BACKENDS:
            raise ValueError(f"ALSALS: backend={backend!r} is invalid; accepted: {' | '.join(BACKENDS)}")
        if sharded and process_group is None:
            raise ValueError("ALSALS: sharded=True needs process_group= (the group the shards span)")
        self.hyper = hyper
        self.backend_name = backend
        # Section 6: losses are averaged over process_group before any decision, so every rank
        # takes the same eta; with sharded parameters (FSDP) the local sums are added as well.
        self.process_group = process_group
        self.sharded = bool(sharded)
        self._plan: Optional[_Plan] = None
        self._groups_version = 0                   # add_param_group / load_state_dict
        # param_groups[i]["lr"] mirrors eta so the usual logging works; it is not an input.
        # "betas" mirrors the global betas (momentum-cycling schedulers then fail loudly:
        # _check_mirrors).
        super().__init__(params, {"lr": hyper.init_step_size, "weight_decay": hyper.weight_decay,
                                  "betas": hyper.betas})
        # buffers=model: keep the module and read its buffers at each step (models move later).
        self._buffer_module = buffers if isinstance(buffers, torch.nn.Module) else None
        self._check_distributed_params()
        self._reserve_host_state_key()
        if isinstance(buffers, torch.nn.Module):
            buffers = buffers.buffers()
        self._buffers: List[Tensor] = list(buffers) if buffers is not None else []
        for b in self._buffers:
            if not isinstance(b, Tensor):
                raise TypeError(f"ALSALS: buffers= takes tensors (e.g. model.buffers()); got {type(b).__name__}")
        self._buffer_snapshot: List[Tensor] = []
        self._backups: Dict[Tensor, Tensor] = {}   # w0 copies: scratch, not optimizer state
        self._resolved: Dict[Tuple[torch.device, torch.dtype], Backend] = {}
        # Host state (section 5).
        self.eta: float = hyper.init_step_size
        self.t: int = 0
        self.counters = {"steps": 0, "searches": 0, "trials": 0, "rejected": 0, "skipped": 0,
                         "fallbacks": 0}
        self._fast: Optional[float] = None         # "auto" EMAs of eta (section 3)
        self._slow: Optional[float] = None
        self._last_search_t = 0
        self._growth: Optional[float] = None       # adapted growth (growth_boost; None: hyper.growth)
        self._scale_found = False                  # a search has accepted (ends first_backtrack)
        self._cooldown_from: Optional[float] = None  # eta when the cooldown began (section 3)
        self._warned_past_budget = False
        # Device state: the control vector (h, s and the count of non-finite steps the host has
        # not seen persist in it), the verdict and its host copy; on the parameters' device,
        # created at the first step.
        self._ctl: Optional[Tensor] = None
        self._verdict: Optional[Tensor] = None
        self._verdict_host: Optional[Tensor] = None
        self.last_step: Optional[StepInfo] = None
        self.reads = 0                             # device-to-host reads made by step()

    # -- visible state --------------------------------------------------------------------------
    @property
    def chosen_backends(self) -> dict:
        """{(device, dtype): backend name} as resolved so far (filled at the first step)."""
        return {key: getattr(b, "name", type(b).__name__) for key, b in self._resolved.items()}

    def __repr__(self) -> str:
        defaults = VARIANT_DEFAULTS[self.hyper.variant]
        parts = [f"variant={self.hyper.variant!r}"]
        for name, value in vars(self.hyper).items():
            if name != "variant" and value != getattr(defaults, name):
                parts.append(f"{name}={value!r}")
        parts.append(f"backend={self.backend_name!r}")
        if self._resolved:
            chosen = ", ".join(f"{d}/{str(t).replace('torch.', '')}: {n}"
                               for (d, t), n in self.chosen_backends.items())
            parts.append(f"chosen=[{chosen}]")
        if self._buffer_module is not None or self._buffers:
            kept = "module" if self._buffer_module is not None else f"{len(self._buffers)} tensors"
            parts.append(f"buffers={kept}")
        sizes = [len(g["params"]) for g in self.param_groups]
        parts.append(f"groups={len(sizes)} ({sum(sizes)} params)")
        parts.append(f"eta={self.eta:.4g}, t={self.t}")
        return f"ALSALS({', '.join(parts)})"

    # -- construction checks --------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        self._check_group_keys(param_group)              # unknown keys would be no-ops
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if hasattr(self, "eta"):         # after construction: the lr mirror shows the current eta
            group["lr"] = self.eta
        validate_weight_decay(group["weight_decay"])
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"ALSALS: parameters must be real floating point; got {p.dtype}")
            self._check_memory_efficient_dtype(p.dtype)
        self._groups_version = getattr(self, "_groups_version", 0) + 1

    def _check_memory_efficient_dtype(self, dtype: torch.dtype) -> None:
        if self._hyper.memory_efficient and dtype not in (torch.float32, torch.float64):
            raise ValueError("ALSALS: memory_efficient=True supports fp32 and fp64 parameters "
                             f"only (in-place trial moves would drift in {dtype}); got {dtype}")

    def _reserve_host_state_key(self) -> None:
        """param_groups[0]["alsals"] exists (a placeholder; state_dict() writes the host state
        there): DCP's flatten_optimizer_state_dict=True keeps only the group keys a live group has."""
        self.param_groups[0].setdefault(_checkpoint.HOST_KEY, _checkpoint.HOST_PLACEHOLDER)

    def _check_distributed_params(self) -> None:
        """FSDP2 (DTensor) parameters on several ranks: losses must be averaged over a group."""
        params = [p for g in self.param_groups for p in g["params"]]
        if self.process_group is None and _dist.needs_process_group(params):
            raise ValueError("ALSALS: DTensor (FSDP2) parameters span several ranks; pass "
                             "process_group= (the data-parallel group the losses are averaged "
                             "over, e.g. torch.distributed.group.WORLD)")

    # -- the hyperparameters and what every step derives from them -----------------------------
    @property
    def hyper(self) -> Hyper:
        # The step path reads self._hyper: a property read is a Python call per access.
        return self._hyper

    @hyper.setter
    def hyper(self, hyper: Hyper) -> None:
        # Derived once per Hyper (frozen; replaced only by assignment, e.g. a checkpoint load),
        # so that a step reads them without recomputing.
        self._hyper = hyper
        self._derived = _Derived.of(hyper)
        if hyper.drop_factor is None:
            self._plateau: Optional[PlateauTest] = None
        elif getattr(self, "_plateau", None) is None:
            self._plateau = PlateauTest()

    # -- the "auto" schedule, line_search_every and the cooldown (section 3) ---------------------
    def _searches_at(self, t: int) -> bool:
        if t > self._derived.cooldown_start:
            return False                      # the cooldown takes no trial forwards
        plateau = self._plateau
        if plateau is not None and plateau.drops:
            return False                      # alsals_plateau: eta is held from the first drop
        k = self._hyper.line_search_every
        if k != "auto":    # t = 1, k+1, 2k+1, ... (counted from the last search: section 9)
            assert isinstance(k, int)      # make_hyper admits an int >= 1 or "auto"
            return self._last_search_t == 0 or t - self._last_search_t >= k
        if t <= 10 or self._fast is None:
            return True
        return t - self._last_search_t >= self._auto_interval()

    def _auto_interval(self) -> int:
        # Called once _fast is set; _after_search and load_state_dict set _fast and _slow together.
        assert self._fast is not None and self._slow is not None
        r = self._fast / self._slow
        if r < 1:
            r = 1 / r
        if r == 1:
            return 10
        return min(10, max(1, math.floor(1 / (r - 1) + 0.5)))

    def _cool(self, t: int) -> None:
        """Step t of the cooldown: eta falls linearly from the searches' last eta to 1/(n+1) of it
        at total_steps (n: the cooldown's steps) and stays there after (warned once)."""
        start, steps = self._derived.cooldown_start, self._derived.cooldown_steps
        if self._cooldown_from is None:
            self._cooldown_from = self.eta
        left = start + steps - t + 1          # steps of the budget left, this one included
        if left < 1 and not self._warned_past_budget:
            self._warned_past_budget = True
            warnings.warn(f"ALSALS: step {t} is past total_steps={self._hyper.total_steps}; the "
                          f"cooldown has ended and the steps go on at its last step size",
                          stacklevel=_user_stacklevel())
        self.eta = self._cooldown_from * max(left, 1) / (steps + 1)
        self._sync_lr()

    def set_total_steps(self, total_steps: Optional[int], cooldown_fraction: Optional[float] = None) -> None:
        """Sets the run's step budget (as ``total_steps=`` at construction) where it is known
        only after the optimizer exists, as in a framework that builds the optimizer before it
        counts its steps; None removes it.  Refused once the cooldown has begun, since its
        schedule is fixed from its first step."""
        if self._cooldown_from is not None:
            raise RuntimeError(f"ALSALS: set_total_steps({total_steps!r}): the cooldown of "
                               f"total_steps={self._hyper.total_steps} has begun (step {self.t}); "
                               "its schedule can no longer change")
        require_budget_for_fraction(total_steps, cooldown_fraction)
        hyper = with_budget(self._hyper, total_steps, cooldown_fraction)
        if hyper.total_steps is not None and hyper.total_steps <= self.t:
            raise ValueError(f"ALSALS: set_total_steps({total_steps!r}): the run has already taken "
                             f"{self.t} steps; the budget must end after the current step")
        self.hyper = hyper
        self._warned_past_budget = False

    def _after_search(self, t: int) -> None:
        if self._fast is None:
            self._fast = self._slow = self.eta
        else:
            assert self._slow is not None              # set together with _fast
            self._fast = 0.9 * self._fast + 0.1 * self.eta
            self._slow = 0.99 * self._slow + 0.01 * self.eta
        self._last_search_t = t

    # -- the parameter plan ---------------------------------------------------------------------
    def _capture_rng(self) -> _RngState:
        """The CPU and CUDA generators' states now, natively when the current plan uses the host
        helper (its decision is reused: host_ext.module() reads the environment)."""
        plan = self._plan
        return _RngState(self._param_devices(), plan.host if plan is not None else host_ext.module())

    def _param_devices(self) -> Tuple[int, ...]:
        plan = self._plan
        if plan is not None and plan.params and plan.params[0].device == plan.device:
            return plan.cuda_devices
        return tuple(sorted({p.device.index or 0 for g in self.param_groups for p in g["params"]
                             if p.device.type == "cuda"}))

    def _config(self) -> tuple:
        return (self._groups_version, tuple(map(_weight_decay_of, self.param_groups)))

    def _refresh_plan(self) -> _Plan:
        """The plan for this step's gradients: the current one if it still fits, else a new one."""
        plan = self._plan
        if plan is not None and plan.config == self._config() and plan.refresh_grads():
            return plan
        self._plan = None
        plan = self._plan = self._build_plan()
        self._ensure_device_state(plan.device)
        return plan

    def _build_plan(self) -> _Plan:
        buckets: Dict[tuple, Bucket] = {}
        owners: Dict[tuple, List[Tensor]] = {}
        others: List[Tensor] = []
        keep_backup = not self._hyper.memory_efficient
        backups: Dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    others.append(p)
                    continue
                _check_grad(p, g)
                self._check_memory_efficient_dtype(p.dtype)
                m, v = self._moments(p)
                key = (p.device, p.dtype, _dist.shard_key(p, self.sharded))
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = Bucket(device=p.device, dtype=p.dtype)
                    owners[key] = []
                owners[key].append(p)
                pl = _dist.local(p)                # FSDP2: the passes run on the local shards
                b.params.append(pl)
                b.grads.append(_dist.local(g))
                b.exp_avgs.append(_dist.local(m))
                b.exp_avg_sqs.append(_dist.local(v))
                b.weight_decays.append(float(group["weight_decay"]))
                if keep_backup:
                    w0 = self._backups.get(p)
                    if w0 is None or w0.shape != pl.shape or w0.dtype != pl.dtype or w0.device != pl.device \
                            or w0.stride() != pl.stride():
                        w0 = torch.empty_like(pl)
                    b.backups.append(w0)
                    backups[p] = w0
        self._backups = backups                    # backups of params that left the plan are freed
        if not buckets:
            raise RuntimeError("ALSALS: no parameter has a gradient after backward(); does the loss "
                               "depend on the optimized parameters?")
        devices = {key[0] for key in buckets}
        if len(devices) > 1:
            raise ValueError("ALSALS keeps one step size for all parameters and decides on one "
                             f"device, so all parameters with gradients must share a device; found "
                             f"{sorted(str(d) for d in devices)}")
        device = next(iter(devices))
        groups: Dict[tuple, Tuple[Backend, List[Bucket]]] = {}
        for key, b in buckets.items():
            backend = self._backend_for(b)
            # One group per backend and shard group: partial sums are reduced per shard group.
            groups.setdefault((id(backend), key[2]), (backend, []))[1].append(b)
        # Each group's buckets as a tuple: immutable, so a backend may key its tables on the object.
        plan = _Plan(device, list(buckets.values()), [(be, tuple(bs)) for be, bs in groups.values()],
                     others, self._config(),
                     self.sharded, owners=list(owners.values()),
                     group_keys=[k[1] for k in groups])
        if plan.local_shards:    # FSDP2: every trial and the next step must see what was written
            plan.fsdp = _dist.fsdp_modules([o for os_ in plan.owners for o in os_], self._buffer_module)
        return plan

    def _moments(self, p: Tensor) -> Tuple[Tensor, Tensor]:
        """m and v of ``p``, created or converted to follow its device, dtype (section 1) and memory
        layout (the fused kernels walk a parameter and its moments in one order: a model moved to
        channels_last, or a contiguous checkpoint loaded into one, keeps training)."""
        moment = math_dtype(p.dtype)
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
        for name in ("exp_avg", "exp_avg_sq"):
            t = state[name]
            if t.shape != p.shape:
                raise ValueError(f"ALSALS: the {name} of a parameter of shape {tuple(p.shape)} has "
                                 f"shape {tuple(t.shape)} (a state_dict of another model?)")
            if t.dtype != moment or t.device != p.device:
                t = state[name] = t.to(device=p.device, dtype=moment)
            if t.stride() != p.stride() and not _dist.is_dtensor(p):
                state[name] = torch.empty_like(p, dtype=moment).copy_(t)   # p's layout
        return state["exp_avg"], state["exp_avg_sq"]

    def _init_state_without_closure(self) -> bool:
        """``step()`` without a closure on a fresh optimizer whose gradients are all zero.

        This is how ``torch.distributed.checkpoint.state_dict`` (get/set_optimizer_state_dict)
        initialises an optimizer's state before loading into it: it creates m and v (zero) for
        every parameter with a gradient and changes nothing else (no parameter moves; t, eta and
        the counters stay).  Any other ``step()`` without a closure raises TypeError.
        """
        if self.state:
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads or any(bool(_dist.local(g).any()) for g in grads):
            return False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._moments(p)
        return True

    def _backend_for(self, b: Bucket) -> Backend:
        """The backend of bucket ``b``: the one rule for what a fused backend cannot take (a dtype
        its kernels lack, such as fp64; a non-dense view; a gradient, moment or backup in another
        layout than its parameter): the backend's ``unfusable_reason`` says why, and the bucket
        runs on foreach from then on (``chosen_backends``), with one warning if the user named
        the backend.  Moments and backups follow their parameter's dtype, device and layout
        (``_moments``), so what remains is what the kernels cannot walk."""
        key = (b.device, b.dtype)
        backend = self._resolved.get(key)
        if backend is None:
            backend = _backends.get_backend(self.backend_name, b.device)
        unfusable = getattr(backend, "unfusable_reason", None)
        problem = unfusable(b) if unfusable is not None else None
        if problem is not None:
            backend = _backends.get_backend("foreach", b.device)
            if self.backend_name != "auto":
                warnings.warn(f"ALSALS: backend={self.backend_name!r} cannot take the "
                              f"{str(b.dtype).replace('torch.', '')} parameters on {b.device} "
                              f"({problem}); they run on foreach from now on (opt.chosen_backends)",
                              stacklevel=5)
        self._resolved[key] = backend
        return backend

    def _ensure_device_state(self, device: torch.device) -> None:
        """ctl (h, s, pending skips persist in it) and the verdict buffers, on ``device``."""
        if self._ctl is None:
            self._ctl = new_ctl(device)
            self._ctl[Ctl.SCALE] = 1.0
        elif self._ctl.device != device:
            self._ctl = self._ctl.to(device)
        if self._verdict is None or self._verdict.device != device:
            self._verdict = torch.zeros(VERDICT_SIZE, dtype=torch.float64, device=device)
            self._verdict_host = (torch.zeros(VERDICT_SIZE, dtype=torch.float64, pin_memory=True)
                                  if device.type == "cuda" else self._verdict)

    # h, s and the pending-skip count, as 0-dim views of ctl (for tests and tools).
    @property
    def _h(self) -> Optional[Tensor]:
        return None if self._ctl is None else self._ctl[Ctl.H]

    @property
    def _s(self) -> Optional[Tensor]:
        return None if self._ctl is None else self._ctl[Ctl.S]

    @property
    def _pending_skips(self) -> Optional[Tensor]:
        return None if self._ctl is None else self._ctl[Ctl.PENDING]

    # -- cross-rank sums and the one read -------------------------------------------------------
    def _sum_over_shards(self, plan: _Plan, parts: List[Tensor]) -> Tensor:
        """Partial sums of plan.groups, each added over its shard group only (distributed.py)."""
        return _dist.sum_partials(parts, plan.group_keys, self.process_group)

    def _step_ctl(self) -> Tensor:
        """ctl during a step: _refresh_plan (``_ensure_device_state``) created it on the plan's device."""
        ctl = self._ctl
        assert ctl is not None, "the device state is created by _refresh_plan before any pass"
        return ctl

    def _read_verdict(self) -> List[float]:
        """The one device-to-host read of a trial: the verdict vector, in one copy."""
        self.reads += 1
        host, verdict = self._verdict_host, self._verdict
        # Both are created by _refresh_plan (_ensure_device_state) before any pass.
        assert host is not None and verdict is not None
        if host is not verdict:       # CUDA: pinned buffer, non-blocking copy, one sync
            host.copy_(verdict, non_blocking=True)
            torch.cuda.current_stream(verdict.device).synchronize()
        return host.tolist()

    def _sync_lr(self) -> None:
        for group in self.param_groups:
            group["lr"] = self.eta
        self._synced_eta = self.eta          # tells a hand-written eta from an lr write (_check_mirrors)

    # -- the step (section 1) -------------------------------------------------------------------
    @_step_hooks
    def step(self, closure=None):
        # (capture needs an initialized CUDA; a CPU build of torch cannot ask about capture)
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(GRAPH_CAPTURE_HELP)
        # DCP's state initialisation (get/set_optimizer_state_dict) zeroes lr around this call,
        # so it is recognised before the lr mirror is checked.
        if closure is None and getattr(self, "_window", None) is None \
                and self._init_state_without_closure():
            return None
        self._check_mirrors()                            # scheduler writes to lr fail loudly
        if closure is None or (isinstance(closure, functools.partial) and is_framework_closure(closure)):
            return self._step_user_gradients(closure)   # gradients already in p.grad
        if not callable(closure):
            raise TypeError(CLOSURE_HELP)
        self._check_grads_before_closure()               # backward since zero_grad()?
        searching = self._searches_at(self.t + 1)
        rng_before = self._capture_rng() if searching else None
        grad_mode = torch.is_grad_enabled()
        _set_grad_enabled(True)                          # torch.enable_grad()
        try:
            loss = _as_loss(closure(), "gradient forward")
        finally:
            _set_grad_enabled(grad_mode)
        self._check_closure_result(loss)                 # no backward in the closure
        try:
            loss.backward()
        except RuntimeError as exc:
            self._explain_backward_error(exc)            # a closure that ran backward
        _set_grad_enabled(False)                         # torch.no_grad()
        try:
            loss0 = loss.detach()                        # last_step.loss and what the passes read
            if loss0.dim():                              # a (1, 1) loss: last_step.loss is 0-dim
                loss0 = loss0.reshape(())
            self._update(closure, loss0, searching, rng_before)
            self._finish_step(loss0)
        finally:
            _set_grad_enabled(grad_mode)
        # The loss as the closure returned it, as torch's optimizers return theirs: its spent
        # autograd graph is then released by the caller, not inside step().
        return loss

    def _finish_step(self, loss: Optional[Tensor]) -> Optional[Tensor]:
        """End of every step: last_step.loss is the detached L0 tensor (one type, no read); note
        which gradients the step saw, so a later backward outside step() is detected."""
        if loss is not None and self.last_step is not None:
            self.last_step.loss = loss
        self._record_gradient_marks()
        self._grads_zeroed = False
        self._window = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._record_gradient_marks()
        self._grads_zeroed = True            # zeroed in place (set_to_none=False) is not stale
        self._window = None

    def _update(self, closure, loss0: Tensor, searching: bool, rng_before: Optional[_RngState]) -> None:
        """Everything after the gradient: moments, candidate, line search (under no_grad);
        ``loss0`` is the gradient forward's loss, detached."""
        plan = self._refresh_plan()
        try:
            eta_before = self.eta
            hp = self._step_scalars(plan, searching)
            device_loss = self._device_loss(loss0, plan)
            self._passes(plan, hp, device_loss, searching)
            self.t += 1
            self.counters["steps"] += 1
            if not searching:
                self.last_step = StepInfo(eta=hp.eta, trials=0, accepted=True, searched=False,
                                          loss=loss0, loss_trial=None, slope=None)
            else:
                assert rng_before is not None        # callers capture it on searching steps
                found = self._search(plan, hp, closure, rng_before, eta_before)
                self._commit(plan, hp, found, eta_before)
            if self._plateau is not None:
                self._drop_on_a_plateau(device_loss)
        finally:
            plan.release_grads()
            if plan.fsdp:         # FSDP2: the next forward all-gathers the parameters written here
                _dist.reshard_all(plan.fsdp)

    def _first_trial_eta(self, searching: bool) -> float:
        """The step size of the step's candidate: eta*growth on a searching step (section 1);
        with ``growth_boost`` the growth is the adapted one (``_adapt_growth``)."""
        growth = self._growth if self._growth is not None else self._hyper.growth
        return min(self.eta * growth, ETA_MAX) if searching else self.eta   # config.ETA_MAX

    # -- the adaptive variant's host-side search rules (neutral for the paper variants) ----------
    def _backtrack_factor(self, loss_rose: bool) -> float:
        """Backtracking factor of the next trial: ``first_backtrack`` until a search has accepted
        (it brings init_step_size down to the loss's scale in few trials), then ``backtrack``.
        Before that, a trial whose loss rose above L0 (NaN included) takes
        ``first_backtrack_on_rise`` if set: on a quadratic profile the loss rises only beyond
        twice the largest eta the test accepts, so with 0.5 and 0.25 the skipped trial would have
        failed too (section 2.1)."""
        hyper = self._hyper
        fb = hyper.first_backtrack
        if fb is None or self._scale_found:
            return hyper.backtrack
        rise = hyper.first_backtrack_on_rise
        return rise if (loss_rose and rise is not None) else fb

    def _adapt_growth(self, accepted: bool, trials: int) -> None:
        """After a search: a first trial that passed multiplies the next growth by
        ``growth_boost`` (at most ``growth_max``); a backtrack or a rejection resets it."""
        hyper = self._hyper
        self._scale_found = self._scale_found or accepted
        if hyper.growth_boost <= 1:
            return
        current = self._growth if self._growth is not None else hyper.growth
        self._growth = min(hyper.growth_max, current * hyper.growth_boost) if (accepted and trials == 1) \
            else hyper.growth

    def _drop_on_a_plateau(self, device_loss: Tensor) -> None:
        """alsals_plateau (docs/algorithm.md section 2.1): keep this step's loss (as a tensor: no
        read) and, every ``drop_every`` steps, test whether the losses since the last drop still
        fall; if not, divide eta by ``drop_factor`` (the first drop ends the searches).  The
        cooldown owns eta once it has begun.  The losses are the rank mean under
        process_group, so every rank drops at the same step."""
        t, hyper, plateau = self.t, self._hyper, self._plateau
        assert plateau is not None and hyper.drop_factor is not None
        if t > self._derived.cooldown_start:
            return
        plateau.add(t, device_loss)
        if t % hyper.drop_every or len(plateau) <= hyper.drop_min_samples:
            return
        self.reads += plateau.read()
        if len(plateau) > hyper.drop_min_samples and plateau.plateaued(hyper.drop_significance):
            self.eta = max(self.eta / hyper.drop_factor, ETA_MIN)
            plateau.drops += 1
            plateau.reset()
            self._sync_lr()

    def _keep_eta_on_a_zero_slope(self, plan: _Plan, hp: StepScalars, found: _Search, eta_before: float,
                                  search_dir: Dir) -> None:
        """Guard 3 (docs/algorithm.md section 1.3): the slope is exactly 0 on a zero gradient (short
        of an exactly orthogonal d, only there), where every trial passes (guard 1) and the
        search measured nothing, so it takes the pre-step eta instead of the grown one.  Without
        it eta grows by ``growth`` at every search while the loss stays at 0 (a fitted batch), up
        to ETA_MAX, and every step after the loss leaves 0 is rejected after max_trials trials."""
        self._move(plan, hp, found.eta_at_params, search_dir, eta_before, search_dir)
        found.eta = found.eta_at_params = eta_before

    def _eta_after_search(self, found: _Search, eta_before: float) -> float:
        """eta as a search leaves it: the accepted trial's, or (spec guard 2) the pre-step value."""
        return found.eta if found.accepted else eta_before

    def _step_scalars(self, plan: _Plan, searching: bool) -> StepScalars:
        hyper, derived, t = self._hyper, self._derived, self.t + 1
        if t > derived.cooldown_start:
            self._cool(t)
        eta = self._first_trial_eta(searching)
        if hyper.memory_efficient and eta * plan.max_wd >= 0.5:
            raise ValueError(f"ALSALS: memory_efficient=True recovers w0 by dividing by "
                             f"(1 - eta*weight_decay), and eta*weight_decay = {eta * plan.max_wd:.3g} "
                             "is too large for that; lower weight_decay or use memory_efficient=False")
        beta1, beta2 = derived.betas
        # tuple.__new__ in StepScalars' field order is what its generated __new__ does, without
        # that Python function: this runs every step right after a backward has evicted the
        # caches, where keyword construction costs a few microseconds more.
        return _new_tuple(StepScalars, (eta, beta1, beta2, derived.eps, 1 - beta1 ** t, 1 - beta2 ** t,
                                        derived.smoothing, derived.search_dir, derived.max_grad_norm))

    def _device_loss(self, loss: Tensor, plan: _Plan) -> Tensor:
        """A detached loss as the passes read it: a 0-dim tensor on the plan's device in the
        dtype the closure returned (every backend reads any float dtype, so the usual case costs
        no device operation), or its float64 mean over the ranks."""
        if self.process_group is not None:
            return _dist.mean_over(loss.reshape(()).to(device=plan.device, dtype=torch.float64),
                                   self.process_group)
        if loss.dim():
            loss = loss.reshape(())
        return loss if loss.device == plan.device else loss.to(plan.device)

    def _passes(self, plan: _Plan, hp: StepScalars, loss0: Tensor, searching: bool) -> None:
        """The grad pass (gradient norm, non-finite check, clip scale: its finisher writes ctl),
        then the step pass (moments, backup and candidate; when searching, its finisher writes
        the slopes).  A plan of one backend makes them one call (``update_pass``) when it has it."""
        ctl = self._step_ctl()
        guarded = plan.guarded
        write_backup = (searching or bool(guarded)) and not self._hyper.memory_efficient
        if plan.update_pass is not None:
            plan.update_pass(plan.groups[0][1], ctl, loss0, hp, searching=searching,
                             write_backup=write_backup)
        elif not plan.generic:
            backend, buckets = plan.groups[0]
            backend.grad_pass(buckets, ctl, loss0, hp)
            backend.step_pass(buckets, hp, ctl, searching=searching, write_backup=write_backup)
        else:
            self._generic_passes(plan, hp, ctl, loss0, searching, write_backup)
        if guarded and not searching:
            self._undo_if_non_finite(plan, hp, guarded, hp.eta, Dir.MOMENTUM)

    def _generic_passes(self, plan: _Plan, hp: StepScalars, ctl: Tensor, loss0: Tensor,
                        searching: bool, write_backup: bool) -> None:
        """Several backends or sharded parameters: each pass returns its partial sums, and the
        driver adds them (over the shard groups) and runs the finishers (``decisions``)."""
        parts = [backend.grad_pass(buckets, ctl, loss0, hp, finish=False) for backend, buckets in plan.groups]
        sumsq = self._sum_over_shards(plan, _partials(parts))
        decisions.finish_grad(ctl, sumsq, loss0, hp.max_grad_norm)
        if not searching:
            for backend, buckets in plan.groups:
                backend.step_pass(buckets, hp, ctl, searching=False, write_backup=write_backup)
            return
        parts = [backend.step_pass(buckets, hp, ctl, searching=True, write_backup=write_backup,
                                   finish=False) for backend, buckets in plan.groups]
        sums = self._sum_over_shards(plan, _partials(parts))
        decisions.finish_slope(ctl, sums, hp.smoothing)

    def _move(self, plan: _Plan, hp: StepScalars, src_eta: float, src_dir: Dir, dst_eta: float,
              dst_dir: Dir, only_if: Optional[Ctl] = None) -> None:
        from_backup = not self._hyper.memory_efficient
        ctl = self._step_ctl()
        for backend, buckets in plan.groups:
            backend.move_pass(buckets, hp, ctl, src_eta=src_eta, src_dir=src_dir,
                              dst_eta=dst_eta, dst_dir=dst_dir, from_backup=from_backup,
                              only_if=only_if)

    def _decide(self, plan: _Plan, loss_try: Tensor, eta: float) -> List[float]:
        """One trial's verdict on the device, then its one read."""
        hyper = self._hyper
        dp = DecisionScalars(eta, hyper.c, hyper.smoothing)
        ctl, out = self._step_ctl(), self._verdict
        assert out is not None                 # created with ctl by _ensure_device_state
        if plan.generic:
            decisions.verdict(ctl, loss_try, dp, out)
        else:
            plan.groups[0][0].verdict(ctl, loss_try, dp, out)
        return self._read_verdict()

    def _search(self, plan: _Plan, hp: StepScalars, closure, rng_before: _RngState,
                eta_before: float) -> _Search:
        """The trial loop (section 1): params are at cand(eta) along the search direction."""
        hyper = self._hyper
        # alsals searches along UPDATE (m_hat*p, or g*p after the fallback); the others along g*p.
        search_dir = Dir.UPDATE if hp.search_dir is Dir.MOMENTUM else Dir.GRAD
        found = _Search(hp.eta)
        rng_after = _RngState(tuple(rng_before.cuda), rng_before.native)   # where the gradient forward left them
        snapshotted = False
        try:
            if hp.search_dir is Dir.MOMENTUM:   # the step pass wrote m_hat*p; g*p if it fell back
                self._move(plan, hp, hp.eta, Dir.MOMENTUM, hp.eta, Dir.UPDATE, only_if=Ctl.FALLBACK)
            self._snapshot_buffers()
            snapshotted = True
            fsdp = plan.fsdp
            module = self._buffer_module           # buffers=model: its train/eval modes are watched
            modes = _training_modes(module) if module is not None else None
            while True:
                if fsdp:          # FSDP2 would reuse the unsharded copy of the last forward
                    _dist.reshard_all(fsdp)
                rng_before.restore()                       # same dropout masks as L0
                loss_try = _as_loss(closure(), "trial forward")
                if module is not None and _training_modes(module) != modes:
                    raise RuntimeError(TRAINING_MODE_CHANGED)
                found.trials += 1
                # The verdict's slots in Verdict's order (checked where _VERDICT_ORDER is defined)
                accept, finite, fallback, found.loss0, found.loss_try, found.slope, pending, _ = \
                    self._decide(plan, self._trial_loss(loss_try, plan), found.eta)
                if pending:
                    self._absorb_skips(int(pending))
                if not finite:             # nothing was written: params are w0 (section 1)
                    found.skipped = True
                    break
                found.fallback = bool(fallback)
                if accept:
                    found.accepted = True
                    break
                found.eta *= self._backtrack_factor(loss_rose=not found.loss_try <= found.loss0)
                if found.trials == hyper.max_trials or found.eta < ETA_MIN:   # config.ETA_MIN
                    break
                self._move(plan, hp, found.eta_at_params, search_dir, found.eta, search_dir)
                found.eta_at_params = found.eta
        except BaseException:
            self._move(plan, hp, found.eta_at_params, search_dir, 0.0, search_dir)  # back to w0
            self.eta = eta_before          # m, v, t keep the update (section 1)
            self._sync_lr()
            raise
        finally:
            self.counters["trials"] += found.trials
            rng_after.restore()
            rng_after.release()
            rng_before.release()      # not restored again: the step's replays are over
            if snapshotted:
                self._restore_buffers()
        return found

    def _trial_loss(self, loss_try: Tensor, plan: _Plan) -> Tensor:
        loss_try = self._device_loss(loss_try.detach(), plan)
        guarded = plan.guarded
        if guarded:                         # a candidate that overflowed is a non-finite trial
            bad = self._non_finite_params(plan, guarded) > 0
            loss_try = torch.where(bad, torch.full_like(loss_try, math.nan), loss_try)
        return loss_try

    def _commit(self, plan: _Plan, hp: StepScalars, found: _Search, eta_before: float) -> None:
        """Accept (h and s were committed by the verdict), reject (back to w0) or skip."""
        search_dir = Dir.UPDATE if hp.search_dir is Dir.MOMENTUM else Dir.GRAD
        if not found.skipped:
            self.counters["searches"] += 1
            self.counters["fallbacks"] += found.fallback
            measured = not (found.accepted and found.slope == 0.0)
            if not measured and found.eta > eta_before:
                self._keep_eta_on_a_zero_slope(plan, hp, found, eta_before, search_dir)
            if found.accepted:
                if not self._hyper.update_is_trial_point and not found.fallback:
                    # adam_sls/salsa: the update goes from w0 along m_hat*p with the accepted eta
                    self._move(plan, hp, found.eta, search_dir, found.eta, Dir.UPDATE)
                    guarded = plan.guarded
                    if guarded:
                        self._undo_if_non_finite(plan, hp, guarded, found.eta, Dir.UPDATE)
            else:
                self.counters["rejected"] += 1
                self._move(plan, hp, found.eta_at_params, search_dir, 0.0, search_dir)
            self.eta = self._eta_after_search(found, eta_before)
            if measured:
                self._adapt_growth(found.accepted, found.trials)
            self._after_search(self.t)
        self._sync_lr()
        self.last_step = StepInfo(eta=self.eta, trials=found.trials, accepted=found.accepted,
                                  searched=True, loss=found.loss0, loss_trial=found.loss_try,
                                  slope=found.slope, skipped=found.skipped, fallback=found.fallback)

    # -- no step leaves a non-finite parameter (docs/algorithm.md section 9) ---------------------
    # fp16 candidates overflow at eta*|d| > 65504 although the step size is representable.  For
    # fp16 buckets the driver keeps a w0 backup on non-searching steps too, checks the written
    # candidate on the device (no host read) and restores w0 when any element is not finite; on
    # searching steps such a candidate counts as a non-finite trial.  Other dtypes cannot overflow
    # inside config.ETA_MAX, so they pay nothing (``_Plan.guarded``: the groups to check).
    def _non_finite_params(self, plan: _Plan, guarded: List[int]) -> Tensor:
        """Count of non-finite fp16 tensors, summed over the shard groups (0-dim float64)."""
        parts = []
        for j in guarded:
            params = [w for b in plan.groups[j][1] if b.dtype == torch.float16 for w in b.params if w.numel()]
            if not params:
                parts.append(torch.zeros((), dtype=torch.float64, device=plan.device))
                continue
            norms = torch.stack(torch._foreach_norm(params, math.inf)).double()
            parts.append((~torch.isfinite(norms)).sum(dtype=torch.float64))
        keys = [plan.group_keys[j] for j in guarded]
        return _dist.sum_partials(parts, keys, self.process_group)

    def _undo_if_non_finite(self, plan: _Plan, hp: StepScalars, guarded: List[int], eta: float,
                            direction: Dir) -> None:
        """Back to w0 (a device-side decision) when a written candidate is not finite."""
        ctl = self._step_ctl()
        torch.gt(self._non_finite_params(plan, guarded), 0, out=ctl[Ctl.UNDO])
        self._move(plan, hp, eta, direction, 0.0, direction, only_if=Ctl.UNDO)

    def _absorb_skips(self, n: int) -> None:
        """Steps the device skipped for a non-finite loss/gradient: they count for nothing.

        (The verdict that reported them has already zeroed ctl[PENDING].)"""
        self.t -= n
        self.counters["skipped"] += n
        self.counters["steps"] -= n

    def _current_buffers(self) -> List[Tensor]:
        module = self._buffer_module
        if module is not None:
            self._buffers = list(module.buffers())
        buffers = self._buffers
        snap = self._buffer_snapshot
        if not buffers and not snap:
            return buffers                # (no buffers=: the usual case, without a generator)
        if len(snap) != len(buffers) or any(s.shape != b.shape or s.dtype != b.dtype or s.device != b.device
                                            for s, b in zip(snap, buffers)):
            self._buffer_snapshot = [torch.empty_like(b) for b in buffers]
        return buffers

    def _snapshot_buffers(self) -> None:
        if not self._current_buffers():                  # re-reads buffers=model each step
            return
        for dst, src in zip(self._buffer_snapshot, self._buffers):
            dst.copy_(src)

    def _restore_buffers(self) -> None:
        for dst, src in zip(self._buffers, self._buffer_snapshot):
            dst.copy_(src)

    # -- state_dict (section 5): everything needed to continue bit-identically ------------------
    # The format (versioned) and its validation live in checkpoint.py.  The host state is stored
    # in param_groups[0] so that torch.distributed.checkpoint's helpers, which keep only "state"
    # and "param_groups", carry it.
    def _host_state(self) -> dict:
        ctl = self._ctl
        return _checkpoint.host_state(
            hyper=self._hyper, eta=self.eta, t=self.t, counters=self.counters, fast=self._fast,
            slow=self._slow, last_search_t=self._last_search_t,
            h=0.0 if ctl is None else float(ctl[Ctl.H]), s=0.0 if ctl is None else float(ctl[Ctl.S]),
            pending_skips=0 if ctl is None else int(ctl[Ctl.PENDING]),
            growth=self._growth, scale_found=self._scale_found, cooldown_from=self._cooldown_from,
            plateau=None if self._plateau is None else self._plateau.state())

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: {n: (v.clone() if isinstance(v, Tensor) else v) for n, v in s.items()}
                       for k, s in sd["state"].items()}
        return _checkpoint.attach(sd, self._host_state())

    def load_state_dict(self, state_dict: dict) -> None:
        """Validate everything first (checkpoint.validate), then apply; on any error (a
        CheckpointError, a ValueError naming what is wrong) the optimizer is unchanged.  As torch
        optimizers do, the saved hyperparameters win over the constructor's, and torch's
        load_state_dict pre and post hooks fire."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._apply_checkpoint(_checkpoint.validate(self, state_dict))
        for group in self.param_groups:      # the betas mirror follows the loaded hyperparameters
            group["betas"] = tuple(self._hyper.betas)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _apply_checkpoint(self, plan: _checkpoint.LoadPlan) -> None:
        """Assignments that cannot fail, from a validated checkpoint.LoadPlan."""
        for group, wd in zip(self.param_groups, plan.weight_decays):
            group["weight_decay"] = wd
        self.state.clear()
        self.state.update(plan.state)
        self.hyper = plan.hyper
        host = plan.host
        self.eta, self.t = host["eta"], host["t"]
        self.counters = dict(host["counters"])
        self._fast, self._slow = host["fast"], host["slow"]
        self._last_search_t = host["last_search_t"]
        self._load_device_state(host)
        self._growth = host["growth"]
        self._scale_found = host["scale_found"]
        self._cooldown_from = host["cooldown_from"]
        # the saved test, in place of the fresh one the hyper setter made
        self._plateau = None if plan.hyper.drop_factor is None else PlateauTest.from_state(host["plateau"])
        self._plan = None                          # the moments are new tensors
        self._groups_version += 1
        self._sync_lr()

    def _load_device_state(self, extra: dict) -> None:
        """h, s and the pending skips into a fresh ctl (moved to the params' device at the next
        step); the keys are those of every ALSALS state_dict so far."""
        h, s, pending = extra.get("h"), extra.get("s"), extra.get("pending_skips")
        device = h.device if isinstance(h, Tensor) else torch.device("cpu")
        ctl = new_ctl(device)
        ctl[Ctl.SCALE] = 1.0
        for slot, value in ((Ctl.H, h), (Ctl.S, s), (Ctl.PENDING, pending)):
            if value is not None:
                ctl[slot] = torch.as_tensor(value, dtype=torch.float64).to(device).reshape(())
        self._ctl = ctl
        self._verdict = self._verdict_host = None

