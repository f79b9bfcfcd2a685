"""Shared fixtures: small MedMNIST-layout npz files made on the fly, and the real shared data."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402



def write_medmnist_npz(root, flag: str, size: int = 28, n=(40, 12, 16), seed: int = 0) -> Path:
    """Write random data for ``flag`` at ``size`` in the official MedMNIST npz layout.

    Keys ``{split}_images`` (uint8, ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB, per
    ``medmnist.INFO[flag]['n_channels']``) and ``{split}_labels`` (uint8 ``(N, 1)``, or ``(N, L)``
    0/1 for multi-label flags). The file name is medmnist's: ``{flag}.npz`` at 28 px, else
    ``{flag}_{size}.npz``. Every class appears in every split (when the split is big enough), so
    stratification and AUCs are defined. The MD5 is of course not the official one: load with
    ``verify=False``.
    """
    from medmnist.info import INFO

    meta = INFO[flag]
    n_classes = len(meta["label"])
    multilabel = meta["task"].startswith("multi-label")
    channels = meta["n_channels"]
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size) if channels == 1 else (count, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if multilabel:
            labels = (rng.random((count, n_classes)) < 0.3).astype(np.uint8)
            labels[np.arange(count), np.arange(count) % n_classes] = 1  # every label occurs
        else:
            labels = rng.permutation(np.arange(count) % n_classes).astype(np.uint8).reshape(count, 1)
        arrays[f"{split}_labels"] = labels
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def make_npz():
    """Factory ``make_npz(root, flag, size=28, n=(train, val, test), seed=0) -> Path``."""
    return write_medmnist_npz


@pytest.fixture
def shared_data() -> Path:
    """The folder of real MedMNIST files (the data root, :func:`helpers.config.data_root`); skips when it is absent."""
    from helpers.config import data_root

    path = data_root()
    if not (path / "breastmnist.npz").is_file():
        pytest.skip(f"real MedMNIST data not found in {path}")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny networks: thread start-up and spinning dominate them, and a busy
    machine's oversubscription hurts them most (restored afterwards). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def retina(tmp_path, make_npz, monkeypatch):
    """A small generated RetinaMNIST (40/10/10 images, ordinal grades 0-4), with a private cache."""
    from helpers.data import load

    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RLMED_PROGRESS", "none")
    make_npz(tmp_path / "data", "retinamnist", n=(40, 10, 10))
    return load("retinamnist", 28, tmp_path / "data", verify=False, download=False)
