"""Triton kernels of the fused ALSALS passes (installed as ``alsals_fused.triton_kernels``).

``kernels`` holds the kernels, their launch configuration and the list of every specialization
the backend launches; ``aot`` compiles that list ahead of time (``python -m
alsals_fused.triton_kernels.aot --arch 80 90``).
"""
from .kernels import (BLOCK, FINISH_BLOCK, FINISH_WARPS, ITERS, KERNELS, MODE_FALLBACK,  # noqa: F401
                      MODE_GRAD, MODE_MOMENTUM, NUM_WARPS, TABLE_COLS, finish_kernel,
                      grad_sumsq_kernel, move_kernel, specializations, step_kernel)
