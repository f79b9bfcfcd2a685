"""Per-fold diagnostics from what the fold units stored (histories, metrics, out-of-fold scores).

For each fold: epochs trained and best epoch (``stopped_early`` and ``best_at_first`` are separate
facts: a fold whose best epoch was 1 may have trained 11 epochs behind a patience of 10), the stop
reason and the LR at stop, the train/val gap at the best epoch (clean train pass, in points of ACC
or R²), the slope of the val loss after the best epoch (relative to its value there, per epoch),
the val metrics, and the per-subgroup errors (per class or grade, and per group column of the
target, :mod:`helpers.folds.groups`: the worst group of each column and its error over the best's).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..results import Recorder
from ..train import FitConfig
from .targets import Target, classification_summary, group_errors, ordinal_metrics

#: Columns of the diagnostics table, in the order the page shows them.
COLUMNS = ("target", "config", "fold", "epochs_trained", "best_epoch", "stopped_early", "best_at_first",
           "stop_reason", "lr_at_stop", "lr_drops", "gap_at_best", "val_loss_slope", "worst_group", "group_ratio")


def val_loss_slope(history: pd.DataFrame, best_epoch: int, key: str = "val/loss") -> float:
    """Least-squares slope of the val loss from the best epoch to the last, per epoch, relative to
    the val loss at the best epoch (``+0.05``: it rose 5 % of its best value per epoch). NaN when
    no epoch follows the best."""
    after = history[history["epoch"] >= best_epoch]
    if len(after) < 2 or key not in after:
        return math.nan
    slope = float(np.polyfit(after["epoch"].to_numpy(float), after[key].to_numpy(float), 1)[0])
    ref = abs(float(after[key].iloc[0])) or 1.0
    return slope / ref


def gap_at_best(history: pd.DataFrame, best_epoch: int, target: Target) -> float:
    """Train minus val at the best epoch, in points (x100) of ACC (classification) or R² (regression);
    the train side is the probe's clean pass (``train_eval/``), else the running ``train/`` value."""
    metric = "r2" if target.regression else "acc"
    row = history[history["epoch"] == best_epoch]
    if row.empty:
        return math.nan
    row = row.iloc[0]
    train = row.get(f"train_eval/{metric}", row.get(f"train/{metric}", math.nan))
    return 100.0 * (float(train) - float(row.get(f"val/{metric}", math.nan)))


def stop_reason(epochs_trained: int, stopped_early: bool, cfg: FitConfig) -> str:
    """Why a fold stopped: early stopping, its epoch budget, or neither (an interrupted run)."""
    if stopped_early:
        return f"patience {cfg.patience}"
    return "epoch budget" if epochs_trained >= cfg.epochs else "interrupted"


def diagnose_fold(history: pd.DataFrame, best_epoch: int, stopped_early: bool, cfg: FitConfig,
                  target: Target) -> dict:
    """The diagnostics of one fold from its per-epoch ``history`` (see the module docstring)."""
    lr = history["lr_end"] if "lr_end" in history else history["lr"]
    lr = lr.to_numpy(float)
    return {"epochs_trained": int(len(history)), "best_epoch": int(best_epoch), "stopped_early": bool(stopped_early),
            "best_at_first": bool(best_epoch == 1), "stop_reason": stop_reason(len(history), stopped_early, cfg),
            "lr_at_stop": float(lr[-1]) if len(lr) else math.nan,
            "lr_drops": int(np.sum(np.diff(lr) < -1e-12 * max(lr.max(initial=0), 1e-30))) if cfg.schedule == "plateau" else 0,
            "gap_at_best": gap_at_best(history, best_epoch, target),
            "val_loss_slope": val_loss_slope(history, best_epoch)}


def _fold_units(recorder: Recorder, target: Target, config: str, variant: str | None = "any") -> list[dict]:
    """The stored fold units of (``target``, ``config``), of the given ``variant`` key unless "any"."""
    units = [u for u in recorder.units() if u["keys"].get("target") == target.name
             and u["keys"].get("config") == config and u["keys"].get("fold") != "final"
             and (variant == "any" or u["keys"].get("variant") == variant)]
    return sorted(units, key=lambda u: int(u["keys"]["fold"]))


def fold_table(recorder: Recorder, target: Target, config: str, cfg: FitConfig, n_classes: int,
               variant: str | None = "any", frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per fold of (``target``, ``config``): the diagnostics, the val metrics and the worst
    class or grade with its error over the best one's (``worst_group``, ``group_ratio``); for each
    column of ``frame`` (:func:`helpers.folds.groups.group_frame`) the same as ``worst_<column>`` and
    ``ratio_<column>``."""
    rows = []
    for u in _fold_units(recorder, target, config, variant):
        keys, metrics = u["keys"], u["metrics"]
        history = recorder.history(**keys)
        row = {"target": target.name, "config": config, "fold": int(keys["fold"]), "seed": keys.get("seed")}
        row.update(diagnose_fold(history, metrics["best_epoch"], u.get("stopped_early", False), cfg, target))
        row.update({m: metrics.get(f"val/{m}", math.nan) for m, _ in target.metrics()})
        groups = fold_group_errors(recorder, u, target, n_classes, frame=frame)
        row["worst_group"], row["group_ratio"] = None, math.nan
        for column, g in groups[groups["group"] != "all"].groupby("column", sort=False):
            worst = g.loc[g["value"].idxmax(), "group"] if len(g) else None
            if column == target.label_column:
                row["worst_group"], row["group_ratio"] = worst, group_ratio(g["value"])
            else:
                row[f"worst_{column}"], row[f"ratio_{column}"] = worst, group_ratio(g["value"])
        rows.append(row)
    return pd.DataFrame(rows)


def group_ratio(errors: Sequence[float], floor: float = 0.02) -> float:
    """Worst subgroup error over the best one (the best floored at ``floor``, so a perfect group does
    not make the ratio infinite)."""
    e = np.asarray(list(errors), dtype=float)
    e = e[np.isfinite(e)]
    return float(e.max() / max(e.min(), floor)) if len(e) >= 2 else math.nan


def fold_group_errors(recorder: Recorder, unit: Mapping, target: Target, n_classes: int, groups=None,
                      frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-subgroup errors of one fold unit's val predictions (:func:`helpers.folds.targets.group_errors`):
    by class or grade (or ``groups``), then by each column of ``frame`` (group per official train
    index), stacked long with a ``column`` naming the grouping."""
    sc = recorder.scores(**unit["keys"])
    parts = [group_errors(sc["val_labels"], sc["val_scores"], target, n_classes, groups)]
    for column in ([] if frame is None else frame.columns):
        values = frame.loc[np.asarray(sc["val_index"], dtype=int), column].to_numpy()
        parts.append(group_errors(sc["val_labels"], sc["val_scores"], target, n_classes, values, column=column))
    return pd.concat(parts, ignore_index=True)


def subgroup_table(recorder: Recorder, target: Target, config: str, n_classes: int,
                   variant: str | None = "any", frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-fold, per-subgroup errors of (``target``, ``config``), long format (``column``, ``group``,
    ``n``, ``value``, ``metric``): the class or grade, and every column of ``frame``."""
    frames = [fold_group_errors(recorder, u, target, n_classes, frame=frame).assign(
                  target=target.name, config=config, fold=int(u["keys"]["fold"]))
              for u in _fold_units(recorder, target, config, variant)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def out_of_fold(recorder: Recorder, target: Target, config: str, variant: str | None = "any") -> dict:
    """The pooled out-of-fold predictions of (``target``, ``config``): every train image predicted
    by the fold model that did not train on it (``labels``, ``scores``, ``index``, ``fold``)."""
    parts = {"labels": [], "scores": [], "index": [], "fold": []}
    for u in _fold_units(recorder, target, config, variant):
        sc = recorder.scores(**u["keys"])
        parts["labels"].append(sc["val_labels"])
        parts["scores"].append(sc["val_scores"])
        parts["index"].append(sc["val_index"])
        parts["fold"].append(np.full(len(sc["val_labels"]), int(u["keys"]["fold"])))
    return {k: np.concatenate(v) for k, v in parts.items()} if parts["labels"] else {}


def pooled_metrics(recorder: Recorder, target: Target, config: str, n_classes: int, task: str,
                   variant: str | None = "any") -> dict:
    """Metrics of the pooled out-of-fold predictions (e.g. the overall R² over all folds)."""
    oof = out_of_fold(recorder, target, config, variant)
    if not oof:
        return {}
    if target.regression:
        m = ordinal_metrics(oof["labels"], oof["scores"][:, 0], n_classes)
    else:
        m = classification_summary(oof["labels"], oof["scores"], task)
    return {k: m[k] for k, _ in target.metrics()}
