"""Child networks of the RLMedNAS search and the engine that trains and scores them.

An architecture (*arch*) is a list of per-layer dicts ``{"filters": f, "kernel": k, "dropout": d}``.
Each layer is ``Conv2d(k x k, padding k // 2) -> MaxPool2d(2) -> ReLU -> Dropout(d)``; after the
last layer the features are flattened into one ``Linear`` to the classes. One layer is the
RLMedNAS reference child ``Conv2d(1->f, k) -> ReLU -> MaxPool2d(2) -> Dropout(d) -> Linear(f*14*14
-> 11)``: max-pooling before the ReLU computes the same function with the same gradient (both are
monotone; a window whose maximum is <= 0 passes no gradient either way) on a 4x smaller tensor.
At 28 px with 11 classes a one-layer child has ``f * (k**2 + 2157) + 11`` parameters.

:func:`train_children` trains children (Adam, cross-entropy, no augmentation, data normalised as
``(x / 255 - 0.5) / 0.5``, ``drop_last`` batches) and scores them by accuracy on a validation
split. Two engines compute the same thing:

* ``engine="plain"``: one child at a time, a straightforward PyTorch loop over in-memory tensors
  (:class:`NASChild`, NCHW, ``torch.optim.Adam``); the reference for speed and for results.
* ``engine="fast"``: the same training, faster on CPU (see "Fast engine" below). For the same
  seeds and data order its validation accuracies and losses equal the plain engine's within
  float rounding (fp32; the convolution sums its terms in another order).

What a child's result depends on -- and nothing else:

* ``seeds[i]``: child ``i``'s initial weights (PyTorch's default ``Conv2d``/``Linear`` init, drawn
  from a per-child ``torch.Generator``) and its dropout masks (a per-child random stream, see
  :class:`DropoutStream`). So a child's result does not depend on the engine, on the other
  children in the call or on the global RNG.
* ``data_seed``: the order of the training images in every epoch (epoch ``e`` uses the ``e``-th
  ``torch.randperm`` of a ``torch.Generator`` seeded with ``data_seed``). It is the SAME for all
  children of one call: children evaluated together see the same batches, which is what lets
  them share the data pipeline; call once per child to give every child its own order.
* the training settings (``epochs``, ``batch_size``, ``lr``, ``max_train``, ``precision``) and the data.

Dropout masks: each layer with ``dropout = p > 0`` draws, per training step, one 16-bit uniform
per activation (in NHWC order) from the child's counter-based stream (splitmix64, see
:class:`DropoutStream`) and keeps an activation iff ``u >= round(p * 65536)``, scaling kept ones
by ``1 / (1 - p)`` (as ``nn.Dropout``). The keep probability is exact for p = 0.25 and 0.5 and
0.10000610 for p = 0.1 (``nn.Dropout`` compares with a float threshold, exact to ~1e-7). Both
engines use this mechanism, so they drop the same activations. (The stream is far cheaper than
``bernoulli_``, which costs ~16 % of a plain 128-filter step, so the plain engine is somewhat
faster than the same loop with ``nn.Dropout``.)

Fast engine (CPU, fp32; measured with ``benchmarks/nas_children.py``). One-layer children with
at most 11 classes (all of the RLMedNAS space) run a hand-written training step in a small C
library, compiled on first use with the system C compiler (``gcc``/``cc``, AVX-512; ~3 s, cached
under ``$RLMED_CACHE/nas_kernels``) and called through ``ctypes``:

* forward: the convolution of the four positions of every 2x2 pooling window is computed in
  registers (two windows at a time), then bias, maximum (first maximum on ties, as ``MaxPool2d``),
  ReLU, the dropout mask (its splitmix64 words computed in the kernel) and the head's logits
  (accumulated from the registers), writing only the pooled activations and a 1-byte code of the
  winning position, channel-blocked by 16 so that writes are sequential and a block of head
  weights stays in L2 while the images stream by. The full-size convolution output never exists.
* backward: the gradient of each activation is formed from the logits' gradient and the head
  weights, masked by the code, and the weight/bias gradients are accumulated tap by tap, a
  two-source vector permute picking each lane's winning input pixel (only 1/4 of the dense
  convolution's multiply-adds). The full-size gradient never exists either.
* loss (cross-entropy), the head's weight gradient (a small matmul over the stored activations)
  and Adam (the formula of ``torch.optim.Adam``) are C loops too. Inside the kernels denormals are
  flushed to zero (FTZ/DAZ, restored on return): a confident softmax yields ~1e-40 gradients whose
  microcode assists otherwise slow every kernel; their contribution is far below float rounding.
* threads: PyTorch runs on one thread while the engine trains and no PyTorch op runs in the
  engine's own threads (OpenMP/MKL threads spin after every small op and then steal the cores
  from the kernels; on a shared machine one descheduled OpenMP thread stalls every op). The
  engine's two threads split one child's step in two batch halves (always two, so results do not
  depend on the thread count), or -- when a call has several children (``workers``) -- train two
  children at once, one per thread.
* data are normalised and zero-padded once (and kept for the next call on the same splits);
  batches are index lists into them. Large tensors reuse freed memory (glibc ``mallopt``, restored
  afterwards) instead of being page-faulted in at every step.
* children with more layers (or more classes) use autograd: the first layer through the same
  kernels, deeper layers as PyTorch ops in channels_last, the head with its weights in (h, w, c)
  order (a permutation of the plain child's (c, h, w) weights: exact).
* without a C compiler or AVX-512 (or with ``RLMED_NAS_KERNELS=0``) the fast engine uses PyTorch
  ops for every layer (same results within rounding, slower).

Not used, as they did not pay here: concatenating children along channels into one convolution
(the kernels' speed does not depend on the channel count, so children only share the data),
``torch.compile`` of the fused pooling/dropout (inductor emitted scalar loops for the mixed
int16/uint8/float kernel, slower than eager PyTorch), bf16 autocast (the fp32 kernels are faster
than mkldnn's bf16 convolution, and fp32 keeps the numbers of the plain engine).

``precision="bf16"`` runs the PyTorch ops under ``torch.autocast(bfloat16)`` (plain: the whole
child; fast: the PyTorch path for every layer). It changes the numbers; the benchmark's ``--bf16``
reports whether the ranking of architectures holds.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import register_model

__all__ = [
    "ENGINES", "PRECISIONS", "normalize_arch", "child_params", "child_flops", "NASChild", "nas_child",
    "DropoutStream", "keep_threshold", "train_children", "ChildCache", "kernels_available", "clear_data_cache",
]

ENGINES = ("plain", "fast")
PRECISIONS = ("fp32", "bf16")
_ARCH_KEYS = ("filters", "kernel", "dropout")


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------

def normalize_arch(arch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Validated copy of an arch: a list of ``{"filters": int, "kernel": odd int, "dropout": float}``.

    A single dict is taken as a one-layer arch.
    """
    layers = [arch] if isinstance(arch, Mapping) else list(arch)
    if not layers:
        raise ValueError("an arch needs at least one layer")
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise TypeError(f"layer {i} of the arch must be a dict, got {type(layer).__name__}")
        keys = set(layer)
        if keys != set(_ARCH_KEYS):
            raise ValueError(f"layer {i} must have exactly the keys {list(_ARCH_KEYS)}; got {sorted(keys)}")
        f, k, d = layer["filters"], layer["kernel"], layer["dropout"]
        if int(f) != f or f < 1:
            raise ValueError(f"layer {i}: filters must be a positive integer, got {f!r}")
        if int(k) != k or k < 1 or k % 2 == 0:
            raise ValueError(f"layer {i}: kernel must be a positive odd integer, got {k!r}")
        if not 0.0 <= float(d) < 1.0:
            raise ValueError(f"layer {i}: dropout must be in [0, 1), got {d!r}")
        out.append({"filters": int(f), "kernel": int(k), "dropout": float(d)})
    return out


def _sides(arch: Sequence[Mapping], image_size: int) -> list[int]:
    """Input side of every layer plus the final side (each layer halves it, flooring)."""
    sides = [int(image_size)]
    for _ in arch:
        sides.append(sides[-1] // 2)
    if sides[-1] < 1:
        raise ValueError(f"{len(arch)} pooling layers do not fit {image_size}px images")
    return sides


def child_params(arch, in_chans: int = 1, num_classes: int = 11, image_size: int = 28) -> int:
    """Number of parameters of :class:`NASChild` (one layer at 28 px, 11 classes: ``f*(k**2+2157)+11``)."""
    arch = normalize_arch(arch)
    sides = _sides(arch, image_size)
    total, prev = 0, in_chans
    for layer in arch:
        f, k = layer["filters"], layer["kernel"]
        total += prev * k * k * f + f
        prev = f
    return total + prev * sides[-1] ** 2 * num_classes + num_classes


def child_flops(arch, in_chans: int = 1, num_classes: int = 11, image_size: int = 28) -> dict:
    """Multiply-add FLOPs (2 per MAC) per image of the convolutions and the linear head.

    ``fwd``: forward; ``bwd``: backward (weight gradients of every layer, input gradients of all
    but the first layer); ``train = fwd + bwd`` per training image. Pooling, ReLU, dropout, the loss
    and the optimizer are not counted.
    """
    arch = normalize_arch(arch)
    sides = _sides(arch, image_size)
    fwd = bwd = 0
    prev = in_chans
    for i, layer in enumerate(arch):
        f, k = layer["filters"], layer["kernel"]
        conv = 2 * sides[i] ** 2 * prev * k * k * f
        fwd += conv
        bwd += conv * (1 if i == 0 else 2)
        prev = f
    head = 2 * prev * sides[-1] ** 2 * num_classes
    fwd += head
    bwd += 2 * head
    return {"fwd": fwd, "bwd": bwd, "train": fwd + bwd}


def keep_threshold(p: float) -> int:
    """int16 threshold: an activation is kept iff its 16-bit uniform ``u >= keep_threshold(p)``."""
    return int(round(float(p) * 65536)) - 32768


def _dropout_scale(p: float) -> float:
    """``1 / (1 - p)`` rounded to float32 (the factor both engines multiply kept activations by)."""
    return float(np.float32(1.0 / (1.0 - float(p))))


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


def _uniform_words_numpy(key: int, ctr: int, nwords: int) -> np.ndarray:
    """Words ``ctr .. ctr+nwords-1`` of the splitmix64 stream ``key`` (uint64; wraps like C)."""
    i = np.arange(ctr + 1, ctr + nwords + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + i * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        return z ^ (z >> np.uint64(31))


def _signed64(c: int) -> int:
    """The int64 with the same bits as the uint64 ``c``."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _uniform_words_torch(key: int, ctr: int, nwords: int, device: str | torch.device) -> torch.Tensor:
    """:func:`_uniform_words_numpy` computed by PyTorch on ``device`` (an int64 tensor, same bits).

    Used when children train on a GPU, so dropout masks are made where they are used rather than
    on the host and copied every step. int64 products wrap like uint64 ones; right shifts are made
    logical by masking off the sign-extended bits.
    """
    def shr(z: torch.Tensor, k: int) -> torch.Tensor:
        return (z >> k) & ((1 << (64 - k)) - 1)

    i = torch.arange(ctr + 1, ctr + nwords + 1, dtype=torch.int64, device=device)
    z = i * _signed64(_GOLDEN) + _signed64(key)
    z = (z ^ shr(z, 30)) * _signed64(_MIX1)
    z = (z ^ shr(z, 27)) * _signed64(_MIX2)
    return z ^ shr(z, 31)


def _uniform_words(key: int, ctr: int, nwords: int) -> np.ndarray:
    kernels = _get_kernels()
    if kernels is None:
        return _uniform_words_numpy(key, ctr, nwords)
    out = np.empty(nwords, dtype=np.uint64)
    kernels.lib.nas_uniform16(key, ctr, nwords, out.ctypes.data)
    return out


class DropoutStream:
    """A child's dropout randomness: a counter-based splitmix64 stream keyed by the child seed.

    Word ``i`` is ``mix64(key + (i + 1) * golden)`` (splitmix64); a draw of ``n`` 16-bit uniforms
    takes the next ``ceil(n / 4)`` words, element ``e`` being 16-bit lane ``e % 4`` of word
    ``e // 4``. Every engine draws, per training step and per layer with dropout, ``N*H*W*C``
    values (NHWC order) in layer order, so the same seed gives the same masks whatever the engine;
    the fast engine's kernel computes the same words itself from ``(key, counter)``.
    """

    _TAG = 0x4E41534444524F50  # "NASDROP": keeps this stream apart from other uses of the seed

    def __init__(self, seed: int):
        self.key = _mix64((int(seed) & _U64) ^ self._TAG)
        self.counter = 0

    def take(self, n: int) -> int:
        """Reserve the words of ``n`` uniforms; returns the first word's index."""
        start = self.counter
        self.counter += (n + 3) // 4
        return start

    def int16(self, n: int, device: str | torch.device | None = None) -> torch.Tensor:
        """The next ``n`` uniform int16 values, on ``device`` (default: the CPU).

        On a GPU the words are computed there (:func:`_uniform_words_torch`); the values are the
        same bits on every device.
        """
        nwords = (n + 3) // 4
        if device is not None and torch.device(device).type != "cpu":
            return _uniform_words_torch(self.key, self.take(n), nwords, device).view(torch.int16)[:n]
        words = _uniform_words(self.key, self.take(n), nwords)
        return torch.from_numpy(words.view(np.int16)[:n])


class ChildDropout(nn.Module):
    """Dropout whose masks come from a :class:`DropoutStream` when one is attached (else ``F.dropout``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.stream: DropoutStream | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.stream is None:
            return F.dropout(x, self.p, True)
        n, c, h, w = x.shape
        u = self.stream.int16(n * h * w * c, x.device).view(n, h, w, c).permute(0, 3, 1, 2)
        return torch.where(u >= keep_threshold(self.p), x * _dropout_scale(self.p), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class NASChild(nn.Module):
    """The child network of an arch (see the module docstring); ``seed`` fixes its initial weights.

    Without ``seed`` the weights come from the global RNG (as for any ``nn.Module``).
    """

    def __init__(self, arch, in_chans: int = 1, num_classes: int = 11, image_size: int = 28,
                 seed: int | None = None):
        super().__init__()
        self.arch = normalize_arch(arch)
        self.in_chans, self.num_classes, self.image_size = in_chans, num_classes, image_size
        sides = _sides(self.arch, image_size)
        layers: list[nn.Module] = []
        prev = in_chans
        for layer in self.arch:
            f, k = layer["filters"], layer["kernel"]
            layers += [nn.Conv2d(prev, f, k, padding=k // 2), nn.MaxPool2d(2), nn.ReLU(),
                       ChildDropout(layer["dropout"])]
            prev = f
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev * sides[-1] ** 2, num_classes)
        if seed is not None:
            self.init_(seed)

    def init_(self, seed: int) -> "NASChild":
        """Re-draw all weights as PyTorch's default init does, from ``torch.Generator(seed)``."""
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    w = torch.empty(m.weight.shape).uniform_(-bound, bound, generator=gen)
                    b = torch.empty(m.bias.shape).uniform_(-bound, bound, generator=gen)
                    m.weight.copy_(w)
                    m.bias.copy_(b)
        return self

    def set_dropout_stream(self, stream: DropoutStream | None) -> None:
        for m in self.modules():
            if isinstance(m, ChildDropout):
                m.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_model("nas_child")
def nas_child(num_classes: int, in_chans: int = 1,
              arch=({"filters": 32, "kernel": 3, "dropout": 0.25},), image_size: int = 28,
              seed: int | None = None) -> NASChild:
    """A RLMedNAS child network (see :class:`NASChild`); ``arch`` is a list of layer dicts."""
    return NASChild(arch, in_chans=in_chans, num_classes=num_classes, image_size=image_size, seed=seed)


# ----------------------------------------------------------------------------------------------
# C kernels of the fused first layer
# ----------------------------------------------------------------------------------------------

_C_SOURCE = r"""
/* RLMedNAS child kernels (see helpers/nas_engine.py). AVX-512 F/BW/VL/DQ.

   Layouts: channels are processed in blocks of 16; "blocked" arrays of a batch of NTOT rows are
   (NB, NTOT, Q, 16) with NB = ceil(F / 16) and Q = S2 * S2 pooled positions (lanes beyond F are 0).

   nas_fwd: fused first layer of a child: conv (K x K, cin -> F, zero padding) + bias -> 2x2 max-pool
   (first maximum wins ties, NaN wins as in MaxPool2d) -> ReLU -> dropout, for batch rows [n0, n1).
   xpad: zero-padded images, cin*P*P floats each (plus slack after the last); row n is image idx[n];
   the conv output at (y, x) reads xpad[ci][y + off + dy][x + off + dx]. w: (T, F), T = cin*K*K in
   (ci, dy, dx) order. Dropout (drop != 0): the 16-bit uniforms of the activations in NHWC order
   (element e = (n*Q + q)*F + c) are the words ctr, ctr+1, ... of the splitmix64 stream `key` (see
   nas_uniform16); keep iff u >= thr, times scale. out (nullable): blocked activations; code
   (nullable): blocked winning window position 0..3, or 4 where the activation is 0 (no gradient).
   hw (nullable, nc <= NCMAX): head weights (NB, nc, Q, 16); then logits (NTOT, nc) += the
   activations times hw (the head bias is not added).

   nas_bwd: weight and bias gradients of that layer, ACCUMULATED into dW (T, F) and db (F), from
   the gradient of the activations: dA (blocked), or (dA NULL) dl (NTOT, nc) times hw. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MIX1 0xBF58476D1CE4E5B9ULL
#define MIX2 0x94D049BB133111EBULL
#define NCMAX 11

/* Denormals (|x| < 1.2e-38, e.g. the softmax of very wrong classes) are flushed to zero inside the
   kernels (FTZ/DAZ, as many BLAS kernels do): each would cost a ~100-cycle microcode assist, and
   their contribution is far below float rounding. The caller's floating-point mode is restored. */
static inline unsigned int ftz_begin(void) { const unsigned int old = _mm_getcsr(); _mm_setcsr(old | 0x8040); return old; }
static inline void ftz_end(unsigned int old) { _mm_setcsr(old); }

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    return z ^ (z >> 31);
}

/* Dropout uniforms: word i of a stream with key k is mix64(k + (i + 1) * GOLDEN) (splitmix64);
   element e of a draw starting at word c is the 16-bit lane e % 4 of word c + e / 4. */
void nas_uniform16(uint64_t key, uint64_t ctr, int64_t nwords, uint64_t* out) {
    for (int64_t i = 0; i < nwords; i++) out[i] = mix64(key + (ctr + (uint64_t)i + 1) * GOLDEN);
}

static inline __m256i words4(uint64_t key, uint64_t w0) {
    const __m256i st = _mm256_add_epi64(_mm256_set1_epi64x((long long)(key + (w0 + 1) * GOLDEN)),
                                        _mm256_set_epi64x((long long)(3 * GOLDEN), (long long)(2 * GOLDEN), (long long)GOLDEN, 0));
    __m256i z = _mm256_mullo_epi64(_mm256_xor_si256(st, _mm256_srli_epi64(st, 30)), _mm256_set1_epi64x((long long)MIX1));
    z = _mm256_mullo_epi64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), _mm256_set1_epi64x((long long)MIX2));
    return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

static inline __m256i uniforms16(uint64_t key, uint64_t ctr, int64_t e) {
    if ((e & 3) == 0) return words4(key, ctr + (uint64_t)(e >> 2));
    int16_t buf[16];
    for (int l = 0; l < 16; l++) {
        const int64_t el = e + l;
        buf[l] = (int16_t)(mix64(key + (ctr + (uint64_t)(el >> 2) + 1) * GOLDEN) >> (16 * (el & 3)));
    }
    return _mm256_loadu_si256((const __m256i*)buf);
}

/* Bias, 2x2 max (first maximum; NaN wins), ReLU, dropout, stores and head update of one window. */
static inline __attribute__((always_inline)) void window_out(
    __m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 vb, __mmask16 cm, int64_t o, int64_t e,
    const float* hwb, int64_t hstride,
    uint64_t key, uint64_t ctr, int drop, __m256i vthr, __m512 vscale, float* out, uint8_t* code,
    int nc, __m512* lacc)
{
    const __m512 zero = _mm512_setzero_ps();
    a0 = _mm512_add_ps(a0, vb); a1 = _mm512_add_ps(a1, vb);
    a2 = _mm512_add_ps(a2, vb); a3 = _mm512_add_ps(a3, vb);
    __m512 m = a0;
    __m128i c = _mm_setzero_si128();
    __mmask16 g;
    g = _mm512_cmp_ps_mask(a1, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a1, a1, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, g, a1); c = _mm_mask_mov_epi8(c, g, _mm_set1_epi8(1));
    g = _mm512_cmp_ps_mask(a2, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a2, a2, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, g, a2); c = _mm_mask_mov_epi8(c, g, _mm_set1_epi8(2));
    g = _mm512_cmp_ps_mask(a3, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a3, a3, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, g, a3); c = _mm_mask_mov_epi8(c, g, _mm_set1_epi8(3));
    __mmask16 keep = _mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ) & cm;
    __m512 av;
    if (drop) {
        keep &= _mm256_cmpge_epi16_mask(uniforms16(key, ctr, e), vthr);
        av = _mm512_maskz_mul_ps(keep, m, vscale);
    } else {
        av = _mm512_maskz_mov_ps(keep, m);
    }
    if (out) _mm512_storeu_ps(out + o, av);
    if (code) _mm_storeu_si128((__m128i*)(code + o), _mm_mask_mov_epi8(_mm_set1_epi8(4), keep, c));
    if (hwb) {
#pragma GCC unroll 11
        for (int oc = 0; oc < NCMAX; oc++)
            if (oc < nc)
                lacc[oc] = _mm512_fmadd_ps(av, _mm512_loadu_ps(hwb + oc * hstride), lacc[oc]);
    }
}

static inline __attribute__((always_inline)) void fwd_impl(
    const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
    const int K, int S2, const float* wp, const float* b, int F,
    uint64_t key, uint64_t ctr, int drop, int16_t thr, float scale,
    float* out, uint8_t* code, const float* hw, int nc, float* logits)
{
    const int Q = S2 * S2;
    const __m512 vscale = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    const __m256i vthr = _mm256_set1_epi16(thr);
    /* channel blocks outermost: the block's head weights (nc*Q*16 floats) stay in L2 over the images */
    for (int cb = 0; cb < F; cb += 16) {
        const __mmask16 cm = (F - cb >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (F - cb)) - 1);
        const __m512 vb = _mm512_maskz_loadu_ps(cm, b + cb);
        const float* wb = wp + (int64_t)(cb / 16) * cin * K * K * 16;   /* this block's taps, 16 floats each */
        const int64_t hstride = (int64_t)Q * 16;
        const float* hwc = hw ? hw + (int64_t)(cb / 16) * nc * Q * 16 : 0;   /* head block (nc, Q, 16) */
        for (int64_t n = n0; n < n1; n++) {
            const int64_t ob = ((int64_t)(cb / 16) * NTOT + n) * Q * 16;   /* blocked (nb, N, Q, 16) */
            const float* img = xpad + idx[n] * (int64_t)cin * P * P;
            __m512 lacc[NCMAX];
#pragma GCC unroll 11
            for (int o = 0; o < NCMAX; o++) lacc[o] = zero;
            for (int i = 0; i < S2; i++) {
                int j = 0;
                /* two windows at a time: 8 independent accumulator chains, shared weight loads */
                for (; j + 1 < S2; j += 2) {
                    __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
                    __m512 e0 = zero, e1 = zero, e2 = zero, e3 = zero;
                    int t = 0;
                    for (int ci = 0; ci < cin; ci++) {
                        const float* base = img + (int64_t)ci * P * P + (2 * i + off) * P + (2 * j + off);
#pragma GCC unroll 8
                        for (int dy = 0; dy < K; dy++) {
                            const float* r0 = base + dy * P;
                            const float* r1 = r0 + P;
#pragma GCC unroll 8
                            for (int dx = 0; dx < K; dx++) {
                                const __m512 wv = _mm512_load_ps(wb + (t + dy * K + dx) * 16);
                                a0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx]), wv, a0);
                                a1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 1]), wv, a1);
                                a2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx]), wv, a2);
                                a3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 1]), wv, a3);
                                e0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 2]), wv, e0);
                                e1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 3]), wv, e1);
                                e2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 2]), wv, e2);
                                e3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 3]), wv, e3);
                            }
                        }
                        t += K * K;
                    }
                    const int q = i * S2 + j;
                    const int64_t e = (n * Q + q) * (int64_t)F + cb;   /* NHWC element index: dropout stream */
                    window_out(a0, a1, a2, a3, vb, cm, ob + q * 16, e, hwc ? hwc + q * 16 : 0, hstride, key, ctr, drop,
                               vthr, vscale, out, code, nc, lacc);
                    window_out(e0, e1, e2, e3, vb, cm, ob + (q + 1) * 16, e + F, hwc ? hwc + (q + 1) * 16 : 0, hstride,
                               key, ctr, drop, vthr, vscale, out, code, nc, lacc);
                }
                for (; j < S2; j++) {
                    __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
                    int t = 0;
                    for (int ci = 0; ci < cin; ci++) {
                        const float* base = img + (int64_t)ci * P * P + (2 * i + off) * P + (2 * j + off);
#pragma GCC unroll 8
                        for (int dy = 0; dy < K; dy++) {
                            const float* r0 = base + dy * P;
                            const float* r1 = r0 + P;
#pragma GCC unroll 8
                            for (int dx = 0; dx < K; dx++) {
                                const __m512 wv = _mm512_load_ps(wb + (t + dy * K + dx) * 16);
                                a0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx]), wv, a0);
                                a1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 1]), wv, a1);
                                a2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx]), wv, a2);
                                a3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 1]), wv, a3);
                            }
                        }
                        t += K * K;
                    }
                    const int q = i * S2 + j;
                    window_out(a0, a1, a2, a3, vb, cm, ob + q * 16, (n * Q + q) * (int64_t)F + cb,
                               hwc ? hwc + q * 16 : 0, hstride, key, ctr, drop, vthr, vscale, out, code, nc, lacc);
                }
            }
            if (hwc) {
#pragma GCC unroll 11
                for (int oc = 0; oc < NCMAX; oc++)
                    if (oc < nc) logits[n * nc + oc] += _mm512_reduce_add_ps(lacc[oc]);
            }
        }
    }
}

void nas_fwd(const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
             int K, int S2, const float* w, const float* b, int F, uint64_t key, uint64_t ctr, int drop,
             int thr, float scale, float* out, uint8_t* code, const float* hw, int nc, float* logits)
{
    /* weights packed per block of 16 channels: (F/16, T, 16), zero-padded, 64-byte aligned */
    const int T = cin * K * K, nb = (F + 15) / 16;
    float* wp = (float*)aligned_alloc(64, (size_t)nb * T * 16 * sizeof(float));
    if (!wp) return;
    const unsigned int csr = ftz_begin();
    for (int bb = 0; bb < nb; bb++)
        for (int t = 0; t < T; t++)
            for (int l = 0; l < 16; l++) {
                const int c = bb * 16 + l;
                wp[((int64_t)bb * T + t) * 16 + l] = c < F ? w[(int64_t)t * F + c] : 0.0f;
            }
#define FWD(KK) fwd_impl(xpad, idx, NTOT, n0, n1, cin, P, off, KK, S2, wp, b, F, key, ctr, drop, (int16_t)thr, scale, out, code, hw, nc, logits)
    switch (K) {
    case 1: FWD(1); break;
    case 3: FWD(3); break;
    case 5: FWD(5); break;
    case 7: FWD(7); break;
    default: FWD(K); break;
    }
#undef FWD
    ftz_end(csr);
    free(wp);
}

static inline __attribute__((always_inline)) void bwd_impl(
    const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
    const int K, int S2, const float* dA, const float* dl, const float* hw, int nc,
    const uint8_t* code, float scale, int F, float* dW, float* db)
{
    const int Q = S2 * S2;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int cb = 0; cb < F; cb += 16) {
        const __mmask16 cm = (F - cb >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (F - cb)) - 1);
        for (int ci = 0; ci < cin; ci++) {
            __m512 acc[K * K];
#pragma GCC unroll 64
            for (int t = 0; t < K * K; t++) acc[t] = _mm512_setzero_ps();
            __m512 accb = _mm512_setzero_ps();
            for (int64_t n = n0; n < n1; n++) {
                const float* img = xpad + idx[n] * (int64_t)cin * P * P + (int64_t)ci * P * P;
                for (int i = 0; i < S2; i++) {
                    for (int j = 0; j < S2; j++) {
                        const int q = i * S2 + j;
                        const int64_t o = (((int64_t)(cb / 16) * NTOT + n) * Q + q) * 16;   /* blocked */
                        const __m128i c8 = _mm_maskz_loadu_epi8(cm, code + o);
                        const __mmask16 act = _mm_cmplt_epu8_mask(c8, _mm_set1_epi8(4)) & cm;
                        if (!act) continue;
                        __m512 d;
                        if (dA) {
                            d = _mm512_maskz_loadu_ps(act, dA + o);
                        } else {
                            d = _mm512_setzero_ps();
                            for (int oc = 0; oc < nc; oc++)
                                d = _mm512_fmadd_ps(_mm512_set1_ps(dl[n * nc + oc]),
                                                    _mm512_maskz_loadu_ps(act, hw + (((int64_t)(cb / 16) * nc + oc) * Q + q) * 16), d);
                        }
                        const __m512 g = _mm512_maskz_mul_ps(act, d, vscale);
                        if (ci == 0) accb = _mm512_add_ps(accb, g);
                        /* the winning pixel of tap (dy, dx): row a, column b + dx of the two rows
                           (2i+off+dy, 2i+off+dy+1) loaded from column 2j+off: a 2-source permute */
                        const __m512i c32 = _mm512_cvtepu8_epi32(c8);
                        const __m512i sel = _mm512_or_si512(_mm512_and_si512(c32, _mm512_set1_epi32(1)),
                                                            _mm512_slli_epi32(_mm512_and_si512(c32, _mm512_set1_epi32(2)), 3));
                        const float* base = img + (2 * i + off) * P + (2 * j + off);
#pragma GCC unroll 8
                        for (int dx = 0; dx < K; dx++) {
                            const __m512i sdx = _mm512_add_epi32(sel, _mm512_set1_epi32(dx));
#pragma GCC unroll 8
                            for (int dy = 0; dy < K; dy++) {
                                const __m512 ra = _mm512_loadu_ps(base + dy * P);
                                const __m512 rb = _mm512_loadu_ps(base + (dy + 1) * P);
                                const __m512 v = _mm512_permutex2var_ps(ra, sdx, rb);
                                acc[dy * K + dx] = _mm512_fmadd_ps(g, v, acc[dy * K + dx]);
                            }
                        }
                    }
                }
            }
#pragma GCC unroll 64
            for (int t = 0; t < K * K; t++) {
                float* dd = dW + (int64_t)(ci * K * K + t) * F + cb;
                _mm512_mask_storeu_ps(dd, cm, _mm512_add_ps(_mm512_maskz_loadu_ps(cm, dd), acc[t]));
            }
            if (ci == 0)
                _mm512_mask_storeu_ps(db + cb, cm, _mm512_add_ps(_mm512_maskz_loadu_ps(cm, db + cb), accb));
        }
    }
}

int nas_bwd(const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
            int K, int S2, const float* dA, const float* dl, const float* hw, int nc,
            const uint8_t* code, float scale, int F, float* dW, float* db)
{
#define BWD(KK) bwd_impl(xpad, idx, NTOT, n0, n1, cin, P, off, KK, S2, dA, dl, hw, nc, code, scale, F, dW, db)
    const unsigned int csr = ftz_begin();
    int bad = 0;
    switch (K) {
    case 1: BWD(1); break;
    case 3: BWD(3); break;
    case 5: BWD(5); break;
    case 7: BWD(7); break;
    default: bad = 1;
    }
    ftz_end(csr);
    return bad;
#undef BWD
}

/* Head weight gradient dhw (NB, nc, QJ) = dl^T (nc, NTOT) @ acts (NB, NTOT, QJ) for blocks
   [b0, b1) and columns [j0, j1) (multiples of 16); sums over the batch rows in order. */
void nas_head_grad(const float* dl, const float* acts, int64_t NTOT, int nc, int64_t QJ,
                   int64_t b0, int64_t b1, int64_t j0, int64_t j1, float* dhw)
{
    const unsigned int csr = ftz_begin();
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t j = j0; j < j1; j += 16) {
            __m512 acc[NCMAX];
#pragma GCC unroll 11
            for (int o = 0; o < NCMAX; o++) acc[o] = _mm512_setzero_ps();
            const float* a = acts + b * NTOT * QJ + j;
            for (int64_t n = 0; n < NTOT; n++) {
                const __m512 v = _mm512_loadu_ps(a + n * QJ);
#pragma GCC unroll 11
                for (int o = 0; o < NCMAX; o++)
                    if (o < nc) acc[o] = _mm512_fmadd_ps(_mm512_set1_ps(dl[n * nc + o]), v, acc[o]);
            }
#pragma GCC unroll 11
            for (int o = 0; o < NCMAX; o++)
                if (o < nc) _mm512_storeu_ps(dhw + (b * nc + o) * QJ + j, acc[o]);
        }
    }
    ftz_end(csr);
}

/* Mean cross-entropy of logits (n, nc) + bias (added in place) and labels y: returns the loss;
   dl = (softmax - onehot) / n (the gradient of the mean loss); db = column sums of dl. */
double nas_cross_entropy(float* logits, const float* bias, const int64_t* y, int64_t n, int nc, float* dl, float* db)
{
    const unsigned int csr = ftz_begin();
    double total = 0.0;
    for (int o = 0; o < nc; o++) db[o] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float* z = logits + i * nc;
        for (int o = 0; o < nc; o++) z[o] += bias[o];
        float mx = z[0];
        for (int o = 1; o < nc; o++) mx = z[o] > mx ? z[o] : mx;
        double se = 0.0;
        for (int o = 0; o < nc; o++) se += exp((double)(z[o] - mx));
        const double lse = mx + log(se);
        total += lse - z[y[i]];
        for (int o = 0; o < nc; o++) {
            const float g = (float)((exp((double)z[o] - lse) - (o == y[i] ? 1.0 : 0.0)) / (double)n);
            dl[i * nc + o] = g;
            db[o] += g;
        }
    }
    ftz_end(csr);
    return total / (double)n;
}

/* Adam (as torch.optim.Adam, no weight decay) on n elements; the gradient is g0 (+ g1 if not NULL):
   m += (1-b1)(g-m); v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v) / bc2_sqrt + eps). */
void nas_adam(float* p, const float* g0, const float* g1, float* m, float* v, int64_t n,
              float b1, float b2, float eps, float step_size, float bc2_sqrt)
{
    const unsigned int csr = ftz_begin();
    const float w1 = 1.0f - b1, w2 = 1.0f - b2;
    for (int64_t i = 0; i < n; i++) {
        const float g = g1 ? g0[i] + g1[i] : g0[i];
        const float mi = m[i] + w1 * (g - m[i]);
        const float vi = v[i] * b2 + w2 * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * (mi / (sqrtf(vi) / bc2_sqrt + eps));
    }
    ftz_end(csr);
}
"""

_KERNEL_SIZES = (1, 3, 5, 7)   # specialised in the C source; other sizes use the PyTorch path
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fno-math-errno", "-shared",
           "-fPIC"]
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
_kernels_lock = threading.Lock()
_kernels_state: dict[str, Any] = {}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_NCMAX = 11   # the fused head handles up to this many classes (MedMNIST 2D single-label: <= 11)


class _Kernels:
    """The compiled fused-layer kernels, called on two batch halves in two threads."""

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

    def with_threads(self, threads: int) -> "_Kernels":
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
        return (_ptr(st["xpad"]), _ptr(st["idx"]), len(st["idx"]), a, e, st["cin"], st["P"], st["off"], st["k"],
                st["s2"], _ptr(w_t), _ptr(b), w_t.shape[1], st["key"], stream_ctr, int(drop),
                keep_threshold(p) if drop else 0, _dropout_scale(p) if drop else 1.0,
                _ptr(out), _ptr(code), _ptr(hw), nc, _ptr(logits))

    def forward(self, st, w_t, b, stream_ctr, p, out, code, hw=None, logits=None) -> None:
        _check_contiguous(st["xpad"], st["idx"], w_t, b, out, code, hw, logits)
        nc = 0 if hw is None else hw.shape[1]
        self._halves(self.lib.nas_fwd, len(st["idx"]), lambda h, a, e: self.fwd_args(
            h, a, e, st, w_t, b, stream_ctr, p, out, code, hw, nc, logits))

    def bwd_args(self, h, a, e, st, dA, dl, hw, code, p, dw_parts, db_parts):
        nc = 0 if hw is None else hw.shape[1]
        return (_ptr(st["xpad"]), _ptr(st["idx"]), len(st["idx"]), a, e, st["cin"], st["P"], st["off"], st["k"],
                st["s2"],
                _ptr(dA), _ptr(dl), _ptr(hw), nc, _ptr(code), _dropout_scale(p) if p > 0 else 1.0,
                dw_parts.shape[2], _ptr(dw_parts[h]), _ptr(db_parts[h]))

    def backward(self, st, dA, dl, hw, code, p, dw_parts, db_parts) -> None:
        _check_contiguous(st["xpad"], st["idx"], dA, dl, hw, code, dw_parts, db_parts)
        self._halves(self.bwd, len(st["idx"]), lambda h, a, e: self.bwd_args(
            h, a, e, st, dA, dl, hw, code, p, dw_parts, db_parts))

    def bwd(self, *args) -> None:
        if self.lib.nas_bwd(*args) != 0:
            raise ValueError(f"NAS kernels support kernel sizes {_KERNEL_SIZES}")


def _no_grad_call(fn, *args):
    with torch.no_grad():   # grad mode is per thread: worker threads start with it on
        return fn(*args)


def _check_contiguous(*tensors) -> None:
    for t in tensors:
        if t is not None and (not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError("NAS kernels need contiguous CPU tensors")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _compile_kernels() -> Path:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) found")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([_C_SOURCE, " ".join(_CFLAGS), cc, *version, platform.machine()])
                         .encode()).hexdigest()[:16]
    from .config import cache_dir
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
        src.write_text(_C_SOURCE)
        out = Path(tmp) / so.name
        res = subprocess.run([cc, *_CFLAGS, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"compiling the NAS kernels failed:\n{res.stderr[-2000:]}")
        os.replace(out, so)   # atomic: concurrent builders end with the same file
    return so


def _get_kernels() -> _Kernels | None:
    """The kernels, compiled on first use; None where unavailable (the reason in kernels_available())."""
    with _kernels_lock:
        if "kernels" not in _kernels_state:
            kernels, why = None, ""
            if os.environ.get("RLMED_NAS_KERNELS", "1") == "0":
                why = "disabled by RLMED_NAS_KERNELS=0"
            elif platform.machine() not in ("x86_64", "AMD64"):
                why = f"not an x86-64 CPU ({platform.machine()})"
            elif not set(_REQUIRED_CPU_FLAGS) <= _cpu_flags():
                why = f"CPU lacks one of {_REQUIRED_CPU_FLAGS}"
            else:
                try:
                    kernels = _Kernels(ctypes.CDLL(str(_compile_kernels())))
                except Exception as exc:  # no compiler, compile error, load error: fall back
                    why = f"{type(exc).__name__}: {exc}"
            _kernels_state.update(kernels=kernels, why=why)
        return _kernels_state["kernels"]


def kernels_available() -> tuple[bool, str]:
    """Whether the fast engine's C kernels can be used here, and if not, why."""
    k = _get_kernels()
    return k is not None, _kernels_state.get("why", "")


# ----------------------------------------------------------------------------------------------
# Memory: reuse freed large blocks (glibc) while the fast engine runs
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _reuse_large_allocations(enabled: bool = True):
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
def _torch_threads(n: int):
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


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x / 255 - 0.5) / 0.5`` (the same ops in both engines: bitwise equal)."""
    return images.float().div_(255.0).sub_(0.5).div_(0.5)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Data:
    """Train/val tensors of one call, shared by every child.

    The fast engine keeps the last one (normalised and padded images) for the next call with the
    very same split tensors (compared by identity, so changed data are never served stale).
    """

    _last: "tuple | None" = None
    _last_lock = threading.Lock()

    @classmethod
    def get(cls, train_split, val_split, max_train, device) -> "_Data":
        ident = (train_split.images, train_split.labels, val_split.images, val_split.labels)
        with cls._last_lock:
            last = cls._last
            if (last is not None and all(a is b for a, b in zip(last[0], ident))
                    and last[1] == (max_train, torch.device(device))):
                return last[2]
            data = cls(train_split, val_split, max_train, torch.device(device))
            cls._last = (ident, (max_train, torch.device(device)), data)
            return data

    def __init__(self, train_split, val_split, max_train: int | None, device: torch.device):
        tx, ty = train_split.images, train_split.labels
        if max_train is not None:
            tx, ty = tx[:max_train], ty[:max_train]
        if ty.ndim != 1:
            raise ValueError("train_children needs single-label data (int64 labels of shape (N,))")
        self.train_images, self.train_labels = tx, ty.to(device)
        self.val_images, self.val_labels = val_split.images, val_split.labels.to(device)
        self.device = device
        self._norm: dict[str, torch.Tensor] = {}
        self._pad: dict[tuple, torch.Tensor] = {}

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_val(self) -> int:
        return len(self.val_labels)

    def normalised(self, split: str) -> torch.Tensor:
        if split not in self._norm:
            imgs = self.train_images if split == "train" else self.val_images
            self._norm[split] = _normalise(imgs).to(self.device)
        return self._norm[split]

    def padded(self, split: str, r: int) -> torch.Tensor:
        """Normalised images zero-padded by ``r`` on each side, flat (plus slack), for the kernels."""
        key = (split, r)
        if key not in self._pad:
            x = self.normalised(split)
            n, c, h, w = x.shape
            p = h + 2 * r
            flat = torch.zeros(n * c * p * p + 64)
            flat[: n * c * p * p].view(n, c, p, p)[:, :, r:r + h, r:r + w] = x
            self._pad[key] = flat
        return self._pad[key]

    def epoch_orders(self, data_seed: int, epochs: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(int(data_seed))
        return [torch.randperm(self.n_train, generator=gen) for _ in range(epochs)]


def clear_data_cache() -> None:
    """Drop the fast engine's kept copy of the last splits (normalised and padded images)."""
    with _Data._last_lock:
        _Data._last = None


def _train_plain(arch, seed, data: _Data, cfg: dict) -> dict:
    """One child, the straightforward way."""
    device = data.device
    model = NASChild(arch, cfg["in_chans"], cfg["num_classes"], cfg["image_size"], seed=seed).to(device)
    model.set_dropout_stream(DropoutStream(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    bs = cfg["batch_size"]
    steps = data.n_train // bs
    epoch_losses = []
    model.train()
    t0 = time.perf_counter()
    for order in data.epoch_orders(cfg["data_seed"], cfg["epochs"]):
        total = 0.0
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            x = _normalise(data.train_images[idx]).to(device)
            y = data.train_labels[idx.to(device)]
            with _autocast(cfg["precision"], device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_losses.append(total / max(steps, 1))
    t1 = time.perf_counter()
    model.eval()
    correct = 0
    with torch.no_grad(), _autocast(cfg["precision"], device):
        for start in range(0, data.n_val, bs):
            x = _normalise(data.val_images[start:start + bs]).to(device)
            correct += int((model(x).argmax(1) == data.val_labels[start:start + bs]).sum())
    return {"val_acc": correct / data.n_val, "val_correct": correct, "epoch_losses": epoch_losses,
            "fit_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def _to_blocked(x: torch.Tensor) -> torch.Tensor:
    """(N, S2, S2, F) -> (NB, N, S2*S2, 16), channels zero-padded to NB*16 (the kernels' layout)."""
    n, s2, _, f = x.shape
    nb = (f + 15) // 16
    if nb * 16 != f:
        x = F.pad(x, (0, nb * 16 - f))
    return x.reshape(n, s2 * s2, nb, 16).permute(2, 0, 1, 3).contiguous()


def _from_blocked(xb: torch.Tensor, f: int, s2: int) -> torch.Tensor:
    """(NB, N, S2*S2, 16) -> (N, S2, S2, F) (a copy)."""
    nb, n = xb.shape[:2]
    return xb.permute(1, 2, 0, 3).reshape(n, s2, s2, nb * 16)[..., :f].contiguous()


class _FusedFirstLayer(torch.autograd.Function):
    """Layer 1 through the C kernels (children with more layers): activations (N, S2, S2, F), NHWC."""

    @staticmethod
    def forward(ctx, w_t, b, st, ctr, p):
        n, f, s2 = len(st["idx"]), w_t.shape[1], st["s2"]
        nb = (f + 15) // 16
        out = torch.empty(nb, n, s2 * s2, 16)
        code = torch.empty(nb, n, s2 * s2, 16, dtype=torch.uint8)
        st["kernels"].forward(st, w_t, b, ctr, p, out, code)
        ctx.st, ctx.p, ctx.f = st, p, f
        ctx.save_for_backward(code)
        return _from_blocked(out, f, s2)

    @staticmethod
    def backward(ctx, d_out):
        (code,) = ctx.saved_tensors
        st, f = ctx.st, ctx.f
        dw_parts = torch.zeros(2, st["cin"] * st["k"] ** 2, f)
        db_parts = torch.zeros(2, f)
        st["kernels"].backward(st, _to_blocked(d_out), None, None, code, ctx.p, dw_parts, db_parts)
        return dw_parts[0] + dw_parts[1], db_parts[0] + db_parts[1], None, None, None


class _KernelAdam:
    """``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8, no weight decay) in the C library."""

    def __init__(self, params, lr: float, lib, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.lib, (self.b1, self.b2), self.eps = float(lr), lib, betas, float(eps)
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in params}
        self.t = 0

    def step(self, items) -> None:
        """``items``: (param, grad, second grad part or None), the gradient being their sum."""
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        step_size, bc2_sqrt = self.lr / bc1, math.sqrt(bc2)
        for p, g0, g1 in items:
            m, v = self.state[id(p)]
            _check_contiguous(p, g0, g1, m, v)
            self.lib.nas_adam(p.data_ptr(), g0.data_ptr(), _ptr(g1), m.data_ptr(), v.data_ptr(), p.numel(),
                              self.b1, self.b2, self.eps, step_size, bc2_sqrt)


class _FastChild:
    """A child's parameters in the fast engine's layouts, its training step and its logits.

    One-layer children with at most ``_NCMAX`` classes run a hand-written step: the forward kernel
    also accumulates the head's logits, the backward kernel takes the logits' gradient and the head
    weights directly; loss, the head's weight gradient and Adam are C loops too (no autograd).
    Other children use autograd over the first-layer kernel (when available) and PyTorch ops.
    """

    def __init__(self, arch, seed, cfg, data: _Data, kernels: _Kernels | None):
        ref = NASChild(arch, cfg["in_chans"], cfg["num_classes"], cfg["image_size"], seed=seed)
        self.arch, self.cfg, self.data = ref.arch, cfg, data
        usable = cfg["precision"] == "fp32" and data.device.type == "cpu" and ref.arch[0]["kernel"] in _KERNEL_SIZES
        self.kernels = kernels if usable else None
        self.stream = DropoutStream(seed)
        self.sides = _sides(self.arch, cfg["image_size"])
        self.nc = cfg["num_classes"]
        self.fused = self.kernels is not None and len(self.arch) == 1 and self.nc <= _NCMAX
        dev = data.device
        self.conv_w, self.conv_b = [], []
        for i, conv in enumerate(m for m in ref.features if isinstance(m, nn.Conv2d)):
            w = conv.weight.detach().to(dev)
            if i == 0 and self.kernels is not None:
                w = w.permute(1, 2, 3, 0).reshape(-1, w.shape[0]).contiguous()        # (cin*k*k, f)
            else:
                w = w.clone(memory_format=torch.channels_last)
            self.conv_w.append(w.clone(memory_format=torch.preserve_format).requires_grad_())
            self.conv_b.append(conv.bias.detach().to(dev).clone().requires_grad_())
        f_last, s_last = self.arch[-1]["filters"], self.sides[-1]
        hw = ref.head.weight.detach().to(dev).view(self.nc, f_last, s_last, s_last).permute(0, 2, 3, 1)
        if self.fused:   # (NB, nc, Q, 16): the kernels' blocked layout, padded channels stay 0
            self.head_w = _to_blocked(hw).requires_grad_()
        else:            # (nc, h*w*c)
            self.head_w = hw.reshape(self.nc, -1).contiguous().requires_grad_()
        self.head_b = ref.head.bias.detach().to(dev).clone().requires_grad_()
        self.params = [t for pair in zip(self.conv_w, self.conv_b) for t in pair] + [self.head_w, self.head_b]
        self.r = self.arch[0]["kernel"] // 2
        self.adam = _KernelAdam(self.params, cfg["lr"], self.kernels.lib) if self.fused else None

    def _geometry(self, idx: torch.Tensor, split: str) -> dict:
        r, k = self.r, self.arch[0]["kernel"]
        return {"kernels": self.kernels, "xpad": self.data.padded(split, r), "idx": idx,
                "cin": self.cfg["in_chans"], "P": self.sides[0] + 2 * r, "off": 0, "k": k,
                "s2": self.sides[1], "key": self.stream.key}

    # -- one-layer children: hand-written step -------------------------------------------------
    def _fused_buffers(self, n: int) -> dict:
        """Per-step arrays of a one-layer child, allocated once per batch size."""
        if getattr(self, "_buf_n", None) != n:
            f, q, nc = self.arch[0]["filters"], self.sides[1] ** 2, self.nc
            nb = (f + 15) // 16
            self._buf = {"acts": torch.empty(nb, n, q * 16), "code": torch.empty(nb, n, q * 16, dtype=torch.uint8),
                         "logits": torch.empty(n, nc), "dl": torch.empty(n, nc), "dhb": torch.empty(nc),
                         "dw": torch.empty(2, self.conv_w[0].shape[0], f), "db": torch.empty(2, f),
                         "dhw": torch.empty(self.head_w.shape)}
            self._buf_n = n
        return self._buf

    def _fused_step(self, idx: torch.Tensor, y: torch.Tensor) -> float:
        """Forward, loss, backward and Adam of a one-layer child on one batch; returns the loss."""
        kern, lib, st = self.kernels, self.kernels.lib, self._geometry(idx, "train")
        n, f, p = len(idx), self.arch[0]["filters"], self.arch[0]["dropout"]
        q, nc = self.sides[1] ** 2, self.nc
        nb = (f + 15) // 16
        buf = self._fused_buffers(n)
        acts, code, logits, dl, dhw = buf["acts"], buf["code"], buf["logits"], buf["dl"], buf["dhw"]
        ctr = self.stream.take(n * q * f) if p > 0 else 0
        y = y.contiguous()
        with torch.no_grad():
            logits.zero_()
            kern.forward(st, self.conv_w[0], self.conv_b[0], ctr, p, acts, code, self.head_w, logits)
            _check_contiguous(y, dl, buf["dhb"], self.head_b)
            loss = lib.nas_cross_entropy(logits.data_ptr(), self.head_b.data_ptr(), y.data_ptr(), n, nc,
                                         dl.data_ptr(), buf["dhb"].data_ptr())
            buf["dw"].zero_()
            buf["db"].zero_()
            # the head's weight gradient (nc, N) @ (N, Q*16) per channel block, in C beside the two
            # halves of the backward kernel: halves of the blocks, or of the columns for one block
            qj = q * 16
            if nb > 1:
                parts = ((0, nb // 2, 0, qj), (nb // 2, nb, 0, qj))
            else:
                parts = ((0, 1, 0, (q // 2) * 16), (0, 1, (q // 2) * 16, qj))

            def half(h):
                a, e = (0, n // 2) if h == 0 else (n // 2, n)
                kern.bwd(*kern.bwd_args(h, a, e, st, None, dl, self.head_w, code, p, buf["dw"], buf["db"]))
                lib.nas_head_grad(dl.data_ptr(), acts.data_ptr(), n, nc, qj, *parts[h], dhw.data_ptr())

            _check_contiguous(st["xpad"], idx, self.head_w, code, acts, dhw)
            kern.parallel2(lambda: half(0), lambda: half(1))
            self.adam.step([(self.conv_w[0], buf["dw"][0], buf["dw"][1]), (self.conv_b[0], buf["db"][0], buf["db"][1]),
                            (self.head_w, dhw, None), (self.head_b, buf["dhb"], None)])
        return loss

    # -- general children: autograd ----------------------------------------------------------
    def forward(self, idx: torch.Tensor, split: str, train: bool) -> torch.Tensor:
        """Logits of the images ``idx`` of ``split`` (train: with dropout)."""
        data, n = self.data, len(idx)
        if self.fused:   # logits only (no autograd): scoring, or a look at a training batch
            layer = self.arch[0]
            draw = train and layer["dropout"] > 0
            ctr = self.stream.take(n * self.sides[1] ** 2 * layer["filters"]) if draw else 0
            logits = torch.zeros(n, self.nc)
            with torch.no_grad():
                self.kernels.forward(self._geometry(idx, split), self.conv_w[0], self.conv_b[0], ctr,
                                     layer["dropout"] if draw else 0.0, None, None, self.head_w, logits)
            return logits + self.head_b.detach()
        x = None
        for i, layer in enumerate(self.arch):
            f, k, p = layer["filters"], layer["kernel"], layer["dropout"]
            s2 = self.sides[i + 1]
            draw = train and p > 0
            if i == 0 and self.kernels is not None:
                ctr = self.stream.take(n * s2 * s2 * f) if draw else 0
                x = _FusedFirstLayer.apply(self.conv_w[0], self.conv_b[0], self._geometry(idx, split), ctr,
                                           p if draw else 0.0)                    # (N, s2, s2, f)
                x = x.permute(0, 3, 1, 2)                                          # NCHW view, CL memory
                continue
            if i == 0:
                x = data.normalised(split)[idx].contiguous(memory_format=torch.channels_last)
            x = F.conv2d(x, self.conv_w[i], self.conv_b[i], padding=k // 2)
            x = F.relu(F.max_pool2d(x, 2))
            if draw:
                u = self.stream.int16(n * s2 * s2 * f, x.device).view(n, s2, s2, f).permute(0, 3, 1, 2)
                x = torch.where(u >= keep_threshold(p), x * _dropout_scale(p), 0.0)
        feats = x.permute(0, 2, 3, 1).reshape(n, -1)          # (h, w, c) order
        return F.linear(feats, self.head_w, self.head_b)

    def train_step(self, idx: torch.Tensor, y: torch.Tensor, opt) -> float | torch.Tensor:
        if self.fused:
            return self._fused_step(idx, y)
        with _autocast(self.cfg["precision"], self.data.device):
            loss = F.cross_entropy(self.forward(idx, "train", True), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()


def _train_fast(arch, seed, data: _Data, cfg: dict, kernels: _Kernels | None) -> dict:
    device = data.device
    child = _FastChild(arch, seed, cfg, data, kernels)
    opt = None if child.fused else torch.optim.Adam(child.params, lr=cfg["lr"],
                                                    fused=True if device.type in ("cpu", "cuda") else None)
    bs = cfg["batch_size"]
    steps = data.n_train // bs
    epoch_losses = []
    labels = data.train_labels
    t0 = time.perf_counter()
    for order in data.epoch_orders(cfg["data_seed"], cfg["epochs"]):
        order = order.to(device)
        losses = []
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            losses.append(child.train_step(idx, labels[idx], opt))
        epoch_losses.append(float(sum(float(x) for x in losses)) / max(steps, 1))
    t1 = time.perf_counter()
    correct = 0
    chunk = data.n_val if child.fused else max(bs, 1024)
    with torch.no_grad(), _autocast(cfg["precision"], device):
        for start in range(0, data.n_val, chunk):
            idx = torch.arange(start, min(start + chunk, data.n_val), device=device)
            correct += int((child.forward(idx, "val", False).argmax(1) == data.val_labels[idx]).sum())
    return {"val_acc": correct / data.n_val, "val_correct": correct, "epoch_losses": epoch_losses,
            "fit_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def train_children(archs: Sequence, train_split, val_split, *, num_classes: int, seeds: Sequence[int],
                   epochs: int = 5, batch_size: int = 128, lr: float = 1e-3, data_seed: int = 0,
                   device: str | torch.device = "cpu", engine: str = "fast", precision: str = "fp32",
                   max_train: int | None = None, in_chans: int | None = None, image_size: int | None = None,
                   cache: "ChildCache | None" = None, workers: int | None = None) -> list[dict]:
    """Train each child of ``archs`` on ``train_split`` and score it on ``val_split``.

    Args:
        archs: architectures (lists of layer dicts; see :func:`normalize_arch`).
        train_split, val_split: :class:`helpers.data.Split` (uint8 images (N, C, H, W), int64 labels).
        num_classes: logits of the head.
        seeds: one per child; seeds its initial weights and its dropout masks.
        data_seed: the order of the training images in each epoch, the same for every child here.
        engine: ``"plain"`` (reference loop) or ``"fast"`` (see the module docstring).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        max_train: use only the first ``max_train`` training images.
        in_chans, image_size: default to the images' channels and side.
        cache: a :class:`ChildCache`; children found there are not trained (``cached: True``).
        workers: fast engine on CPU with its kernels: how many children train at once, each on
            one thread (default: 2 when there are two or more children and torch may use two
            threads; 1 trains one child at a time, its kernels split over two threads). Results
            do not depend on it.

    Returns:
        One dict per child: ``val_acc``, ``params``, ``train_s`` (its share of the wall time: its own
        training and scoring plus an equal share of the data preparation), ``final_train_loss`` (mean
        training loss over the last epoch's steps), ``epoch_losses``, ``val_correct``, ``n_val``,
        ``n_train``, ``arch``, ``seed``, ``data_seed``, ``engine``, ``precision``, ``cached``.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    archs = [normalize_arch(a) for a in archs]
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(archs):
        raise ValueError(f"need one seed per arch: {len(archs)} archs, {len(seeds)} seeds")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    device = torch.device(device)
    c, h = train_split.images.shape[1], train_split.images.shape[2]
    in_chans = c if in_chans is None else in_chans
    image_size = h if image_size is None else image_size
    if (in_chans, image_size) != (c, h):
        raise ValueError(f"images are {c}x{h}x{h} but in_chans={in_chans}, image_size={image_size}")
    n_train = len(train_split) if max_train is None else min(int(max_train), len(train_split))
    if n_train < batch_size:
        raise ValueError(f"{n_train} training images do not fill one batch of {batch_size} (drop_last)")
    cfg = {"num_classes": int(num_classes), "in_chans": int(in_chans), "image_size": int(image_size),
           "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "data_seed": int(data_seed),
           "precision": precision, "max_train": max_train}

    results: list[dict | None] = [None] * len(archs)
    keys = [None] * len(archs)
    if cache is not None:
        settings = dict(cfg, n_train=n_train, data=cache.data_fingerprint(train_split, val_split, n_train))
        for i, (arch, seed) in enumerate(zip(archs, seeds)):
            keys[i] = cache.key(arch, seed, settings)
            hit = cache.get(keys[i])
            if hit is not None:
                results[i] = dict(hit, cached=True)
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        t0 = time.perf_counter()
        data = _Data.get(train_split, val_split, max_train, device) if engine == "fast" else \
            _Data(train_split, val_split, max_train, device)
        kernels = _get_kernels() if engine == "fast" and device.type == "cpu" and precision == "fp32" else None
        threads = torch.get_num_threads()
        # Two children at once (one thread each) or one child split over two threads.
        n_workers = 1
        if kernels is not None and threads > 1:
            n_workers = min(2, len(todo)) if workers is None else max(1, min(int(workers), threads, len(todo)))
            kernels = kernels.with_threads(1 if n_workers > 1 else min(threads, 2))
        with _reuse_large_allocations(engine == "fast" and device.type == "cpu"), \
                _torch_threads(1 if kernels is not None else threads):
            if engine == "fast":   # shared preparation, timed apart and shared out equally
                data.normalised("train"), data.normalised("val")
                if kernels is not None:
                    for r in sorted({archs[i][0]["kernel"] // 2 for i in todo}):
                        data.padded("train", r), data.padded("val", r)
            prep_s = time.perf_counter() - t0

            def run(i):
                t1 = time.perf_counter()
                if engine == "plain":
                    out = _train_plain(archs[i], seeds[i], data, cfg)
                else:
                    out = _train_fast(archs[i], seeds[i], data, cfg, kernels)
                out["own_s"] = time.perf_counter() - t1
                return i, out

            t_run = time.perf_counter()
            if n_workers > 1:   # largest first, so the two workers finish close together
                todo = sorted(todo, key=lambda i: -child_flops(archs[i], in_chans, num_classes, image_size)["train"])
                with ThreadPoolExecutor(n_workers, thread_name_prefix="nas_child") as pool:
                    done = list(pool.map(run, todo))
            else:
                done = [run(i) for i in todo]
            wall = time.perf_counter() - t_run
            own_total = sum(out["own_s"] for _, out in done) or 1.0
            for i, out in done:
                out.update(
                    params=child_params(archs[i], in_chans, num_classes, image_size),
                    train_s=wall * out["own_s"] / own_total + prep_s / len(todo), prep_s=prep_s / len(todo),
                    final_train_loss=out["epoch_losses"][-1], n_val=data.n_val, n_train=data.n_train,
                    arch=archs[i], seed=seeds[i], data_seed=int(data_seed), engine=engine,
                    precision=precision, workers=n_workers, cached=False)
                results[i] = out
                if cache is not None:
                    cache.put(keys[i], out)
    return results


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

class ChildCache:
    """Results of trained children in a JSON-lines file, keyed by everything that decides them.

    The key holds the arch, the seed, the training settings (epochs, batch size, lr, data seed,
    number of training images, precision, classes, channels, image size) and a fingerprint of the
    data; not the engine (both engines compute the same results). Lines are appended atomically
    (one ``write`` on an ``O_APPEND`` file); :meth:`compact` rewrites the file atomically. A
    damaged line (e.g. from a killed writer) is skipped. Used only when passed to
    :func:`train_children`, which marks results from it ``cached: True``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, dict] = {}
        self._mtime = None
        self._fingerprints: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(arch, seed: int, settings: Mapping[str, Any]) -> str:
        payload = {"arch": normalize_arch(arch), "seed": int(seed), **settings}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    def data_fingerprint(self, train_split, val_split, n_train: int) -> str:
        """SHA-256 over the used training images and labels and the validation split (memoised)."""
        ident = (id(train_split.images), id(val_split.images), n_train, train_split.images.data_ptr(),
                 val_split.images.data_ptr())
        if ident not in self._fingerprints:
            h = hashlib.sha256()
            for t in (train_split.images[:n_train], train_split.labels[:n_train], val_split.images, val_split.labels):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprints[ident] = h.hexdigest()[:20]
        return self._fingerprints[ident]

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._entries, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        entries = {}
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    entries[rec["key"]] = rec["result"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._entries, self._mtime = entries, mtime

    def get(self, key: str) -> dict | None:
        with self._lock:
            self._load()
            hit = self._entries.get(key)
            return None if hit is None else dict(hit)

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        rec = {"key": key, "result": {k: v for k, v in result.items() if k != "cached"}}
        line = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self._entries[key] = dict(rec["result"])

    def compact(self) -> None:
        """Rewrite the file with one line per key (atomic rename)."""
        from .results import atomic_write_text
        with self._lock:
            self._mtime = None
            self._load()
            text = "".join(json.dumps({"key": k, "result": v}, sort_keys=True, separators=(",", ":")) + "\n"
                           for k, v in self._entries.items())
            atomic_write_text(self.path, text)
            self._mtime = None

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None
