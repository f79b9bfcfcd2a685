"""One supervised unit of work: train a registry model with ``fit``, select on val, test once, store.

Every notebook that trains a classifier (baselines, a NAS champion, a fold) goes through
:func:`train_and_test`, so units are trained, selected, tested and stored the same way.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from . import augment as augment_mod
from . import data as data_mod
from .config import book_dir, cache_dir
from .models import create_model
from .repro import packages_used, resolve_device, seed_everything, unit_code_digest
from .results import Recorder, digest, unit_name
from .train import FitConfig, Hook, evaluate, fit

def load_dataset(flag: str, size: int = 28, data_root: str | None = None,
                 max_samples: Mapping[str, int | None] | None = None, seed: int = 0,
                 verify: bool = True) -> data_mod.MedMNIST:
    """Load a flag and, for smoke or quick profiles, a stratified subset of each split."""
    ds = data_mod.load(flag, size, data_root, verify=verify)
    if max_samples and any(v is not None for v in max_samples.values()):
        ds = data_mod.subsample(ds, dict(max_samples), seed=seed)
    return ds


def checkpoint_dir(results: str | os.PathLike) -> Path:
    """Cache folder of the training checkpoints of the units under a results folder:
    ``$RLMED_CACHE/checkpoints/<book>/<notebook>/<run>/``, where ``<book>`` is a short digest of the
    book's results folder, so two books (a test's and the real one) never share checkpoints; for the
    book's results folder itself, the book's whole checkpoint folder."""
    root = Path(results).resolve()
    book_results = (book_dir() / "results").resolve()
    try:
        rel = Path(hashlib.sha256(str(book_results).encode()).hexdigest()[:12]) / root.relative_to(book_results)
    except ValueError:  # a results folder outside the book: key the cache by its path
        rel = Path("external") / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return cache_dir("checkpoints") / rel


def checkpoint_path(recorder: Recorder, unit: str) -> Path:
    """Cache file of a unit's training checkpoint, in :func:`checkpoint_dir` of its recorder. It resumes
    an interrupted unit, and a finished one restores a unit whose results were set aside by a params
    change that did not touch it, without retraining; once a unit is recorded, :func:`train_and_test`
    deletes its checkpoints left by other code (never resumed). ``make clean-book`` deletes the book's."""
    return checkpoint_dir(recorder.root) / f"{unit}.pt"


def unit_settings(model_name: str, *, model_kwargs: Mapping[str, Any] | None = None, augment: Mapping | None = None,
                  sampler: str | None = None, class_weighting: str | None = None, init_from: Any = None,
                  normalize: tuple | None = None) -> dict:
    """The settings of a unit beyond its flag, model and seed, with the defaults left out: what goes
    into its ``variant`` key so that two units differing only in them never share a name."""
    given = {"model_kwargs": dict(model_kwargs or {}), "augment": dict(augment or {}), "sampler": sampler,
             "class_weighting": class_weighting,
             "init_from": _weights_id(init_from),
             "normalize": list(normalize) if normalize is not None else None}
    return {k: v for k, v in given.items() if v not in (None, {}, [])}


def _weights_id(init_from) -> str | None:
    """Initial weights by content: a file's or a state dict's SHA-256 (a path alone could change under a unit)."""
    if init_from is None:
        return None
    h = hashlib.sha256()
    if isinstance(init_from, Mapping):
        for k, v in init_from.items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(Path(init_from).read_bytes() if Path(init_from).is_file() else str(init_from).encode())
    return h.hexdigest()[:16]


def _initial_weights(init_from) -> dict:
    if isinstance(init_from, Mapping):
        return dict(init_from)
    path = Path(init_from)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no weights file {path}. Fix: pass the path of a state dict saved "
                                f"with torch.save (e.g. Recorder.model_path(...) of a unit trained with keep_model=True).")
    return torch.load(path, map_location="cpu", weights_only=True)


def train_and_test(recorder: Recorder, ds: data_mod.MedMNIST, model_name: str, seed: int,
                   cfg: FitConfig, *, batch_size: int = 128, augment: Mapping | None = None,
                   model_kwargs: Mapping[str, Any] | None = None, sampler: str | None = None,
                   class_weighting: str | None = None, device: str = "auto",
                   hooks: Sequence[Hook] = (), unit: Mapping[str, Any] | None = None,
                   init_from: str | os.PathLike | Mapping | None = None,
                   normalize: tuple[float, float] | None = None,
                   evaluate_on: Sequence[str] = ("val", "test"), keep_model: bool = False,
                   criterion=None, param_groups_fn=None, data_tag: str | None = None,
                   scorer=None, num_outputs: int | None = None,
                   sample_weights: torch.Tensor | None = None, dry_run: bool = False) -> dict | bool:
    """Train, select the best epoch on val, evaluate on ``evaluate_on``, store the unit; return metrics.

    The one supervised unit of every chapter. Its key is ``unit`` (default flag, model, seed) plus a
    ``variant`` digest when any setting beyond those is given (model kwargs, augmentation, sampler,
    class weighting, initial weights, normalisation). A unit already stored with the same
    fingerprint (its key and settings, the fit config, the data's shape and subset, the helpers
    code) is loaded, not retrained; one made otherwise is redone.

    * ``init_from``: a weights file (loaded with ``weights_only=True``) or a state dict to start from.
    * ``normalize``: ``(mean, std)`` for the loaders (default 0.5, 0.5).
    * ``evaluate_on``: the splits scored after selection; a k-fold unit passes ``("val",)`` and never
      touches test.
    * ``keep_model``: store the best weights as ``models/<unit>.pt`` (:meth:`Recorder.load_model`).
    * ``criterion`` and ``param_groups_fn(model) -> groups`` are handed to :func:`helpers.train.fit`.
    * ``scorer(model, loader, prefix) -> (metrics, scores, labels)`` replaces the classification
      evaluation, of val at every epoch (fit's ``validate``) and of each split of ``evaluate_on``
      (e.g. a regression target: MAE, R², quadratic kappa); ``num_outputs`` overrides the model's
      number of outputs (1 for a regression head; default the dataset's classes).
    * A hook may have a ``fingerprint`` (JSON-able: its settings, so units differing only in them are
      redone) and ``unit_arrays() -> {name: array}`` (stored with the unit's scores after selection).
    * ``sampler="weighted"`` draws class-balanced batches; ``class_weighting="balanced"`` weights the loss.
    * ``sample_weights``: one weight per training image for a weighted sampler with replacement (e.g.
      oversampling images a model got wrong); it replaces ``sampler`` and enters the fingerprint.
    * ``dry_run``: train nothing; return whether the unit is stored with this fingerprint (so would
      be reused), e.g. to decide whether work that depends on the unit's weights can be skipped.

    Under ``torchrun`` (DDP), every rank trains on its shard of each epoch; only rank 0 evaluates
    and stores, and every rank returns the stored metrics.
    """
    evaluate_on = tuple(evaluate_on)
    unknown = [s for s in evaluate_on if s not in ds.splits]
    if unknown or "val" not in evaluate_on:
        raise ValueError(f"evaluate_on={evaluate_on!r}: it must include 'val' and name splits of the dataset "
                         f"({', '.join(ds.splits)}); a k-fold unit uses ('val',).")
    settings = unit_settings(model_name, model_kwargs=model_kwargs, augment=augment, sampler=sampler,
                             class_weighting=class_weighting, init_from=init_from, normalize=normalize)
    keys = dict(unit or {"flag": ds.flag, "model": model_name, "seed": seed})
    if settings:
        keys["variant"] = digest(settings)[:8]
    fingerprint = {"keys": keys, "settings": settings, "model": model_name, "seed": seed, "fit": asdict(cfg),
                   "batch_size": batch_size, "evaluate_on": list(evaluate_on), "data": data_fingerprint(ds),
                   "data_tag": data_tag, "hooks": [getattr(h, "fingerprint", None) or type(h).__name__ for h in hooks],
                   "criterion": None if criterion is None else getattr(criterion, "__name__", type(criterion).__name__)}
    if sample_weights is not None:   # absent otherwise: other units keep their fingerprints
        if len(sample_weights) != len(ds["train"]) or not bool((torch.as_tensor(sample_weights) >= 0).all()):
            raise ValueError(f"sample_weights: {len(sample_weights)} weights for {len(ds['train'])} training images; "
                             f"give one non-negative weight per image of ds['train'].")
        fingerprint["sample_weights"] = hashlib.sha256(torch.as_tensor(sample_weights, dtype=torch.float64)
                                                       .numpy().tobytes()).hexdigest()[:16]
    if scorer is not None or num_outputs is not None:   # absent otherwise: other units keep their fingerprints
        fingerprint.update(scorer=repr(scorer), num_outputs=num_outputs)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mean, std = normalize if normalize is not None else (0.5, 0.5)

    # the unit's code: the shared modules plus the chapter packages its hooks and criterion come from
    code = unit_code_digest(uses=packages_used(*hooks, criterion, param_groups_fn, scorer))
    # named after the unit's fingerprint and code: a checkpoint left by other code is never resumed
    ckpt = checkpoint_path(recorder, f"{unit_name(**keys)}-{digest({'unit': fingerprint, 'code': code})[:12]}")
    if dry_run:
        return recorder.is_current(keys, fingerprint=fingerprint, code=code)

    def compute() -> dict | None:
        dev = resolve_device(device)
        seed_everything(seed)
        model = create_model(model_name, num_classes=num_outputs or ds.n_classes, in_chans=ds.n_channels,
                             **dict(model_kwargs or {}))
        if init_from is not None:
            model.load_state_dict(_initial_weights(init_from))
        train = ds["train"]
        weights = None
        if sampler == "weighted" and not ds.multilabel:
            weights = data_mod.class_balanced_weights(train.labels, ds.n_classes)
        if sample_weights is not None:
            weights = torch.as_tensor(sample_weights, dtype=torch.float32)
        loader = data_mod.TensorLoader(train, batch_size, shuffle=True, augment=augment_mod.make_augment(augment),
                                       device=dev, weights=weights, seed=seed, mean=mean, std=std,
                                       rank=rank, world_size=world)
        val_loader = data_mod.TensorLoader(ds["val"], 512, device=dev, mean=mean, std=std)
        cw = data_mod.class_weights(train.labels, ds.n_classes) if class_weighting == "balanced" and not ds.multilabel else None
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        result = fit(model, loader, val_loader, ds.task, cfg, device=dev, checkpoint=ckpt, hooks=hooks,
                     class_weights=cw, desc=unit_name(**keys), criterion=criterion,
                     param_groups=param_groups_fn(model) if param_groups_fn is not None else None,
                     validate=(lambda m: scorer(m, val_loader, "val")[0]) if scorer is not None else None)
        if rank != 0:
            return None
        metrics, scores = {}, {}
        for split in evaluate_on:
            split_loader = val_loader if split == "val" else data_mod.TensorLoader(ds[split], 512, device=dev,
                                                                                   mean=mean, std=std)
            m, sc, lab = (scorer(result.model, split_loader, split) if scorer is not None else
                          evaluate(result.model, split_loader, ds.task, prefix=split, device=dev, amp=cfg.amp,
                                   channels_last=cfg.channels_last))
            metrics.update(m)
            scores.update({f"{split}_scores": sc, f"{split}_labels": lab, f"{split}_index": ds[split].index.numpy()})
        for hook in hooks:   # a hook's arrays at the best epoch (e.g. an agent's masks of probe images)
            scores.update(hook.unit_arrays() if hasattr(hook, "unit_arrays") else {})
        metrics.update({"params": sum(p.numel() for p in result.model.parameters()), "best_epoch": result.best_epoch,
                        "epochs_run": len(result.history), "train_s": result.wall_s})
        return {"metrics": metrics, "history": result.history, "scores": scores,
                "model": result.model.state_dict() if keep_model else None,
                "extra": {"stopped_early": result.stopped_early, "resumed_from": result.resumed_from}}

    record = recorder.unit(keys, compute, fingerprint=fingerprint, code=code)
    if world > 1:
        dist.barrier()
        if record is None:
            record = recorder.load_unit(**keys)
    if rank == 0:   # recorded: checkpoints of this unit left by other code can never be resumed
        pattern = re.escape(unit_name(**keys)) + r"-[0-9a-f]{12}\.pt"
        for stale in (ckpt.parent.iterdir() if ckpt.parent.is_dir() else ()):
            if stale != ckpt and re.fullmatch(pattern, stale.name):
                stale.unlink(missing_ok=True)
    return record["metrics"]


def data_fingerprint(ds: data_mod.MedMNIST) -> dict:
    """What identifies a dataset's content cheaply: flag, size, and per split its length and a digest
    of its official indices and labels (so another subset or another file gives another fingerprint)."""
    out = {"flag": ds.flag, "size": ds.size}
    for name, split in ds.splits.items():
        h = hashlib.sha256(split.index.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
        out[name] = [len(split), h.hexdigest()[:16]]
    return out
