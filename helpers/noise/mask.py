"""The noise-mask pipeline of Policy Gradient-Driven Noise Mask (Yavuz & Yang 2024), batched.

A mask is one value in ``(0, 1)`` per cell of a ``G x G`` grid per image. It is upsampled to the
image size (nearest neighbour, as the reference does), blurred with a Gaussian (kernel size and
sigma are params; the reference uses 13 and 6 at 224 px) and multiplied into the *normalised*
image, broadcast over its channels. Every step is one batched tensor operation on the training
device: there is no per-image Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ParamsError

__all__ = ["MaskConfig", "gaussian_kernel1d", "blur", "upsample", "make_mask", "apply_mask"]


@dataclass
class MaskConfig:
    """Shape of the masks: ``grid`` cells per side, Gaussian ``kernel`` (odd, pixels) and ``sigma``."""

    grid: int = 7
    kernel: int = 5
    sigma: float = 1.0

    def __post_init__(self):
        if self.grid < 1:
            raise ParamsError(f"mask grid must be >= 1, got {self.grid}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ParamsError(f"mask kernel must be an odd number of pixels >= 1, got {self.kernel} (e.g. 5)")
        if self.sigma <= 0:
            raise ParamsError(f"mask sigma must be > 0, got {self.sigma}")

    @property
    def cells(self) -> int:
        return self.grid * self.grid


def gaussian_kernel1d(kernel: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps of odd length ``kernel`` (sums to 1)."""
    r = torch.arange(kernel, device=device, dtype=dtype) - (kernel - 1) / 2
    w = torch.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


def blur(m: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` masks with reflect padding (keeps the value range
    and, away from a flat border, the mean). ``kernel == 1`` returns ``m``."""
    if kernel == 1:
        return m
    w = gaussian_kernel1d(kernel, sigma, m.device, m.dtype)
    pad = kernel // 2
    mode = "reflect" if min(m.shape[-2:]) > pad else "replicate"
    out = F.conv2d(F.pad(m, (pad, pad, 0, 0), mode=mode), w.view(1, 1, 1, kernel))
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode=mode), w.view(1, 1, kernel, 1))


def upsample(cells: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """``(B, grid*grid)`` cell values to ``(B, 1, H, W)`` by nearest-neighbour upsampling."""
    b = cells.shape[0]
    return F.interpolate(cells.view(b, 1, grid, grid), size=size, mode="nearest")


def make_mask(cells: torch.Tensor, cfg: MaskConfig, size: tuple[int, int]) -> torch.Tensor:
    """Sampled cell values ``(B, G*G)`` -> blurred masks ``(B, 1, H, W)``, without gradient."""
    with torch.no_grad():
        return blur(upsample(cells.detach().float(), cfg.grid, size), cfg.kernel, cfg.sigma)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The classifier's input: the normalised image times the mask, broadcast over channels."""
    return x * mask.to(x.dtype)
