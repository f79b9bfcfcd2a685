"""A RadImageNet-like multi-modality mix from MedMNIST files: one joint label space over datasets.

The reference pre-trains on RadImageNet (many modalities and organs, one label space). Its analogue
here: the train/val/test splits of several MedMNIST flags (CT, X-ray, ultrasound, fundus, ...)
stacked, each dataset's classes given their own block of joint labels (``offset[flag] + local``).

* **Channels rule.** ``channels=3``: grayscale images are replicated to three channels, RGB kept,
  so a fundus keeps its colour and every image of a batch has the same shape. ``channels=1``: RGB
  is converted to luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601).
* **Imbalance.** ``max_train`` caps each dataset's train split (a stratified subset), so one large
  dataset (OrganAMNIST, 34k) cannot swamp the small ones; ``None`` keeps natural proportions.
  A class-balanced sampler over the joint labels is the notebook's ``balance: "class"``.
* Multi-label flags (ChestMNIST) have no single label and are refused.

:func:`leave_one_out` builds the mix without one dataset (the "unseen concept" protocol), and
:func:`per_dataset_metrics` maps a mix model's joint scores back to each dataset's own labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import data as data_mod
from ..config import data_root as _data_root
from ..metrics import classification_metrics

__all__ = ["JointLabels", "MixDataset", "present_flags", "to_channels", "build_mix", "leave_one_out",
           "kshot", "per_dataset_metrics"]


@dataclass(frozen=True)
class JointLabels:
    """Dataset ``flags`` and their class counts; joint label = ``offset[flag] + local label``."""

    flags: tuple[str, ...]
    n_classes: tuple[int, ...]

    @property
    def offsets(self) -> dict[str, int]:
        return dict(zip(self.flags, np.cumsum((0,) + self.n_classes[:-1]).tolist()))

    @property
    def size(self) -> int:
        return int(sum(self.n_classes))

    def to_joint(self, flag: str, local) -> torch.Tensor:
        local = torch.as_tensor(local)
        n = self.n_classes[self.flags.index(flag)]
        if len(local) and (int(local.min()) < 0 or int(local.max()) >= n):
            raise ValueError(f"{flag}: local labels must be in 0..{n - 1}")
        return local + self.offsets[flag]

    def to_local(self, joint) -> tuple[list[str], torch.Tensor]:
        """Each joint label's dataset flag and its label in that dataset."""
        joint = torch.as_tensor(joint)
        starts = torch.tensor(list(self.offsets.values()))
        which = torch.bucketize(joint, starts, right=True) - 1
        if len(joint) and (int(joint.min()) < 0 or int(joint.max()) >= self.size):
            raise ValueError(f"joint labels must be in 0..{self.size - 1}")
        return [self.flags[i] for i in which.tolist()], joint - starts[which]

    def columns(self, flag: str) -> slice:
        o = self.offsets[flag]
        return slice(o, o + self.n_classes[self.flags.index(flag)])


@dataclass
class MixDataset(data_mod.MedMNIST):
    """A :class:`helpers.data.MedMNIST` over the joint labels, plus each sample's dataset of origin
    (``source[split]``: indices into ``joint.flags``) and each dataset's own metadata."""

    joint: JointLabels = None
    source: dict = field(default_factory=dict)
    members: dict = field(default_factory=dict)   # flag -> {"task", "labels", "modality channels"}


def present_flags(size: int = 28, root=None) -> list[str]:
    """The single-label MedMNIST 2D flags whose file at ``size`` is in the data root."""
    root = _data_root(root)
    return [f for f in data_mod.flags_2d() if (root / data_mod.file_name(f, size)).is_file()
            and not data_mod.info(f)["task"].startswith("multi-label")]


def _convert(images: torch.Tensor, channels: int) -> torch.Tensor:
    c = images.shape[1]
    if c == channels:
        return images
    if channels == 3 and c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels}; channels must be 1 or 3")


def to_channels(ds: data_mod.MedMNIST, channels: int) -> data_mod.MedMNIST:
    """``ds`` with its images converted by the mix's channels rule (module docstring)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    splits = {k: data_mod.Split(_convert(s.images, channels), s.labels, s.index) for k, s in ds.splits.items()}
    return replace(ds, n_channels=channels, splits=splits)


def build_mix(flags, size: int = 28, root=None, *, channels: int = 3, max_train: int | None = None,
              max_eval: int | None = None, seed: int = 0, verify: bool = True,
              datasets: dict | None = None) -> MixDataset:
    """Stack the splits of ``flags`` into one joint-label dataset (see the module docstring).

    ``max_train``/``max_eval`` cap each dataset's train and val/test splits (stratified);
    ``datasets`` may hand in already loaded :class:`helpers.data.MedMNIST` objects by flag.
    """
    flags = list(dict.fromkeys(flags))
    if len(flags) < 1:
        raise ValueError("build_mix needs at least one flag")
    loaded = []
    for f in flags:
        ds = (datasets or {}).get(f) or data_mod.load(f, size, root, verify=verify)
        if ds.multilabel:
            raise ValueError(f"{f} is a multi-label dataset ({ds.task}); a joint single-label space cannot "
                             f"hold it. Fix: leave it out of the mix's flags.")
        ds = data_mod.subsample(ds, {"train": max_train, "val": max_eval, "test": max_eval}, seed=seed)
        loaded.append(to_channels(ds, channels))
    joint = JointLabels(tuple(flags), tuple(d.n_classes for d in loaded))
    splits, source = {}, {}
    for name in data_mod.SPLITS:
        if not all(name in d.splits for d in loaded):
            continue
        imgs = torch.cat([d[name].images for d in loaded])
        labels = torch.cat([joint.to_joint(f, d[name].labels) for f, d in zip(flags, loaded)])
        source[name] = torch.cat([torch.full((len(d[name]),), i, dtype=torch.long) for i, d in enumerate(loaded)])
        splits[name] = data_mod.Split(imgs, labels)
    names = {str(joint.offsets[f] + int(k)): f"{f}: {v}" for f, d in zip(flags, loaded) for k, v in d.label_names.items()}
    members = {f: {"task": d.task, "n_classes": d.n_classes, "channels": data_mod.info(f)["n_channels"],
                   "n_train": len(d["train"])} for f, d in zip(flags, loaded)}
    tag = "mix-" + "+".join(f.replace("mnist", "") for f in flags)
    return MixDataset(tag, size, "multi-class", channels, names, splits, joint=joint, source=source, members=members)


def leave_one_out(mix_flags, held_out: str, **kwargs) -> MixDataset:
    """The mix over ``mix_flags`` without ``held_out`` (which must be one of them): the pre-training
    set of the unseen-concept protocol. Its joint label space has no class of ``held_out``."""
    flags = [f for f in mix_flags if f != held_out]
    if len(flags) == len(list(mix_flags)):
        raise ValueError(f"held-out dataset {held_out!r} is not in the mix {list(mix_flags)}")
    return build_mix(flags, **kwargs)


def kshot(ds: data_mod.MedMNIST, k: int | None, seed: int = 0) -> data_mod.MedMNIST:
    """``ds`` with at most ``k`` training images per class (chosen at random with ``seed``);
    ``None`` or 0 keeps the whole train split. Val and test are untouched."""
    if not k:
        return ds
    rng = np.random.default_rng(seed)
    labels = ds["train"].labels.numpy()
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in range(ds.n_classes)]
    idx = np.sort(np.concatenate(picks))
    return replace(ds, splits={**ds.splits, "train": ds["train"].take(idx)})


def per_dataset_metrics(mix: MixDataset, scores: np.ndarray, labels: np.ndarray, index: np.ndarray,
                        split: str = "test") -> list[dict]:
    """A mix model's stored scores scored per dataset, each in its own label space: the joint
    scores restricted to that dataset's columns and renormalised, its labels mapped back with
    :meth:`JointLabels.to_local`. Keys per row: ``dataset``, ``acc``, ``auc``, ``balanced_acc``,
    ``f1`` (macro F1 of the argmax), ``n``."""
    from sklearn.metrics import f1_score

    src = mix.source[split].numpy()[np.asarray(index)]
    rows = []
    for i, flag in enumerate(mix.joint.flags):
        sel = src == i
        if not sel.any():
            continue
        sc = scores[sel][:, mix.joint.columns(flag)]
        sc = sc / np.clip(sc.sum(1, keepdims=True), 1e-12, None)
        got, local = mix.joint.to_local(torch.as_tensor(labels[sel]))
        assert set(got) == {flag}, "a sample's joint label is outside its dataset's block"
        local = local.numpy()
        m = classification_metrics(local, sc, mix.members[flag]["task"])
        m["f1"] = float(f1_score(local, sc.argmax(1), average="macro", zero_division=0))
        rows.append({"dataset": flag, **{k: m[k] for k in ("acc", "auc", "balanced_acc", "f1")}, "n": int(sel.sum())})
    return rows
