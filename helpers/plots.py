"""Figures for the book (matplotlib + seaborn): learning curves, comparisons, reward curves.

Every function takes tidy DataFrames read from a run's stored results and returns the Figure,
so a notebook can both show it and save it with :meth:`helpers.results.Recorder.save_figure`.

Figures are sized to the book's text column (:data:`TEXT_WIDTH`, legends included), so they are
shown at about their drawn size and their labels stay legible; curves with few points carry
markers, so a one-epoch (smoke) run still shows its points.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)

#: Width of the book's text column in inches (about 700 px at the inline backend's 100 dpi).
TEXT_WIDTH = 7.0
#: Room a legend placed beside the axes takes.
LEGEND_WIDTH = 1.5
#: Curves with at most this many points per line are drawn with markers.
MARKERS_UP_TO = 12


def _width(ncols: int, per_col: float, legend_beside: bool = False) -> float:
    """Figure width: ``per_col`` inches per column, capped so figure and legend fit the text column."""
    room = TEXT_WIDTH - (LEGEND_WIDTH if legend_beside else 0.0)
    return min(per_col * ncols, room)


def _label(key: str) -> str:
    from .page import human_name

    return human_name(key)


def _marker(df: pd.DataFrame, x: str) -> str | None:
    return "o" if df[x].nunique() <= MARKERS_UP_TO else None


def learning_curves(histories: pd.DataFrame, metrics: Sequence[str] = ("train/loss", "val/loss", "val/auc"),
                    hue: str = "model", col: str = "flag", x: str = "epoch") -> plt.Figure:
    """One row per metric, one column per ``col`` value; mean over seeds with a ±1 sd band.

    Without a ``col`` column in ``histories`` the metrics are laid side by side in one row.
    """
    cols = list(dict.fromkeys(histories[col])) if col in histories else [None]
    metrics = [m for m in metrics if m in histories]
    side_by_side = cols == [None]
    rows, ncols = (1, len(metrics)) if side_by_side else (len(metrics), len(cols))
    width = _width(ncols, 2.6)
    fig, axes = plt.subplots(rows, ncols, figsize=(width, (2.4 if side_by_side else 1.9) * rows + 0.5),
                             squeeze=False, sharex=True if side_by_side else "col")
    marker = _marker(histories, x) if x in histories else None
    for j, c in enumerate(cols):
        sub = histories if c is None else histories[histories[col] == c]
        for i, m in enumerate(metrics):
            ax = axes[0][i] if side_by_side else axes[i][j]
            last = (i == len(metrics) - 1) if side_by_side else (i == 0 and j == len(cols) - 1)
            sns.lineplot(data=sub, x=x, y=m, hue=hue if hue in sub else None, errorbar="sd", ax=ax, legend=last,
                         marker=marker)
            ax.set_title(f"{c}" if i == 0 and c is not None else "")
            ax.set_ylabel(_label(m) if side_by_side or j == 0 else "")
            ax.set_xlabel(_label(x))
    fig.tight_layout()
    legend_ax = axes[0][-1]
    if legend_ax.get_legend() is not None:   # one legend, below the grid: the panels keep the width
        n = len(legend_ax.get_legend().get_texts())
        sns.move_legend(legend_ax, "upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=fig.transFigure,
                        ncol=min(n, 5), frameon=False, title=None)
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.35 / fig.get_figheight())
    return fig


def compare_with_published(ours: pd.DataFrame, published: pd.DataFrame, metric: str = "acc",
                           flag: str = "flag") -> plt.Figure:
    """Our per-seed test metric (points and mean ± sd) beside published single numbers (crosses).

    ``ours`` has columns ``flag``, ``model`` and ``test/<metric>``; ``published`` has ``flag``,
    ``method`` and ``<metric>``.
    """
    flags = list(dict.fromkeys(ours[flag]))
    fig, axes = plt.subplots(1, len(flags), figsize=(_width(len(flags), 2.6, legend_beside=True), 3.0),
                             squeeze=False)
    for ax, f in zip(axes[0], flags):
        mine = ours[ours[flag] == f]
        sns.pointplot(data=mine, x="model", y=f"test/{metric}", errorbar="sd", linestyle="none",
                      capsize=0.2, ax=ax, color="C0")
        sns.stripplot(data=mine, x="model", y=f"test/{metric}", ax=ax, color="C0", alpha=0.4, size=4)
        pub = published[published[flag] == f]
        for k, (_, row) in enumerate(pub.iterrows()):
            ax.axhline(row[metric], color=f"C{k + 1}", lw=1, ls="--", label=row["method"])
        ax.set_title(f)
        ax.set_ylabel(f"test {metric.upper()}" if ax is axes[0][0] else "")
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=30)
    axes[0][-1].legend(title="published", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def reward_curves(df: pd.DataFrame, x: str = "episode", y: str = "rl/reward", hue: str = "strategy",
                  window: int = 10) -> plt.Figure:
    """Reward per episode (faint) and its moving average, mean over seeds with a ±1 sd band."""
    df = df.sort_values([hue, "seed", x]).copy()
    df["moving_avg"] = df.groupby([hue, "seed"])[y].transform(lambda s: s.rolling(window, min_periods=1).mean())
    fig, ax = plt.subplots(figsize=(_width(1, 7.0, legend_beside=True), 3.2))
    sns.lineplot(data=df, x=x, y=y, hue=hue, errorbar=None, alpha=0.25, ax=ax, legend=False)
    sns.lineplot(data=df, x=x, y="moving_avg", hue=hue, errorbar="sd", ax=ax, marker=_marker(df, x))
    ax.set_ylabel(f"{_label(y)} (moving average over {window})")
    ax.set_xlabel(_label(x))
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))   # beside the curves, not over them
    fig.tight_layout()
    return fig


def action_probabilities(episodes: pd.DataFrame, strategies: Sequence[str], x: str = "episode") -> plt.Figure:
    """The controller's probability of each choice per decision over episodes (mean over seeds).

    ``episodes`` holds columns ``p/<decision>=<value>`` written by :func:`helpers.nas.run_search`.
    """
    cols = [c for c in episodes.columns if c.startswith("p/")]
    decisions = list(dict.fromkeys(c[2:].split("=")[0] for c in cols))
    fig, axes = plt.subplots(len(strategies), len(decisions),
                             figsize=(_width(len(decisions), 2.6), 1.9 * len(strategies) + 0.3),
                             squeeze=False, sharey=True)
    marker = _marker(episodes, x) if x in episodes else None
    for i, strat in enumerate(strategies):
        sub = episodes[episodes["strategy"] == strat]
        for j, dec in enumerate(decisions):
            ax = axes[i][j]
            mine = [c for c in cols if c[2:].split("=")[0] == dec]
            long = sub.melt(id_vars=[x, "seed"], value_vars=mine, var_name="choice", value_name="probability")
            long["choice"] = long["choice"].str.split("=").str[1]
            sns.lineplot(data=long, x=x, y="probability", hue="choice", errorbar="sd", ax=ax, marker=marker)
            ax.set_title(f"{strat}: {dec}")
            ax.set_xlabel(_label(x) if i == len(strategies) - 1 else "")
            ax.set_ylim(0, 1)
            ax.legend(title=dec, fontsize=7, title_fontsize=8)
    fig.tight_layout()
    return fig


def params_vs_accuracy(episodes: pd.DataFrame, hue: str = "strategy") -> plt.Figure:
    """Every evaluated child: parameters (log x) against validation accuracy."""
    fig, ax = plt.subplots(figsize=(_width(1, 7.0, legend_beside=True), 3.4))
    sns.scatterplot(data=episodes, x="params", y="val_acc", hue=hue, style=hue, alpha=0.6, ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("child parameters")
    ax.set_ylabel("validation accuracy")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig
