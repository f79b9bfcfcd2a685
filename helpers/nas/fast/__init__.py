"""The fast child engine (CPU, fp32): hand-written C kernels (``kernels.c``) and the Python around them.

* :mod:`.kernels`: the C source as package data, its compilation (cached under
  ``$RLMED_CACHE/nas_kernels``) and the ctypes calls, split over two threads.
* :mod:`.engine`: a child's parameters in the kernels' layouts, its training step and logits.
* :mod:`.runtime`: PyTorch on one thread and glibc keeping large blocks while the engine runs.

Why it is built this way, and what it measured: ``benchmarks/README.md``.
"""
# The engine module is imported by helpers.nas.children (it needs helpers.nas.dropout, which needs
# the kernels): importing only the kernels here keeps that order free of cycles.
from .kernels import KERNEL_SIZES, NCMAX, Kernels, get_kernels, kernel_source, kernels_available

__all__ = ["KERNEL_SIZES", "NCMAX", "Kernels", "get_kernels", "kernel_source", "kernels_available"]
