"""Backend registry: one algorithm, several implementations of its element-wise passes.

``reference`` (readable oracle) and ``foreach`` (multi-tensor PyTorch) run everywhere; ``triton``
and ``cuda`` are the fused GPU paths.  ``auto`` prefers cuda, then triton, on a GPU, and foreach
elsewhere.  What a fused backend cannot take (fp64, a layout its kernels cannot walk:
``fused_tables.unfusable_reason``) the optimizer runs on foreach (``ALSALS._backend_for``).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

from .base import (  # noqa: F401  (re-exported)
    CTL_SIZE,
    Backend,
    BackendUnavailable,
    Bucket,
    Ctl,
    DecisionScalars,
    Dir,
    StepScalars,
    Verdict,
)

_MODULES = {
    "reference": ("reference", "ReferenceBackend"),
    "foreach": ("foreach", "ForeachBackend"),
    "triton": ("triton_backend", "TritonBackend"),
    "cuda": ("cuda_backend", "CudaBackend"),
}
_instances: Dict[str, Backend] = {}


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {', '.join(_MODULES)}"
    module_name, _ = _MODULES[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:  # triton or the extension missing
        return f"it could not be imported ({exc})"
    check = getattr(module, "unavailable_reason", None)
    return check(device) if check else None


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` (or the best one for ``device`` if ``name == 'auto'``)."""
    device = torch.device(device)
    if name == "auto":
        candidates = ("cuda", "triton", "foreach") if device.type == "cuda" else ("foreach",)
        name = next(n for n in candidates if unavailable_reason(n, device) is None)
    else:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"ALSALS backend={name!r} cannot run on {device}: {reason}")
    if name not in _instances:
        module_name, class_name = _MODULES[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        _instances[name] = getattr(module, class_name)()
    return _instances[name]


def available_backends(device="cpu") -> Dict[str, Optional[str]]:
    """Every backend with None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in _MODULES}
