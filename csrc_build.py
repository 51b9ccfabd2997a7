"""Build settings of the C++/CUDA extension ``alsals_fused._C``, shared by setup.py and the JIT path.

Kept free of torch imports at module level so that setup.py can import it before deciding
anything.  Environment knobs:

- ``TORCH_CUDA_ARCH_LIST``: torch's own (e.g. "8.0;9.0"); when unset we add -gencode for sm_80
  and sm_90 ourselves (A100, H100/H200) and torch adds nothing.
- ``ALSALS_FUSED_PTXAS_VERBOSE=1``: pass -Xptxas -v (registers and spills per kernel in the log).
- ``ALSALS_FUSED_LINEINFO=1``: -lineinfo for profilers.
"""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["csrc/alsals_ops.cpp", "csrc/kernels.cu"]
DEFAULT_ARCHS = ("80", "90")


def sources(absolute: bool = False) -> List[str]:
    return [str(ROOT / s) if absolute else s for s in SOURCES]


def _cuda_home() -> Optional[Path]:
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return Path(os.environ[key])
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(os.path.realpath(nvcc)).parent.parent
    return None


# Headers torch's CUDA headers include that a minimal toolkit may not ship.
_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")


def _extra_include_dirs() -> List[str]:
    """pip's nvidia/*/include dirs, only when the toolkit lacks headers torch includes (cusparse.h...).

    With a full toolkit nothing is added, so its headers are never shadowed by another version.
    """
    home = _cuda_home()
    if home is not None and all((home / "include" / h).is_file() for h in _LIBRARY_HEADERS):
        return []
    found: List[str] = []
    for key in ("purelib", "platlib"):
        nvidia = Path(sysconfig.get_paths()[key]) / "nvidia"
        if not nvidia.is_dir():
            continue
        for inc in sorted(nvidia.glob("*/include")):
            if str(inc) not in found:
                found.append(str(inc))
    return found


def gencode_flags() -> List[str]:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch turns the list into -gencode flags itself
    flags: List[str] = []
    for arch in DEFAULT_ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def nvcc_flags(gencode: bool = True) -> List[str]:
    # No -std: torch's build adds the dialect its headers need (C++17 up to 2.x, C++20 in 2.14);
    # the kernels need C++17 (if constexpr), nvcc's default.
    flags = ["-O3"] + (gencode_flags() if gencode else [])
    if os.environ.get("ALSALS_FUSED_PTXAS_VERBOSE"):
        flags += ["-Xptxas", "-v"]
    if os.environ.get("ALSALS_FUSED_LINEINFO"):
        flags.append("-lineinfo")
    # No --use_fast_math: the passes rely on IEEE division and sqrt (they must match the reference
    # within fp32 rounding and recompute d bit-identically between passes).
    return flags


def cxx_flags() -> List[str]:
    return ["-O3"]


def include_dirs(absolute: bool = True) -> List[str]:
    return [str(CSRC) if absolute else "csrc"] + _extra_include_dirs()


def extension_kwargs() -> Dict[str, object]:
    """Keyword arguments of torch.utils.cpp_extension.CUDAExtension (besides the name)."""
    return {
        "sources": sources(),
        "include_dirs": include_dirs(),
        "extra_compile_args": {"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    }


def jit_kwargs() -> Dict[str, object]:
    """Keyword arguments of torch.utils.cpp_extension.load (besides the name)."""
    return {
        "sources": sources(absolute=True),
        "extra_include_paths": include_dirs(),
        "extra_cflags": cxx_flags(),
        # No -gencode: torch compiles for the GPU it sees (or TORCH_CUDA_ARCH_LIST).
        "extra_cuda_cflags": nvcc_flags(gencode=False),
    }
