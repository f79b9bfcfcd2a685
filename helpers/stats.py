"""Paired comparisons over seeds (or folds): a method against its equal-budget control.

The input is a long table with one row per observation: a ``by`` column naming the method
(``strategy``, ``method``, ...), a ``unit`` column pairing observations (``seed`` or ``fold``) and
the metric. Each unit is reduced to one number per method (``mean`` or ``max``), the two methods
are paired by unit and compared with a paired t-test (``scipy.stats.ttest_rel``). Used by the NAS
chapter (RL against random search) and meant for any method-vs-control chapter (an ensemble
against uniform averaging, a learned mask against random masks, APGA against cutout).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["per_unit", "paired_test", "paired_comparison", "compare_pairs", "holm", "summary_table"]


def per_unit(df: pd.DataFrame, metric: str, by: str = "strategy", unit: str = "seed",
             reduce: str = "mean") -> pd.DataFrame:
    """``reduce`` of ``metric`` per (method, unit): one row per unit, one column per method."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', not {reduce!r}")
    return df.groupby([by, unit])[metric].agg(reduce).unstack(by)


def paired_test(table: pd.DataFrame, a: str, b: str) -> dict:
    """Paired t-test of columns ``a`` vs ``b`` over the rows (units) where both are present.

    Returns ``n`` (paired units), ``mean_a``, ``mean_b``, ``mean_diff``, ``sd_diff`` (ddof 1) and
    ``t``, ``p`` (two-sided); ``t`` and ``p`` are NaN with fewer than two units or no variation
    (differences equal up to floating-point rounding, which would otherwise give an absurd ``t``).
    """
    from scipy import stats

    pair = table[[a, b]].dropna()
    diff = pair[a] - pair[b]
    out = {"n": len(pair), "mean_a": float(pair[a].mean()), "mean_b": float(pair[b].mean()),
           "mean_diff": float(diff.mean()), "sd_diff": float(diff.std(ddof=1)) if len(pair) > 1 else math.nan}
    scale = max(1.0, float(pair.abs().to_numpy().max())) if len(pair) else 1.0
    if len(pair) > 1 and float(diff.max() - diff.min()) > 1e-9 * scale:   # rounding noise is no variation
        t = stats.ttest_rel(pair[a], pair[b])
        out.update(t=float(t.statistic), p=float(t.pvalue))
    else:
        out.update(t=math.nan, p=math.nan)
    return out


def paired_comparison(df: pd.DataFrame, a: str, b: str, metric: str, *, by: str = "strategy",
                      unit: str = "seed", reduce: str = "mean", **extra) -> dict:
    """Method ``a`` vs method ``b`` on the per-``unit`` ``reduce`` of ``metric`` (see :func:`paired_test`).

    Keys: ``a``, ``b``, ``metric``, then ``extra`` (e.g. what subset was compared), ``n_<unit>s``,
    ``mean_a``, ``mean_b``, ``mean_diff``, ``sd_diff``, ``t``, ``p``.
    """
    res = paired_test(per_unit(df, metric, by, unit, reduce), a, b)
    return {"a": a, "b": b, "metric": metric, **extra, f"n_{unit}s": res.pop("n"), **res}


def compare_pairs(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], metric: str, *, by: str = "strategy",
                  unit: str = "seed", reduce: str = "mean", **extra) -> pd.DataFrame:
    """One :func:`paired_comparison` row per (method, control) pair of ``pairs`` whose two methods ran."""
    ran = set(df[by])
    return pd.DataFrame([paired_comparison(df, a, b, metric, by=by, unit=unit, reduce=reduce, **extra)
                         for a, b in pairs if a in ran and b in ran])


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def summary_table(df: pd.DataFrame, by: Sequence[str], values: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` over seeds (or folds) of ``values`` grouped by ``by``, as display strings."""
    from .metrics import format_mean_std, mean_std

    stats = mean_std(df, list(by), list(values))
    out = stats[list(by)].copy()
    for v in values:
        out[v] = [format_mean_std(m, s, digits) for m, s in zip(stats[f"{v}_mean"], stats[f"{v}_std"])]
    out["n"] = stats["n"]
    return out
