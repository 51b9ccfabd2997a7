"""Which framework is driving ``step()``, recognised without importing any framework.

The driver asks these to pick the path of a step (Lightning's closure runs backward itself) and
to word its errors (accelerate's accumulation, GradScaler); the frameworks' own modules are only
looked at when they are already imported.
"""
from __future__ import annotations

import functools
import sys
from types import FrameType
from typing import Optional


def is_framework_closure(closure) -> bool:
    """Lightning's automatic-optimization closure (a partial of its precision plugin's wrapper)."""
    if not isinstance(closure, functools.partial):
        return False
    module = getattr(closure.func, "__module__", None) or ""
    return module.startswith(("lightning.", "pytorch_lightning."))


def accumulation_steps() -> int:
    """gradient_accumulation_steps of the live Accelerator (1 if accelerate is not in use)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return 1
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None) or {}
    kwargs = shared.get("plugin_kwargs") or {}
    return int(kwargs.get("num_steps", 1) or 1)


def stepped_by_accelerate(depth: int = 8) -> bool:
    """Is this step() called by accelerate's AcceleratedOptimizer (a few frames up)?"""
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == "accelerate.optimizer":
            return True
        frame = frame.f_back
    return False


def grad_scaler_caller(frame) -> Optional[str]:
    """Who called step() without a closure, for its error message (only then: it walks the
    stack, innermost first): "grad_scaler" under torch.amp.GradScaler.step, "lightning" when a
    Lightning Trainer precision plugin's optimizer_step called that GradScaler.step (its fp16
    plugins run the closure themselves; Fabric's leave the backward to the user, as a plain
    scaler does), else None."""
    found = None
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        if found is None:
            if path.endswith("/torch/amp/grad_scaler.py") and code.co_name == "step":
                found = "grad_scaler"
        elif code.co_name == "optimizer_step" and ("/lightning/pytorch/plugins/precision/" in path
                                                   or "/pytorch_lightning/plugins/precision/" in path):
            return "lightning"
        frame = frame.f_back
    return found
