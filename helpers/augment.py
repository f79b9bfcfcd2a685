"""Batched per-sample augmentation on tensors (CPU or GPU), and albumentations for large images.

:func:`make_augment` builds a callable ``aug(x, generator) -> x`` from a params mapping; ``x`` is a
float batch in ``[0, 1]`` of shape (B, C, H, W). Every image draws its own random parameters (from
``generator``, on the CPU, so results do not depend on the device), and all geometric ops are
fused into one ``affine_grid`` + ``grid_sample`` call per batch.

Spec keys (all optional; absent or zero means off)::

    hflip: 0.5            probability of a horizontal flip
    vflip: 0.0            probability of a vertical flip
    rotate: 15            max rotation in degrees (uniform in [-rotate, rotate])
    translate: 0.1        max shift as a fraction of the image size
    scale: [0.9, 1.1]     zoom range
    crop_scale: [0.8, 1]  RandomResizedCrop area range (aspect ratio 3/4..4/3)
    pad: zeros            what the geometric ops fill the uncovered border with: zeros (black, as
                          torchvision's default fill), border (the edge pixels) or reflection
    brightness: 0.1       additive brightness jitter
    contrast: 0.1         multiplicative contrast jitter
    erase: 0.25           probability of random erasing (cutout) with erase_scale area
    erase_scale: [0.02, 0.2]
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .config import ParamsError, check_keys

SPEC_KEYS = ("hflip", "vflip", "rotate", "translate", "scale", "crop_scale", "pad",
             "brightness", "contrast", "erase", "erase_scale")
#: Fills of the geometric ops (``pad``), as ``grid_sample``'s ``padding_mode``. Zeros is the default;
#: on OrganAMNIST's tight crops, a 10 % zero-padded translation stopped val improving after epoch 3
#: where border or reflection padding did not (the fold-diagnostics chapter's issue note).
PAD_MODES = ("zeros", "border", "reflection")


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def random_affine_theta(n: int, gen: torch.Generator, *, rotate: float = 0.0, translate: float = 0.0,
                        scale: tuple[float, float] | None = None,
                        crop_scale: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-sample 2x3 affine matrices (output -> input coordinates, as ``affine_grid`` wants)."""
    eye = torch.eye(3).expand(n, 3, 3).clone()
    m = eye.clone()
    if crop_scale:
        area = _uniform(gen, n, *crop_scale)
        log_r = _uniform(gen, n, math.log(3 / 4), math.log(4 / 3))
        w = torch.sqrt(area * log_r.exp())
        h = torch.sqrt(area / log_r.exp())
        square = (w > 1) | (h > 1)  # like torchvision's fallback: keep the area, drop the aspect ratio
        w = torch.where(square, area.sqrt(), w).clamp(max=1.0)
        h = torch.where(square, area.sqrt(), h).clamp(max=1.0)
        cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
        crop = eye.clone()
        crop[:, 0, 0], crop[:, 1, 1], crop[:, 0, 2], crop[:, 1, 2] = w, h, cx, cy
        m = crop @ m
    if scale:
        s = 1.0 / _uniform(gen, n, *scale)
        zoom = eye.clone()
        zoom[:, 0, 0], zoom[:, 1, 1] = s, s
        m = zoom @ m
    if rotate:
        a = torch.deg2rad(_uniform(gen, n, -rotate, rotate))
        rot = eye.clone()
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        m = rot @ m
    if translate:
        shift = eye.clone()
        shift[:, 0, 2] = _uniform(gen, n, -2 * translate, 2 * translate)
        shift[:, 1, 2] = _uniform(gen, n, -2 * translate, 2 * translate)
        m = shift @ m
    return m[:, :2, :]


def erase_masks(n: int, h: int, w: int, gen: torch.Generator, p: float,
                scale: tuple[float, float] = (0.02, 0.2)) -> torch.Tensor:
    """(n, 1, h, w) float masks, 1 inside one random box per selected sample (random erasing)."""
    area = _uniform(gen, n, *scale) * h * w
    ratio = _uniform(gen, n, math.log(0.3), math.log(3.3)).exp()
    bh = torch.sqrt(area * ratio).clamp(1, h)
    bw = torch.sqrt(area / ratio).clamp(1, w)
    top = torch.rand(n, generator=gen) * (h - bh)
    left = torch.rand(n, generator=gen) * (w - bw)
    on = (torch.rand(n, generator=gen) < p).float()
    ys = torch.arange(h).view(1, h, 1).float()
    xs = torch.arange(w).view(1, 1, w).float()
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + bh).view(-1, 1, 1)) &
              (xs >= left.view(-1, 1, 1)) & (xs < (left + bw).view(-1, 1, 1))).float()
    return (inside * on.view(-1, 1, 1)).unsqueeze(1)


class BatchAugment:
    """Callable batched augmentation built from a spec mapping (see the module docstring)."""

    def __init__(self, spec: Mapping[str, Any]):
        check_keys(spec, SPEC_KEYS, "augment spec")
        self.spec = dict(spec)
        g = self.spec
        self.pad = g.get("pad") or "zeros"
        if self.pad not in PAD_MODES:
            raise ParamsError(f"augment spec: pad={self.pad!r} is not a fill the warp knows. Fix: one of "
                              f"{', '.join(PAD_MODES)}.")
        self.geometric = any(g.get(k) for k in ("rotate", "translate", "scale", "crop_scale"))

    def __repr__(self) -> str:
        return f"BatchAugment({self.spec})"

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        g, n = self.spec, x.shape[0]
        dev = x.device
        if self.geometric:
            theta = random_affine_theta(n, gen, rotate=g.get("rotate", 0.0), translate=g.get("translate", 0.0),
                                        scale=g.get("scale"), crop_scale=g.get("crop_scale"))
            grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.pad, align_corners=False)
        for key, dim in (("hflip", -1), ("vflip", -2)):
            if g.get(key):
                flip = (torch.rand(n, generator=gen) < g[key]).to(dev).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(dim), x)
        if g.get("brightness") or g.get("contrast"):
            c = _uniform(gen, n, 1 - g.get("contrast", 0.0), 1 + g.get("contrast", 0.0)).to(dev).view(-1, 1, 1, 1)
            b = _uniform(gen, n, -g.get("brightness", 0.0), g.get("brightness", 0.0)).to(dev).view(-1, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * c + mean + b).clamp_(0.0, 1.0)
        if g.get("erase"):
            mask = erase_masks(n, x.shape[-2], x.shape[-1], gen, g["erase"], tuple(g.get("erase_scale", (0.02, 0.2))))
            x = x * (1.0 - mask.to(dev, x.dtype))
        return x


def make_augment(spec: Mapping[str, Any] | None) -> BatchAugment | None:
    """A :class:`BatchAugment` from a params mapping, or ``None`` when the spec is empty/off."""
    if not spec:
        return None
    if not isinstance(spec, Mapping):
        raise ParamsError(f"augment must be a mapping of op: setting, got {spec!r}")
    return BatchAugment(spec)


class AlbumentationsAugment:
    """Per-image albumentations pipeline applied to a batch (for larger images, on CPU).

    ``pipeline`` is an ``albumentations.Compose``; it receives each image as float32 HWC in
    [0, 1]. Slower than :class:`BatchAugment` but offers albumentations' whole catalogue.
    The pipeline is re-seeded from ``gen`` every batch, so runs are reproducible.
    """

    def __init__(self, pipeline: Callable):
        self.pipeline = pipeline

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        if hasattr(self.pipeline, "set_random_seed"):
            self.pipeline.set_random_seed(seed)
        arr = x.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        out = np.stack([self.pipeline(image=img)["image"] for img in arr])
        if out.ndim == 3:
            out = out[..., None]
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype).contiguous()
