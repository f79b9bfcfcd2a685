"""Tables of a finished search: the reference's phase table, champions, paired tests and their sentences."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .. import stats
from ..report import comparison_sentence, decomposition_sentence, power_note, val_test_sentence
from .space import arch_from_key
from .strategies import COMPARISONS, DECOMPOSITIONS, controller_label

__all__ = ["METRICS", "phase_table", "with_controller", "champions", "paired_comparison", "compare_strategies",
           "describe_comparison", "paired_tests", "describe_tests", "describe_decomposition", "champion_fit_config",
           "retrain_champions", "champions_beside_baselines", "val_test_note"]

# metric -> (its name in sentences, number format, difference format)
METRICS = {"reward": ("reward", "{:.4f}", "{:+.4f}"), "val_acc": ("val accuracy", "{:.4f}", "{:+.4f}"),
           "params": ("parameters", "{:,.0f}", "{:+,.0f}")}


def phase_table(episodes: pd.DataFrame, by: Sequence[str] = ("strategy",)) -> pd.DataFrame:
    """The reference table: mean reward, params and val accuracy over the episodes of each phase."""
    return (episodes.groupby(list(by), sort=False)[["reward", "params", "val_acc"]].mean()
            .reset_index())


def with_controller(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``controller`` column after ``strategy``: what picked the children."""
    out = table.copy()
    out.insert(out.columns.get_loc("strategy") + 1, "controller", [controller_label(s) for s in out["strategy"]])
    return out


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


def _span(row) -> str:
    last = row.get("last")
    return f"the last {int(last)} episodes" if last is not None and np.isfinite(last) else "all episodes"


def describe_comparison(last: pd.DataFrame, best: pd.DataFrame, alpha: float = 0.05) -> str:
    """Plain sentences (markdown bullets) from the two tables of :func:`compare_strategies`,
    naming the metric they compared."""
    lines = []
    for (_, a), (_, b) in zip(last.iterrows(), best.iterrows()):
        name, fmt, dfmt = METRICS.get(a["metric"], (a["metric"], "{:.4f}", "{:+.4f}"))
        lines.append(f"- **{a['a']} vs {a['b']}**: {comparison_sentence(a, f'mean {name} over {_span(a)}', alpha, fmt=fmt, diff_fmt=dfmt)}. "
                     f"{comparison_sentence(b, f'Best {name} found', alpha, difference=False, fmt=fmt)}.")
    note = power_note(int(last["n_seeds"].max())) if len(last) else ""
    if note:
        lines.append(f"- {note}")
    return "\n".join(lines)


def paired_tests(episodes: pd.DataFrame, last: int | None, pairs: Sequence[tuple[str, str]] = COMPARISONS,
                 metrics: Sequence[str] = ("reward", "val_acc", "params"), best: Sequence[str] = ("reward",)
                 ) -> pd.DataFrame:
    """Paired tests over seeds of every pair of ``pairs`` whose two strategies ran: per metric of
    ``metrics`` on its mean over the last ``last`` episodes, and for ``best`` also on the best value
    found (``summary`` says which). ``p_holm``: Holm-adjusted over the tests of the same metric (one
    family per metric: the reward's two summaries together)."""
    ran = set(episodes["strategy"])
    pairs = [(a, b) for a, b in pairs if a in ran and b in ran]
    rows = []
    for metric in metrics:
        summaries = [("last", last)] + ([("best", None)] if metric in best else [])
        for summary, n in summaries:
            for a, b in pairs:
                row = (paired_comparison(episodes, a, b, metric, last=n) if summary == "last"
                       else paired_comparison(episodes, a, b, metric, reduce="max"))
                rows.append({"summary": summary, **row})
    out = pd.DataFrame(rows)
    if len(out):
        out["p_holm"] = np.nan
        for _, idx in out.groupby("metric", sort=False).groups.items():
            out.loc[idx, "p_holm"] = stats.holm(out.loc[idx, "p"].to_numpy())
        cols = ["a", "b", "metric", "summary", "last", "n_seeds", "mean_a", "mean_b", "mean_diff", "sd_diff", "t", "p", "p_holm"]
        out = out[[c for c in cols if c in out] + [c for c in out if c not in cols]]
    return out


def _label(row) -> str:
    name = METRICS.get(row["metric"], (row["metric"],))[0]
    return f"best {name} found" if row["summary"] == "best" else f"mean {name} over {_span(row)}"


def describe_tests(tests: pd.DataFrame, alpha: float = 0.05) -> str:
    """Markdown bullets from :func:`paired_tests`, one per pair, each sentence naming its metric and
    giving the raw and the Holm-adjusted p-value."""
    lines = []
    for (a, b), group in tests.groupby(["a", "b"], sort=False):
        parts = []
        for _, row in group.iterrows():
            _, fmt, dfmt = METRICS.get(row["metric"], (row["metric"], "{:.4f}", "{:+.4f}"))
            label = _label(row)
            parts.append(comparison_sentence(row, label[0].upper() + label[1:], alpha, fmt=fmt, diff_fmt=dfmt))
        lines.append(f"- **{a} vs {b}**: " + ". ".join(parts) + ".")
    note = power_note(int(tests["n_seeds"].max())) if len(tests) else ""
    if note:
        lines.append(f"- {note}")
    return "\n".join(lines)


def describe_decomposition(tests: pd.DataFrame, alpha: float = 0.05) -> str:
    """Markdown bullets: for each (total, mask, RL) triple of :data:`DECOMPOSITIONS` whose three
    rows are in ``tests`` (per metric and summary), how much of the total the mask explains and how
    much learning does. The empty string when no triple ran."""
    lines = []
    for (metric, summary), group in tests.groupby(["metric", "summary"], sort=False):
        rows = {(r["a"], r["b"]): r for _, r in group.iterrows()}
        for triple in DECOMPOSITIONS:
            if all(pair in rows for pair in triple):
                total, mask, rl = (rows[pair] for pair in triple)
                dfmt = METRICS.get(metric, (metric, "{:.4f}", "{:+.4f}"))[2]
                lines.append("- " + decomposition_sentence(total, mask, rl, _label(total), alpha, diff_fmt=dfmt))
    return "\n".join(lines)


def champion_fit_config(cfg, champion: dict):
    """The champions' :class:`helpers.train.FitConfig`: the children's lr and the children's precision
    (bf16 autocast only when the children ran bf16; ``fit``'s own default is bf16 on CUDA), then
    the notebook's ``champion`` group (an explicit ``amp`` there wins)."""
    from ..train import FitConfig

    return FitConfig.from_params({"lr": cfg.child["lr"], "amp": cfg.child.get("precision", "fp32") == "bf16",
                                  **dict(champion)})


def retrain_champions(recorder, ds, episodes: pd.DataFrame, cfg, *, batch_size: int = 128,
                      device: str = "auto") -> pd.DataFrame:
    """Retrain the champion of every (strategy, seed) with the shared ``fit`` and test it once.

    Units are stored under ``<run>/champions`` with their weights (a finished one is not retrained);
    returns one row per champion with its val and test metrics.
    """
    from ..experiment import train_and_test
    from ..results import Recorder

    champ_rec = Recorder(recorder.root / "champions")
    for _, row in champions(episodes).iterrows():
        train_and_test(champ_rec, ds, "nas_child", int(row["seed"]), cfg, batch_size=batch_size,
                       model_kwargs={"arch": arch_from_key(row["arch"]), "image_size": ds.size}, device=device,
                       unit={"strategy": row["strategy"], "seed": int(row["seed"]), "arch": row["arch"]},
                       keep_model=True)   # the summary page rebuilds each champion to test it on corrupted images
    return champ_rec.wide_metrics()


def champions_beside_baselines(champ: pd.DataFrame, baselines: pd.DataFrame, flag: str) -> pd.DataFrame:
    """Params, val ACC beside test ACC/AUC (mean ± std over seeds) of the champions, then the
    baselines page's models on ``flag``."""
    cols = ["params", "val/acc", "test/acc", "test/auc"]
    table = stats.summary_table(champ, ["strategy"], [c for c in cols if c in champ])
    if len(baselines):
        cols = [c for c in cols if c in champ and c in baselines]
        base = baselines[baselines["flag"] == flag].assign(strategy=lambda d: "baseline: " + d["model"])
        table = pd.concat([table, stats.summary_table(base, ["strategy"], cols)], ignore_index=True)
    return table


def baselines_note(baselines: pd.DataFrame, flag: str) -> str:
    """One sentence on the rows beside the champions: the baselines page's models on ``flag`` (a
    yardstick trained with that page's own budget), or that no baselines run was available."""
    if len(baselines) and "flag" in baselines and (baselines["flag"] == flag).any():
        models = ", ".join(sorted(baselines.loc[baselines["flag"] == flag, "model"].astype(str).unique()))
        return (f"Below the champions: the baselines page's models on {flag} ({models}), trained with that "
                "page's own budget and training subset, so read them as a yardstick, not a matched comparison.")
    return f"No baselines run on {flag} was available to this run, so the table shows the champions only."


def val_test_note(champ: pd.DataFrame) -> str:
    """One sentence: does the champions' val accuracy (mean over strategies and seeds) overstate test?"""
    if not len(champ) or "val/acc" not in champ or "test/acc" not in champ:
        return ""
    return val_test_sentence(float(champ["val/acc"].mean()), float(champ["test/acc"].mean()),
                             f"The {len(champ)} champions (mean over strategies and seeds)")
