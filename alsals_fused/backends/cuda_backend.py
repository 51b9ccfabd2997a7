"""The CUDA backend: the three passes as hand-written CUDA kernels (``csrc/``, module ``alsals_fused._C``).

The extension registers ``torch.ops.alsals_fused.{grad_sumsq, step_pass, move_pass}``; this
module only adapts the backend contract (``base.py``) to them.  Each pass is one or a few kernel
launches over the whole bucket (a multi-tensor launcher, see ``csrc/launch_table.h``) plus, for
the sums, a deterministic cleanup kernel; the device flags in ``ctrl`` are read by the kernels,
so no pass synchronizes with the host.

fp64 parameters are not handled by the kernels (``supports`` returns False): the optimizer routes
them to the foreach backend.  Tensors whose layout the kernels do not take (a gradient with other
strides than its parameter, a non-dense view) make the extension raise NotImplementedError before
launching anything; that bucket then runs on foreach for that call.

Loading: ``import alsals_fused._C`` (built by ``pip install --no-build-isolation -e .`` or
``python setup.py build_ext --inplace``).  If it is missing and ``ALSALS_FUSED_JIT=1``, it is
compiled on first use with ``torch.utils.cpp_extension.load`` (needs nvcc and ninja; the
sources are the repository's ``csrc/``).
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .base import Bucket, Dir, StepScalars

OPS = ("grad_sumsq", "step_pass", "move_pass")
BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
              "--inplace`) in an environment with a CUDA build of torch and nvcc, or set "
              "ALSALS_FUSED_JIT=1 to compile it on first use")

_lock = threading.Lock()
_module = None
_load_error: Optional[str] = None
_loaded = False


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _jit_build():
    """Compile csrc/ with torch.utils.cpp_extension.load (ALSALS_FUSED_JIT=1)."""
    root = _repo_root()
    if not (root / "csrc" / "alsals_ops.cpp").is_file():
        raise ImportError(f"ALSALS_FUSED_JIT=1 but the sources are not at {root / 'csrc'} "
                          "(the JIT path needs a source checkout)")
    sys.path.insert(0, str(root))
    try:
        csrc_build = importlib.import_module("csrc_build")
    finally:
        sys.path.remove(str(root))
    from torch.utils.cpp_extension import load
    return load(name="alsals_fused_jit_C", verbose=bool(os.environ.get("ALSALS_FUSED_JIT_VERBOSE")),
                **csrc_build.jit_kwargs())


def load_extension():
    """The extension module, or None (the reason is in ``_load_error``).  Loaded once."""
    global _module, _load_error, _loaded
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        try:
            _module = importlib.import_module("alsals_fused._C")
        except ImportError as exc:
            _load_error = f"the extension alsals_fused._C is not built ({exc}); {BUILD_HINT}"
            if os.environ.get("ALSALS_FUSED_JIT") == "1":
                try:
                    _module = _jit_build()
                    _load_error = None
                except Exception as jit_exc:  # compiler missing, build error, ...
                    _load_error = (f"the extension alsals_fused._C is not built and the JIT build "
                                   f"(ALSALS_FUSED_JIT=1) failed: {jit_exc}")
        if _module is not None:
            missing = [op for op in OPS if not hasattr(torch.ops.alsals_fused, op)]
            if missing:
                _load_error = f"the extension loaded but does not register {missing}; rebuild it"
                _module = None
        _loaded = True
        return _module


def unavailable_reason(device) -> Optional[str]:
    """None when the extension loads and ``device`` is a CUDA device, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the CUDA backend runs on CUDA GPUs only and the parameters are on {device}; "
                "use backend='foreach' (or 'auto') there")
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"
    if load_extension() is None:
        return _load_error
    return None


class CudaBackend:
    name = "cuda"

    def __init__(self):
        if load_extension() is None:
            from .base import BackendUnavailable
            raise BackendUnavailable(f"ALSALS backend='cuda': {_load_error}")
        self._ops = torch.ops.alsals_fused
        self._foreach = None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16)

    def _fallback(self):
        if self._foreach is None:
            from .foreach import ForeachBackend
            self._foreach = ForeachBackend()
        return self._foreach

    def grad_sumsq(self, bucket: Bucket) -> Tensor:
        if not bucket.grads:
            return torch.zeros((), dtype=torch.float64, device=bucket.device)
        try:
            return self._ops.grad_sumsq(bucket.grads)
        except NotImplementedError:  # a layout the kernels do not take
            return self._fallback().grad_sumsq(bucket)

    def step_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, searching: bool,
                  write_backup: bool) -> Optional[Tensor]:
        if not bucket.params:
            return torch.zeros(2, dtype=torch.float64, device=bucket.device) if searching else None
        try:
            dots = self._ops.step_pass(
                bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                bucket.backups if write_backup else [], bucket.weight_decays, ctrl,
                hp.eta, hp.beta1, hp.beta2, hp.eps, hp.bias_correction1, hp.bias_correction2,
                hp.momentum_search, searching, write_backup)
        except NotImplementedError:
            return self._fallback().step_pass(bucket, hp, ctrl, searching=searching,
                                              write_backup=write_backup)
        return dots if searching else None

    def move_pass(self, bucket: Bucket, hp: StepScalars, ctrl: Tensor, *, src_eta: float,
                  src_dir: Dir, dst_eta: float, dst_dir: Dir, from_backup: bool,
                  only_if_fallback: bool = False) -> None:
        if not bucket.params:
            return
        try:
            self._ops.move_pass(
                bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                bucket.backups if from_backup else [], bucket.weight_decays, ctrl,
                hp.eps, hp.bias_correction1, hp.bias_correction2, hp.momentum_search,
                float(src_eta), int(src_dir), float(dst_eta), int(dst_dir), from_backup,
                only_if_fallback)
        except NotImplementedError:
            self._fallback().move_pass(bucket, hp, ctrl, src_eta=src_eta, src_dir=src_dir,
                                       dst_eta=dst_eta, dst_dir=dst_dir, from_backup=from_backup,
                                       only_if_fallback=only_if_fallback)
