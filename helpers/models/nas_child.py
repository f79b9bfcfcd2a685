"""The child network of the RLMedNAS search (Zoph & Le, ICLR 2017; RLMedNAS), as a registry model.

An architecture (*arch*) is a list of per-layer dicts ``{"filters": f, "kernel": k, "dropout": d}``.
Each layer is ``Conv2d(k x k, padding k // 2) -> MaxPool2d(2) -> ReLU -> Dropout(d)``; after the
last layer the features are flattened into one ``Linear`` to the classes. One layer is the
RLMedNAS reference child ``Conv2d(1->f, k) -> ReLU -> MaxPool2d(2) -> Dropout(d) -> Linear(f*14*14
-> 11)``: max-pooling before the ReLU computes the same function with the same gradient (both are
monotone; a window whose maximum is <= 0 passes no gradient either way) on a 4x smaller tensor.
At 28 px with 11 classes a one-layer child has ``f * (k**2 + 2157) + 11`` parameters.

Dropout masks: given 16-bit uniforms ``u`` (one per activation, NHWC order; see
:class:`helpers.nas.DropoutStream`), an activation is kept iff ``u >= keep_threshold(p)`` and kept
ones are scaled by :func:`dropout_scale` (``1 / (1 - p)`` as ``nn.Dropout``). Without a stream
attached, :class:`ChildDropout` is ``F.dropout``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["ARCH_KEYS", "normalize_arch", "feature_sides", "child_params", "child_flops", "keep_threshold",
           "dropout_scale", "apply_dropout", "ChildDropout", "NASChild", "nas_child"]

ARCH_KEYS = ("filters", "kernel", "dropout")


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
        if keys != set(ARCH_KEYS):
            raise ValueError(f"layer {i} must have exactly the keys {list(ARCH_KEYS)}; got {sorted(keys)}")
        f, k, d = layer["filters"], layer["kernel"], layer["dropout"]
        if int(f) != f or f < 1:
            raise ValueError(f"layer {i}: filters must be a positive integer, got {f!r}")
        if int(k) != k or k < 1 or k % 2 == 0:
            raise ValueError(f"layer {i}: kernel must be a positive odd integer, got {k!r}")
        if not 0.0 <= float(d) < 1.0:
            raise ValueError(f"layer {i}: dropout must be in [0, 1), got {d!r}")
        out.append({"filters": int(f), "kernel": int(k), "dropout": float(d)})
    return out


def feature_sides(arch: Sequence[Mapping], image_size: int) -> list[int]:
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
    sides = feature_sides(arch, image_size)
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
    sides = feature_sides(arch, image_size)
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
    """int16 threshold: an activation is kept iff its 16-bit uniform ``u >= keep_threshold(p)``.

    Keep probability: exact for p = 0.25 and 0.5, 0.10000610 for p = 0.1.
    """
    return int(round(float(p) * 65536)) - 32768


def dropout_scale(p: float) -> float:
    """``1 / (1 - p)`` rounded to float32 (the factor every engine multiplies kept activations by)."""
    return float(np.float32(1.0 / (1.0 - float(p))))


def apply_dropout(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with the activations whose uniform ``u`` (int16, same shape) is below the threshold zeroed."""
    return torch.where(u >= keep_threshold(p), x * dropout_scale(p), 0.0)


class ChildDropout(nn.Module):
    """Dropout whose masks come from a dropout stream when one is attached (else ``F.dropout``).

    A stream is anything with ``int16(n, device)`` returning its next ``n`` uniforms
    (:class:`helpers.nas.DropoutStream`); they are read in NHWC order.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.stream = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.stream is None:
            return F.dropout(x, self.p, True)
        n, c, h, w = x.shape
        u = self.stream.int16(n * h * w * c, x.device).view(n, h, w, c).permute(0, 3, 1, 2)
        return apply_dropout(x, u, self.p)

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
        sides = feature_sides(self.arch, image_size)
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

    def set_dropout_stream(self, stream) -> None:
        """Attach ``stream`` (or None: ``F.dropout``) to every dropout layer."""
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
