"""Gradients the optimizer did not compute, and the checks that keep ``step()`` honest.

``ALSALS`` (``optimizer.py``) inherits ``UserGradientsMixin``: ``step()`` runs the checks below
at its start, and ``_step_user_gradients`` when the gradients are already in ``p.grad``.  Nothing
here imports a framework (``frameworks.py`` recognises them); a Lightning closure is handed to
``integrations/lightning.py``, which uses the window API below (``open_window``,
``discard_window``, ``GradientWindow.add``).

The API (README: "Gradients you computed yourself")::

    opt.zero_grad()
    with opt.micro_batch(trial=lambda: loss_fn(model(x), y)) as mb:   # RNG captured here
        loss = loss_fn(model(x), y)
        loss.backward()              # or scaler.scale(loss).backward(), accelerator.backward(loss)
        mb.loss = loss               # the loss whose gradient is now in p.grad (before GradScaler)
    clip_grad_norm_(model.parameters(), 1.0)    # optional: the search uses p.grad as it is
    loss = opt.step()                # or scaler.step(opt); the line search, trials call `trial`

Several ``micro_batch`` blocks before one ``step()`` form one accumulation window: the window's
loss L0 is the sum of ``scale * mb.loss`` and a trial forward the sum of ``scale * trial()`` over
its micro-batches, in order, with the RNG replayed from where the window's first micro-batch
started (so every micro-batch sees its own dropout masks again).  Each trial therefore costs one
forward over every micro-batch of the window.  A cheaper, documented subset: open the window
(``micro_batch``) only around the micro-batches the trials should evaluate, for example the last
one, and run the others' forward/backward outside it; L0 and the trials are then that subset's
loss while the gradient is the whole window's.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, List, Literal, Optional, Tuple

import torch
from torch import Tensor

from . import host_ext
from ._types import CLOSURE_HELP, _RngState, check_loss_value
from .frameworks import accumulation_steps, grad_scaler_caller, is_framework_closure, stepped_by_accelerate

if TYPE_CHECKING:
    from .config import Hyper

    # The mixin is only ever a base of ALSALS, next to torch.optim.Optimizer (param_groups,
    # zero_grad via super()); at run time it derives from object.
    _MixinBase = torch.optim.Optimizer
else:
    _MixinBase = object

# Param-group keys ALSALS reads.  "lr" and "betas" are mirrors (of eta and of the global betas);
# "param_names" is torch's (named_parameters); anything else would be silently ignored.
GROUP_KEYS = ("params", "weight_decay", "betas", "param_names")
MARKED = 8          # gradients watched for a backward outside step() (see _gradient_marks)

FIX_HINT = (
    "ALSALS picks the step size itself (param_groups[i]['lr'] is a read-only mirror of eta); "
    "detach the scheduler (with the Hugging Face Trainer use "
    "alsals_fused.integrations.transformers.ALSALSTrainer, which installs a schedule that only "
    "reports eta), set the first step size with init_step_size=, and use torch.optim.AdamW if "
    "you want a learning-rate schedule."
)

USER_GRADIENTS_HELP = (
    "To step on gradients you computed yourself (gradient accumulation, your own clipping, "
    "GradScaler, a framework that owns backward), run your forward/backward inside "
    "`with opt.micro_batch(trial=lambda: loss_fn(model(x), y)) as mb: ...; mb.loss = loss` and "
    "then call opt.step() (README: 'Gradients you computed yourself'). Lightning: return ALSALS "
    "from configure_optimizers (handled); Hugging Face Trainer: "
    "alsals_fused.integrations.transformers.ALSALSTrainer; accelerate: "
    "alsals_fused.integrations.accelerate.micro_batch."
)

CLOSURE_RAN_BACKWARD = (
    "ALSALS: the closure passed to step() ran backward itself (the LBFGS convention). ALSALS's "
    "closure must only return the loss: step() runs backward once, then calls the closure again "
    "under no_grad for every trial forward. " + USER_GRADIENTS_HELP
)

LIGHTNING_FP16 = (
    "ALSALS cannot run under Lightning's 16-bit mixed precision (precision='16-mixed', which "
    "steps through torch.amp.GradScaler): that plugin runs the training closure itself and then "
    "calls optimizer.step() without it, so the line search has no forward for its trial points. "
    "Use precision='bf16-mixed' (no loss scaling needed) or '32-true'; with manual optimization, "
    "run the forward/backward inside self.optimizers().optimizer.micro_batch(...) (the ALSALS "
    "object, not Lightning's wrapper of it) and then call step(). The parameters and the "
    "optimizer's state are unchanged."
)

GRAD_SCALER_WITHOUT_WINDOW = (
    "ALSALS: GradScaler.step(opt) called step() without a gradient window. torch.amp.GradScaler "
    "steps the optimizer without a closure (and refuses one), so the line search needs "
    "opt.micro_batch(trial=...) around the forward/backward before scaler.step(opt); with "
    "accelerate's mixed_precision='fp16', alsals_fused.integrations.accelerate.micro_batch. "
)

ACCUMULATED_BEFORE_STEP = (
    "ALSALS: step(closure) runs backward itself, but p.grad already holds gradients computed "
    "after the last zero_grad()/step() (for example your own loss.backward() or clip_grad_norm_ "
    "before step(closure)); they would be added to the closure's gradient. Call opt.zero_grad() "
    "right before step(closure). " + USER_GRADIENTS_HELP
)

FAILED_BLOCK = (
    "ALSALS: a micro_batch block of this gradient window raised {} after p.grad changed, so p.grad "
    "may hold part of that micro-batch's gradient while the window has no loss for it; step() "
    "would search on a gradient that does not match L0. Call opt.zero_grad() and run the window's "
    "micro-batches again (zero_grad() starts a new window)."
)

STALE_GRADS_WARNING = (
    "ALSALS: p.grad still holds the previous step's gradient, and step(closure) adds this step's "
    "gradient to it; call opt.zero_grad() before each step()."
)


class MicroBatch:
    """One micro-batch of a gradient window (``opt.micro_batch``); set ``.loss`` inside the block."""

    def __init__(self, trial: Callable[[], Tensor], scale: float):
        if not callable(trial):
            raise TypeError("ALSALS.micro_batch(trial=...) takes a callable that returns this "
                            "micro-batch's loss without calling backward (it runs under no_grad)")
        self.trial = trial
        self.scale = _check_scale(scale)
        self.loss: Optional[Tensor] = None


def _check_scale(scale) -> float:
    """``scale`` as a float, refused unless a finite number > 0: NaN or inf would make every step
    a skipped one, 0 makes L0 and every trial 0 (the equality guard then accepts any step), and a
    negative scale turns the search into an ascent."""
    value = float(scale) if isinstance(scale, numbers.Real) and not isinstance(scale, bool) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"ALSALS.micro_batch: scale={scale!r} is invalid; scale must be a finite "
                         "number > 0 (the factor your backward applied that mb.loss does not "
                         "include, e.g. 1 / number of micro-batches)")
    return value


class GradientWindow:
    """The micro-batches whose gradients are in p.grad, their losses, and the RNG state before them."""

    def __init__(self, rng: _RngState, watch: Optional[Tuple[List[Tensor], Any]] = None):
        self.rng = rng                      # optimizer._RngState captured before the first forward
        self.parts: List[MicroBatch] = []
        self.buffers_module: Optional[torch.nn.Module] = None   # set by framework adapters
        # The watched gradients as the last part left them (the optimizer's _window_marks):
        # tells open_window whether they were reset since (model.zero_grad()).
        self.watched: List[Tensor]
        self.marks: Any
        self.watched, self.marks = watch if watch is not None else ([], None)
        # The exception a micro_batch block raised after writing p.grad (step() refuses the window).
        self.failed_block: Optional[str] = None

    def add(self, trial: Callable[[], Tensor], loss: Tensor, scale: float = 1.0) -> MicroBatch:
        """A micro-batch whose backward has run: ``loss`` is its loss (``scale`` as in
        ``ALSALS.micro_batch``), ``trial()`` its loss at the current parameters."""
        mb = MicroBatch(trial, scale)
        check_loss_value(loss, "the micro-batch's loss")
        mb.loss = loss
        self._append(mb)
        return mb

    def _append(self, mb: MicroBatch) -> None:
        self.parts.append(mb)
        if self.marks is not None:
            self.marks.record()

    def gradients_reset(self) -> bool:
        """Were the gradients this window's parts wrote reset since the last part (a
        ``model.zero_grad()`` instead of ``opt.zero_grad()``, e.g. after GradScaler skipped the
        window)?  Every watched gradient set to None is a reset; one written in place since is a
        reset only if every watched gradient is now zero (``zero_grad(set_to_none=False)``), as a
        backward run outside the window (the documented subset) writes them too.  Only that
        second case reads the device, and only when the gradients changed between parts."""
        if self.marks is None or not self.parts:
            return False
        changed = self.marks.changed()
        if changed <= 0:
            return changed < 0
        grads = [p.grad for p in self.watched]
        if any(g is not None and type(g) is not Tensor for g in grads):
            return False          # DTensor shards: a local zero test could differ between ranks
        return not any(bool(g.any()) for g in grads if g is not None)

    def loss(self) -> Tensor:
        total: Optional[Tensor] = None
        for mb in self.parts:
            assert mb.loss is not None      # _MicroBatchContext.__exit__ only appends a set loss
            value = mb.loss.detach().reshape(())
            value = value if mb.scale == 1.0 else value * mb.scale
            total = value if total is None else total + value
        assert total is not None            # only called on a window with parts (_step_user_gradients)
        return total

    def trial(self) -> Tensor:
        total: Optional[Tensor] = None
        for mb in self.parts:
            value = mb.trial()
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise TypeError("ALSALS: a micro_batch trial must return the micro-batch's scalar "
                                f"loss as a torch.Tensor; got {type(value).__name__}")
            check_loss_value(value, "a micro_batch trial's loss")     # before a float scale hides an int
            value = value.reshape(())
            value = value if mb.scale == 1.0 else value * mb.scale
            total = value if total is None else total + value
        assert total is not None            # only called on a window with parts (_step_user_gradients)
        return total


class PyGradMarks:
    """Which gradient tensor each watched parameter holds and its version counter (host-side, no
    read): the host helper's ``GradMarks`` (csrc/host_reader.cpp) in Python, same answers.

    ``record()`` notes them (weak references: a gradient set to None is freed as usual);
    ``changed()`` is 1 if some parameter holds a gradient that is not the recorded one or was
    written in place since (or nothing was recorded yet), 0 if every gradient is as recorded, -1
    if no parameter has a gradient (one set to None since is not a change: nothing can
    accumulate into it)."""

    def __init__(self, params: List[Tensor]):
        self.params = params
        self.marks: Optional[List[Optional[Tuple[Any, int]]]] = None

    def record(self) -> None:
        self.marks = [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in self.params]

    def changed(self) -> int:
        marks, any_grad = self.marks, False
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            any_grad = True
            if marks is None:
                return 1
            mark = marks[i]
            if mark is None or mark[0]() is not g or g._version != mark[1]:
                return 1
        return 0 if any_grad else -1


class UserGradientsMixin(_MixinBase):
    """The parts of ALSALS that face training code which runs backward itself."""

    # Set by ALSALS.__init__ (optimizer.py); declared here for the methods below.
    hyper: Hyper
    _hyper: Hyper        # what the hyper property returns (read directly on the per-step path)
    eta: float
    t: int
    _buffers: List[Tensor]
    _buffer_module: Optional[torch.nn.Module]
    _window: Optional[GradientWindow]

    if TYPE_CHECKING:
        # Implemented by ALSALS (optimizer.py).
        def _finish_step(self, loss: Optional[Tensor]) -> Optional[Tensor]: ...

        def _searches_at(self, t: int) -> bool: ...

        def _capture_rng(self) -> _RngState: ...

        def _update(self, closure: Callable[[], Tensor], loss0: Tensor, searching: bool,
                    rng_before: Optional[_RngState]) -> None: ...

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def _reject_adamw_arguments(lr) -> None:
        if lr is not None:
            raise TypeError(f"ALSALS has no lr= (got lr={lr!r}): the line search picks the step size "
                            "at every step. Use init_step_size= for the first step size "
                            "(default 0.1); param_groups[i]['lr'] reports the current one.")

    def _check_group_keys(self, param_group: dict) -> None:
        """Unknown param-group keys would be silently ignored: reject them (construction and add_param_group)."""
        if not isinstance(param_group, dict):
            return
        if "lr" in param_group:
            raise ValueError("ALSALS: a param group sets 'lr', but ALSALS has one step size for all "
                             "groups, picked by the line search; remove 'lr' (init_step_size= sets "
                             "the first step size)")
        unknown = sorted(set(param_group) - set(GROUP_KEYS))
        if unknown:
            raise ValueError(f"ALSALS: unknown param-group key(s) {unknown}; ALSALS reads "
                             f"{list(GROUP_KEYS[:2])} per group (betas must equal the global "
                             "betas=); the others are global constructor arguments")
        if "betas" in param_group and tuple(param_group["betas"]) != tuple(self.hyper.betas):
            raise ValueError("ALSALS: betas are global (one ADAM state schedule for the line "
                             "search); pass betas= to the constructor instead of per group")

    # -- no silent no-ops (start of every step) -------------------------------------------------
    def _check_mirrors(self) -> None:
        """param_groups[i]['lr'] mirrors eta and ['betas'] the global betas; a write means someone
        (a scheduler, SWALR, the user) expects it to do something: say so instead of ignoring it."""
        eta, betas = self.eta, self._hyper.betas
        for i, group in enumerate(self.param_groups):
            lr = group.get("lr")
            g_betas = group.get("betas", betas)
            if lr == eta and (g_betas is betas or tuple(g_betas) == tuple(betas)):
                continue                  # (the usual case, in few operations: it runs every step)
            if lr != eta:
                synced = getattr(self, "_synced_eta", self.hyper.init_step_size)
                if eta != synced and lr == synced:
                    raise RuntimeError(
                        f"ALSALS: opt.eta was set to {eta!r} outside the optimizer (its value was "
                        f"{synced!r}). eta is read-only: the line search picks it at every "
                        "searching step (param_groups[i]['lr'] mirrors it). Set the first step "
                        "size with init_step_size= when you construct ALSALS; to go on, set "
                        f"opt.eta back to {synced!r}.")
                raise RuntimeError(
                    f"ALSALS: param_groups[{i}]['lr'] was set to {lr!r} but eta is {eta!r}. Likely "
                    "causes: a learning-rate scheduler attached to this optimizer "
                    "(torch.optim.lr_scheduler.*, transformers' default linear schedule, "
                    "swa_utils.SWALR, Lightning's lr_scheduler_configs) or code that sets the lr "
                    "by hand. " + FIX_HINT)
            raise RuntimeError(
                f"ALSALS: param_groups[{i}]['betas'] was set to {tuple(g_betas)!r} but ALSALS "
                f"uses betas={tuple(betas)!r}. Likely cause: a scheduler that cycles momentum "
                "(OneCycleLR, CyclicLR with cycle_momentum=True). " + FIX_HINT)

    def _check_grads_before_closure(self) -> None:
        """step(closure) runs backward: gradients written since zero_grad()/the last step would add up."""
        n = accumulation_steps()
        if n > 1 and stepped_by_accelerate():
            raise RuntimeError(
                f"ALSALS: accelerate accumulates gradients over {n} micro-batches and calls the "
                "optimizer's step() only on a window's last one, so a closure given to step() "
                "would see that micro-batch only. Run each micro-batch inside "
                "alsals_fused.integrations.accelerate.micro_batch(accelerator, optimizer, trial) "
                "and call optimizer.step() without a closure (README: accelerate).")
        changed = self._gradient_marks().changed()
        if changed == 1:
            raise RuntimeError(ACCUMULATED_BEFORE_STEP)
        if changed == 0 and not getattr(self, "_grads_zeroed", False) \
                and not getattr(self, "_warned_stale", False):
            self._warned_stale = True
            warnings.warn(STALE_GRADS_WARNING, stacklevel=4)

    def _check_closure_result(self, loss: Tensor) -> None:
        """Before step()'s backward: did the closure run backward itself (gradients written since
        the check at the start of step), or build a loss without autograd?"""
        if self._gradient_marks().changed() == 1:
            raise RuntimeError(CLOSURE_RAN_BACKWARD)
        if loss.requires_grad:
            return
        raise RuntimeError("ALSALS: the loss does not require grad; the closure must build it from "
                           "the parameters with autograd enabled. " + USER_GRADIENTS_HELP)

    @staticmethod
    def _explain_backward_error(exc: RuntimeError) -> None:
        if "backward through the graph a second time" in str(exc):
            raise RuntimeError(CLOSURE_RAN_BACKWARD) from exc
        raise exc

    def _gradient_marks(self) -> Any:
        """The marks (``PyGradMarks``, or the host helper's ``GradMarks``) of the parameters whose
        gradients are watched: a fixed sample of at most MARKED of them (first, last and evenly
        between), so the checks cost a few microseconds whatever the model's size; a backward
        outside step() writes (nearly) every parameter's gradient.  The sample is the one of the
        last record (param groups added since join it at the next record), so a backward run
        between a record and add_param_group/load_state_dict is still seen."""
        marks = getattr(self, "_marks", None)
        if marks is None:
            marks = self._new_gradient_marks()
        return marks[1]

    def _marks_key(self) -> tuple:
        return (getattr(self, "_groups_version", None), len(self.param_groups))

    def _watched_params(self) -> List[Tensor]:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        n = len(params)
        picks = sorted({round(i * (n - 1) / (MARKED - 1)) for i in range(MARKED)}) if n > MARKED else range(n)
        return [params[i] for i in picks]

    @staticmethod
    def _marks_of(watched: List[Tensor]) -> Any:
        native = host_ext.module()
        return native.GradMarks(watched) if native is not None else PyGradMarks(watched)

    def _new_gradient_marks(self) -> Tuple[tuple, Any]:
        watched = self._watched_params()
        marks = self._marks = (self._marks_key(), self._marks_of(watched))
        return marks

    def _window_marks(self) -> Tuple[List[Tensor], Any]:
        """The watched parameters and marks of their own for a new gradient window (recorded
        after each part; the step checks keep theirs), reused while the param groups stay."""
        key = self._marks_key()
        cached = getattr(self, "_window_watch", None)
        if cached is None or cached[0] != key:
            watched = self._watched_params()
            cached = self._window_watch = (key, watched, self._marks_of(watched))
        return cached[1], cached[2]

    def _record_gradient_marks(self) -> None:
        """Note the watched gradients as they are now (end of a step, zero_grad)."""
        marks = getattr(self, "_marks", None)
        if marks is None or marks[0] != self._marks_key():
            marks = self._new_gradient_marks()
        marks[1].record()

    # -- gradients the optimizer did not compute -------------------------------------------------
    def micro_batch(self, trial: Callable[[], Tensor], *, scale: float = 1.0):
        """Context manager around a forward/backward you run yourself; see the module docstring.

        ``trial()`` returns this micro-batch's loss at the current parameters without calling
        backward (it runs under no_grad, with the RNG replayed).  ``scale`` multiplies both
        ``mb.loss`` and ``trial()``: pass the factor your backward applied that ``mb.loss`` does
        not include (accelerate's ``backward`` divides by gradient_accumulation_steps)."""
        return _MicroBatchContext(self, MicroBatch(trial, scale))

    def open_window(self) -> GradientWindow:
        """The open gradient window, opened now (capturing the RNG state for the trials' replay)
        if none is: framework adapters call this right before the first forward of a window.  A
        window whose gradients were reset since its last part (``model.zero_grad()``) is dropped
        first, as ``opt.zero_grad()`` drops it: its losses no longer match ``p.grad``."""
        window = getattr(self, "_window", None)
        if window is not None and window.parts and window.gradients_reset():
            window = None
        elif window is not None and window.failed_block is not None and self._gradient_marks().changed() < 0:
            window = None            # a broken window whose gradients were all set to None since
        if window is None:
            window = self._window = GradientWindow(self._capture_rng(), self._window_marks())
        return window

    def discard_window(self) -> None:
        """Forget the open gradient window (its micro-batches are not stepped on): the next
        ``micro_batch`` or ``open_window`` starts a new one, as ``zero_grad()`` and ``step()`` do."""
        self._window = None

    def _step_user_gradients(self, closure) -> Optional[Tensor]:
        """step() without a closure (or with a framework's closure): search on p.grad as it is."""
        if closure is not None:
            adapter = framework_adapter(closure)
            window = adapter.run(self)
            if window is None:       # the framework skipped this step (training_step returned None)
                return None
        else:
            window = getattr(self, "_window", None)
            if window is not None and window.failed_block is not None:
                raise RuntimeError(FAILED_BLOCK.format(window.failed_block))
            if window is None or not window.parts:
                caller = grad_scaler_caller(sys._getframe(1))
                if caller == "lightning":
                    raise TypeError(LIGHTNING_FP16)
                raise TypeError((GRAD_SCALER_WITHOUT_WINDOW if caller else CLOSURE_HELP + "\n")
                                + USER_GRADIENTS_HELP)
        self._window = None
        searching = self._searches_at(self.t + 1)
        loss0 = window.loss()                  # detached
        saved_module = self._buffer_module
        if window.buffers_module is not None and saved_module is None and not self._buffers:
            self._buffer_module = window.buffers_module
        try:
            with torch.no_grad():
                self._update(window.trial, loss0, searching, window.rng if searching else None)
        finally:
            self._buffer_module = saved_module
        return self._finish_step(loss0)


class _MicroBatchContext:
    def __init__(self, opt, mb: MicroBatch):
        self.opt, self.mb = opt, mb

    def __enter__(self) -> MicroBatch:
        self.window = self.opt.open_window()        # first micro-batch: captures the RNG
        return self.mb

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is not None:
            self._after_failed_block(exc_type)
            return False
        if not isinstance(self.mb.loss, Tensor) or self.mb.loss.numel() != 1:
            self._after_failed_block(TypeError)
            raise TypeError("ALSALS.micro_batch: set mb.loss to this micro-batch's scalar loss "
                            "tensor (the one you ran backward on) inside the with block")
        try:
            check_loss_value(self.mb.loss, "mb.loss")
        except TypeError:
            self._after_failed_block(TypeError)
            raise
        self.mb.loss = self.mb.loss.detach()        # keep no graph alive until step()
        self.window._append(self.mb)
        return False

    def _after_failed_block(self, exc_type) -> None:
        """A block that raised adds no part.  If p.grad changed since the window's last part (or,
        for a first block, since the last step or zero_grad), its backward may have written part
        of its gradient, which no loss of the window accounts for: the window is kept but broken,
        and step() refuses it until zero_grad() starts over.  Otherwise nothing of the block
        remains, and a window it opened (no parts) goes, so that the next micro-batch captures
        the RNG state its own forward starts from."""
        window: GradientWindow = self.window
        if self.opt._window is not window:     # discarded or replaced inside the block
            return
        marks = window.marks if window.parts else self.opt._gradient_marks()
        if marks is None or marks.changed() == 1:
            window.failed_block = exc_type.__name__
        elif not window.parts:
            self.opt.discard_window()


# -- frameworks whose closure runs backward itself -------------------------------------------------
def framework_adapter(closure):
    if is_framework_closure(closure):
        from .integrations.lightning import LightningClosureAdapter
        return LightningClosureAdapter(closure)
    raise TypeError("ALSALS: unrecognised framework closure")
