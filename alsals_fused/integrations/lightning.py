"""Lightning, automatic optimization: return ALSALS from ``configure_optimizers``, nothing else.

Lightning calls ``optimizer.step(closure=...)`` with a closure that runs ``training_step``,
``zero_grad`` (first micro-batch of an accumulation window), ``backward``, the
``on_before_optimizer_step`` hooks and gradient clipping, and returns the detached loss.
``ALSALS.step`` recognises that closure (``frameworks.is_framework_closure``) and hands it here:

- the gradient: the closure is run once as Lightning means it (RNG captured before it);
- the trials: ``training_step`` alone on the same batch, through the strategy (so precision and
  autocast apply), under no_grad with the same random numbers, with ``self.log`` / ``self.log_dict``
  muted so trial losses never reach the logs, and without backward;
- the module's buffers (BatchNorm statistics) are protected around the trials unless the
  optimizer was given ``buffers=`` explicitly;
- ``accumulate_grad_batches=N``: Lightning calls the optimizer only on the last micro-batch of a
  window, so the trials evaluate that micro-batch (a documented subset): L0 and the trial loss are
  its ``training_step`` loss, the slope uses the whole window's gradient.  Resumed from a
  checkpoint saved inside a window, the first step has only the micro-batches after it in p.grad
  (checkpoints hold no gradients): it runs on them, with a warning (RESUMED_INSIDE_A_WINDOW).
- ``training_step`` returning None skips the step, as with any optimizer.

This module imports nothing from Lightning; the closure's objects are reached by attribute.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..user_gradients import GradientWindow


RESUMED_INSIDE_A_WINDOW = (
    "ALSALS: this step's accumulate_grad_batches window has no zero_grad() since the last step: "
    "the run resumed from a checkpoint saved inside the window, and checkpoints hold no "
    "gradients, so p.grad holds only the micro-batches after the checkpoint (as with any "
    "optimizer). The search runs on that partial window (its trials evaluate the window's last "
    "micro-batch, as always); the optimizer's own state was restored exactly. Save checkpoints at "
    "window boundaries (ModelCheckpoint does) to avoid it.")

CALL_ALSALS = (
    "call the ALSALS object itself, self.optimizers().optimizer: opt.zero_grad(); "
    "opt.step(lambda: loss_fn(self(x), y)) with a closure that returns the loss without backward, "
    "or run the forward and self.manual_backward(loss) inside "
    "`with opt.micro_batch(trial=lambda: loss_fn(self(x), y)) as mb: ...; mb.loss = loss`, then "
    "opt.step(). Lightning does not count steps taken this way (trainer.global_step stays 0): "
    "bound the run with max_epochs, not max_steps."
)

MANUAL_OPTIMIZATION = (
    "ALSALS: under Lightning's manual optimization, self.optimizers().step() hands ALSALS its "
    "precision plugin's closure protocol (the closure runs backward itself, or does nothing), "
    "which has no forward for the line search's trial points. Instead, " + CALL_ALSALS
)


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def _muted_logging(module):
    """Trial forwards must not log: shadow LightningModule.log/log_dict for their duration."""
    had = {name: name in vars(module) for name in ("log", "log_dict")}
    for name in had:
        object.__setattr__(module, name, _noop)
    try:
        yield
    finally:
        for name, own in had.items():
            if not own:
                object.__delattr__(module, name)


class LightningClosureAdapter:
    def __init__(self, closure):
        # closure = functools.partial(precision._wrap_closure, lightning_module, optimizer, Closure)
        self.closure = closure
        self.inner = closure.args[-1] if closure.args else closure.keywords.get("closure")
        step_fn = getattr(self.inner, "_step_fn", None)
        loop = getattr(getattr(step_fn, "func", None), "__self__", None)
        self.trainer = getattr(loop, "trainer", None)
        if step_fn is None or self.trainer is None:
            module = closure.args[0] if closure.args else None
            if getattr(module, "automatic_optimization", True) is False:
                raise RuntimeError(MANUAL_OPTIMIZATION)
            raise RuntimeError("ALSALS: this Lightning version's automatic-optimization closure is "
                               "not the one alsals_fused.integrations.lightning knows "
                               "(Closure._step_fn). Switch to manual optimization "
                               "(self.automatic_optimization = False) and " + CALL_ALSALS)
        self.step_fn = step_fn
        self.accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)

    def run(self, opt) -> Optional[GradientWindow]:
        opt.discard_window()
        window = opt.open_window()                  # RNG captured before training_step
        loss = self.closure()                       # forward, zero_grad, backward, clipping
        if loss is None:
            opt.discard_window()
            return None
        if self.accumulate > 1 and not getattr(opt, "_grads_zeroed", False):
            # Lightning zeroes at a window's first micro-batch; none since this optimizer's last
            # step (or its creation): the run resumed from a checkpoint saved inside a window.
            warnings.warn(RESUMED_INSIDE_A_WINDOW, stacklevel=2)
        # Lightning divides the loss by accumulate_grad_batches: the scale undoes that.
        window.add(self._trial, loss, float(self.accumulate))
        window.buffers_module = self.trainer.lightning_module
        return window

    def _trial(self) -> Tensor:
        module = self.trainer.lightning_module
        with _muted_logging(module), torch.no_grad():
            result = self.step_fn()
        loss = getattr(result, "closure_loss", None)
        if loss is None:
            raise RuntimeError("ALSALS: training_step returned no loss during a line-search trial "
                               "(it returned one for the gradient); it must return the loss for "
                               "the same batch every time it is called")
        return loss.detach()
