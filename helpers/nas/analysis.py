"""Tables of a finished search: the reference's phase table, champions, paired tests and their sentences."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .. import stats
from ..report import comparison_sentence, power_note
from .space import arch_from_key
from .strategies import COMPARISONS

__all__ = ["phase_table", "champions", "paired_comparison", "compare_strategies", "describe_comparison",
           "retrain_champions", "champions_beside_baselines"]


def phase_table(episodes: pd.DataFrame, by: Sequence[str] = ("strategy",)) -> pd.DataFrame:
    """The reference table: mean reward, params and val accuracy over the episodes of each phase."""
    return (episodes.groupby(list(by), sort=False)[["reward", "params", "val_acc"]].mean()
            .reset_index())


def champions(episodes: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, seed) the child with the best validation reward (first one on ties)."""
    best = episodes.sort_values(["strategy", "seed", "reward", "episode"], ascending=[True, True, False, True])
    return best.groupby(["strategy", "seed"], sort=False).head(1).reset_index(drop=True)


def paired_comparison(episodes: pd.DataFrame, a: str, b: str, metric: str = "reward",
                      last: int | None = None, reduce: str = "mean") -> dict:
    """Paired t-test over seeds of strategy ``a`` vs ``b`` on the per-seed ``reduce`` of ``metric``.

    ``last`` restricts to the final ``last`` episodes (what the policy does after learning);
    ``reduce="max"`` compares the best child each search found. See :func:`helpers.stats.paired_comparison`.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', not {reduce!r}")
    df = episodes if last is None else episodes[episodes["episode"] > episodes["episode"].max() - last]
    return stats.paired_comparison(df, a, b, metric, by="strategy", unit="seed", reduce=reduce, last=last)


def compare_strategies(episodes: pd.DataFrame, last: int | None, pairs: Sequence[tuple[str, str]] = COMPARISONS,
                       metric: str = "reward") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired tests of every pair of ``pairs`` whose two strategies were run: on the mean ``metric``
    of the last ``last`` episodes, and on the best ``metric`` found. Returns ``(last, best)``."""
    ran = set(episodes["strategy"])
    pairs = [(a, b) for a, b in pairs if a in ran and b in ran]
    last_t = pd.DataFrame([paired_comparison(episodes, a, b, metric, last=last) for a, b in pairs])
    best_t = pd.DataFrame([paired_comparison(episodes, a, b, metric, reduce="max") for a, b in pairs])
    return last_t, best_t


def describe_comparison(last: pd.DataFrame, best: pd.DataFrame, alpha: float = 0.05) -> str:
    """Plain sentences (markdown bullets) from the two tables of :func:`compare_strategies`."""
    lines = []
    for (_, a), (_, b) in zip(last.iterrows(), best.iterrows()):
        span = f"the last {int(a['last'])} episodes" if a.get("last") is not None and np.isfinite(a["last"]) else "all episodes"
        lines.append(f"- **{a['a']} vs {a['b']}**: {comparison_sentence(a, f'mean reward over {span}', alpha)}. "
                     f"{comparison_sentence(b, 'Best reward found', alpha, difference=False)}.")
    note = power_note(int(last["n_seeds"].max())) if len(last) else ""
    if note:
        lines.append(f"- {note}")
    return "\n".join(lines)


def retrain_champions(recorder, ds, episodes: pd.DataFrame, cfg, *, batch_size: int = 128,
                      device: str = "auto") -> pd.DataFrame:
    """Retrain the champion of every (strategy, seed) with the shared ``fit`` and test it once.

    Units are stored under ``<run>/champions`` (a finished one is not retrained); returns one row
    per champion with its val and test metrics.
    """
    from ..experiment import train_and_test
    from ..results import Recorder

    champ_rec = Recorder(recorder.root / "champions")
    for _, row in champions(episodes).iterrows():
        train_and_test(champ_rec, ds, "nas_child", int(row["seed"]), cfg, batch_size=batch_size,
                       model_kwargs={"arch": arch_from_key(row["arch"])}, device=device,
                       unit={"strategy": row["strategy"], "seed": int(row["seed"]), "arch": row["arch"]})
    return champ_rec.wide_metrics()


def champions_beside_baselines(champ: pd.DataFrame, baselines: pd.DataFrame, flag: str) -> pd.DataFrame:
    """Test ACC/AUC (mean ± std over seeds) of the champions, then the baselines page's models on ``flag``."""
    cols = ["params", "test/acc", "test/auc"]
    table = stats.summary_table(champ, ["strategy"], cols)
    if len(baselines):
        base = baselines[baselines["flag"] == flag].assign(strategy=lambda d: "baseline: " + d["model"])
        table = pd.concat([table, stats.summary_table(base, ["strategy"], cols)], ignore_index=True)
    return table
