"""One supervised unit of work: train a registry model with ``fit``, select on val, test once, store.

Every notebook that trains a classifier (baselines, a NAS champion, a fold) goes through
:func:`train_and_test`, so units are trained, selected, tested and stored the same way.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from . import augment as augment_mod
from . import data as data_mod
from .config import book_dir, cache_dir
from .models import create_model
from .repro import resolve_device, seed_everything
from .results import Recorder, unit_name
from .train import FitConfig, Hook, evaluate, fit

FIT_KEYS = ("epochs", "lr", "weight_decay", "optimizer", "schedule", "grad_clip", "patience",
            "min_delta", "min_epochs", "monitor", "amp", "label_smoothing")


def load_dataset(flag: str, size: int = 28, data_root: str | None = None,
                 max_samples: Mapping[str, int | None] | None = None, seed: int = 0,
                 verify: bool = True) -> data_mod.MedMNIST:
    """Load a flag and, for smoke or quick profiles, a stratified subset of each split."""
    ds = data_mod.load(flag, size, data_root, verify=verify)
    if max_samples and any(v is not None for v in max_samples.values()):
        ds = data_mod.subsample(ds, dict(max_samples), seed=seed)
    return ds


def fit_config(params: Mapping[str, Any], **overrides: Any) -> FitConfig:
    """The :class:`FitConfig` named by the keys of a notebook's params that ``fit`` understands."""
    return FitConfig.from_params({k: params[k] for k in FIT_KEYS if k in params}, **overrides)


def checkpoint_path(recorder: Recorder, unit: str) -> Path:
    """Cache file of a unit's training checkpoint: ``$RLMED_CACHE/checkpoints/<notebook>/<run>/...``."""
    root = recorder.root.resolve()
    try:
        rel = root.relative_to((book_dir() / "results").resolve())
    except ValueError:  # a results folder outside the book: key the cache by its path
        rel = Path("external") / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_dir("checkpoints") / rel / f"{unit}.pt"


def train_and_test(recorder: Recorder, ds: data_mod.MedMNIST, model_name: str, seed: int,
                   cfg: FitConfig, *, batch_size: int = 128, augment: Mapping | None = None,
                   model_kwargs: Mapping[str, Any] | None = None, sampler: str | None = None,
                   class_weighting: str | None = None, device: str = "auto",
                   hooks: Sequence[Hook] = (), unit: Mapping[str, Any] | None = None) -> dict:
    """Train, select the best epoch on val, evaluate once on test, store the unit; return metrics.

    A unit already stored is loaded, not retrained. ``sampler="weighted"`` draws class-balanced
    batches; ``class_weighting="balanced"`` weights the loss instead. The training checkpoint lives
    in the cache, keyed by the unit, so an interrupted unit resumes.
    """
    keys = dict(unit or {"flag": ds.flag, "model": model_name, "seed": seed})
    if recorder.has_unit(**keys):
        return recorder.load_unit(**keys)["metrics"]
    dev = resolve_device(device)
    seed_everything(seed)
    model = create_model(model_name, num_classes=ds.n_classes, in_chans=ds.n_channels, **dict(model_kwargs or {}))
    train = ds["train"]
    weights = None
    if sampler == "weighted" and not ds.multilabel:
        weights = data_mod.class_balanced_weights(train.labels, ds.n_classes)
    loader = data_mod.TensorLoader(train, batch_size, shuffle=True, augment=augment_mod.make_augment(augment),
                                   device=dev, weights=weights, seed=seed)
    val_loader = data_mod.TensorLoader(ds["val"], 512, device=dev)
    cw = data_mod.class_weights(train.labels, ds.n_classes) if class_weighting == "balanced" and not ds.multilabel else None
    ckpt = checkpoint_path(recorder, unit_name(**keys))
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    result = fit(model, loader, val_loader, ds.task, cfg, device=dev, checkpoint=ckpt, hooks=hooks,
                 class_weights=cw, desc=unit_name(**keys))
    val_metrics, val_scores, val_labels = evaluate(result.model, val_loader, ds.task, prefix="val", device=dev, amp=cfg.amp,
                                                  channels_last=cfg.channels_last)
    test_loader = data_mod.TensorLoader(ds["test"], 512, device=dev)
    test_metrics, test_scores, test_labels = evaluate(result.model, test_loader, ds.task, prefix="test", device=dev, amp=cfg.amp,
                                                     channels_last=cfg.channels_last)
    n_params = sum(p.numel() for p in result.model.parameters())
    metrics = {**val_metrics, **test_metrics, "params": n_params, "best_epoch": result.best_epoch,
               "epochs_run": len(result.history), "train_s": result.wall_s}
    recorder.save_unit(keys, metrics, history=result.history,
                       scores={"val_scores": val_scores, "val_labels": val_labels, "val_index": ds["val"].index.numpy(),
                               "test_scores": test_scores, "test_labels": test_labels,
                               "test_index": ds["test"].index.numpy()},
                       extra={"stopped_early": result.stopped_early, "resumed_from": result.resumed_from})
    return metrics


def summary_table(df: pd.DataFrame, by: Sequence[str], values: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` over seeds (or folds) of ``values`` grouped by ``by``, as display strings."""
    from .metrics import format_mean_std, mean_std

    stats = mean_std(df, list(by), list(values))
    out = stats[list(by)].copy()
    for v in values:
        out[v] = [format_mean_std(m, s, digits) for m, s in zip(stats[f"{v}_mean"], stats[f"{v}_std"])]
    out["n"] = stats["n"]
    return out
