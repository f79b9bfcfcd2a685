"""Masks on normalised images: ``1`` marks a pixel the agent acts on (erases), ``0`` one it leaves.

Images reach the hooks normalised, ``(x - mean) / std``; an erased pixel is set to the value of a
black pixel, :func:`fill_value` (``-mean / std``), the reference's zero fill before normalisation.
"""
from __future__ import annotations

import torch


def fill_value(mean: float = 0.5, std: float = 0.5) -> float:
    """The normalised value of a black (0) pixel: what erased pixels are set to."""
    return (0.0 - mean) / std


def erase(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """``x`` with the pixels where ``mask`` is 1 set to ``fill``; ``mask`` (B, 1, H, W) in [0, 1] (soft works)."""
    if mask.shape[-2:] != x.shape[-2:] or mask.shape[0] != x.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(x.shape)}")
    mask = mask.to(x.dtype)
    return x * (1.0 - mask) + fill * mask


def keep_only(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """The inverse masking: keep the pixels where ``mask`` is 1, set the others to ``fill``."""
    return erase(x, 1.0 - mask.to(x.dtype), fill)


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of two binary masks (B, 1, H, W); 1 where both are empty."""
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
