"""Triton kernels of the fused ALSALS passes (installed as ``alsals_fused.triton_kernels``).

``kernels`` holds the kernels, their launch configuration and the list of every specialization
the backend launches; ``aot`` compiles that list ahead of time (``python -m
alsals_fused.triton_kernels.aot --arch 80 90``).
"""
from .kernels import (  # noqa: F401
                      BLOCK,
                      COMPILE_OPTIONS,
                      FINISH_CTL,
                      FINISH_NONE,
                      FINISH_SUM,
                      FINISHERS,
                      ITERS,
                      KERNELS,
                      NUM_WARPS,
                      VERDICT_WARPS,
                      grad_kernel,
                      move_kernel,
                      specializations,
                      step_kernel,
                      verdict_kernel,
)
