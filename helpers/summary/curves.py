"""Every RL method's training signals side by side, and the fold diagnostics at a glance.

:func:`rl_curves` reads the ``rl/*`` keys every RL chapter logs (design principle 4) from the stored
units of each run: a unit's per-step trace table (``tables/trace__<unit>.csv``) when the chapter
stores one, else its history (per ``episode`` for an architecture search, per ``epoch`` otherwise).
:func:`rl_figure` draws reward, baseline and entropy per run, one line per method (mean over seeds).
:func:`folds_overview` condenses the fold-diagnostics chapter's stored per-fold table.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..results import unit_name
from .chapters import RunRef, _ro

__all__ = ["RL_KEYS", "rl_curves", "rl_figure", "folds_overview"]

RL_KEYS = ("rl/reward", "rl/baseline", "rl/entropy")
#: the unit key naming the method, per chapter (first one present)
_METHOD_KEYS = ("strategy", "method", "combiner")


def _label(keys: dict) -> str:
    name = next((str(keys[k]) for k in _METHOD_KEYS if k in keys), "?")
    if keys.get("expert"):
        name += " + gate"
    extra = [f"{k}={keys[k]}" for k in ("k", "held_out") if k in keys]
    return name + (f" ({', '.join(extra)})" if extra else "")


def rl_curves(runs: Sequence[RunRef], keys: Sequence[str] = RL_KEYS) -> pd.DataFrame:
    """Long table of the ``rl/*`` signals of every unit of ``runs`` that logged them: ``chapter, run,
    method, seed, x`` (the step, episode or epoch), ``x_name``, ``key``, ``value``."""
    frames = []
    for run in runs:
        for root in (run.root, run.root / "champions"):
            if not (root / "units").is_dir():
                continue
            rec = _ro(root)
            for u in rec.units():
                name = unit_name(**u["keys"])
                trace = root / "tables" / f"trace__{name}.csv"
                hist = root / "history" / f"{name}.csv"
                path = trace if trace.is_file() else hist if hist.is_file() else None
                if path is None:
                    continue
                df = pd.read_csv(path)
                present = [k for k in keys if k in df]
                if not present:
                    continue
                x_name = next(c for c in ("step", "episode", "epoch") if c in df) if any(
                    c in df for c in ("step", "episode", "epoch")) else None
                x = df[x_name] if x_name else pd.Series(np.arange(1, len(df) + 1))
                long = df[present].assign(x=x.to_numpy()).melt(id_vars="x", var_name="key", value_name="value")
                frames.append(long.assign(chapter=run.notebook, run=run.name, method=_label(u["keys"]),
                                          seed=u["keys"].get("seed"), x_name=x_name or "row"))
    if not frames:
        return pd.DataFrame(columns=["chapter", "run", "method", "seed", "x", "x_name", "key", "value"])
    out = pd.concat(frames, ignore_index=True)
    return out[["chapter", "run", "method", "seed", "x", "x_name", "key", "value"]]


def rl_figure(curves: pd.DataFrame, keys: Sequence[str] = RL_KEYS):
    """One row of panels per run (reward, baseline, entropy), one line per method: the mean over
    seeds, with a band of ±1 sd where there are several seeds."""
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(zip(curves["chapter"], curves["run"])))
    fig, axes = plt.subplots(max(1, len(runs)), len(keys), figsize=(4.2 * len(keys), 2.6 * max(1, len(runs))),
                             squeeze=False)
    for i, (chapter, run) in enumerate(runs):
        sub = curves[(curves["chapter"] == chapter) & (curves["run"] == run)]
        for j, key in enumerate(keys):
            ax = axes[i, j]
            part = sub[sub["key"] == key]
            for method, m in part.groupby("method", sort=False):
                stats = m.groupby("x")["value"].agg(["mean", "std"]).reset_index()
                ax.plot(stats["x"], stats["mean"], label=method, lw=1.3, marker="o" if len(stats) < 6 else None, ms=3)
                if m["seed"].nunique() > 1:
                    ax.fill_between(stats["x"], stats["mean"] - stats["std"].fillna(0),
                                    stats["mean"] + stats["std"].fillna(0), alpha=0.15)
            ax.set_title(f"{chapter}/{run}: {key.split('/')[-1]}", fontsize=9)
            ax.set_xlabel(part["x_name"].iloc[0] if len(part) else "")
            ax.tick_params(labelsize=7)
            if j == len(keys) - 1 and len(part):
                ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def folds_overview(runs: Sequence[RunRef]) -> pd.DataFrame:
    """Per fold-diagnostics run, target and config: folds, mean epochs trained and best epoch, how
    many folds stopped early, had their best epoch first or last, the mean train/val gap at the best
    epoch and val-loss slope after it, and the most common stop reason (from its stored
    ``tables/diagnostics_<target>.csv``)."""
    rows = []
    for run in runs:
        if run.notebook != "folds":
            continue
        for path in sorted((run.root / "tables").glob("diagnostics_*.csv")):
            d = pd.read_csv(path)
            d = d[d["fold"].astype(str) != "final"] if "fold" in d else d
            for (target, cfg), g in d.groupby(["target", "config"], sort=False):
                rows.append({"run": run.name, "target": target, "config": cfg, "folds": len(g),
                             "epochs trained": g["epochs_trained"].mean(), "best epoch": g["best_epoch"].mean(),
                             "stopped early": int(g["stopped_early"].astype(bool).sum()),
                             "best at first": int(g["best_at_first"].astype(bool).sum()),
                             "best at last": int((g["best_epoch"] == g["epochs_trained"]).sum()),
                             "gap at best": g["gap_at_best"].mean(), "val loss slope": g["val_loss_slope"].mean(),
                             "stop reason": g["stop_reason"].mode().iloc[0] if len(g) else ""})
    return pd.DataFrame(rows)
