"""The chapter's figures, read from stored units: weight and temperature trajectories, the gate's
histogram, the REINFORCE variant's reward and entropy curves."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..results import Recorder
from .pipeline import LABELS

__all__ = ["combiner_histories", "trajectories", "gate_histogram", "reward_curves"]


def combiner_histories(recorder: Recorder, variants: Sequence[str] = ("ce", "faithful", "rl"), gated: bool = False) -> pd.DataFrame:
    """The per-epoch histories of the weighting units, stacked, with ``combiner`` and ``seed`` columns."""
    frames = []
    for u in recorder.units():
        k = u["keys"]
        if k.get("role") == "combiner" and k.get("combiner") in variants and k.get("expert") == gated:
            frames.append(recorder.history(**k).assign(combiner=k["combiner"], seed=k["seed"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _band(ax, df: pd.DataFrame, x: str, y: str, label: str, **kw) -> None:
    g = df.groupby(x)[y]
    m, s = g.mean(), g.std().fillna(0)
    ax.plot(m.index, m.values, label=label, **kw)
    ax.fill_between(m.index, m - s, m + s, alpha=0.15, color=ax.lines[-1].get_color())


def trajectories(hist: pd.DataFrame) -> plt.Figure:
    """Mean member weight (on val) per epoch for each variant, and the temperature (mean ± sd over seeds)."""
    variants = list(dict.fromkeys(hist["combiner"]))
    wcols = [c for c in hist.columns if c.startswith("weight/")]
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(3.2 * (len(variants) + 1), 3.0), squeeze=False)
    for ax, v in zip(axes[0], variants):
        d = hist[hist["combiner"] == v]
        for c in wcols:
            _band(ax, d, "epoch", c, c.split("/", 1)[1])
        ax.set_title(LABELS.get(v, v), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("mean weight on val")
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    for v in variants:
        _band(ax, hist[hist["combiner"] == v], "epoch", "temperature", LABELS.get(v, v))
    ax.set_title("temperature T (kept > 0)", fontsize=9)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def gate_histogram(recorder: Recorder, combiner: str = "rl", split: str = "test") -> plt.Figure:
    """Histogram of the gate value ``g`` (expert share) on ``split``, right and wrong cases apart, all seeds."""
    right, wrong = [], []
    for u in recorder.units():
        k = u["keys"]
        if k.get("role") == "combiner" and k.get("combiner") == combiner and k.get("expert"):
            sc = recorder.scores(**k)
            ok = sc[f"{split}_scores"].argmax(1) == sc[f"{split}_labels"]
            right.append(sc[f"{split}_gate"][ok])
            wrong.append(sc[f"{split}_gate"][~ok])
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    bins = np.linspace(0, 1, 26)
    for vals, name in ((right, "right"), (wrong, "wrong")):
        v = np.concatenate(vals) if vals else np.array([])
        ax.hist(v, bins=bins, alpha=0.6, density=True, label=f"{name} (n = {len(v)}, mean {v.mean() if len(v) else float('nan'):.3f})")
    ax.set_xlabel(f"gate g (share of the expert), {split} split, {LABELS.get(combiner, combiner)}")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reward_curves(hist: pd.DataFrame) -> plt.Figure:
    """``rl/reward`` with ``rl/baseline``, and ``rl/entropy``, per epoch (mean ± sd over seeds)."""
    d = hist[hist["combiner"] == "rl"]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    _band(axes[0], d, "epoch", "rl/reward", "reward")
    _band(axes[0], d, "epoch", "rl/baseline", "baseline", linestyle="--")
    axes[0].set_ylabel("reward (rl/reward) and baseline")
    axes[0].legend(fontsize=7)
    _band(axes[1], d, "epoch", "rl/entropy", "entropy")
    axes[1].set_ylabel("Dirichlet policy entropy (nats)")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return fig
