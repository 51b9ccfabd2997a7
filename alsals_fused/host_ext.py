"""The optional native host helper ``alsals_fused._host`` (``csrc/host_reader.cpp``).

It does the driver's per-step host work in C++: the parameter plan's gradient read
(``GradReader``: ``refresh_grads`` then costs a pointer walk instead of several torch method
calls per tensor and a Python object per gradient), the integration checks' watch on a few
gradients (``GradMarks``: one call where Python loops, three times per step) and the line
search's CPU random-number snapshots (``CpuRngState``: copied in place into objects the driver
reuses, where ``torch.get_rng_state`` allocates 5 KB each time, which right after a backward
costs tens of microseconds).

``pip install --no-build-isolation -e .`` builds it with any torch, CPU or CUDA; from a source
checkout ``ALSALS_FUSED_JIT=1`` compiles it on first use instead (as for the CUDA extension;
``torch.utils.cpp_extension.load``, about 30 s; without it, a JIT build that finished earlier is
loaded as it is).  Without it the driver does all of it in
Python, with the same checks and the same decisions.  ``ALSALS_FUSED_PYTHON_READS=1`` makes the
driver ignore the helper (tests and benchmarks compare both paths); the driver asks
``module()`` when it builds a parameter plan or a sample of watched gradients, not per step.
"""
from __future__ import annotations

import os
from typing import Any, Optional

_ENV = "ALSALS_FUSED_PYTHON_READS"
_API = ("GradReader", "GradMarks", "CpuRngState")   # what the driver uses of the module
_module: Any = None
_error: Optional[str] = None      # why there is no module (a failed JIT build is not retried)
_JIT_NAME = "alsals_fused_jit_host"   # the JIT build's module (and build folder) name


def _disabled() -> bool:
    return os.environ.get(_ENV, "0") not in ("", "0")


def _jit_build():
    import torch.utils.cpp_extension as cpp

    from ._source_tree import CSRC, build_settings
    kw = build_settings().host_extension_kwargs()
    return cpp.load(name=_JIT_NAME, sources=[str(CSRC.parent / s) for s in kw["sources"]],
                    extra_cflags=kw["extra_compile_args"]["cxx"],
                    verbose=bool(os.environ.get("ALSALS_FUSED_JIT_VERBOSE")))


def _load() -> Any:
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    try:
        from . import _host  # type: ignore[attr-defined]
        missing = [name for name in _API if not hasattr(_host, name)]
        if missing:      # built from older sources (a pull without a rebuild): use Python instead
            _error = (f"alsals_fused._host is out of date (no {', '.join(missing)}); rebuild it: "
                      "pip install --no-build-isolation -e .")
            return None
        _module = _host
    except ImportError as exc:
        _error = f"alsals_fused._host is not built ({exc}); pip install --no-build-isolation -e ."
        if os.environ.get("ALSALS_FUSED_JIT") != "1":
            # a JIT build that another process finished
            from ._source_tree import CSRC, finished_jit_build
            built = finished_jit_build(_JIT_NAME, [CSRC / "build_settings.py", CSRC / "host_reader.cpp"])
            if built is not None and all(hasattr(built, name) for name in _API):
                _module, _error = built, None
        else:
            try:
                _module, _error = _jit_build(), None
            except Exception as jit_exc:  # noqa: BLE001 (reported by status(), never raised)
                _error = f"alsals_fused._host is not built and its JIT build failed: {jit_exc}"
    return _module


def module() -> Optional[Any]:
    """The helper module, or None when it is not built or ``ALSALS_FUSED_PYTHON_READS`` is set.

    The driver asks when it builds a parameter plan or a sample of watched gradients (and for
    RNG snapshots before its first plan) and passes the answer on: reading ``os.environ`` runs
    tens of microseconds of cold Python right after a backward."""
    return None if _disabled() else _load()


def grad_reader_class() -> Optional[Any]:
    """``GradReader`` of the helper, or None when it is not built or is disabled."""
    native = module()
    return None if native is None else native.GradReader


def status() -> str:
    """How the plan reads gradients here, in words (benchmarks and the GPU suite report it)."""
    if _disabled():
        return f"python ({_ENV} is set)"
    module = _load()
    if module is None:
        return f"python ({_error})"
    return f"native ({module.__name__})"
