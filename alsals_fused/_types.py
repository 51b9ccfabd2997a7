"""Leaf types of the driver: the step telemetry, the closure help text, the RNG snapshot.

Imported by the driver (``optimizer.py``) and by the user-gradient machinery
(``user_gradients.py``); imports nothing from the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor

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

    eta: float                              # step size after the step (rejected: eta before it)
    trials: int                             # trial forwards run (0 if the step did not search)
    accepted: bool                          # params moved to an accepted point (see skipped)
    searched: bool
    loss: Union[float, Tensor]              # L0, detached: a 0-dim tensor on every step (no read)
    loss_trial: Optional[float]             # the last trial's loss; None if not searched
    slope: Optional[float]                  # the unsmoothed slope the test used; None if not searched
    skipped: bool = False                   # non-finite loss/gradient detected by this step's read
    fallback: bool = False                  # the non-descent fallback (g*p, plain test) was used


class _RngState:
    """CPU and CUDA generator states, captured and restored for dropout replay (section 4).

    The CPU state is a native snapshot (``CpuRngState``, reused from ``free``) when ``native``
    is the host helper (``host_ext.module()``), else torch.get_rng_state()'s tensor, which
    allocates 5 KB each time; ``release`` hands a native snapshot back for reuse."""

    free: List[Any] = []          # released CpuRngState objects (a searching step uses two)
    FREE_MAX = 8

    def __init__(self, cuda_devices: Tuple[int, ...], native: Optional[Any]):
        self.native = native
        if native is not None:
            free = _RngState.free
            self.cpu: Any = free.pop() if free else native.CpuRngState()
            self.cpu.capture()
        else:
            self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices} if cuda_devices else {}

    def restore(self) -> None:
        cpu = self.cpu
        if isinstance(cpu, Tensor):
            torch.set_rng_state(cpu)
        elif cpu is None:
            raise RuntimeError("ALSALS internal error: an RNG state was restored after its release")
        else:
            cpu.restore()
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)

    def release(self) -> None:
        if self.cpu is not None and not isinstance(self.cpu, Tensor):
            if len(_RngState.free) < _RngState.FREE_MAX:
                _RngState.free.append(self.cpu)
            self.cpu = None


def check_loss_value(value: Tensor, what: str) -> None:
    """A loss the line search can compare: a real floating-point tensor that holds a value (not
    an int or bool, which would be compared as a number, not complex, not on the meta device).
    Raises TypeError naming ``what``; the same check for a closure's, a trial's and mb.loss."""
    if value.is_meta:
        raise TypeError(f"ALSALS: {what} is on the meta device (it holds no value); the loss "
                        "must be computed on the parameters' device")
    if not value.is_floating_point():
        raise TypeError(f"ALSALS: {what} is a {value.dtype} tensor; the loss must be a real "
                        "floating-point tensor (e.g. float32) computed from the parameters")
