"""Stratified k-fold cross-validation around the one supervised unit.

The folds are cut from the official **train** split only, once, into a split file
(:func:`helpers.data.kfold`) that every config reuses, so "before" and "after" are paired fold by
fold. A fold's dataset holds two splits, ``train`` (the other folds) and ``val`` (this fold): the
official val and test splits are not in it, so no fold unit can see them. Only the chosen config
is trained once more on the official train split, selected on the official val split and
evaluated once on the official test split (:func:`final_unit`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from .. import data as data_mod
from ..experiment import train_and_test
from ..results import Recorder, digest
from ..train import FitConfig
from .groups import sample_weights, sampler_column
from .targets import FoldProbe, Target


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training config of the loop: its ``fit`` group, augmentation and sampler (None; ``weighted``:
    class-balanced batches; ``group:<column>``: batches balanced over a group column's groups)."""

    name: str
    fit: Mapping[str, Any]
    augment: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sampler: str | None = None

    def fit_config(self, base: Mapping[str, Any] | None = None) -> FitConfig:
        return FitConfig.from_params({**dict(base or {}), **dict(self.fit)})

    def as_dict(self) -> dict:
        return {"fit": dict(self.fit), "augment": dict(self.augment), "sampler": self.sampler}

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "Arm":
        from ..config import ParamsError

        unknown = set(spec) - {"fit", "augment", "sampler"}
        if unknown:
            raise ParamsError(f"config '{name}': unknown key(s) {sorted(unknown)}; a config has fit, augment, sampler")
        arm = cls(name, dict(spec.get("fit") or {}), dict(spec.get("augment") or {}), spec.get("sampler"))
        arm.fit_config()   # refuses unknown fit keys and bad values before any work
        if arm.sampler not in (None, "weighted") and not sampler_column(arm.sampler):
            raise ParamsError(f"config '{name}': sampler '{arm.sampler}' unknown; use null, weighted or "
                              f"group:<column> (a group column of the target)")
        from ..augment import make_augment

        make_augment(arm.augment)
        return arm


def unit_variant(arm: Arm, model: str, model_kwargs: Mapping[str, Any] | None = None) -> str | None:
    """The ``variant`` key :func:`helpers.experiment.train_and_test` gives this config's units (None: none),
    so tables read exactly the units of this config, never those of an earlier config of the same name."""
    from ..experiment import unit_settings

    settings = unit_settings(model, model_kwargs=model_kwargs, augment=arm.augment or None, sampler=arm.sampler)
    return digest(settings)[:8] if settings else None


def fold_file(recorder: Recorder, ds: data_mod.MedMNIST, k: int, seed: int) -> Path:
    """Where the fold split of ``ds``'s train split lives: named by flag, k, seed and the labels' digest."""
    labels = ds["train"].labels.numpy()
    tag = digest([ds["train"].index.numpy().tolist(), labels.tolist()])[:8]
    return recorder.root / "splits" / f"{ds.flag}_k{k}_seed{seed}_{tag}.json"


def fold_datasets(ds: data_mod.MedMNIST, k: int, seed: int, path: str | Path) -> list[data_mod.MedMNIST]:
    """The ``k`` fold datasets of ``ds``'s train split (stratified, from the split file at ``path``):
    each has only ``train`` (the other folds) and ``val`` (this fold), with the official indices."""
    if k < 2:
        raise ValueError(f"k={k}: k-fold needs at least 2 folds")
    counts = np.bincount(ds["train"].labels.numpy(), minlength=ds.n_classes)
    if counts[counts > 0].min() < k:
        raise ValueError(f"k={k} folds but the smallest class of {ds.flag} train has {counts[counts > 0].min()} "
                         f"images. Fix: fewer folds or a larger max_train.")
    train = ds["train"]
    splits = data_mod.kfold(train.labels.numpy(), k, seed, path)
    return [dataclasses.replace(ds, splits={"train": train.take(tr), "val": train.take(va)}) for tr, va in splits]


def _group_weights(arm: Arm, ds: data_mod.MedMNIST, frame: pd.DataFrame | None) -> dict:
    """``sample_weights`` for a ``group:<column>`` sampler (balanced over the column's groups among the
    images trained on); nothing for the other samplers."""
    column = sampler_column(arm.sampler)
    if column is None:
        return {}
    return {"sample_weights": sample_weights(frame if frame is not None else pd.DataFrame(), column,
                                             ds["train"].index.numpy())}


def fold_unit(recorder: Recorder, fold_ds: data_mod.MedMNIST, target: Target, arm: Arm, fold: int, *,
              model: str, seed: int, base_fit: Mapping[str, Any], batch_size: int, device: str,
              model_kwargs: Mapping[str, Any] | None = None, frame: pd.DataFrame | None = None) -> dict:
    """Train one fold with one config (val only, never test) and return its stored metrics; ``frame``
    holds the target's group columns (:func:`helpers.folds.groups.group_frame`) for a group sampler."""
    probe = FoldProbe(fold_ds["train"], target, fold_ds.n_classes, fold_ds.task)
    return train_and_test(recorder, fold_ds, model, seed, arm.fit_config(base_fit), batch_size=batch_size,
                          augment=arm.augment or None, sampler=arm.sampler, model_kwargs=model_kwargs,
                          device=device, hooks=(probe,), evaluate_on=("val",),
                          unit={"target": target.name, "config": arm.name, "fold": fold, "seed": seed},
                          **_group_weights(arm, fold_ds, frame), **target.unit_options(fold_ds.n_classes))


def run_folds(recorder: Recorder, ds: data_mod.MedMNIST, target: Target, arm: Arm, *, k: int, fold_seed: int = 0,
              model: str = "cnn", seed: int = 0, base_fit: Mapping[str, Any] | None = None, batch_size: int = 64,
              device: str = "auto", model_kwargs: Mapping[str, Any] | None = None,
              log: Callable[[str], None] | None = None, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every fold of ``target`` with config ``arm``: one row per fold (unit keys and val metrics)."""
    folds = fold_datasets(ds, k, fold_seed, fold_file(recorder, ds, k, fold_seed))
    rows = []
    for i, fold_ds in enumerate(folds, start=1):
        metrics = fold_unit(recorder, fold_ds, target, arm, i, model=model, seed=seed, base_fit=base_fit or {},
                            batch_size=batch_size, device=device, model_kwargs=model_kwargs, frame=frame)
        rows.append({"target": target.name, "config": arm.name, "fold": i, "seed": seed, **metrics})
        if log:
            log(f"{target.name} {arm.name} fold {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                   if k.startswith("val/")))
    return pd.DataFrame(rows)


def final_unit(recorder: Recorder, ds: data_mod.MedMNIST, target: Target, arm: Arm, *, model: str = "cnn",
               seed: int = 0, base_fit: Mapping[str, Any] | None = None, batch_size: int = 64, device: str = "auto",
               model_kwargs: Mapping[str, Any] | None = None, frame: pd.DataFrame | None = None) -> dict:
    """The chosen config trained on the official train split, its epoch selected on the official
    val split, evaluated once on the official test split."""
    probe = FoldProbe(ds["train"], target, ds.n_classes, ds.task)
    return train_and_test(recorder, ds, model, seed, arm.fit_config(base_fit or {}), batch_size=batch_size,
                          augment=arm.augment or None, sampler=arm.sampler, model_kwargs=model_kwargs,
                          device=device, hooks=(probe,), evaluate_on=("val", "test"),
                          unit={"target": target.name, "config": arm.name, "fold": "final", "seed": seed},
                          keep_model=True,   # the summary page rebuilds it to test it on corrupted images
                          **_group_weights(arm, ds, frame), **target.unit_options(ds.n_classes))


def check_configs(before: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]] | None,
                  base_fit: Mapping[str, Any]) -> dict[str, Arm]:
    """The given configs as :class:`Arm` (``before`` and the extra ones on top of ``base_fit``), refused
    before any work when a key, a value or a name is wrong."""
    from ..config import ParamsError

    arms = {}
    for name, spec in {"before": before, **dict(extra or {})}.items():
        if name != "before" and (name in ("before", "after") or name.startswith("only ")):
            raise ParamsError(f"extra_configs: the name '{name}' is taken by a generated config; choose another")
        if not isinstance(spec, Mapping):
            raise ParamsError(f"config '{name}' must be a mapping with fit, augment, sampler; got {spec!r}")
        arms[name] = Arm.from_dict(name, {**spec, "fit": {**dict(base_fit), **dict(spec.get("fit") or {})}})
    return arms
