"""The C++/CUDA sources of a source checkout (``csrc/``) and their build settings, for the two
JIT builds (``backends/cuda_backend.py``: the CUDA extension; ``host_ext.py``: the host helper),
and where such a build lands.

``csrc/build_settings.py`` is loaded by its path: it lives with the sources it builds and is not
a package module (setup.py loads it the same way).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, Optional

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


def _build_root() -> Path:
    """Where ``torch.utils.cpp_extension.load`` builds: $TORCH_EXTENSIONS_DIR, else torch's
    default root with its ``py<ver>_<cu|cpu>`` folder (torch's layout, without creating it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    cu = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{cu}"


def finished_jit_build(name: str, depends: Iterable[Path]) -> Optional[ModuleType]:
    """The module of a JIT build of ``name`` that completed earlier (in another process, e.g. a
    GPU-suite phase that was then cut), imported from torch's build folder; None when there is
    none, when it is older than any file in ``depends`` (the sources changed since) or when it
    does not import.  Compiles nothing, so it serves ``ALSALS_FUSED_JIT`` unset or 0 too."""
    path = _build_root() / name / f"{name}.so"
    try:
        built = path.stat().st_mtime
        if any(Path(d).stat().st_mtime > built for d in depends):
            return None
    except OSError:
        return None
    import importlib.machinery
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except ImportError:       # a link cut short, another torch: not usable
        return None
    return module
