"""A NAS child's dropout randomness: a counter-based splitmix64 stream keyed by the child seed.

Word ``i`` of the stream with key ``k`` is ``mix64(k + (i + 1) * golden)`` (splitmix64); a draw
of ``n`` 16-bit uniforms takes the next ``ceil(n / 4)`` words, element ``e`` being 16-bit lane
``e % 4`` of word ``e // 4``. The words are computed three ways with the same bits: numpy
(:func:`uniform_words_numpy`), PyTorch on any device (:func:`uniform_words_torch`, used on a GPU)
and the C kernels (:func:`uniform_words`, which also compute them inside the fused layer). What a
mask keeps given the uniforms is :func:`helpers.models.nas_child.keep_threshold`.
"""
from __future__ import annotations

import numpy as np
import torch

from .fast import kernels as kernels_mod

__all__ = ["DropoutStream", "mix64", "uniform_words", "uniform_words_numpy", "uniform_words_torch"]

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """The splitmix64 finaliser of a Python int (uint64 arithmetic)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


def uniform_words_numpy(key: int, ctr: int, nwords: int) -> np.ndarray:
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


def uniform_words_torch(key: int, ctr: int, nwords: int, device: str | torch.device) -> torch.Tensor:
    """:func:`uniform_words_numpy` computed by PyTorch on ``device`` (an int64 tensor, same bits).

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


def uniform_words(key: int, ctr: int, nwords: int) -> np.ndarray:
    """:func:`uniform_words_numpy`, computed by the C kernels when they are available."""
    kernels = kernels_mod.get_kernels()
    if kernels is None:
        return uniform_words_numpy(key, ctr, nwords)
    out = np.empty(nwords, dtype=np.uint64)
    kernels.lib.nas_uniform16(key, ctr, nwords, out.ctypes.data)
    return out


class DropoutStream:
    """A child's dropout stream (see the module docstring), keyed by its seed.

    Every engine draws, per training step and per layer with dropout, ``N*H*W*C`` values (NHWC
    order) in layer order, so the same seed gives the same masks whatever the engine; the fast
    engine's kernel computes the same words itself from ``(key, counter)``.
    """

    TAG = 0x4E41534444524F50  # "NASDROP": keeps this stream apart from other uses of the seed

    def __init__(self, seed: int):
        self.key = mix64((int(seed) & _U64) ^ self.TAG)
        self.counter = 0

    def take(self, n: int) -> int:
        """Reserve the words of ``n`` uniforms; returns the first word's index."""
        start = self.counter
        self.counter += (n + 3) // 4
        return start

    def int16(self, n: int, device: str | torch.device | None = None) -> torch.Tensor:
        """The next ``n`` uniform int16 values, on ``device`` (default: the CPU).

        On a GPU the words are computed there (:func:`uniform_words_torch`); the values are the
        same bits on every device.
        """
        nwords = (n + 3) // 4
        if device is not None and torch.device(device).type != "cpu":
            return uniform_words_torch(self.key, self.take(n), nwords, device).view(torch.int16)[:n]
        words = uniform_words(self.key, self.take(n), nwords)
        return torch.from_numpy(words.view(np.int16)[:n])
