"""accelerate with ALSALS (imports nothing from accelerate).

Without accumulation, ``optimizer.step(closure)`` works as in a plain loop; accelerate's wrapper
returns None, so read the step's loss from the ALSALS object (``opt.last_step.loss``, a 0-dim
tensor) or compute it in the closure.  Not with ``mixed_precision="fp16"``: accelerate's step
then goes through torch's GradScaler, which unscales ``p.grad`` before it calls the optimizer,
so it needs the scaled backward to have run already (without one it fails before ALSALS is
called); use ``micro_batch`` below, whose ``accelerator.backward`` scales the loss and whose
search then sees the unscaled gradients.  bf16 needs no scaler, and ``step(closure)`` works.

With ``accelerator.accumulate()`` (gradient_accumulation_steps > 1) accelerate runs the inner
``step()`` only on a window's last micro-batch, so a closure given to ``step()`` would see that one
micro-batch only; ALSALS refuses that with an error pointing here.  Instead run each micro-batch's
forward/backward inside ``micro_batch``, and every micro-batch is seen by the gradient and by
every trial forward::

    for x, y in loader:
        with accelerator.accumulate(model):
            with micro_batch(accelerator, optimizer, lambda: loss_fn(model(x), y)) as mb:
                loss = loss_fn(model(x), y)
                accelerator.backward(loss)
                mb.loss = loss
            optimizer.step()          # the line search, at the window's last micro-batch
            optimizer.zero_grad()
"""
from __future__ import annotations

from ..optimizer import ALSALS


def unwrap(optimizer):
    """The ALSALS object inside accelerate's (or another framework's) optimizer wrappers."""
    seen = optimizer
    while not isinstance(seen, ALSALS):
        inner = getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            raise TypeError(f"expected an ALSALS optimizer (possibly wrapped), got {type(optimizer).__name__}")
        seen = inner
    return seen


def micro_batch(accelerator, optimizer, trial):
    """``opt.micro_batch`` with the 1/gradient_accumulation_steps that ``accelerator.backward`` applies."""
    return unwrap(optimizer).micro_batch(trial, scale=1.0 / accelerator.gradient_accumulation_steps)
