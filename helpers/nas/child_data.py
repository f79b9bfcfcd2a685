"""The data of one :func:`helpers.nas.train_children` call, shared by every child and both engines."""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["ChildData", "normalise", "autocast", "clear_data_cache"]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x / 255 - 0.5) / 0.5`` (the same ops in both engines: bitwise equal)."""
    return images.float().div_(255.0).sub_(0.5).div_(0.5)


def autocast(precision: str, device: torch.device):
    """``torch.autocast(bfloat16)`` for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ChildData:
    """Train/val tensors of one call, shared by every child.

    The fast engine keeps the last one (normalised and padded images) for the next call with the
    very same split tensors (compared by identity, so changed data are never served stale).
    """

    _last: "tuple | None" = None
    _last_lock = threading.Lock()

    @classmethod
    def get(cls, train_split, val_split, max_train, device) -> "ChildData":
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

    def set_normalised(self, split: str, x: torch.Tensor) -> None:
        """Use ``x`` as the normalised images of ``split`` (tests feed float images this way)."""
        self._norm[split] = x
        self._pad = {k: v for k, v in self._pad.items() if k[0] != split}

    def normalised(self, split: str) -> torch.Tensor:
        if split not in self._norm:
            imgs = self.train_images if split == "train" else self.val_images
            self._norm[split] = normalise(imgs).to(self.device)
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
        """The training order of every epoch: the successive ``randperm`` of ``Generator(data_seed)``."""
        gen = torch.Generator().manual_seed(int(data_seed))
        return [torch.randperm(self.n_train, generator=gen) for _ in range(epochs)]


def clear_data_cache() -> None:
    """Drop the fast engine's kept copy of the last splits (normalised and padded images)."""
    with ChildData._last_lock:
        ChildData._last = None
