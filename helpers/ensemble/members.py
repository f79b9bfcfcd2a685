"""Ensemble members and the expert, trained once by cross-fitting, and their stored scores.

Every combiner of this chapter (averaging, a stacker, a weighting network, a gate) learns from
predictions that the members did **not** train on. The training split is cut into ``k`` stratified
folds (written once to a fold file, :func:`helpers.data.kfold`); a member is trained ``k`` times,
each time on ``k - 1`` folds, and scores the fold it left out (``oof``), the validation split and the
test split. So every training image gets an out-of-fold score, and a member's val/test score is the
mean of its ``k`` fold models (cross-fitting). With ``k = 2`` this costs what one training on the
whole split costs. Every fold model is a stored unit (:func:`helpers.experiment.train_and_test`,
``keep_model=True``): weights, history and raw scores are on disk and reused, never retrained.

The expert is trained the same way, with a weighted sampler that oversamples the training images
the members' plain average gets wrong **out of fold** (never a validation or test image).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import data as data_mod
from ..experiment import train_and_test
from ..results import Recorder
from ..train import FitConfig

__all__ = ["ScoreStack", "cross_fit_folds", "fold_dataset", "member_seed", "train_members", "member_stack",
           "find_unit", "misclassified", "oversample_weights", "sampler_share", "train_experts"]


@dataclass
class ScoreStack:
    """Probabilities of ``K`` models on the three splits: ``train`` is out of fold.

    ``train``, ``val``, ``test``: float arrays ``(K, N_split, C)``; ``y_*``: int labels ``(N_split,)``;
    ``names``: the ``K`` model names. Rows follow the order of ``ds[split]``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray
    y_test: np.ndarray
    names: list

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities (K, N, C), labels (N,))`` of a split."""
        return getattr(self, name), getattr(self, f"y_{name}")

    def take(self, idx: Sequence[int]) -> "ScoreStack":
        """The stack of models ``idx`` only."""
        idx = list(idx)
        return replace(self, train=self.train[idx], val=self.val[idx], test=self.test[idx],
                       names=[self.names[i] for i in idx])


def cross_fit_folds(ds: data_mod.MedMNIST, k: int, seed: int, path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified folds of ``ds['train']`` (positions), written once to ``path`` and reused."""
    if k < 2:
        raise ValueError(f"folds={k}: cross-fitting needs at least 2 folds, so that every training image "
                         f"gets a score from a model that did not train on it.")
    return data_mod.kfold(ds["train"].labels, k, seed, path)


def fold_dataset(ds: data_mod.MedMNIST, fit_pos: np.ndarray, oof_pos: np.ndarray) -> data_mod.MedMNIST:
    """``ds`` whose ``train`` is ``fit_pos`` of the training split, with the left-out ``oof`` split added."""
    train = ds["train"]
    if len(np.intersect1d(fit_pos, oof_pos)):
        raise ValueError("a fold's training and out-of-fold positions overlap")
    return replace(ds, splits={"train": train.take(fit_pos), "val": ds["val"], "test": ds["test"],
                               "oof": train.take(oof_pos)})


def member_seed(seed: int, member: int, fold: int) -> int:
    """The training seed of member ``member``'s fold model ``fold`` in replicate ``seed`` (all distinct)."""
    return 1000 * seed + 10 * member + fold


def train_members(recorder: Recorder, ds: data_mod.MedMNIST, seed: int, folds: Sequence, n_members: int,
                  model: str, cfg: FitConfig, *, model_kwargs: Mapping[str, Any] | None = None,
                  batch_size: int = 32, augment: Mapping | None = None, hooks: Sequence = (),
                  device: str = "auto", unit_tag: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Train (or load) every fold model of ``n_members`` members for replicate ``seed``; one row each.

    Each fold model is a stored unit with keys ``role=member, member, fold, seed`` (plus ``unit_tag``)
    and its own training seed (:func:`member_seed`); it keeps its weights and scores val, oof, test.
    """
    rows = []
    for member in range(n_members):
        for fold, (fit_pos, oof_pos) in enumerate(folds):
            keys = {"role": "member", "member": member, "fold": fold, "seed": seed, **dict(unit_tag or {})}
            m = train_and_test(recorder, fold_dataset(ds, fit_pos, oof_pos), model, member_seed(seed, member, fold),
                               cfg, batch_size=batch_size, augment=augment, model_kwargs=model_kwargs,
                               device=device, hooks=list(hooks), unit=keys, keep_model=True,
                               evaluate_on=("val", "oof", "test"))
            rows.append({**keys, **m})
    return pd.DataFrame(rows)


def _positions(index: np.ndarray, official: np.ndarray) -> np.ndarray:
    where = {int(v): i for i, v in enumerate(official)}
    try:
        return np.array([where[int(v)] for v in index])
    except KeyError as exc:
        raise ValueError(f"stored scores name image {exc} that is not in this dataset's split: the unit was "
                         f"made on other data. Fix: rerun with the same flag and subset, or remove the unit.") from None


def find_unit(recorder: Recorder, keys: Mapping[str, Any]) -> dict:
    """The full keys of the one stored unit whose keys include ``keys`` (train_and_test adds a
    ``variant`` digest of its settings); none or several is an error naming the keys."""
    found = [u["keys"] for u in recorder.units() if all(u["keys"].get(k) == v for k, v in keys.items())]
    if len(found) != 1:
        raise LookupError(f"{len(found)} stored units match {dict(keys)} in {recorder.root}; expected one. "
                          f"Fix: train the members first (train_members / train_experts) with these keys.")
    return found[0]


def member_stack(recorder: Recorder, ds: data_mod.MedMNIST, seed: int, n_folds: int, members: Sequence[int],
                 role: str = "member", unit_tag: Mapping[str, Any] | None = None) -> ScoreStack:
    """Assemble stored scores into a :class:`ScoreStack`: out-of-fold on train, fold means on val/test.

    Reads only the stored units (``role``, ``member``, ``fold``, ``seed``); trains nothing. A training
    image without an out-of-fold score (folds that do not cover the split) raises.
    """
    n_train, n_classes = len(ds["train"]), ds.n_classes
    official = {s: ds[s].index.numpy() for s in ("train", "val", "test")}
    stacks = {s: [] for s in ("train", "val", "test")}
    for member in members:
        oof = np.full((n_train, n_classes), np.nan)
        val, test = [], []
        for fold in range(n_folds):
            keys = {"role": role, **({"member": member} if role == "member" else {}), "fold": fold, "seed": seed,
                    **dict(unit_tag or {})}
            sc = recorder.scores(**find_unit(recorder, keys))
            oof[_positions(sc["oof_index"], official["train"])] = sc["oof_scores"]
            val.append(sc["val_scores"][np.argsort(_positions(sc["val_index"], official["val"]))])
            test.append(sc["test_scores"][np.argsort(_positions(sc["test_index"], official["test"]))])
        if np.isnan(oof).any():
            raise ValueError(f"{int(np.isnan(oof).any(1).sum())} training images have no out-of-fold score "
                             f"({role} {member}, seed {seed}): the folds must cover the training split.")
        stacks["train"].append(oof)
        stacks["val"].append(np.mean(val, 0))
        stacks["test"].append(np.mean(test, 0))
    names = [f"{role} {m}" for m in members] if role == "member" else [role]
    return ScoreStack(*(np.stack(stacks[s]) for s in ("train", "val", "test")),
                      *(ds[s].labels.numpy() for s in ("train", "val", "test")), names=names)


def misclassified(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the images whose argmax of ``probs`` (N, C) is not their label."""
    return np.asarray(probs).argmax(1) != np.asarray(labels)


def oversample_weights(n_train: int, wrong: np.ndarray, factor: float = 2.0) -> torch.Tensor:
    """Sampler weights over the ``n_train`` training images: ``factor`` for the ones in ``wrong``, else 1.

    ``wrong`` is a boolean mask over the training split or an array of training positions; anything
    that is not a training position (a validation image, an index past the split) is refused.
    """
    if factor <= 0:
        raise ValueError(f"oversample factor must be > 0, got {factor}")
    wrong = np.asarray(wrong)
    if wrong.dtype == bool:
        if len(wrong) != n_train:
            raise ValueError(f"misclassified mask has {len(wrong)} entries for {n_train} training images")
        pos = np.flatnonzero(wrong)
    else:
        pos = wrong.astype(int)
        if len(pos) and (pos.min() < 0 or pos.max() >= n_train):
            raise ValueError(f"misclassified positions must be training positions 0..{n_train - 1}; got "
                             f"{pos.min()}..{pos.max()}. Only out-of-fold predictions on train may mark images.")
    w = torch.ones(n_train)
    w[torch.as_tensor(pos, dtype=torch.long)] = float(factor)
    return w


def sampler_share(weights: torch.Tensor, wrong: np.ndarray, epochs: int, seed: int) -> dict:
    """Share of marked images in the sampler's draws (``epochs`` epochs, seeded like training) vs in the data.

    The draws are those of :class:`helpers.data.TensorLoader` with ``weights`` (multinomial with
    replacement, ``len(weights)`` per epoch, generator seeded with ``seed``).
    """
    wrong = torch.as_tensor(np.asarray(wrong, dtype=bool))
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.cat([torch.multinomial(weights, len(weights), replacement=True, generator=gen)
                       for _ in range(max(1, epochs))])
    return {"share_in_data": float(wrong.float().mean()), "share_in_batches": float(wrong[drawn].float().mean()),
            "share_expected": float(weights[wrong].sum() / weights.sum()), "draws": int(len(drawn))}


def train_experts(recorder: Recorder, ds: data_mod.MedMNIST, seed: int, folds: Sequence, wrong: np.ndarray,
                  model: str, cfg: FitConfig, *, factor: float = 2.0, model_kwargs: Mapping[str, Any] | None = None,
                  batch_size: int = 32, augment: Mapping | None = None, hooks: Sequence = (),
                  device: str = "auto", unit_tag: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Cross-fit the expert: fold model ``f`` trains on fold ``f``'s training part, oversampling its
    out-of-fold misclassified images (``wrong``, a mask over ``ds['train']``) by ``factor``.

    Returns one row per fold with the unit's metrics and the measured share of misclassified images
    in the sampler's draws against their share in the fold's training data.
    """
    wrong = np.asarray(wrong, dtype=bool)
    if len(wrong) != len(ds["train"]):
        raise ValueError(f"misclassified mask has {len(wrong)} entries for {len(ds['train'])} training images")
    rows = []
    for fold, (fit_pos, oof_pos) in enumerate(folds):
        keys = {"role": "expert", "fold": fold, "seed": seed, **dict(unit_tag or {})}
        weights = oversample_weights(len(fit_pos), wrong[fit_pos], factor)
        train_seed = member_seed(seed, 9, fold)
        m = train_and_test(recorder, fold_dataset(ds, fit_pos, oof_pos), model, train_seed, cfg,
                           batch_size=batch_size, augment=augment, model_kwargs=model_kwargs, device=device,
                           hooks=list(hooks), unit=keys, keep_model=True, evaluate_on=("val", "oof", "test"),
                           sample_weights=weights)
        rows.append({**keys, **m, **sampler_share(weights, wrong[fit_pos], cfg.epochs, train_seed)})
    return pd.DataFrame(rows)
