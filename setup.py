"""Packaging for alsals-fused.

``pip install -e .`` installs the pure-Python package (reference, foreach and Triton backends).
``pip install -e . --no-build-isolation`` also builds the C++/CUDA extension ``alsals_fused._C``
when the environment has a CUDA build of torch and a CUDA toolkit; otherwise it says why it
skipped it and installs the rest.
"""
import os
import sys

from setuptools import setup

# triton_kernels/ ships inside our package: a top-level "triton_kernels" would shadow the module
# of that name that the Triton project publishes.
PACKAGES = ["alsals_fused", "alsals_fused.backends", "alsals_fused.integrations", "alsals_fused.triton_kernels"]
PACKAGE_DIR = {"alsals_fused.triton_kernels": "triton_kernels"}


def _extension_build():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with the reason printed."""
    if os.environ.get("ALSALS_FUSED_SKIP_EXTENSION"):
        return [], {}, "ALSALS_FUSED_SKIP_EXTENSION is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # build isolation hides torch: the common, pure-Python case
        return [], {}, f"torch is not importable at build time ({exc.__class__.__name__}); " \
                       "use pip install --no-build-isolation to build it"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return [], {}, "no CUDA toolkit found (set CUDA_HOME)"
    from csrc_build import extension_kwargs  # noqa: E402  (lives next to this file)
    ext = CUDAExtension(name="alsals_fused._C", **extension_kwargs())
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ext_modules, cmdclass, skipped = _extension_build()
if skipped:
    print(f"alsals-fused: skipping the C++/CUDA extension: {skipped}. "
          "The reference, foreach and triton backends are installed.", file=sys.stderr)

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
        "demo": ["matplotlib"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib", "lightning>=2.4", "transformers>=4.46", "accelerate>=1.0"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
