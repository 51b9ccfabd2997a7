"""Packaging for alsals-fused.

``pip install -e .`` installs the pure-Python package (reference, foreach and Triton backends).
``pip install --no-build-isolation -e .`` also builds, with the torch of the environment:

- ``alsals_fused._host``, the C++ host helper (``csrc/host_reader.cpp``; any torch, CPU or
  CUDA: the parameter plan's per-step gradient read);
- ``alsals_fused._C``, the C++/CUDA extension, when that torch is a CUDA build and a CUDA
  toolkit is found.

Whatever it skips, it says why and installs the rest.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# triton_kernels/ ships inside our package: a top-level "triton_kernels" would shadow the module
# of that name that the Triton project publishes.
PACKAGES = ["alsals_fused", "alsals_fused.backends", "alsals_fused.examples", "alsals_fused.integrations",
            "alsals_fused.triton_kernels"]
PACKAGE_DIR = {"alsals_fused.triton_kernels": "triton_kernels"}


def _build_settings():
    """csrc/build_settings.py, loaded by its path (the build settings live with the sources)."""
    path = os.path.join(HERE, "csrc", "build_settings.py")
    spec = importlib.util.spec_from_file_location("alsals_fused_build_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_build():
    """(ext_modules, cmdclass, [what was skipped and why])."""
    if os.environ.get("ALSALS_FUSED_SKIP_EXTENSION"):
        return [], {}, ["the C++ host helper and the C++/CUDA extension: ALSALS_FUSED_SKIP_EXTENSION is set"]
    settings = _build_settings()
    # Before torch.utils.cpp_extension is imported: it fixes CUDA_HOME at import, and its own
    # guess is wrong when the nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc).
    settings.ensure_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # build isolation hides torch: the common, pure-Python case
        return [], {}, [f"the C++ host helper and the C++/CUDA extension: torch is not importable "
                        f"at build time ({exc.__class__.__name__}); use pip install "
                        "--no-build-isolation to build them"]
    ext_modules, skipped = [], []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        skipped.append(f"the C++ host helper: no C++ compiler ({cxx!r} is not on PATH; set CXX)")
    else:
        print("alsals-fused: building the C++ host helper alsals_fused._host", file=sys.stderr)
        ext_modules.append(CppExtension(name="alsals_fused._host", **settings.host_extension_kwargs()))
    if torch.version.cuda is None:
        skipped.append(f"the C++/CUDA extension: torch {torch.__version__} is a CPU build")
    elif CUDA_HOME is None or not settings.is_toolkit(settings.Path(CUDA_HOME)):
        skipped.append(f"the C++/CUDA extension: no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r}; "
                       "looked for nvcc on PATH and /usr/local/cuda; set CUDA_HOME to the toolkit)")
    else:
        print(f"alsals-fused: building the C++/CUDA extension with the toolkit at {CUDA_HOME}",
              file=sys.stderr)
        ext_modules.append(CUDAExtension(name="alsals_fused._C", **settings.extension_kwargs()))
    return ext_modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}, skipped


ext_modules, cmdclass, skipped = _extension_build()
for what in skipped:
    print(f"alsals-fused: skipping {what}. The reference, foreach and triton backends are installed.",
          file=sys.stderr)

setup(
    name="alsals-fused",
    version="0.1.0",
    description="ALSALS (ADAM with momentum + stochastic Armijo line search), fused for PyTorch",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "demo": ["matplotlib", "prodigyopt>=1.1"],
        # The learning-rate-free optimizers the quality harness compares against are test
        # dependencies: CI's smoke subset runs them.
        # scikit-learn: its bundled 8x8 digits are the data of three quality workloads.
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib", "lightning>=2.4", "transformers>=4.46",
                 "accelerate>=1.0", "prodigyopt>=1.1", "schedulefree>=1.4", "dadaptation>=3.2",
                 "scikit-learn>=1.3"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
