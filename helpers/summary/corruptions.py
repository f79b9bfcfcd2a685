"""Image corruptions of increasing severity, for the robustness of stored final models.

Five corruptions, each at severities 1..5 (0 is the clean image), applied to the uint8 test images
before a model's normalisation. The transforms are albumentations' (already a pinned dependency; a
dedicated corruption package, ``imagecorruptions`` 1.1.2, was checked with ``pip install --dry-run``
and would add ``opencv-python`` beside our ``opencv-python-headless``: two distributions of one
``cv2`` module). Each transform is given a one-point range, so a severity is one fixed strength:

=================  ==============================================  =================================
name               transform (albumentations 2.0.8)                 strength at severity 1..5
=================  ==============================================  =================================
``gaussian_noise``  ``GaussNoise``, one noise field for all          std = .08 .12 .18 .26 .38 of the
                    channels (a gray image stays gray)               range (ImageNet-C's values)
``gaussian_blur``   ``GaussianBlur``, kernel from sigma              sigma = .5 .75 1 1.25 1.5 px at
                                                                     28 px, scaled with the side
``contrast``        ``ColorJitter`` contrast only: blend with the    factor = .4 .3 .2 .1 .05
                    image's mean gray                                (ImageNet-C's values)
``jpeg``            ``ImageCompression`` (JPEG)                      quality = 25 18 15 10 7
                                                                     (ImageNet-C's values)
``pixelate``        OpenCV (albumentations' backend): area-average   side = 14 11 9 7 5 px at 28 px,
                    down to a smaller side, nearest back up          scaled with the side
=================  ==============================================  =================================

The ladders follow ImageNet-C (Hendrycks & Dietterich, ICLR 2019) where a value does not depend on
the image side; ImageNet-C's blur sigmas (1..6 px at 224 px) would vanish at 28 px scaled linearly
and erase the image unscaled, so the blur ladder is ours. ImageNet-C's pixelation factors (.6 .5
.4 .3 .25) give 28 px images sides of 17, 14, 11, 8 and 7 px, and a side that does not divide 28
leaves uneven blocks that differ more from the image than the next, smaller, even one (17 px is
further from the image than 14 px): the ladder is not monotone. Ours halves the side first (14 px,
2 x 2 blocks) and then shrinks it, which is monotone on MedMNIST images. Noise is drawn from a generator seeded per
call (``seed``), so a corrupted test set is the same for every model scored on it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["CORRUPTIONS", "SEVERITIES", "LEVELS", "corrupt", "ladder_table"]

#: Each corruption's strength at severity 1..5 (see the module docstring).
LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "jpeg": (25, 18, 15, 10, 7),
    "pixelate": (14, 11, 9, 7, 5),
}
CORRUPTIONS = tuple(LEVELS)
SEVERITIES = (1, 2, 3, 4, 5)
#: What the strength of each corruption measures (for the page's table).
UNITS = {"gaussian_noise": "noise std (fraction of 255)", "gaussian_blur": "sigma (px at 28 px)",
         "contrast": "contrast factor (1 = clean)", "jpeg": "JPEG quality (100 = best)",
         "pixelate": "side it is reduced to (px at 28 px)"}


def _transform(name: str, severity: int, side: int):
    import albumentations as A
    import cv2

    v = LEVELS[name][severity - 1]
    if name == "gaussian_noise":
        return A.GaussNoise(std_range=(v, v), mean_range=(0.0, 0.0), per_channel=False, p=1.0)
    if name == "gaussian_blur":
        sigma = v * side / 28
        return A.GaussianBlur(blur_limit=0, sigma_limit=(sigma, sigma), p=1.0)
    if name == "contrast":
        return A.ColorJitter(brightness=(1.0, 1.0), contrast=(v, v), saturation=(1.0, 1.0), hue=(0.0, 0.0), p=1.0)
    if name == "jpeg":
        return A.ImageCompression(compression_type="jpeg", quality_range=(int(v), int(v)), p=1.0)
    if name == "pixelate":
        small = max(1, round(v * side / 28))

        def pixelate(image, **_):
            down = cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA)
            return cv2.resize(down, (side, side), interpolation=cv2.INTER_NEAREST).reshape(image.shape)
        return A.Lambda(image=pixelate, p=1.0)
    raise ValueError(f"corruption {name!r} unknown; use one of {', '.join(CORRUPTIONS)}")


def corrupt(images, name: str, severity: int, seed: int = 0):
    """``images`` (uint8, ``(N, C, H, W)``, a tensor or an array) under corruption ``name`` at
    ``severity`` (0: unchanged; 1..5: see :data:`LEVELS`), as the same type, shape and dtype.

    Deterministic for a given ``seed``: the images are corrupted in order by one seeded pipeline.
    """
    if name not in LEVELS:
        raise ValueError(f"corruption {name!r} unknown; use one of {', '.join(CORRUPTIONS)}")
    if severity not in (0, *SEVERITIES):
        raise ValueError(f"severity {severity!r}: use 0 (clean) or one of {SEVERITIES}")
    is_tensor = isinstance(images, torch.Tensor)
    arr = images.cpu().numpy() if is_tensor else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {arr.dtype} {arr.shape}")
    if severity == 0:
        return images
    import albumentations as A

    pipeline: Callable = A.Compose([_transform(name, severity, arr.shape[-1])], seed=seed)
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
        res = pipeline(image=hwc)["image"]
        out[i] = (res[..., None] if res.ndim == 2 else res).transpose(2, 0, 1)
    return torch.from_numpy(out) if is_tensor else out


def ladder_table():
    """The corruptions and their strength per severity, as a table for the page."""
    import pandas as pd

    return pd.DataFrame([{"corruption": n, "strength": UNITS[n], **{f"severity {s}": v for s, v in zip(SEVERITIES, lv)}}
                         for n, lv in LEVELS.items()])
