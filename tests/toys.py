"""Toy data and a plain trainer shared by the tests of the masking chapters (APGA, noise): a binary
set whose label is carried by a bright square, so a test can check what a mask or a map points at."""
from __future__ import annotations

import torch
from torch import nn

from helpers import data as data_mod


def square_ds(n_per_class=(30, 12), size: int = 16, seed: int = 0, *, side: int = 5,
              at: int | None = None) -> data_mod.MedMNIST:
    """Class 1 has a bright ``side`` x ``side`` square on a dark noisy background, class 0 the
    background alone; every split has ``n_per_class`` images per class. The square sits at rows and
    columns ``at .. at + side - 1`` when ``at`` is given (the label lives in that region only), else at a
    random place per image."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for name in ("train", "val", "test"):
        imgs, labels = [], []
        for c, n in enumerate(n_per_class):
            for _ in range(n):
                img = (torch.rand(1, size, size, generator=g) * 60).to(torch.uint8)
                if c == 1:
                    r, s = (at, at) if at is not None else torch.randint(0, size - side, (2,), generator=g).tolist()
                    img[:, r:r + side, s:s + side] = 250
                imgs.append(img)
                labels.append(c)
        splits[name] = data_mod.Split(torch.stack(imgs), torch.tensor(labels))
    return data_mod.MedMNIST("toy", size, "binary-class", 1, {"0": "no square", "1": "square"}, splits)


def train_plain(model: nn.Module, split: data_mod.Split, epochs: int, batch_size: int, lr: float = 3e-3) -> nn.Module:
    """A few epochs of plain Adam on cross-entropy (a toy classifier for the tests to probe)."""
    loader = data_mod.TensorLoader(split, batch_size, shuffle=True, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model
