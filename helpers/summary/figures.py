"""The summary's figures: reliability diagrams and accuracy against corruption severity."""
from __future__ import annotations

import math

import pandas as pd

__all__ = ["reliability_figure", "robustness_figure"]


def _panels(frame: pd.DataFrame, cols: int):
    """A figure with one panel per (chapter, run, dataset) of ``frame``, in order of appearance;
    returns the figure and ``(axis, rows, title)`` per panel (unused cells hidden)."""
    import matplotlib.pyplot as plt

    groups = list(frame.groupby(["chapter", "run", "dataset"], sort=False))
    cols = min(cols, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[len(groups):]:
        ax.set_visible(False)
    return fig, [(ax, sub, f"{run}: {dataset}") for ax, ((_, run, dataset), sub) in zip(flat, groups)]


def _finish(ax, title: str, xlabel: str, ylabel: str, legend: str) -> None:
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=5, loc=legend)


def reliability_figure(diagram: pd.DataFrame, cols: int = 4):
    """One panel per (run, dataset): accuracy against mean confidence per bin (seeds pooled), one
    line per method, the diagonal being perfect calibration; bins with no image are left out."""
    fig, panels = _panels(diagram, cols)
    for ax, sub, title in panels:
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        for method, m in sub.groupby("method", sort=False):
            m = m[m["n"] > 0]
            ax.plot(m["confidence"], m["accuracy"], marker="o", ms=2.5, lw=1.1, label=method)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        _finish(ax, title, "confidence", "accuracy", "upper left")
    fig.tight_layout()
    return fig


def robustness_figure(rows: pd.DataFrame, cols: int = 4):
    """One panel per (run, dataset): test accuracy (mean over corruptions and seeds) against severity
    (0 = clean), one line per method."""
    clean = rows[rows["corruption"] == "none"]
    corr = rows[rows["corruption"] != "none"]
    keys = ["chapter", "run", "dataset", "method"]
    curve = pd.concat([clean.groupby(keys + ["severity"], sort=False)["acc"].mean(),
                       corr.groupby(keys + ["severity"], sort=False)["acc"].mean()]).reset_index()
    fig, panels = _panels(curve, cols)
    for ax, sub, title in panels:
        for method, m in sub.groupby("method", sort=False):
            m = m.sort_values("severity")
            ax.plot(m["severity"], m["acc"], marker="o", ms=2.5, lw=1.1, label=method)
        _finish(ax, title, "severity (mean over corruptions)", "test accuracy", "lower left")
    fig.tight_layout()
    return fig
