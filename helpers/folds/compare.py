"""Before against after: paired per-fold differences, tests, sentences and the chosen config.

Both configs ran on the same folds (one split file), so each fold gives one paired difference per
metric; :func:`helpers.stats.paired_comparison` tests them (paired t-test over folds) and
:func:`helpers.stats.holm` adjusts the p-values over the metrics of a target. The chosen config is
the one with the better mean fold val headline metric (R² or AUC): selection on validation only.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..report import comparison_sentence
from ..stats import holm, paired_comparison
from .targets import Target


def paired_folds(table: pd.DataFrame, target: Target, a: str = "after", b: str = "before") -> pd.DataFrame:
    """One row per metric of ``target``: ``a`` vs ``b`` paired over folds (mean_a, mean_b, mean_diff,
    sd_diff, t, p, p_holm) and ``better``: whether ``a``'s mean is the better one for that metric."""
    sub = table[table["target"] == target.name]
    rows = []
    for metric, larger in target.metrics():
        if metric not in sub or not {a, b} <= set(sub["config"]):
            continue
        row = paired_comparison(sub, a, b, metric, by="config", unit="fold", target=target.name)
        row["larger_is_better"] = larger
        row["better"] = (row["mean_diff"] > 0) == larger if row["mean_diff"] != 0 else False
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty:
        out["p_holm"] = holm(out["p"].to_numpy())
    return out


def per_fold_differences(table: pd.DataFrame, target: Target, a: str = "after", b: str = "before") -> pd.DataFrame:
    """The per-fold values of ``a`` and ``b`` and their difference, for every metric of ``target``."""
    sub = table[table["target"] == target.name]
    rows = []
    for metric, _ in target.metrics():
        wide = sub.pivot_table(index="fold", columns="config", values=metric)
        if a not in wide or b not in wide:
            continue
        for fold, r in wide.iterrows():
            rows.append({"metric": metric, "fold": int(fold), b: r[b], a: r[a], "difference": r[a] - r[b]})
    return pd.DataFrame(rows)


def outcome_sentence(tests: pd.DataFrame, target: Target, a: str = "after", b: str = "before",
                     alpha: float = 0.05) -> str:
    """Whether ``a`` is better than ``b`` on the headline metric, measured: significant, not, or worse."""
    headline, _ = target.headline()
    if not tests.empty and "a" in tests:
        tests = tests[(tests["a"] == a) & (tests["b"] == b)]
    if tests.empty or headline not in set(tests["metric"]):
        return f"{target.name}: no paired comparison of {a} and {b} (one of them did not run)."
    rows = [comparison_sentence(r, f"{r['metric'].upper()} ({a} vs {b})", alpha=alpha, unit="fold")
            for _, r in tests.iterrows()]
    h = tests[tests["metric"] == headline].iloc[0]
    p = h["p_holm"] if np.isfinite(h.get("p_holm", math.nan)) else h["p"]
    if not np.isfinite(p):
        head = f"{a} cannot be told from {b} by a test on {headline.upper()} (no variation or too few folds)"
    elif p < alpha and h["better"]:
        head = f"{a} is better than {b} on {headline.upper()}, and the difference is significant"
    elif p < alpha:
        head = f"{a} is **worse** than {b} on {headline.upper()}, significantly: the recommended changes did not help"
    elif h["better"]:
        head = (f"{a} is better than {b} on {headline.upper()} on average, but not significantly: the "
                f"recommended changes are not shown to help")
    else:
        head = f"{a} is **not better** than {b} on {headline.upper()} (not significant): the recommended changes did not help"
    return f"**{target.name}**: {head}. " + "; ".join(rows) + "."


def choose_config(table: pd.DataFrame, target: Target, configs: Sequence[str]) -> str:
    """The config with the best mean fold val headline metric (ties: the first listed)."""
    metric, larger = target.headline()
    sub = table[(table["target"] == target.name) & table["config"].isin(configs)]
    means = sub.groupby("config")[metric].mean()
    ordered = [c for c in configs if c in means.index and np.isfinite(means[c])]
    if not ordered:
        return configs[0]
    return max(ordered, key=lambda c: means[c] if larger else -means[c])


def summary_over_folds(result, digits: int = 3) -> pd.DataFrame:
    """Mean ± std over folds of the target's metrics per config, the pooled out-of-fold value beside."""
    from ..stats import summary_table

    metrics = [m for m, _ in result.target.metrics()]
    table = summary_table(result.diagnostics, ["config"], metrics, digits=digits).rename(columns={"n": "folds"})
    pooled = result.pooled.set_index("config")
    for m in metrics:
        table[f"pooled {m}"] = [pooled.loc[c, m] if c in pooled.index else np.nan for c in table["config"]]
    order = {c: i for i, c in enumerate(result.configs)}
    table = table.sort_values("config", key=lambda s: s.map(order)).reset_index(drop=True)
    return table.rename(columns=lambda c: c.replace("qwk", "QWK"))


def final_table(results: Sequence) -> pd.DataFrame:
    """The chosen config of every target, evaluated once: its official val and test metrics."""
    rows = []
    for r in results:
        row = {"target": r.target.name, "chosen": r.chosen, "best epoch": r.final.get("best_epoch")}
        for m, _ in r.target.metrics():
            row[f"val {m}"] = r.final.get(f"val/{m}")
            row[f"test {m}"] = r.final.get(f"test/{m}")
        rows.append({k.replace("qwk", "QWK"): v for k, v in row.items()})
    return pd.DataFrame(rows)


def config_table(arms: Mapping) -> pd.DataFrame:
    """The given configs side by side: one row per setting, one column per config."""
    from ..train import FitConfig

    defaults = FitConfig()
    keys = sorted({k for a in arms.values() for k in a.fit})
    rows = [{"setting": f"fit.{k}", **{n: str(a.fit.get(k, getattr(defaults, k))) for n, a in arms.items()}} for k in keys]
    rows.append({"setting": "augment", **{n: str(dict(a.augment)) or "{}" for n, a in arms.items()}})
    rows.append({"setting": "sampler", **{n: str(a.sampler) for n, a in arms.items()}})
    return pd.DataFrame(rows)


def diagnostics_view(result) -> pd.DataFrame:
    """The per-fold diagnostics table as the page shows it (readable column names, the target's metrics)."""
    metrics = [m for m, _ in result.target.metrics()]
    extra = [f"{p}_{c}" for c in getattr(result, "columns", ())[1:] for p in ("worst", "ratio")]
    cols = ["config", "fold", "epochs_trained", "best_epoch", "stopped_early", "best_at_first", "stop_reason",
            "lr_at_stop", "lr_drops", "gap_at_best", "val_loss_slope", *metrics, "worst_group", "group_ratio",
            *[c for c in extra if c in result.diagnostics]]
    view = result.diagnostics[cols].copy()
    label = getattr(result, "columns", ("group",))[0]
    for c in ("stopped_early", "best_at_first"):
        view[c] = view[c].map({True: "yes", False: "no"})
    return view.rename(columns={"epochs_trained": "epochs", "best_epoch": "best", "stopped_early": "stopped early",
                                "best_at_first": "best was epoch 1", "stop_reason": "stop reason",
                                "lr_at_stop": "LR at stop", "lr_drops": "LR cuts", "gap_at_best": "gap at best (points)",
                                "val_loss_slope": "val loss slope after best", "worst_group": f"worst {label}",
                                "group_ratio": f"worst-to-best {label} error", "qwk": "QWK",
                                **{c: (f"worst {c[6:]}" if c.startswith("worst_") else f"worst-to-best {c[6:]} error")
                                   for c in extra}})


def subgroup_summary(result, digits: int = 3) -> pd.DataFrame:
    """Per subgroup column (class or grade first, then the target's group columns) and group: the
    images in it (every train image is in one fold's val once) and, per config, its error (MAE or
    error rate) as mean ± sd over folds, with a last row per column of the worst group's error over
    the best group's (of the means over folds; the best floored as in
    :func:`helpers.folds.diagnostics.group_ratio`)."""
    from ..metrics import format_mean_std
    from .diagnostics import group_ratio

    g = result.groups[result.groups["group"] != "all"]
    if g.empty:
        return pd.DataFrame()
    if "column" not in g:
        g = g.assign(column=result.target.label_column)
    configs = [c for c in result.configs if c in set(g["config"])]
    order = list(getattr(result, "columns", ())) or list(dict.fromkeys(g["column"]))
    rows = []
    for column in [c for c in order if c in set(g["column"])]:
        sub = g[g["column"] == column]
        groups = sorted(sub["group"].unique(), key=lambda v: (isinstance(v, str), v))
        means = {}
        for group in groups:
            cell = sub[sub["group"] == group]
            first = cell[cell["config"] == configs[0]]
            row = {"column": column, "group": str(group), "images": int(first["n"].sum()), "metric": sub["metric"].iloc[0]}
            for config in configs:
                v = cell.loc[cell["config"] == config, "value"].astype(float)
                row[config] = format_mean_std(v.mean(), v.std(ddof=1) if len(v) > 1 else math.nan, digits)
                means.setdefault(config, []).append(v.mean())
            rows.append(row)
        ratio = {"column": column, "group": "worst-to-best", "images": "", "metric": sub["metric"].iloc[0]}
        for config in configs:
            r = group_ratio(means[config])
            ratio[config] = f"{r:.2f}x" if np.isfinite(r) else ""
        rows.append(ratio)
    return pd.DataFrame(rows)


def fold_histories(histories: pd.DataFrame, result) -> pd.DataFrame:
    """The per-epoch histories of ``result``'s fold units (its configs' variants; not the final unit)."""
    h = histories[(histories["target"] == result.target.name) & (histories["fold"].astype(str) != "final")]
    if "variant" not in h:
        h = h.assign(variant=None)
    keep = [(h["config"] == c) & (h["variant"].isna() if v is None else h["variant"] == v)
            for c, v in result.variants.items()]
    mask = np.logical_or.reduce(keep) if keep else np.zeros(len(h), bool)
    out = h[mask].copy()
    out["fold"] = out["fold"].astype(int)
    return out
