"""ALSALS: ADAM direction with momentum, step size by a stochastic Armijo line search.

This module is the line-search driver shared by every backend (``../shared/ALGORITHM.md`` is the
specification; section numbers below refer to it).  It runs the closure, replays the RNG, keeps
the host state (eta, t, the "auto" schedule, counters) and the device state (h, s), and decides;
the element-wise passes over the parameters are the backend's (``backends/base.py``).

Host/device split (section 5): eta and t are host doubles/ints; the slope, h, s, the losses and
the accept test stay on the device.  A searching step reads one small tensor per trial (the
verdict: accept flag, finiteness flag, fallback flag, losses, slope); a step that does not search
reads nothing.

Deviations from the specification, and why:
- Gradient clipping scales g as the passes read it instead of rewriting ``p.grad`` in place: the
  same update without an extra write pass; ``p.grad`` keeps the unclipped gradient.
- Non-finite loss or gradient: a pre-pass over g (the gradient-norm reduction, also used for
  clipping) sets a device flag, and then no pass writes anything, so params, m and v are untouched
  (the whole update is skipped, not element by element).  The host learns of it at the next read:
  at once on a searching step (whose first trial forward is then wasted), or at the next searching
  step after non-searching ones, and corrects t then (no extra sync on the fast path).  Until
  then the skipped step counts as a step for the bias corrections and the search schedule
  (including the searching step that absorbs it).  ``line_search_every=k`` therefore searches
  when k steps have passed since the last search, which is t = 1, k+1, 2k+1, ... when nothing is
  skipped and never searches twice in a row after a correction.
- A gradient whose square overflows fp32 (|g| above about 1.8e19) counts as non-finite, as a
  non-finite gradient does: v could not absorb it.  On the reference and foreach backends so does
  a per-tensor sum of squares that overflows fp32.
- memory_efficient with weight decay recovers w0 by dividing by (1 - eta*wd); a step whose
  eta*wd reaches 0.5 raises ValueError instead of amplifying rounding (or dividing by zero).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import backends as _backends
from .backends.base import CTRL_SIZE, FALLBACK, GRAD_SCALE, SKIP, Bucket, Dir, StepScalars
from .config import BACKENDS, Hyper, make_hyper, validate_weight_decay

CLOSURE_HELP = (
    "ALSALS.step() needs a closure that returns the loss of the current mini-batch without "
    "calling backward, e.g.\n"
    "    def closure():\n"
    "        return loss_fn(model(x), y)\n"
    "    opt.zero_grad()\n"
    "    loss = opt.step(closure)"
)


@dataclass
class StepInfo:
    """Telemetry of the last step (``opt.last_step``)."""

    eta: float                              # step size after the step (rejected: last tried * backtrack)
    trials: int                             # trial forwards run (0 if the step did not search)
    accepted: bool                          # params moved to an accepted point (see skipped)
    searched: bool
    loss: Union[float, Tensor]              # L0; a device tensor on steps that did not search
    loss_trial: Optional[float]             # the last trial's loss; None if not searched
    slope: Optional[float]                  # the unsmoothed slope the test used; None if not searched
    skipped: bool = False                   # non-finite loss/gradient detected by this step's read
    fallback: bool = False                  # the non-descent fallback (g*p, plain test) was used


class _RngState:
    """CPU and CUDA generator states, captured and restored for dropout replay (section 4)."""

    def __init__(self, cuda_devices: Tuple[int, ...]):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)


def _as_loss(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"ALSALS: the closure must return the loss as a torch.Tensor ({what}); "
                        f"got {type(value).__name__}.\n{CLOSURE_HELP}")
    if value.numel() != 1:
        raise ValueError(f"ALSALS: the closure must return a scalar loss ({what}); "
                         f"got a tensor of shape {tuple(value.shape)}")
    return value


class ALSALS(torch.optim.Optimizer):
    """Automated Large Scale ADAM Line Search.

    ``loss = opt.step(closure)``: the closure returns the mini-batch loss and must not call
    backward.  See README.md for the arguments; defaults depend on ``variant``
    ("alsals" | "adam_sls" | "salsa") and explicit arguments override them.
    """

    def __init__(self, params, *, variant: str = "alsals", init_step_size: Optional[float] = None,
                 c: Optional[float] = None, betas: Optional[Tuple[float, float]] = None,
                 eps: Optional[float] = None, smoothing: Optional[float] = None,
                 growth: Optional[float] = None, backtrack: Optional[float] = None,
                 max_trials: Optional[int] = None, line_search_every: Union[int, str, None] = None,
                 weight_decay: Optional[float] = None, max_grad_norm: Optional[float] = None,
                 memory_efficient: Optional[bool] = None,
                 buffers: Union[Iterable[Tensor], torch.nn.Module, None] = None,
                 backend: str = "auto", process_group=None, sharded: bool = False):
        hyper = make_hyper(variant, init_step_size=init_step_size, c=c, betas=betas, eps=eps,
                           smoothing=smoothing, growth=growth, backtrack=backtrack,
                           max_trials=max_trials, line_search_every=line_search_every,
                           weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                           memory_efficient=memory_efficient)
        if backend not in BACKENDS:
            raise ValueError(f"ALSALS: backend={backend!r} is invalid; accepted: {' | '.join(BACKENDS)}")
        if sharded and process_group is None:
            raise ValueError("ALSALS: sharded=True needs process_group= (the group the shards span)")
        self.hyper: Hyper = hyper
        self.backend_name = backend
        # Section 6: losses are averaged over process_group before any decision, so every rank
        # takes the same eta; with sharded parameters (FSDP) the local sums are added as well.
        self.process_group = process_group
        self.sharded = bool(sharded)
        # param_groups[i]["lr"] mirrors eta so the usual logging works; it is not an input.
        super().__init__(params, {"lr": hyper.init_step_size, "weight_decay": hyper.weight_decay})
        if isinstance(buffers, torch.nn.Module):
            buffers = buffers.buffers()
        self._buffers: List[Tensor] = list(buffers) if buffers is not None else []
        for b in self._buffers:
            if not isinstance(b, Tensor):
                raise TypeError(f"ALSALS: buffers= takes tensors (e.g. model.buffers()); got {type(b).__name__}")
        self._buffer_snapshot: List[Tensor] = []
        self._backups: Dict[Tensor, Tensor] = {}   # w0 copies: scratch, not optimizer state
        self._resolved: Dict[Tuple[torch.device, torch.dtype], object] = {}
        # Host state (section 5).
        self.eta: float = hyper.init_step_size
        self.t: int = 0
        self.counters = {"steps": 0, "searches": 0, "trials": 0, "rejected": 0, "skipped": 0,
                         "fallbacks": 0}
        self._fast: Optional[float] = None         # "auto" EMAs of eta (section 3)
        self._slow: Optional[float] = None
        self._last_search_t = 0
        # Device state, created on the parameters' device at the first step: h, s and the count of
        # non-finite steps the host has not seen yet.
        self._h: Optional[Tensor] = None
        self._s: Optional[Tensor] = None
        self._pending_skips: Optional[Tensor] = None
        self.last_step: Optional[StepInfo] = None
        self.reads = 0                             # device-to-host reads made by step()

    # -- construction checks --------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_weight_decay(group["weight_decay"])
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"ALSALS: parameters must be real floating point; got {p.dtype}")
            if self.hyper.memory_efficient and p.dtype not in (torch.float32, torch.float64):
                raise ValueError("ALSALS: memory_efficient=True supports fp32 and fp64 parameters "
                                 f"only (in-place trial moves would drift in {p.dtype}); got {p.dtype}")

    # -- the "auto" schedule and line_search_every (section 3) ----------------------------------
    def _searches_at(self, t: int) -> bool:
        k = self.hyper.line_search_every
        if k != "auto":    # t = 1, k+1, 2k+1, ... (counted from the last search: see the docstring)
            return self._last_search_t == 0 or t - self._last_search_t >= k
        if t <= 10 or self._fast is None:
            return True
        return t - self._last_search_t >= self._auto_interval()

    def _auto_interval(self) -> int:
        r = self._fast / self._slow
        if r < 1:
            r = 1 / r
        if r == 1:
            return 10
        return min(10, max(1, math.floor(1 / (r - 1) + 0.5)))

    def _after_search(self, t: int) -> None:
        if self._fast is None:
            self._fast = self._slow = self.eta
        else:
            self._fast = 0.9 * self._fast + 0.1 * self.eta
            self._slow = 0.99 * self._slow + 0.01 * self.eta
        self._last_search_t = t

    # -- gathering the tensors ------------------------------------------------------------------
    def _param_devices(self) -> Tuple[int, ...]:
        return tuple(sorted({p.device.index or 0 for g in self.param_groups for p in g["params"]
                             if p.device.type == "cuda"}))

    def _buckets(self) -> Tuple[torch.device, List[Tuple[object, Bucket]]]:
        buckets: Dict[Tuple[torch.device, torch.dtype], Bucket] = {}
        keep_backup = not self.hyper.memory_efficient
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("ALSALS does not support sparse gradients (the line search "
                                       "needs the full direction); use dense embeddings")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise RuntimeError(f"ALSALS: a gradient of shape {tuple(g.shape)}, {g.dtype} on "
                                       f"{g.device} does not match its parameter ({tuple(p.shape)}, "
                                       f"{p.dtype} on {p.device})")
                state = self.state[p]
                if not state:
                    moment = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["exp_avg"] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
                key = (p.device, p.dtype)
                b = buckets.get(key)
                if b is None:
                    b = buckets[key] = Bucket(device=p.device, dtype=p.dtype)
                b.params.append(p)
                b.grads.append(g)
                b.exp_avgs.append(state["exp_avg"])
                b.exp_avg_sqs.append(state["exp_avg_sq"])
                b.weight_decays.append(float(group["weight_decay"]))
                if keep_backup:
                    w0 = self._backups.get(p)
                    if w0 is None or w0.shape != p.shape or w0.dtype != p.dtype or w0.device != p.device:
                        w0 = self._backups[p] = torch.empty_like(p)
                    b.backups.append(w0)
        if not buckets:
            raise RuntimeError("ALSALS: no parameter has a gradient after backward(); does the loss "
                               "depend on the optimized parameters?")
        devices = {key[0] for key in buckets}
        if len(devices) > 1:
            raise ValueError("ALSALS keeps one step size for all parameters and decides on one "
                             f"device, so all parameters with gradients must share a device; found "
                             f"{sorted(str(d) for d in devices)}")
        device = next(iter(devices))
        return device, [(self._backend_for(b), b) for b in buckets.values()]

    def _backend_for(self, b: Bucket):
        key = (b.device, b.dtype)
        backend = self._resolved.get(key)
        if backend is None:
            backend = _backends.get_backend(self.backend_name, b.device)
            if not backend.supports(b.device, b.dtype):
                backend = _backends.get_backend("foreach", b.device)  # e.g. fp64 on fused backends
            self._resolved[key] = backend
        return backend

    def _device_state(self, device: torch.device) -> None:
        if self._h is None:
            self._h = torch.zeros((), dtype=torch.float64, device=device)
            self._s = torch.zeros((), dtype=torch.float64, device=device)
            self._pending_skips = torch.zeros((), dtype=torch.float64, device=device)
        elif self._h.device != device:
            self._h, self._s = self._h.to(device), self._s.to(device)
            self._pending_skips = self._pending_skips.to(device)

    def _mean_over_ranks(self, value: Tensor) -> Tensor:
        if self.process_group is None:
            return value
        import torch.distributed as dist
        value = value.clone()                               # may alias the loss returned to the user
        dist.all_reduce(value, group=self.process_group)   # SUM: gloo has no AVG
        return value / dist.get_world_size(self.process_group)

    def _sum_over_shards(self, value: Tensor) -> Tensor:
        if self.sharded:
            import torch.distributed as dist
            dist.all_reduce(value, group=self.process_group)
        return value

    def _read(self, verdict: Tensor) -> List[float]:
        """The one device-to-host read of a trial."""
        self.reads += 1
        return verdict.tolist()

    def _sync_lr(self) -> None:
        for group in self.param_groups:
            group["lr"] = self.eta

    # -- the step (section 1) -------------------------------------------------------------------
    def step(self, closure=None):  # noqa: C901  (one algorithm, kept in one place on purpose)
        if closure is None or not callable(closure):
            raise TypeError(CLOSURE_HELP)
        searching = self._searches_at(self.t + 1)
        rng_before = _RngState(self._param_devices()) if searching else None
        with torch.enable_grad():
            loss = _as_loss(closure(), "gradient forward")
        if not loss.requires_grad:
            raise RuntimeError("ALSALS: the loss does not require grad; the closure must build it "
                               "from the parameters with autograd enabled")
        loss.backward()
        with torch.no_grad():
            return self._update(closure, loss, searching, rng_before)

    def _update(self, closure, loss: Tensor, searching: bool, rng_before: Optional[_RngState]) -> Tensor:
        """Everything after the gradient: moments, candidate, line search (under no_grad)."""
        hyper = self.hyper
        device, work = self._buckets()
        self._device_state(device)
        loss0 = self._mean_over_ranks(loss.detach().reshape(()).to(device=device, dtype=torch.float64))

        t = self.t + 1
        eta_before = self.eta
        eta = eta_before * hyper.growth if searching else eta_before
        if hyper.memory_efficient:
            self._check_in_place_recovery(eta, work)
        beta1, beta2 = hyper.betas
        hp = StepScalars(eta=eta, beta1=beta1, beta2=beta2, eps=hyper.eps,
                         bias_correction1=1 - beta1 ** t, bias_correction2=1 - beta2 ** t,
                         momentum_search=hyper.momentum_search)

        # Non-finite pre-pass and clipping coefficient, all on the device.
        sumsq = self._sum_over_shards(torch.stack([backend.grad_sumsq(b) for backend, b in work]).sum())
        finite = torch.isfinite(loss0) & torch.isfinite(sumsq)
        scale = torch.ones((), dtype=torch.float64, device=device)
        if hyper.max_grad_norm is not None:   # as clip_grad_norm_: max_norm / (norm + 1e-6), <= 1
            scale = (hyper.max_grad_norm / (sumsq.sqrt() + 1e-6)).clamp(max=1.0)
            scale = torch.where(finite, scale, torch.ones_like(scale))
        skip = (~finite).to(torch.float64)
        ctrl = torch.stack([scale, skip, torch.zeros_like(skip)]).to(torch.float32)
        assert ctrl.numel() == CTRL_SIZE
        self._pending_skips += skip

        write_backup = searching and not hyper.memory_efficient
        dots = [backend.step_pass(b, hp, ctrl, searching=searching, write_backup=write_backup)
                for backend, b in work]
        self.t = t
        self.counters["steps"] += 1
        if not searching:
            self.last_step = StepInfo(eta=eta, trials=0, accepted=True, searched=False,
                                      loss=loss.detach(), loss_trial=None, slope=None)
            return loss.detach()

        rng_after = _RngState(tuple(rng_before.cuda))      # where the gradient forward left them
        # Slope, its smoothing and the non-descent fallback (device).
        total = self._sum_over_shards(torch.stack(dots).sum(dim=0))
        slope, slope_grad = total[0], total[1]
        b3 = hyper.smoothing
        s_new = b3 * self._s + (1 - b3) * slope
        fallback = finite & (s_new <= 0)
        ctrl[FALLBACK] = fallback.to(torch.float32)
        slope_used = torch.where(fallback, slope_grad, slope)
        from_backup = not hyper.memory_efficient

        def move(src_eta: float, dst_eta: float, dst_dir: Dir = Dir.SEARCH) -> None:
            for backend, b in work:
                backend.move_pass(b, hp, ctrl, src_eta=src_eta, src_dir=Dir.SEARCH,
                                  dst_eta=dst_eta, dst_dir=dst_dir, from_backup=from_backup)

        eta_at_params = eta            # params are at cand(eta_at_params) along SEARCH
        accepted = skipped = used_fallback = snapshotted = False
        trials = 0
        loss0_host = loss_try_host = slope_host = math.nan
        h_new = None
        try:
            if hyper.momentum_search:   # the step pass wrote the candidate along m_hat*p
                for backend, b in work:
                    backend.move_pass(b, hp, ctrl, src_eta=eta, src_dir=Dir.MOMENTUM, dst_eta=eta,
                                      dst_dir=Dir.SEARCH, from_backup=from_backup,
                                      only_if_fallback=True)
            self._snapshot_buffers()
            snapshotted = True
            while True:
                rng_before.restore()                       # same dropout masks as L0
                with torch.no_grad():
                    loss_try = _as_loss(closure(), "trial forward")
                trials += 1
                loss_try = self._mean_over_ranks(
                    loss_try.detach().reshape(()).to(device=device, dtype=torch.float64))
                diff = loss0 - loss_try
                h_new = b3 * self._h + (1 - b3) * diff
                smoothed_ok = h_new >= hyper.c * eta * s_new
                plain_ok = diff >= hyper.c * eta * slope_grad
                accept = torch.where(fallback, plain_ok, smoothed_ok) & torch.isfinite(loss_try) & finite
                verdict = torch.stack([accept.to(torch.float64), finite.to(torch.float64),
                                       fallback.to(torch.float64), loss0, loss_try, slope_used,
                                       self._pending_skips])
                (ok, step_finite, was_fallback, loss0_host, loss_try_host, slope_host,
                 pending) = self._read(verdict)
                if pending:
                    self._absorb_skips(int(pending))
                if not step_finite:        # nothing was written: params are w0 (section 1)
                    skipped = True
                    eta = eta_before
                    break
                used_fallback = bool(was_fallback)
                if ok:
                    accepted = True
                    break
                eta *= hyper.backtrack
                if trials == hyper.max_trials:
                    break
                move(eta_at_params, eta)
                eta_at_params = eta
        except BaseException:
            move(eta_at_params, 0.0)       # back to w0; m, v, t keep the update (section 1)
            self.eta = eta_before
            self._sync_lr()
            raise
        finally:
            self.counters["trials"] += trials
            rng_after.restore()
            if snapshotted:
                self._restore_buffers()

        if not skipped:
            self.counters["searches"] += 1
            self.counters["fallbacks"] += used_fallback
            if accepted:
                if not used_fallback:
                    self._h.copy_(h_new)
                    self._s.copy_(s_new)
                if not hyper.update_is_trial_point and not used_fallback:
                    move(eta, eta, Dir.UPDATE)   # adam_sls/salsa: update from w0 along m_hat*p
            else:
                self.counters["rejected"] += 1
                move(eta_at_params, 0.0)
            self.eta = eta
            self._after_search(self.t)
        self._sync_lr()
        self.last_step = StepInfo(eta=eta, trials=trials, accepted=accepted, searched=True,
                                  loss=loss0_host, loss_trial=loss_try_host, slope=slope_host,
                                  skipped=skipped, fallback=used_fallback)
        return loss.detach()

    def _check_in_place_recovery(self, eta: float, work) -> None:
        wd = max((max(b.weight_decays) for _, b in work if b.weight_decays), default=0.0)
        if eta * wd >= 0.5:
            raise ValueError(f"ALSALS: memory_efficient=True recovers w0 by dividing by "
                             f"(1 - eta*weight_decay), and eta*weight_decay = {eta * wd:.3g} is too "
                             "large for that; lower weight_decay or use memory_efficient=False")

    def _absorb_skips(self, n: int) -> None:
        """Steps the device skipped for a non-finite loss/gradient: they count for nothing."""
        self.t -= n
        self.counters["skipped"] += n
        self.counters["steps"] -= n
        self._pending_skips.zero_()

    def _snapshot_buffers(self) -> None:
        if not self._buffers:
            return
        if len(self._buffer_snapshot) != len(self._buffers):
            self._buffer_snapshot = [torch.empty_like(b) for b in self._buffers]
        for dst, src in zip(self._buffer_snapshot, self._buffers):
            dst.copy_(src)

    def _restore_buffers(self) -> None:
        for dst, src in zip(self._buffers, self._buffer_snapshot):
            dst.copy_(src)

    # -- state_dict (section 5): everything needed to continue bit-identically ------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: {n: (v.clone() if isinstance(v, Tensor) else v) for n, v in s.items()}
                       for k, s in sd["state"].items()}
        sd["alsals"] = {
            "eta": self.eta, "t": self.t, "counters": dict(self.counters),
            "fast": self._fast, "slow": self._slow, "last_search_t": self._last_search_t,
            "h": None if self._h is None else self._h.clone(),
            "s": None if self._s is None else self._s.clone(),
            "pending_skips": None if self._pending_skips is None else self._pending_skips.clone(),
            "variant": self.hyper.variant,
            "hyper": dataclasses.asdict(self.hyper),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader casts state to the parameter dtype (fp32 moments of bf16 params would
        # become bf16), so the per-parameter state is mapped here, keeping its dtype.
        extra = state_dict.get("alsals")
        if extra is None:
            raise ValueError("ALSALS.load_state_dict: this state_dict was not saved by ALSALS")
        if extra.get("variant") != self.hyper.variant:
            raise ValueError(f"ALSALS.load_state_dict: saved with variant={extra.get('variant')!r}, "
                             f"this optimizer has variant={self.hyper.variant!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("ALSALS.load_state_dict: the number of parameter groups differs")
        index: Dict[int, Tensor] = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("ALSALS.load_state_dict: a parameter group has a different size")
            index.update(zip(saved["params"], group["params"]))
            group["weight_decay"] = saved["weight_decay"]
        self.state.clear()
        for i, s in state_dict["state"].items():
            p = index[i]
            self.state[p] = {n: (v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v)
                             for n, v in s.items()}
        # As torch optimizers do, the saved hyperparameters win over the constructor's.
        saved_hyper = dict(extra["hyper"])
        saved_hyper["betas"] = tuple(saved_hyper["betas"])
        self.hyper = Hyper(**saved_hyper)
        self.eta, self.t = float(extra["eta"]), int(extra["t"])
        self.counters = dict(extra["counters"])
        self._fast, self._slow = extra["fast"], extra["slow"]
        self._last_search_t = int(extra["last_search_t"])
        self._h, self._s = extra["h"], extra["s"]
        self._pending_skips = extra["pending_skips"]
        for name in ("_h", "_s", "_pending_skips"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.clone())
        self._sync_lr()
