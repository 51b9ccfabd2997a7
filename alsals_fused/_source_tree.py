"""The C++/CUDA sources of a source checkout (``csrc/``) and their build settings, for the two
JIT builds (``backends/cuda_backend.py``: the CUDA extension; ``host_ext.py``: the host helper).

``csrc/build_settings.py`` is loaded by its path: it lives with the sources it builds and is not
a package module (setup.py loads it the same way).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def build_settings() -> ModuleType:
    """csrc/build_settings.py, loaded by its path; ImportError without a source checkout."""
    path = CSRC / "build_settings.py"
    if not path.is_file():
        raise ImportError(f"ALSALS_FUSED_JIT=1 but {path} does not exist (the JIT build needs a "
                          "source checkout)")
    spec = importlib.util.spec_from_file_location("alsals_fused_build_settings", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
