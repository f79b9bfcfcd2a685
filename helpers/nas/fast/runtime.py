"""Runtime settings of the fast engine on CPU: PyTorch's thread count and glibc's heap thresholds."""
from __future__ import annotations

import contextlib
import ctypes
import platform

import torch

__all__ = ["reuse_large_allocations", "torch_threads"]


@contextlib.contextmanager
def reuse_large_allocations(enabled: bool = True):
    """Keep freed large blocks in the heap (glibc ``mallopt``) so big tensors are not page-faulted
    in anew at every step; on exit, set glibc's usual steady-state values (32 MiB / 64 MiB)."""
    libc = None
    if enabled and platform.system() == "Linux":
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
            with contextlib.suppress(Exception):
                libc.malloc_trim(0)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``torch.set_num_threads(n)``, restoring the previous value.

    With the kernels the fast engine runs PyTorch's own (small) ops on one thread and splits the
    kernels over its own two threads: OpenMP threads that spin after every tiny op compete with the
    kernel threads, and on a shared machine one descheduled OpenMP thread stalls every op.
    """
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
