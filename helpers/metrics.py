"""Evaluation metrics for MedMNIST classification and small result tables.

The two headline metrics, :func:`get_acc` and :func:`get_auc`, follow the
definitions of ``medmnist.evaluator.getACC`` / ``getAUC`` (medmnist 3.0.2)
exactly, so numbers reported here are comparable with the MedMNIST papers:

* ``binary-class``: ``y_score`` may be ``(N,)``, ``(N, 1)`` or ``(N, 2)``; the
  *last* column is the positive-class probability. ACC thresholds it
  (``> threshold``), AUC is the ROC AUC of that column.
* ``multi-label, binary-class``: per label ACC (``y_score > threshold``) and
  ROC AUC, averaged over the ``L`` labels.
* ``multi-class`` and ``ordinal-regression``: ACC of ``argmax``; AUC is the
  unweighted mean over classes of the one-vs-rest ROC AUC (one column of
  ``y_score`` per class).

The one deliberate difference: where scikit-learn's ``roc_auc_score`` would
raise because ``y_true`` holds a single class (for a label or a
one-vs-rest class), that AUC is ``nan`` and the averaged AUC is ``nan`` too
(nan propagates; no silent averaging over the defined ones).

Inputs may be numpy arrays, lists or (CPU or GPU) torch tensors.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

__all__ = [
    "TASKS",
    "get_acc",
    "get_auc",
    "predict_labels",
    "classification_metrics",
    "regression_metrics",
    "per_group_accuracy",
    "mean_std",
    "format_mean_std",
]

#: The task strings used in ``medmnist.INFO[flag]["task"]``.
TASKS = (
    "binary-class",
    "multi-class",
    "multi-label, binary-class",
    "ordinal-regression",
)
MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _to_numpy(x) -> np.ndarray:
    """Convert a list / numpy array / torch tensor to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, no import
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _prepare(y_true, y_score, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Bring ``y_true``/``y_score`` to the shapes the metrics work on.

    Returns ``y_true`` as ``(N,)`` (or ``(N, L)`` for multi-label) and
    ``y_score`` as ``(N,)`` positive-class scores for binary-class tasks,
    ``(N, C)`` otherwise. Unlike a bare ``.squeeze()`` this keeps ``N == 1``.
    """
    _check_task(task)
    y_true = _to_numpy(y_true)
    y_score = _to_numpy(y_score).astype(float, copy=False)
    if y_score.ndim == 1 and task != BINARY:
        y_score = y_score[:, None]
    if task == MULTI_LABEL:
        y_true = y_true.reshape(len(y_true), -1)
        y_score = y_score.reshape(len(y_score), -1)
        if y_true.shape != y_score.shape:
            raise ValueError(
                f"multi-label y_true {y_true.shape} and y_score {y_score.shape} differ"
            )
        return y_true, y_score
    if y_true.ndim > 1:
        if y_true.ndim != 2 or y_true.shape[1] != 1:
            raise ValueError(f"y_true must be (N,) or (N, 1) for {task!r}, got {y_true.shape}")
        y_true = y_true[:, 0]
    if task == BINARY:
        if y_score.ndim == 2:
            y_score = y_score[:, -1]  # positive class = last column
        elif y_score.ndim != 1:
            raise ValueError(f"binary y_score must be (N,) or (N, C), got {y_score.shape}")
    elif y_score.ndim != 2:
        raise ValueError(f"y_score must be (N, C) for {task!r}, got {y_score.shape}")
    if len(y_true) != len(y_score):
        raise ValueError(f"y_true has {len(y_true)} rows but y_score has {len(y_score)}")
    return y_true, y_score


def _binary_auc(y_true_bin: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC, or ``nan`` when ``y_true_bin`` holds fewer than two classes."""
    if np.unique(y_true_bin).size < 2:
        return float("nan")
    return float(roc_auc_score(y_true_bin, score))


# --------------------------------------------------------------------------- #
# MedMNIST metrics
# --------------------------------------------------------------------------- #
def get_auc(y_true, y_score, task: str) -> float:
    """Area under the ROC curve, as ``medmnist.evaluator.getAUC`` defines it.

    Args:
        y_true: labels, ``(N,)`` or ``(N, 1)``; ``(N, L)`` 0/1 for multi-label.
        y_score: probabilities ``(N, C)`` (``(N,)`` allowed for binary-class,
            where the last column / the vector is the positive-class score).
        task: one of :data:`TASKS`.

    Returns:
        The AUC as a float; ``nan`` if some (one-vs-rest) label has a single
        class in ``y_true`` (medmnist would raise there).
    """
    y_true, y_score = _prepare(y_true, y_score, task)
    if task == BINARY:
        return _binary_auc(y_true, y_score)
    if task == MULTI_LABEL:
        aucs = [_binary_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])]
    else:  # multi-class, ordinal-regression: one-vs-rest per score column
        aucs = [
            _binary_auc((y_true == i).astype(float), y_score[:, i])
            for i in range(y_score.shape[1])
        ]
    return float(sum(aucs) / len(aucs))


def get_acc(y_true, y_score, task: str, threshold: float = 0.5) -> float:
    """Accuracy, as ``medmnist.evaluator.getACC`` defines it.

    Binary-class: ``positive score > threshold``; multi-label: mean over labels
    of the per-label accuracy of ``y_score > threshold``; multi-class and
    ordinal-regression: accuracy of ``argmax(y_score)`` (threshold unused).
    """
    y_true, y_score = _prepare(y_true, y_score, task)
    if task == MULTI_LABEL:
        y_pred = y_score > threshold
        accs = [accuracy_score(y_true[:, i], y_pred[:, i]) for i in range(y_true.shape[1])]
        return float(sum(accs) / len(accs))
    if task == BINARY:
        return float(accuracy_score(y_true, y_score > threshold))
    return float(accuracy_score(y_true, np.argmax(y_score, axis=-1)))


def predict_labels(y_score, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions matching :func:`get_acc`'s rule.

    ``(N,)`` int labels (``argmax``; for binary-class ``last column > threshold``,
    which equals ``argmax`` for 2-column softmax probabilities) or ``(N, L)``
    0/1 ints for multi-label (``y_score > threshold``).
    """
    _check_task(task)
    y_score = _to_numpy(y_score).astype(float, copy=False)
    if task == MULTI_LABEL:
        return (y_score.reshape(len(y_score), -1) > threshold).astype(int)
    if task == BINARY:
        pos = y_score[:, -1] if y_score.ndim == 2 else y_score.reshape(-1)
        return (pos > threshold).astype(int)
    if y_score.ndim == 1:
        y_score = y_score[:, None]
    return np.argmax(y_score, axis=-1)


def _quiet(fn, *args, **kwargs) -> float:
    """Call a sklearn metric, silencing its warnings; float result (nan kept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            return float(fn(*args, **kwargs))


def classification_metrics(y_true, y_score, task: str, threshold: float = 0.5) -> dict:
    """All classification metrics of one prediction set, as plain floats.

    Keys:
        ``acc``, ``auc``: :func:`get_acc` / :func:`get_auc` (MedMNIST definitions).
        ``balanced_acc``: ``sklearn.metrics.balanced_accuracy_score`` of the hard
            predictions (:func:`predict_labels`: argmax; thresholded for
            binary / multi-label).
        ``kappa``: Cohen's kappa (``sklearn.metrics.cohen_kappa_score``,
            unweighted) of the same hard predictions.
        ``mae`` (ordinal-regression only): mean absolute error between the
            argmax class index and the true class index.

    For multi-label tasks ``balanced_acc`` and ``kappa`` are the mean over
    labels of the per-label (binary) values. Undefined values (AUC with one
    class present, kappa when both raters are constant) are ``nan``.
    """
    y_true_p, _ = _prepare(y_true, y_score, task)
    y_pred = predict_labels(y_score, task, threshold)
    out = {
        "acc": get_acc(y_true, y_score, task, threshold),
        "auc": get_auc(y_true, y_score, task),
    }
    if task == MULTI_LABEL:
        L = y_true_p.shape[1]
        out["balanced_acc"] = float(
            np.mean([_quiet(balanced_accuracy_score, y_true_p[:, i], y_pred[:, i]) for i in range(L)])
        )
        out["kappa"] = float(
            np.mean([_quiet(cohen_kappa_score, y_true_p[:, i], y_pred[:, i]) for i in range(L)])
        )
    else:
        y_true_i = y_true_p.astype(int)
        out["balanced_acc"] = _quiet(balanced_accuracy_score, y_true_i, y_pred)
        out["kappa"] = _quiet(cohen_kappa_score, y_true_i, y_pred)
    if task == "ordinal-regression":
        out["mae"] = float(np.mean(np.abs(y_pred - y_true_p.astype(float))))
    return out


def regression_metrics(y_true, y_pred) -> dict:
    """``{"mae": ..., "r2": ...}`` for real-valued predictions (plain floats).

    Inputs are flattened; ``r2`` is ``nan`` for fewer than two samples.
    """
    y_true = _to_numpy(y_true).astype(float).reshape(-1)
    y_pred = _to_numpy(y_pred).astype(float).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ")
    return {
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": _quiet(r2_score, y_true, y_pred) if len(y_true) >= 2 else float("nan"),
    }


# --------------------------------------------------------------------------- #
# tables
# --------------------------------------------------------------------------- #
def per_group_accuracy(y_true, y_pred, groups) -> pd.DataFrame:
    """Accuracy of hard predictions per group (e.g. per class or per site).

    Args:
        y_true, y_pred: label arrays of the same length (flattened).
        groups: group key of every sample, same length.

    Returns:
        DataFrame with columns ``group, n, correct, acc``, one row per group
        sorted by group, followed by a final row whose group is ``"all"``.
    """
    y_true = _to_numpy(y_true).reshape(-1)
    y_pred = _to_numpy(y_pred).reshape(-1)
    groups = _to_numpy(groups).reshape(-1)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(
            f"lengths differ: y_true {len(y_true)}, y_pred {len(y_pred)}, groups {len(groups)}"
        )
    df = pd.DataFrame({"group": groups, "correct": (y_true == y_pred).astype(int)})
    table = (
        df.groupby("group", sort=True)["correct"]
        .agg(n="size", correct="sum")
        .reset_index()
    )
    total = pd.DataFrame({"group": ["all"], "n": [len(df)], "correct": [int(df["correct"].sum())]})
    table = pd.concat([table.astype({"group": object}), total.astype({"group": object})], ignore_index=True)
    table["n"] = table["n"].astype(int)
    table["correct"] = table["correct"].astype(int)
    table["acc"] = table["correct"] / table["n"].where(table["n"] > 0)
    return table[["group", "n", "correct", "acc"]]


def mean_std(
    df: pd.DataFrame,
    by: str | Sequence[str],
    values: str | Sequence[str],
    ddof: int = 1,
) -> pd.DataFrame:
    """Mean and standard deviation of ``values`` columns within groups of ``by``.

    Typical use: one row per (method, dataset, seed) run, ``by=["method",
    "dataset"]``, ``values=["acc", "auc"]``.

    Returns:
        One row per group (sorted) with the ``by`` columns, then for each value
        column ``<v>_mean`` and ``<v>_std`` (``ddof`` as given, so with the
        default ``ddof=1`` a single-run group has ``nan`` std), then ``n``, the
        number of rows in the group. NaNs in a value column are skipped by the
        mean/std. ``by=[]`` gives a single row over the whole frame.
    """
    by = [by] if isinstance(by, str) else list(by)
    values = [values] if isinstance(values, str) else list(values)
    missing = [c for c in by + values if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in DataFrame (has {list(df.columns)})")
    if not by:
        key = "__all__"
        out = mean_std(df.assign(**{key: 0}), [key], values, ddof=ddof)
        return out.drop(columns=[key])
    grouped = df.groupby(by, sort=True, dropna=False)
    parts = []
    for v in values:
        col = grouped[v]
        parts.append(col.mean().rename(f"{v}_mean"))
        parts.append(col.std(ddof=ddof).rename(f"{v}_std"))
    parts.append(grouped.size().rename("n"))
    return pd.concat(parts, axis=1).reset_index()


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """Format ``mean ± std``, e.g. ``format_mean_std(0.9351, 0.0042) == "0.935 ± 0.004"``.

    When ``std`` is ``nan``/``None`` (a single run, ``ddof=1``) the std is
    shown as an en dash: ``"0.935 ± –"``. A ``nan`` mean is shown as ``"nan"``.
    Counts of 1,000 and more (parameters, images) are shown whole with thousands separators:
    ``format_mean_std(52846.8, 1203.4) == "52,847 ± 1,203"``.
    """
    if mean is None or math.isnan(float(mean)):
        m, fmt = "nan", f".{digits}f"
    else:
        fmt = ",.0f" if abs(float(mean)) >= 1000 else f".{digits}f"
        m = f"{float(mean):{fmt}}"
    if std is None or math.isnan(float(std)):
        return f"{m} ± –"
    return f"{m} ± {float(std):{fmt}}"
