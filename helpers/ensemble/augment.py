"""The reference's augmentation in two implementations: per image with albumentations, batched on tensors.

The reference (torchvision, per image) applies RandomResizedCrop(scale 0.8-1), horizontal flip 0.5,
vertical flip 0.3, rotation 20, an affine (degrees 20, translate 0.1, scale 0.85-1.15, shear 10),
one randomly chosen of colour jitter (.4, .4, .4, hue .1) / Gaussian blur (3, sigma 0.1-2) /
equalize, then random erasing (p 0.2, area 0.02-0.2).

* :func:`reference_pipeline`: that list with albumentations, on uint8 images, one image at a time.
  :class:`AlbumentationsHook` runs it inside :func:`helpers.train.fit` (``transform_batch``).
* :data:`TENSOR_SPEC`: the geometric part as a :class:`helpers.augment.BatchAugment` spec (every
  image its own draw, one fused ``grid_sample`` per batch; no shear), and :class:`ReferenceColour`
  for the rest, batched too: one of colour jitter (torchvision's multiplicative brightness and
  contrast factors 0.6-1.4) / 3x3 Gaussian blur / equalize per image, then random erasing to the
  normalised zero. :class:`TensorColourHook` runs it inside :func:`helpers.train.fit`.

  An earlier ``TENSOR_SPEC`` put ``BatchAugment``'s *additive* brightness (+-0.4 on [0, 1]) and
  contrast 0.4 on *every* image: twice the reference's shift on a mid-grey image, with clipping, on
  three times as many images. It was stronger than the reference's augmentation; at 3 epochs it
  left 4 of 4 diagnostic members on the majority class (2-3 of 4 with the reference-strength
  pipelines), so it added to, but was not the main cause of, the quick profile's undertrained
  members (the budget was; see params/ensemble.yaml).

:func:`throughput` times both on the same images (images/s), for ``benchmarks/ensemble_augment.py``
and for the page, which says which one its profile used.
"""
from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import torch

from ..augment import erase_masks, make_augment
from ..train import Hook

__all__ = ["TENSOR_SPEC", "BACKENDS", "reference_pipeline", "AlbumentationsHook", "ReferenceColour",
           "TensorColourHook", "backend_setup", "throughput"]

BACKENDS = ("tensor", "albumentations")

#: the reference's geometric augmentation as a BatchAugment spec; colour, blur, equalize and erasing
#: are :class:`ReferenceColour` (see the module docstring for what differs)
TENSOR_SPEC: dict = {"crop_scale": [0.8, 1.0], "hflip": 0.5, "vflip": 0.3, "rotate": 20, "translate": 0.1,
                     "scale": [0.85, 1.15]}


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


class ReferenceColour:
    """The reference's photometric steps, batched, every image its own draw from ``gen``:

    one of three per image (``OneOf``, each with probability 1/3): colour jitter as torchvision's
    ``ColorJitter(brightness=.4, contrast=.4)`` (``x * b`` then ``(x - mean) * c + mean``, factors
    uniform in 0.6-1.4; saturation and hue do nothing to grey images), a 3x3 Gaussian blur with
    sigma uniform in 0.1-2, or histogram equalization; then random erasing (p 0.2, area 0.02-0.2)
    of a box to 0 *after* normalisation, as torchvision's ``RandomErasing`` after ``Normalize``.
    ``__call__(x01, gen)`` takes and returns float batches in [0, 1] without the erasing;
    :meth:`erase` erases a normalised batch.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, blur_sigma=(0.1, 2.0), erase: float = 0.2,
                 erase_scale=(0.02, 0.2)):
        self.brightness, self.contrast, self.blur_sigma = brightness, contrast, tuple(blur_sigma)
        self.erase_p, self.erase_scale = erase, tuple(erase_scale)

    @property
    def fingerprint(self) -> dict:
        return {"reference_colour": [self.brightness, self.contrast, list(self.blur_sigma), self.erase_p,
                                     list(self.erase_scale)]}

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        choice = torch.randint(0, 3, (n,), generator=gen)
        b = 1 + (torch.rand(n, generator=gen) * 2 - 1) * self.brightness
        c = 1 + (torch.rand(n, generator=gen) * 2 - 1) * self.contrast
        sigma = torch.rand(n, generator=gen) * (self.blur_sigma[1] - self.blur_sigma[0]) + self.blur_sigma[0]
        view = (-1, 1, 1, 1)
        jit = (x * b.view(view).to(x)).clamp(0, 1)
        mean = jit.mean(dim=(1, 2, 3), keepdim=True)
        jit = ((jit - mean) * c.view(view).to(x) + mean).clamp(0, 1)
        taps = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]).view(1, 3) ** 2 / (2 * sigma.view(-1, 1) ** 2))
        taps = taps / taps.sum(1, keepdim=True)                        # (n, 3) separable kernel
        kernel = (taps[:, :, None] * taps[:, None, :]).to(x)           # (n, 3, 3)
        ch = x.shape[1]
        k = kernel.repeat_interleave(ch, 0).unsqueeze(1)                # (n*ch, 1, 3, 3)
        flat = torch.nn.functional.pad(x.reshape(1, n * ch, *x.shape[-2:]), (1, 1, 1, 1), mode="reflect")
        blur = torch.nn.functional.conv2d(flat, k, groups=n * ch).reshape(x.shape)
        q = (x * 255).round().long().clamp(0, 255).reshape(n * ch, -1)
        hist = torch.zeros(n * ch, 256).scatter_add_(1, q.cpu(), torch.ones(q.shape)).to(x)
        cdf = hist.cumsum(1)
        lo = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).min(1, keepdim=True).values
        span = cdf[:, -1:] - lo
        lut = ((cdf - lo) / span.clamp(min=1)).clamp(0, 1)
        eq = lut.gather(1, q.to(lut.device))
        eq = torch.where(span > 0, eq, x.reshape(n * ch, -1)).reshape(x.shape)   # a flat image stays as it is (PIL)
        pick = choice.view(view).to(x.device)
        return torch.where(pick == 0, jit, torch.where(pick == 1, blur, eq))

    def erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mask = erase_masks(x.shape[0], x.shape[-2], x.shape[-1], gen, self.erase_p, self.erase_scale)
        return x * (1.0 - mask.to(x.device, x.dtype))


class TensorColourHook(Hook):
    """:class:`ReferenceColour` inside the one training loop (``transform_batch``, training batches
    only): undoes the loader's normalisation, applies the colour step, normalises again, erases."""

    def __init__(self, seed: int = 0, mean: float = 0.5, std: float = 0.5, colour: ReferenceColour | None = None):
        self.mean, self.std = mean, std
        self.colour = colour or ReferenceColour()
        self.generator = torch.Generator().manual_seed(seed)
        self.fingerprint = {**self.colour.fingerprint, "mean": mean, "std": std}

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, model) -> tuple[torch.Tensor, torch.Tensor]:
        if not model.training:
            return x, y
        out = self.colour((x * self.std + self.mean).clamp(0, 1), self.generator)
        return self.colour.erase((out - self.mean) / self.std, self.generator).to(x.dtype), y

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


def backend_setup(backend: str, size: int, seed: int) -> tuple[Mapping | None, list]:
    """``(augment spec for train_and_test, hooks)`` of an augmentation backend (see :data:`BACKENDS`)."""
    if backend == "tensor":
        return dict(TENSOR_SPEC), [TensorColourHook(seed)]
    if backend == "albumentations":
        return None, [AlbumentationsHook(size, seed)]
    if backend == "none":
        return None, []
    raise ValueError(f"augment_backend {backend!r} unknown; use one of {BACKENDS} or 'none'")


def throughput(images: torch.Tensor, batch_size: int = 32, repeats: int = 2, seed: int = 0) -> dict:
    """Images/s of both implementations on the same uint8 images ``(N, C, H, W)``, and their ratio.

    The batched path runs :class:`helpers.augment.BatchAugment` with :data:`TENSOR_SPEC` and
    :class:`ReferenceColour` per batch of ``batch_size``; the albumentations path runs
    :func:`reference_pipeline` image by image. The best of ``repeats`` passes is kept (the least
    disturbed by other work on the machine).
    """
    x = images.float().div(255.0)
    size = images.shape[-1]
    aug, gen = make_augment(TENSOR_SPEC), torch.Generator().manual_seed(seed)
    colour = ReferenceColour()
    pipe = reference_pipeline(size, seed)

    def batched():
        for s in range(0, len(x), batch_size):
            colour.erase(colour(aug(x[s:s + batch_size], gen), gen), gen)

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
