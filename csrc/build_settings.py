"""Build settings of the C++/CUDA extension ``alsals_fused._C`` and of the C++ host helper
``alsals_fused._host``: the one place that names their sources, the target architectures and
the flags.

Used by setup.py and by the JIT builds (``alsals_fused._source_tree``), which both load
this file by its path (it is not a package module, and nothing edits ``sys.path``), and read by
CMakeLists.txt (the ``SOURCES = (...)`` and ``ARCHS = (...)`` lines, so keep each on one line).
Free of torch imports: setup.py loads it before deciding anything.

Environment knobs:

- ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit; when unset, ``find_cuda_home`` looks for it (the
  ``nvcc`` on PATH, following symlinks and wrapper scripts, then /usr/local/cuda).
- ``TORCH_CUDA_ARCH_LIST``: torch's own (e.g. "8.0;9.0"); when unset we pass -gencode for ARCHS
  ourselves and torch adds nothing.
- ``ALSALS_FUSED_PTXAS_VERBOSE=1``: -Xptxas -v (registers and spills per kernel in the log).
- ``ALSALS_FUSED_LINEINFO=1``: -lineinfo for profilers.
"""
from __future__ import annotations

import os
import re
import shutil
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
SOURCES = ("alsals_ops.cpp", "kernels.cu")  # relative to csrc/
ARCHS = ("80", "90")  # compute capabilities: sm_80 (A100), sm_90 (H100, H200)
HEADERS = ("alsals_layout.h", "alsals_math.h", "passes.h")
# alsals_fused._host (host_ext.py): C++ with torch's headers, no CUDA, built with any torch.
HOST_SOURCES = ("host_reader.cpp",)

# Headers torch's CUDA headers include (ATen/cuda/CUDAContext.h) that a bare toolkit may lack;
# pip's CUDA wheels (site-packages/nvidia/*/include) have them.
LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")


def sources(absolute: bool = False) -> List[str]:
    """The sources, relative to the repository root (setup.py's working directory) or absolute."""
    return [str(CSRC / s) if absolute else f"csrc/{s}" for s in SOURCES]


def arch_list() -> str:
    """ARCHS in torch's TORCH_CUDA_ARCH_LIST spelling ("8.0;9.0")."""
    return ";".join(f"{a[:-1]}.{a[-1]}" for a in ARCHS)


# ---- the toolkit --------------------------------------------------------------------------
def is_toolkit(path: Optional[Path]) -> bool:
    return path is not None and (path / "bin" / "nvcc").exists() and (path / "include" / "cuda_runtime.h").is_file()


def _toolkit_of_nvcc(nvcc: str) -> Optional[Path]:
    """The toolkit an ``nvcc`` belongs to: its real location's parent, or, for a wrapper script
    (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the toolkit of the nvcc it runs."""
    real = Path(os.path.realpath(nvcc))
    if is_toolkit(real.parent.parent):
        return real.parent.parent
    try:
        with open(real, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for match in re.finditer(rb"(/[^\s'\"$;|&]+)/bin/nvcc\b", head):
        home = Path(os.path.realpath(match.group(1).decode(errors="replace")))
        if is_toolkit(home):
            return home
    return None


def find_cuda_home() -> Optional[Path]:
    """CUDA_HOME or CUDA_PATH if set; else the toolkit behind the ``nvcc`` on PATH; else
    /usr/local/cuda or the newest /usr/local/cuda-*.  None if there is none."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return Path(os.environ[key])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home is not None:
            return home
    candidates = [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    return next((Path(os.path.realpath(c)) for c in candidates if is_toolkit(c)), None)


def ensure_cuda_home() -> Optional[Path]:
    """Sets CUDA_HOME for torch.utils.cpp_extension (which reads it once, at import) when neither
    CUDA_HOME nor CUDA_PATH is set: torch's own guess takes the parent of the ``bin`` holding
    the first nvcc on PATH, which for a wrapper script in /usr/local/bin is /usr/local (no CUDA
    headers there, so pip's copies would be used).  Call before importing cpp_extension."""
    home = find_cuda_home()
    if home is not None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        os.environ["CUDA_HOME"] = str(home)
    return home


def _pip_include_dirs() -> List[str]:
    found: List[str] = []
    for key in ("purelib", "platlib"):
        nvidia = Path(sysconfig.get_paths()[key]) / "nvidia"
        if nvidia.is_dir():
            for inc in sorted(nvidia.glob("*/include")):
                if str(inc) not in found:
                    found.append(str(inc))
    return found


def include_dirs() -> List[str]:
    """csrc/, then the toolkit's include/ (so its headers win over any other copy), then pip's
    nvidia/*/include only when the toolkit lacks headers torch includes (cusparse.h ...), and only
    the folders that supply them.  torch appends its own include dirs after these."""
    dirs = [str(CSRC)]
    home = find_cuda_home()
    toolkit_inc = home / "include" if home is not None else None
    if toolkit_inc is not None and toolkit_inc.is_dir():
        dirs.append(str(toolkit_inc))
    missing = [h for h in LIBRARY_HEADERS if toolkit_inc is None or not (toolkit_inc / h).is_file()]
    for inc in _pip_include_dirs():
        if any((Path(inc) / h).is_file() for h in missing):
            dirs.append(inc)
    return dirs


# ---- flags --------------------------------------------------------------------------------
def gencode_flags() -> List[str]:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []  # torch turns the list into -gencode flags itself
    flags: List[str] = []
    for arch in ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def nvcc_flags(gencode: bool = True) -> List[str]:
    # No -std: torch's build adds the dialect its headers need (C++17 up to 2.x, C++20 in 2.14);
    # the kernels need C++17 (if constexpr), nvcc's default.
    # --fmad=false: no FMA contraction, so every fp32 element-wise update rounds after each
    # operation as the host emulation test (-ffp-contract=off) computes it; the explicit
    # correctly rounded intrinsics are unaffected (docs/algorithm.md section 5).
    flags = ["-O3", "--fmad=false"] + (gencode_flags() if gencode else [])
    if os.environ.get("ALSALS_FUSED_PTXAS_VERBOSE"):
        flags += ["-Xptxas", "-v"]
    if os.environ.get("ALSALS_FUSED_LINEINFO"):
        flags.append("-lineinfo")
    # No --use_fast_math: the passes rely on IEEE division and sqrt (they must match the reference
    # within fp32 rounding and recompute d bit-identically between passes).
    return flags


def cxx_flags() -> List[str]:
    return ["-O3"]


def extension_kwargs() -> Dict[str, object]:
    """Keyword arguments of torch.utils.cpp_extension.CUDAExtension (besides the name)."""
    return {
        "sources": sources(),
        "include_dirs": include_dirs(),
        "depends": [f"csrc/{h}" for h in HEADERS],
        "extra_compile_args": {"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    }


def host_extension_kwargs() -> Dict[str, object]:
    """Keyword arguments of torch.utils.cpp_extension.CppExtension for alsals_fused._host."""
    return {"sources": [f"csrc/{s}" for s in HOST_SOURCES], "extra_compile_args": {"cxx": cxx_flags()}}


def jit_kwargs() -> Dict[str, object]:
    """Keyword arguments of torch.utils.cpp_extension.load (besides the name)."""
    return {
        "sources": sources(absolute=True),
        "extra_include_paths": include_dirs(),
        "extra_cflags": cxx_flags(),
        # No -gencode: torch compiles for the GPU it sees (or TORCH_CUDA_ARCH_LIST).
        "extra_cuda_cflags": nvcc_flags(gencode=False),
    }


if __name__ == "__main__":  # for scripts: the settings as shell-readable lines
    print(f"SOURCES={' '.join(sources())}")
    print(f"ARCHS={' '.join(ARCHS)}")
    print(f"TORCH_CUDA_ARCH_LIST={arch_list()}")
    print(f"CUDA_HOME={find_cuda_home() or ''}")
