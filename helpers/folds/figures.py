"""Figures of the fold diagnostics page: per-fold learning and LR curves, a fold x metric heatmap,
subgroup error bars, and for a regression target predicted against true grade with the confusion
matrix of the rounded grades. Each takes tables read from the run's stored results and returns
the Figure (sized to the book's text column, like :mod:`helpers.plots`)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
import seaborn as sns

from ..plots import TEXT_WIDTH
from .targets import round_grades


def fold_curves(histories: pd.DataFrame, configs: Sequence[str], best: pd.DataFrame | None = None) -> plt.Figure:
    """Per config (rows): train (dashed, clean pass) and val (solid) loss of every fold, with a dot
    at each fold's best epoch; and the LR at the end of each epoch (log scale)."""
    configs = [c for c in configs if c in set(histories["config"])]
    fig, axes = plt.subplots(len(configs), 2, figsize=(TEXT_WIDTH, 2.3 * len(configs) + 0.4), squeeze=False)
    train_key = "train_eval/loss" if "train_eval/loss" in histories else "train/loss"
    lr_key = "lr_end" if "lr_end" in histories else "lr"
    folds = sorted(histories["fold"].unique(), key=int)
    palette = dict(zip(folds, sns.color_palette("tab10", len(folds))))
    for i, config in enumerate(configs):
        sub = histories[histories["config"] == config]
        ax, ax_lr = axes[i]
        for fold, h in sub.groupby("fold"):
            color = palette[fold]
            ax.plot(h["epoch"], h["val/loss"], color=color, lw=1.2, label=f"fold {fold}")
            ax.plot(h["epoch"], h[train_key], color=color, lw=1.0, ls="--")
            ax_lr.plot(h["epoch"], h[lr_key], color=color, lw=1.2)
            if best is not None:
                b = best[(best["config"] == config) & (best["fold"] == int(fold))]
                if len(b):
                    e = int(b["best_epoch"].iloc[0])
                    ax.plot([e], h.loc[h["epoch"] == e, "val/loss"], "o", color=color, ms=4)
        ax.set_title(f"{config}: loss (val solid, train dashed)", fontsize=9)
        ax.set_xlabel("epoch")
        ax_lr.set_title(f"{config}: LR at the end of each epoch", fontsize=9)
        ax_lr.set_yscale("log")
        ax_lr.set_xlabel("epoch")
        for a in (ax, ax_lr):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 6), frameon=False)
    return fig


def metric_heatmap(table: pd.DataFrame, metrics: Sequence[tuple[str, bool]], configs: Sequence[str] | None = None) -> plt.Figure:
    """Fold x metric, one row per (config, fold), the values written in; ``metrics`` are (name,
    larger_is_better). Colours are per column, each metric scaled over its own range, bright = better."""
    order = {c: i for i, c in enumerate(configs or dict.fromkeys(table["config"]))}
    rows = table.assign(_o=table["config"].map(order)).sort_values(["_o", "fold"])
    labels = [f"{c} · fold {f}" for c, f in zip(rows["config"], rows["fold"])]
    values = rows[[m for m, _ in metrics]].to_numpy(float)
    lo, hi = np.nanmin(values, 0), np.nanmax(values, 0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    scaled = np.where([larger for _, larger in metrics], scaled, 1.0 - scaled)
    metrics = [m for m, _ in metrics]
    fig, ax = plt.subplots(figsize=(min(TEXT_WIDTH, 1.4 * len(metrics) + 2.2), 0.28 * len(rows) + 1.0))
    sns.heatmap(scaled, annot=values, fmt=".3f", cmap="viridis", cbar=False, ax=ax,
                xticklabels=[m.upper() for m in metrics], yticklabels=labels, annot_kws={"fontsize": 7})
    ax.set_title("fold x metric (val of each fold; colour per column, bright = better)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def subgroup_bars(groups: pd.DataFrame) -> plt.Figure:
    """Per subgroup and config, the error (MAE or error rate): mean ± sd over folds; one panel per
    subgroup column (the true class or grade, then each group column of the target)."""
    g = groups[groups["group"] != "all"].copy()
    if "column" not in g:
        g["column"] = "class or grade"
    g["group"] = g["group"].astype(str)
    columns = list(dict.fromkeys(g["column"]))
    widths = [max(g.loc[g["column"] == c, "group"].nunique(), 1) for c in columns]
    width = min(TEXT_WIDTH, 0.55 * sum(widths) * max(g["config"].nunique(), 1) + 2.5)
    fig, axes = plt.subplots(1, len(columns), figsize=(width, 2.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    metric = g["metric"].iloc[0] if len(g) else "error"
    hue_order = list(dict.fromkeys(g["config"]))
    for i, (ax, column) in enumerate(zip(axes[0], columns)):
        sub = g[g["column"] == column]
        sns.barplot(data=sub, x="group", y="value", hue="config", hue_order=hue_order, errorbar="sd", capsize=0.15,
                    ax=ax, order=sorted(sub["group"].unique(), key=lambda v: (len(v), v)))
        ax.set_ylabel(("MAE" if metric == "mae" else "error rate") if i == 0 else "")
        ax.set_xlabel(column)
        if sub["group"].str.len().max() * sub["group"].nunique() > 24:   # long names or many groups
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        if i < len(columns) - 1:
            ax.get_legend().remove()
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title=None)
    fig.tight_layout()
    return fig


def predicted_vs_true(labels: np.ndarray, preds: np.ndarray, n_grades: int, title: str = "") -> plt.Figure:
    """Out-of-fold prediction against the true grade (jittered, with the per-grade mean) and the
    confusion matrix of the rounded, clipped grades."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    preds = np.asarray(preds, dtype=float).reshape(-1)
    rng = np.random.default_rng(0)
    fig, (ax, ax_cm) = plt.subplots(1, 2, figsize=(TEXT_WIDTH, 3.0))
    ax.scatter(labels + rng.uniform(-0.2, 0.2, len(labels)), preds, s=5, alpha=0.35)
    means = [preds[labels == g].mean() if np.any(labels == g) else np.nan for g in range(n_grades)]
    ax.plot(range(n_grades), means, "o-", color="C3", label="mean prediction")
    ax.plot([0, n_grades - 1], [0, n_grades - 1], ls=":", color="grey", label="ideal")
    ax.set_xlabel("true grade")
    ax.set_ylabel("predicted (real-valued)")
    ax.set_title(title or "predicted vs true grade", fontsize=9)
    ax.legend(fontsize=7)
    cm = pd.crosstab(pd.Categorical(labels, categories=range(n_grades)),
                     pd.Categorical(round_grades(preds, n_grades), categories=range(n_grades)), dropna=False)
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax_cm, annot_kws={"fontsize": 7})
    ax_cm.set_xlabel("rounded prediction")
    ax_cm.set_ylabel("true grade")
    ax_cm.set_title("confusion matrix of rounded grades", fontsize=9)
    fig.tight_layout()
    return fig
