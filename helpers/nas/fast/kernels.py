"""The fast engine's C kernels (``kernels.c`` beside this file): compiled on first use, called via ctypes.

The source ships as package data and is read with :mod:`importlib.resources`. It is compiled with
the system C compiler (``$CC``, else ``gcc``/``cc``; AVX-512) into ``$RLMED_CACHE/nas_kernels``,
keyed by the source, flags, compiler and machine, so an edited kernel is rebuilt. Without a
compiler or AVX-512, or with ``RLMED_NAS_KERNELS=0``, :func:`get_kernels` returns None and the
fast engine uses PyTorch ops instead (same results within rounding).
"""
from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ...models.nas_child import dropout_scale, keep_threshold

__all__ = ["KERNEL_SIZES", "NCMAX", "kernel_source", "Kernels", "get_kernels", "kernels_available",
           "check_contiguous", "ptr"]

KERNEL_SIZES = (1, 3, 5, 7)   # specialised in the C source; other sizes use the PyTorch path
NCMAX = 11                    # the fused head handles up to this many classes (MedMNIST 2D single-label: <= 11)
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fno-math-errno", "-shared",
           "-fPIC"]
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
_lock = threading.Lock()
_state: dict[str, Any] = {}


def kernel_source() -> str:
    """The C source of the kernels (package data ``helpers/nas/fast/kernels.c``)."""
    return resources.files(__package__).joinpath("kernels.c").read_text(encoding="utf-8")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_contiguous(*tensors) -> None:
    for t in tensors:
        if t is not None and (not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError("NAS kernels need contiguous CPU tensors")


def ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _no_grad_call(fn, *args):
    with torch.no_grad():   # grad mode is per thread: worker threads start with it on
        return fn(*args)


class Kernels:
    """The compiled fused-layer kernels, called on two batch halves in two threads.

    ``lib`` holds the raw C functions (``nas_fwd``, ``nas_bwd``, ``nas_uniform16``,
    ``nas_cross_entropy``, ``nas_adam``, ``nas_head_grad``; see ``kernels.c`` for their layouts).
    """

    def __init__(self, lib: ctypes.CDLL):
        P, I64, U64, I, Fl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_float
        lib.nas_fwd.argtypes = [P, P, I64, I64, I64, I, I, I, I, I, P, P, I, U64, U64, I, I, Fl, P, P, P, I, P]
        lib.nas_fwd.restype = None
        lib.nas_bwd.argtypes = [P, P, I64, I64, I64, I, I, I, I, I, P, P, P, I, P, Fl, I, P, P]
        lib.nas_bwd.restype = ctypes.c_int
        lib.nas_uniform16.argtypes = [U64, U64, I64, P]
        lib.nas_uniform16.restype = None
        lib.nas_cross_entropy.argtypes = [P, P, P, I64, I, P, P]
        lib.nas_cross_entropy.restype = ctypes.c_double
        lib.nas_adam.argtypes = [P, P, P, P, P, I64, Fl, Fl, Fl, Fl, Fl]
        lib.nas_adam.restype = None
        lib.nas_head_grad.argtypes = [P, P, I64, I, I64, I64, I64, I64, I64, P]
        lib.nas_head_grad.restype = None
        self.lib = lib
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nas_kernel")
        self.threads = 2

    def with_threads(self, threads: int) -> "Kernels":
        """The same kernels splitting work over ``threads`` (1 or 2) threads."""
        view = copy.copy(self)
        view.threads = threads
        return view

    def _halves(self, fn, n: int, make_args) -> None:
        """Run ``fn(*make_args(h, n0, n1))`` on the two batch halves (in two threads if ``self.threads > 1``)."""
        cuts = ((0, 0, n // 2), (1, n // 2, n))
        if self.threads > 1 and n > 1:
            fut = self.pool.submit(_no_grad_call, fn, *make_args(*cuts[1]))
            fn(*make_args(*cuts[0]))
            fut.result()
        else:
            for cut in cuts:
                fn(*make_args(*cut))

    def parallel2(self, f0, f1) -> None:
        """Run ``f0()`` and ``f1()``, in two threads when allowed."""
        if self.threads > 1:
            fut = self.pool.submit(_no_grad_call, f1)
            f0()
            fut.result()
        else:
            f0()
            f1()

    def fwd_args(self, h, a, e, st, w_t, b, stream_ctr, p, out, code, hw, nc, logits):
        """Arguments of ``nas_fwd`` for rows [a, e) (``st``: the batch's geometry)."""
        drop = p > 0
        return (ptr(st["xpad"]), ptr(st["idx"]), len(st["idx"]), a, e, st["cin"], st["P"], st["off"], st["k"],
                st["s2"], ptr(w_t), ptr(b), w_t.shape[1], st["key"], stream_ctr, int(drop),
                keep_threshold(p) if drop else 0, dropout_scale(p) if drop else 1.0,
                ptr(out), ptr(code), ptr(hw), nc, ptr(logits))

    def forward(self, st, w_t, b, stream_ctr, p, out, code, hw=None, logits=None) -> None:
        """Fused first layer on the batch ``st``: activations ``out`` and ``code`` (blocked), and
        with head weights ``hw`` the logits accumulated into ``logits``."""
        check_contiguous(st["xpad"], st["idx"], w_t, b, out, code, hw, logits)
        nc = 0 if hw is None else hw.shape[1]
        self._halves(self.lib.nas_fwd, len(st["idx"]), lambda h, a, e: self.fwd_args(
            h, a, e, st, w_t, b, stream_ctr, p, out, code, hw, nc, logits))

    def bwd_args(self, h, a, e, st, dA, dl, hw, code, p, dw_parts, db_parts):
        nc = 0 if hw is None else hw.shape[1]
        return (ptr(st["xpad"]), ptr(st["idx"]), len(st["idx"]), a, e, st["cin"], st["P"], st["off"], st["k"],
                st["s2"],
                ptr(dA), ptr(dl), ptr(hw), nc, ptr(code), dropout_scale(p) if p > 0 else 1.0,
                dw_parts.shape[2], ptr(dw_parts[h]), ptr(db_parts[h]))

    def backward(self, st, dA, dl, hw, code, p, dw_parts, db_parts) -> None:
        """Weight and bias gradients of the fused layer, accumulated per half into ``dw_parts[h]``, ``db_parts[h]``."""
        check_contiguous(st["xpad"], st["idx"], dA, dl, hw, code, dw_parts, db_parts)
        self._halves(self.bwd, len(st["idx"]), lambda h, a, e: self.bwd_args(
            h, a, e, st, dA, dl, hw, code, p, dw_parts, db_parts))

    def bwd(self, *args) -> None:
        if self.lib.nas_bwd(*args) != 0:
            raise ValueError(f"NAS kernels support kernel sizes {KERNEL_SIZES}")


def _compile() -> Path:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) found")
    source = kernel_source()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([source, " ".join(_CFLAGS), cc, *version, platform.machine()])
                         .encode()).hexdigest()[:16]
    from ...config import cache_dir
    try:
        folder = cache_dir("nas_kernels")
    except OSError:
        folder = Path(tempfile.gettempdir()) / "rlmedbook_nas_kernels"
        folder.mkdir(parents=True, exist_ok=True)
    so = folder / f"nas_kernels_{key}.so"
    if so.is_file():
        return so
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "nas_kernels.c"
        src.write_text(source)
        out = Path(tmp) / so.name
        res = subprocess.run([cc, *_CFLAGS, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"compiling the NAS kernels failed:\n{res.stderr[-2000:]}")
        os.replace(out, so)   # atomic: concurrent builders end with the same file
    return so


def get_kernels() -> Kernels | None:
    """The kernels, compiled on first use; None where unavailable (the reason in kernels_available())."""
    with _lock:
        if "kernels" not in _state:
            kernels, why = None, ""
            if os.environ.get("RLMED_NAS_KERNELS", "1") == "0":
                why = "disabled by RLMED_NAS_KERNELS=0"
            elif platform.machine() not in ("x86_64", "AMD64"):
                why = f"not an x86-64 CPU ({platform.machine()})"
            elif not set(_REQUIRED_CPU_FLAGS) <= _cpu_flags():
                why = f"CPU lacks one of {_REQUIRED_CPU_FLAGS}"
            else:
                try:
                    kernels = Kernels(ctypes.CDLL(str(_compile())))
                except Exception as exc:  # no compiler, compile error, load error: fall back
                    why = f"{type(exc).__name__}: {exc}"
            _state.update(kernels=kernels, why=why)
        return _state["kernels"]


def kernels_available() -> tuple[bool, str]:
    """Whether the fast engine's C kernels can be used here, and if not, why."""
    k = get_kernels()
    return k is not None, _state.get("why", "")
