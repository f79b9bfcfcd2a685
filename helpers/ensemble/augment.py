"""The reference's augmentation in two implementations: per image with albumentations, batched on tensors.

The reference (torchvision, per image) applies RandomResizedCrop(scale 0.8-1), horizontal flip 0.5,
vertical flip 0.3, rotation 20, an affine (degrees 20, translate 0.1, scale 0.85-1.15, shear 10),
one randomly chosen of colour jitter (.4, .4, .4, hue .1) / Gaussian blur (3, sigma 0.1-2) /
equalize, then random erasing (p 0.2, area 0.02-0.2).

* :func:`reference_pipeline`: that list with albumentations, on uint8 images, one image at a time.
  :class:`AlbumentationsHook` runs it inside :func:`helpers.train.fit` (``transform_batch``).
* :data:`TENSOR_SPEC`: the closest :class:`helpers.augment.BatchAugment` spec (every image its own
  draw, one fused ``grid_sample`` per batch). It has no shear, blur or equalize; brightness and
  contrast stand in for the colour jitter, applied to every image rather than one of three.

:func:`throughput` times both on the same images (images/s), for ``benchmarks/ensemble_augment.py``
and for the page, which says which one its profile used.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import torch

from ..augment import make_augment
from ..train import Hook

__all__ = ["TENSOR_SPEC", "BACKENDS", "reference_pipeline", "AlbumentationsHook", "backend_setup", "throughput"]

BACKENDS = ("tensor", "albumentations")

#: the reference's augmentation as a BatchAugment spec (see the module docstring for what differs)
TENSOR_SPEC: dict = {"crop_scale": [0.8, 1.0], "hflip": 0.5, "vflip": 0.3, "rotate": 20, "translate": 0.1,
                     "scale": [0.85, 1.15], "brightness": 0.4, "contrast": 0.4, "erase": 0.2,
                     "erase_scale": [0.02, 0.2]}


def reference_pipeline(size: int, seed: int | None = None):
    """The reference's augmentation list as an ``albumentations.Compose`` for uint8 ``(H, W, C)`` images."""
    import albumentations as A

    ops = [
        A.RandomResizedCrop(size=(size, size), scale=(0.8, 1.0), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.3),
        A.Rotate(limit=20, border_mode=0, p=1.0),
        A.Affine(rotate=(-20, 20), translate_percent=(-0.1, 0.1), scale=(0.85, 1.15), shear=(-10, 10), p=1.0),
        A.OneOf([A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.4, p=1.0),
                 A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 2.0), p=1.0),
                 A.Equalize(p=1.0)], p=1.0),
        A.Erasing(scale=(0.02, 0.2), p=0.2),
    ]
    return A.Compose(ops, seed=seed)


def _apply(pipeline, x01: torch.Tensor) -> torch.Tensor:
    """Run ``pipeline`` on every image of a float batch in [0, 1] ``(B, C, H, W)``; same shape back."""
    arr = (x01.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.stack([pipeline(image=img)["image"] for img in arr])
    if out.ndim == 3:
        out = out[..., None]
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


class AlbumentationsHook(Hook):
    """The albumentations pipeline inside the one training loop (``transform_batch``).

    The loader hands over normalised batches ``(x - mean) / std``; the hook undoes the normalisation,
    augments each image with :func:`reference_pipeline` (re-seeded from its own generator every batch,
    so runs are reproducible and resumable) and normalises again.
    """

    def __init__(self, size: int, seed: int = 0, mean: float = 0.5, std: float = 0.5):
        self.size, self.mean, self.std = size, mean, std
        self.pipeline = reference_pipeline(size)
        self.generator = torch.Generator().manual_seed(seed)

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, model) -> tuple[torch.Tensor, torch.Tensor]:
        if not model.training:
            return x, y
        self.pipeline.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        out = _apply(self.pipeline, x * self.std + self.mean)
        return out.sub_(self.mean).div_(self.std).to(x.device, x.dtype), y

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


def backend_setup(backend: str, size: int, seed: int) -> tuple[Mapping | None, list]:
    """``(augment spec for train_and_test, hooks)`` of an augmentation backend (see :data:`BACKENDS`)."""
    if backend == "tensor":
        return dict(TENSOR_SPEC), []
    if backend == "albumentations":
        return None, [AlbumentationsHook(size, seed)]
    if backend == "none":
        return None, []
    raise ValueError(f"augment_backend {backend!r} unknown; use one of {BACKENDS} or 'none'")


def throughput(images: torch.Tensor, batch_size: int = 32, repeats: int = 2, seed: int = 0) -> dict:
    """Images/s of both implementations on the same uint8 images ``(N, C, H, W)``, and their ratio.

    The batched path runs :class:`helpers.augment.BatchAugment` with :data:`TENSOR_SPEC` per batch
    of ``batch_size``; the albumentations path runs :func:`reference_pipeline` image by image. The
    best of ``repeats`` passes is kept (the least disturbed by other work on the machine).
    """
    x = images.float().div(255.0)
    size = images.shape[-1]
    aug, gen = make_augment(TENSOR_SPEC), torch.Generator().manual_seed(seed)
    pipe = reference_pipeline(size, seed)

    def batched():
        for s in range(0, len(x), batch_size):
            aug(x[s:s + batch_size], gen)

    def per_image():
        for s in range(0, len(x), batch_size):
            _apply(pipe, x[s:s + batch_size])

    out = {}
    for name, fn in (("tensor", batched), ("albumentations", per_image)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_img_s"] = len(x) / best
    out["ratio"] = out["tensor_img_s"] / out["albumentations_img_s"]
    out["faster"] = "tensor" if out["ratio"] >= 1 else "albumentations"
    out.update(images=len(x), size=size, batch_size=batch_size)
    return out
