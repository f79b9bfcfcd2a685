"""MedMNIST 2D by flag and size, verified, held in memory as uint8 tensors.

Files are found by medmnist's own names under the data root (see :func:`helpers.config.data_root`):
``{flag}.npz`` for 28 px and ``{flag}_{size}.npz`` for 64, 128 and 224 px. Each file's MD5 is
checked against ``medmnist.INFO``; a missing file tries medmnist's real download and, when that
fails (offline), the error names the file, its MD5 and where to put it.

Images stay ``uint8`` in ``(N, C, H, W)``; :class:`TensorLoader` turns a batch into floats on the
target device and applies a batched augmentation in which every image draws its own transform.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .config import data_root as _data_root
from .results import atomic_write_text

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
_MD5_CACHE: dict[tuple, str] = {}


class DataError(RuntimeError):
    """Missing, corrupt or unknown data; the message names the thing and the fix."""


def _info_table() -> dict:
    from medmnist.info import INFO  # light import: only the metadata table
    return INFO


def flags_2d() -> list[str]:
    """All MedMNIST 2D flags known to the installed medmnist."""
    return sorted(f for f in _info_table() if not f.endswith("3d"))


def info(flag: str) -> dict:
    """medmnist's ``INFO`` entry of a 2D flag; an unknown flag lists the valid ones."""
    table = _info_table()
    if flag not in table or flag.endswith("3d"):
        raise DataError(f"unknown MedMNIST 2D flag '{flag}'; valid flags: {', '.join(flags_2d())}")
    return table[flag]


def file_name(flag: str, size: int = 28) -> str:
    """medmnist's file name for a flag and size: ``organamnist.npz``, ``organamnist_64.npz``."""
    if size not in SIZES:
        raise DataError(f"unknown size {size}; MedMNIST sizes are {SIZES}")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(flag: str, size: int = 28) -> str:
    """The official MD5 of a file, from ``medmnist.INFO``."""
    meta = info(flag)
    return meta["MD5"] if size == 28 else meta[f"MD5_{size}"]


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    """MD5 of a file, cached in memory by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digest.update(block)
        _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def _try_download(flag: str, size: int, root: Path) -> Exception | None:
    """Try medmnist's real download URL; return the exception if it failed."""
    meta = info(flag)
    url = meta["url"] if size == 28 else meta[f"url_{size}"]
    try:
        from torchvision.datasets.utils import download_url
        root.mkdir(parents=True, exist_ok=True)
        download_url(url, root=str(root), filename=file_name(flag, size), md5=expected_md5(flag, size))
        return None
    except Exception as exc:  # offline, HTTP error, bad checksum: all reported the same way
        return exc


def locate(flag: str, size: int = 28, root: str | os.PathLike | None = None,
           download: bool = True, verify: bool = True) -> Path:
    """Path of a verified data file; downloads it if allowed, else a :class:`DataError` with the fix."""
    root = _data_root(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder. Fix: point RLMED_DATA (or the data_root "
                        f"param) at the folder that holds {file_name(flag, size)}.")
    path = root / file_name(flag, size)
    md5 = expected_md5(flag, size)
    if not path.is_file():
        failure = _try_download(flag, size, root) if download else None
        if not path.is_file():
            why = f" (download failed: {failure})" if failure else " (download not attempted)"
            raise DataError(
                f"MedMNIST file {path.name} not found in data root {root}{why}.\n"
                f"Fix: put the official file {path.name} (MD5 {md5}, from "
                f"{info(flag)['url' if size == 28 else f'url_{size}']}) in {root}, or point the "
                f"data root elsewhere with RLMED_DATA=/path/to/folder or the data_root param."
            )
    if verify:
        got = md5sum(path)
        if got != md5:
            raise DataError(
                f"{path} has MD5 {got}, but the official {path.name} has MD5 {md5}: the file is "
                f"corrupt, truncated or a different version.\nFix: replace it with the official "
                f"file, or pass verify=False for a file you made yourself (e.g. test data)."
            )
    return path


@dataclass
class Split:
    """One split: ``images`` uint8 (N, C, H, W); ``labels`` int64 (N,) or float32 (N, L) multi-label."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor = field(default=None)  # positions in the official split

    def __post_init__(self):
        if self.index is None:
            self.index = torch.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "Split":
        """The subset at positions ``idx`` (keeps official indices)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx], self.index[idx])


@dataclass
class MedMNIST:
    """A MedMNIST 2D dataset in memory with its metadata from ``INFO``."""

    flag: str
    size: int
    task: str
    n_channels: int
    label_names: dict
    splits: dict

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    @property
    def multilabel(self) -> bool:
        return self.task.startswith("multi-label")

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"no split '{split}'; splits: {list(self.splits)}")
        return self.splits[split]

    def class_counts(self, split: str = "train") -> np.ndarray:
        labels = self.splits[split].labels
        if self.multilabel:
            return labels.sum(0).numpy()
        return np.bincount(labels.numpy(), minlength=self.n_classes)

    def summary(self) -> dict:
        return {"flag": self.flag, "size": self.size, "task": self.task, "channels": self.n_channels,
                "classes": self.n_classes, **{f"n_{s}": len(v) for s, v in self.splits.items()}}


def _to_tensors(images: np.ndarray, labels: np.ndarray, multilabel: bool) -> Split:
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    if multilabel:
        y = torch.from_numpy(labels.astype(np.float32))
    else:
        y = torch.from_numpy(labels.reshape(len(labels), -1)[:, 0].astype(np.int64))
    return Split(x, y)


def check_labels(labels: torch.Tensor, meta: dict, where: str) -> None:
    """Refuse labels that do not fit the flag's classes (e.g. a 7 in a binary task), naming the file."""
    n_classes = len(meta["label"])
    if meta["task"].startswith("multi-label"):
        if labels.dim() != 2 or labels.shape[1] != n_classes or not torch.isin(labels, torch.tensor([0.0, 1.0])).all():
            raise DataError(f"{where}: multi-label labels must be 0/1 with {n_classes} columns, got shape "
                            f"{tuple(labels.shape)}. Fix: replace the file with the official one.")
        return
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        bad = sorted(set(labels[(labels < 0) | (labels >= n_classes)].tolist()))[:5]
        raise DataError(f"{where}: label(s) {bad} outside the {n_classes} classes 0..{n_classes - 1} of this "
                        f"{meta['task']} task. Fix: replace the file with the official one (or fix the labels "
                        f"of a file you made).")


def load(flag: str, size: int = 28, root: str | os.PathLike | None = None, *,
         verify: bool = True, download: bool = True, splits: Sequence[str] = SPLITS) -> MedMNIST:
    """Load a MedMNIST 2D flag at a size from the data root, with the official splits.

    >>> ds = load("organamnist")            # doctest: +SKIP
    >>> ds["train"].images.shape            # doctest: +SKIP
    torch.Size([34561, 1, 28, 28])
    """
    meta = info(flag)
    path = locate(flag, size, root, download=download, verify=verify)
    multilabel = meta["task"].startswith("multi-label")
    try:
        with np.load(path) as npz:
            out = {s: _to_tensors(npz[f"{s}_images"], npz[f"{s}_labels"], multilabel) for s in splits}
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}. Fix: replace it with the official "
                        f"{path.name} (MD5 {expected_md5(flag, size)}).") from exc
    for s, split in out.items():
        check_labels(split.labels, meta, f"{path} ({s} split)")
        c, h = split.images.shape[1], split.images.shape[2]
        if c != meta["n_channels"] or h != size:
            raise DataError(f"{path} {s} images are {c}x{h}px, expected {meta['n_channels']} "
                            f"channel(s) at {size}px for {flag}")
    return MedMNIST(flag, size, meta["task"], meta["n_channels"], dict(meta["label"]), out)


def subsample(ds: MedMNIST, sizes: dict[str, int | None], seed: int = 0) -> MedMNIST:
    """A stratified subset of each split (``None`` keeps a split whole); for smoke and quick profiles."""
    rng = np.random.default_rng(seed)
    new = {}
    for name, split in ds.splits.items():
        n = sizes.get(name)
        if n is None or n >= len(split):
            new[name] = split
            continue
        labels = split.labels.numpy()
        key = labels if labels.ndim == 1 else labels.argmax(1)
        new[name] = split.take(np.sort(_stratified_pick(key, n, rng)))
    return replace(ds, splits=new)


def _stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n`` indices keeping class proportions (every present class keeps at least one)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
    while quota.sum() > n:
        quota[quota.argmax()] -= 1
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota)]
    chosen = np.concatenate(picks)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    extra = rng.choice(rest, n - len(chosen), replace=False) if n > len(chosen) else []
    return np.concatenate([chosen, extra]).astype(int)


def class_balanced_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-sample weights inversely proportional to class frequency (for a weighted sampler)."""
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return (1.0 / counts)[labels]


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """sklearn-style 'balanced' class weights ``n / (k * count_c)`` for the loss."""
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return len(labels) / (n_classes * counts)


class TensorLoader:
    """Batches from uint8 tensors held in memory (on CPU or GPU) with per-sample augmentation.

    Each epoch draws a fresh order (or, with ``weights``, a weighted sample with replacement of
    ``num_samples``); batches are converted to float, augmented (``augment(x, generator)``, every
    image its own random transform) and normalised with ``(x - mean) / std``. Under
    DistributedDataParallel, pass ``rank`` and ``world_size``: each rank takes its share of the
    same seeded order, so ranks see disjoint samples.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                 augment: Callable | None = None, device: str | torch.device = "cpu",
                 weights: torch.Tensor | None = None, num_samples: int | None = None,
                 seed: int = 0, mean: float = 0.5, std: float = 0.5, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.weights = augment, weights
        self.num_samples = num_samples or len(split)
        self.mean, self.std = mean, std
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def _order(self) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator)
        if self.shuffle:
            return torch.randperm(len(self.labels), generator=self.generator)
        return torch.arange(len(self.labels))

    def _per_rank(self) -> int:
        n = self.num_samples if self.weights is not None else len(self.labels)
        return n // self.world_size if self.world_size > 1 else n

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        if self.world_size > 1:
            per = self._per_rank()
            order = order[self.rank * per:(self.rank + 1) * per]
        order = order.to(self.device)
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            x = self.images[idx].float().div_(255.0)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            x = x.sub_(self.mean).div_(self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def kfold(labels: torch.Tensor | np.ndarray, k: int, seed: int, path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic stratified k-fold split, written once to ``path`` (JSON) and reused.

    Returns ``[(train_idx, val_idx), ...]``. An existing file made for other labels, ``k`` or
    ``seed`` is refused with a message naming it, so folds never silently change under a run.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    key = labels if labels.ndim == 1 else labels.argmax(1)
    digest = hashlib.sha256(np.ascontiguousarray(key).tobytes()).hexdigest()
    path = Path(path)
    if path.is_file():
        saved = json.loads(path.read_text())
        if (saved["k"], saved["seed"], saved["labels_sha256"]) != (k, seed, digest):
            raise DataError(f"fold file {path} was made for k={saved['k']}, seed={saved['seed']} and other "
                            f"labels; delete it or choose another path to make new folds")
        folds = [np.asarray(f, dtype=int) for f in saved["val_folds"]]
    else:
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = [val for _, val in skf.split(np.zeros(len(key)), key)]
        atomic_write_text(path, json.dumps({"k": k, "seed": seed, "n": len(key), "labels_sha256": digest,
                                            "val_folds": [f.tolist() for f in folds]}))
    everything = np.arange(len(key))
    return [(np.setdiff1d(everything, f), np.sort(f)) for f in folds]
