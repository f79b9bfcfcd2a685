"""The cross-method leaderboard: every chapter's final models, method x dataset, over seeds.

:func:`stored_runs` finds the runs of ``book/_runs.yml`` whose results are on disk (a local results
folder, else a published one); :func:`per_seed` reads their final units (:mod:`.chapters`) into one
row per (run, dataset, method, seed) with the test ACC, AUC, balanced accuracy and kappa each unit
stored; :func:`leaderboard` gives ``mean ± std`` over seeds; :func:`paired_differences` compares each
method with its chapter's equal-budget control(s), paired over seeds with
:func:`helpers.stats.paired_comparison`, Holm-adjusted within each run and metric.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .. import config
from ..metrics import format_mean_std
from ..report import signed
from ..stats import holm, paired_comparison
from .chapters import CHAPTERS, FinalUnit, RunRef

__all__ = ["METRICS", "SKIP", "stored_runs", "per_seed", "leaderboard", "paired_differences", "differences_view",
           "coverage", "faithful_glue", "for_page", "full_runs_text"]

#: The leaderboard's metrics, as every classification unit stores them.
METRICS = ("test/acc", "test/auc", "test/balanced_acc", "test/kappa")
#: Pages that read other runs and report no final models of their own.
SKIP = ("summary", "provenance")


def stored_runs(book: Path | None = None, page=None, published: Path | None = None) -> list[RunRef]:
    """The runs of ``<book>/_runs.yml`` (the repository's ``book/_runs.yml`` when the book folder has
    none) that have stored results: the local results folder when it holds units (read through
    ``page.needs`` when a page is given, as the book's ``needs: "*"`` declares), else the run's
    published folder (``book/published/``), else nothing. Summary-like pages are left out."""
    from ..book import planned_runs, published_dir

    book = Path(book or config.book_dir())
    spec_book = book if (book / "_runs.yml").is_file() else config.repo_root() / "book"
    published = published or published_dir()
    out = []
    for entry in planned_runs(spec_book, ordered=False):
        stem = Path(entry["notebook"]).stem
        if stem in SKIP:
            continue
        local = config.results_dir(stem, entry["name"], book=book)
        if (local / "units").is_dir() and any((local / "units").iterdir()):
            root = page.needs(stem, entry["name"]).root if page is not None else local
            out.append(RunRef(stem, entry["name"], Path(root), "local"))
        elif (published / stem / entry["name"] / "units").is_dir():
            out.append(RunRef(stem, entry["name"], published / stem / entry["name"], "published"))
    return out


def per_seed(finals: Iterable[FinalUnit], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """One row per final unit: ``chapter, run, source, profile, dataset, method, role, seed`` and ``metrics``
    (NaN where a unit did not store one)."""
    rows = [{"chapter": f.chapter, "run": f.run, "source": f.source, "profile": f.profile, "dataset": f.dataset,
             "method": f.method, "role": f.role, "seed": f.seed, **{m: f.metrics.get(m, np.nan) for m in metrics}}
            for f in finals]
    cols = ["chapter", "run", "source", "profile", "dataset", "method", "role", "seed", *metrics]
    return pd.DataFrame(rows, columns=cols)


GROUP = ["chapter", "run", "profile", "dataset", "method", "role"]


def leaderboard(rows: pd.DataFrame, metrics: Sequence[str] = METRICS, digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` over seeds per (chapter, run, dataset, method) in the order rows came, with ``n``
    seeds and the numeric means as ``<metric> mean`` (for sorting and figures). A single seed shows
    its value alone (no spread to give)."""
    if rows.empty:
        return pd.DataFrame(columns=[*GROUP, "n", *metrics])
    grouped = rows.fillna({"profile": "?"}).groupby(GROUP, sort=False, dropna=False)
    out = grouped.size().rename("n").reset_index()
    for m in metrics:
        mean, std = grouped[m].mean().to_numpy(), grouped[m].std(ddof=1).to_numpy()
        out[m] = [format_mean_std(a, s, digits) if n > 1 and np.isfinite(s) else
                  ("–" if not np.isfinite(a) else f"{a:.{digits}f}") for a, s, n in zip(mean, std, out["n"])]
        out[f"{m} mean"] = mean
    return out


def paired_differences(rows: pd.DataFrame, metrics: Sequence[str] = METRICS, chapters=None,
                       against: str = "controls") -> pd.DataFrame:
    """Each method against each of its chapter's controls (``chapters``: default
    :data:`helpers.summary.chapters.CHAPTERS`; ``against="faithful"``: against the variant that keeps
    the reference's behaviour instead), per run and dataset, paired over seeds; ``p_holm`` is Holm's
    adjustment over the rows of the same run and metric. Columns: ``chapter, run, dataset, a, b,
    metric, n_seeds, mean_a, mean_b, mean_diff, sd_diff, t, p, p_holm``."""
    chapters = chapters or CHAPTERS
    out = []
    for (chapter, run, dataset), group in rows.groupby(["chapter", "run", "dataset"], sort=False):
        controls = getattr(chapters[chapter], against) if chapter in chapters else {}
        present = set(group["method"])
        for method, ctrl in controls.items():
            for control in ctrl:
                if method not in present or control not in present:
                    continue
                for m in metrics:
                    if group[m].notna().sum() == 0:
                        continue
                    with warnings.catch_warnings():   # near-identical pairs: scipy warns of precision loss
                        warnings.simplefilter("ignore", RuntimeWarning)
                        out.append(paired_comparison(group, method, control, m, by="method", unit="seed",
                                                     chapter=chapter, run=run, dataset=dataset))
    df = pd.DataFrame(out)
    if df.empty:
        return pd.DataFrame(columns=["chapter", "run", "dataset", "a", "b", "metric", "n_seeds", "mean_a", "mean_b",
                                     "mean_diff", "sd_diff", "t", "p", "p_holm"])
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["run", "metric"]).groups.items():
        df.loc[idx, "p_holm"] = holm(df.loc[idx, "p"].to_numpy())
    cols = ["chapter", "run", "dataset", "a", "b", "metric", "n_seeds", "mean_a", "mean_b", "mean_diff", "sd_diff",
            "t", "p", "p_holm"]
    return df[cols]


def differences_view(diffs: pd.DataFrame, metrics: Sequence[str] = METRICS, digits: int = 3) -> pd.DataFrame:
    """The paired differences one row per (run, dataset, method, control): for each metric
    ``+0.012 (p_holm 0.41)``, i.e. mean difference over seeds (method − control) and Holm's p."""
    if diffs.empty:
        return pd.DataFrame(columns=["chapter", "run", "dataset", "method", "control", "n_seeds"])

    def cell(r):
        if not np.isfinite(r["mean_diff"]):
            return "–"
        p = f"p_holm {r['p_holm']:.2g}" if np.isfinite(r["p_holm"]) else "no p"
        return f"{r['mean_diff']:+.{digits}f} ({p})"

    d = diffs.assign(cell=diffs.apply(cell, axis=1))
    wide = d.pivot_table(index=["chapter", "run", "dataset", "a", "b", "n_seeds"], columns="metric", values="cell",
                         aggfunc="first", sort=False).reset_index()
    wide.columns.name = None
    wide = wide.rename(columns={"a": "method", "b": "control"})
    return wide[[c for c in ["chapter", "run", "dataset", "method", "control", "n_seeds", *metrics] if c in wide]]


def coverage(finals: Sequence[FinalUnit], runs: Sequence[RunRef]) -> pd.DataFrame:
    """What each run gives the summary: final units, seeds, whether per-sample scores (calibration)
    and weights (robustness) are stored, how many published units bring robustness rows computed
    when they were published (:mod:`.derived`), and the chapter's note (e.g. no per-seed rows)."""
    rows = []
    for run in runs:
        mine = [f for f in finals if f.run == run.name and f.chapter == run.notebook]
        scores = sum(f.has_scores or bool(len(f.published_rows("calibration"))) for f in mine)
        at_publish = {id(f) for f in mine if f.weights_missing and len(f.published_rows("robustness"))}
        rebuild = sum(not f.weights_missing for f in mine)
        why = sorted({f.weights_missing.split(" (e.g.")[0] for f in mine if f.weights_missing and id(f) not in at_publish})
        prov = run.provenance
        device = prov.get("device") or {}
        rows.append({"chapter": run.notebook, "run": run.name, "source": run.source,
                     "profile": prov.get("profile"), "device": device.get("gpu") or
                     (f"CPU x{device['cpu_count']}" if device.get("cpu_count") else None),
                     "commit": (str((prov.get("git") or {}).get("commit") or "")[:10] or None),
                     "final models": len(mine),
                     "seeds": len({f.seed for f in mine}), "with scores": scores, "rebuildable": rebuild,
                     "robustness at publish": len(at_publish),
                     "why not": "; ".join(why) or "–", "note": CHAPTERS.get(run.notebook).note
                     if run.notebook in CHAPTERS else ""})
    return pd.DataFrame(rows)


def _key(*parts: str) -> str:
    return "-".join(str(p).replace(" ", "_").replace(",", "").replace("/", "_") for p in parts)


def _pair_text(hit: pd.DataFrame) -> str:
    """One (method, control) pair over the settings (dataset, k, ...) of a run: the paired difference
    with Holm's p for one setting, else a tally of the settings where the method was higher or lower."""
    hit = hit[np.isfinite(hit["mean_diff"])]
    if hit.empty:
        return "not measured in this build"
    if len(hit) == 1:
        r = hit.iloc[0]
        p = f"Holm p {r['p_holm']:.2g}" if np.isfinite(r["p_holm"]) else "no test"
        return f"{signed(r['mean_diff'])} ({p}, {int(r['n_seeds'])} seeds)"
    sig = hit["p_holm"] < 0.05
    up, down = hit["mean_diff"] > 0, hit["mean_diff"] < 0
    return (f"higher in {int(up.sum())} of {len(hit)} settings ({int((up & sig).sum())} significant after Holm), "
            f"lower in {int(down.sum())} ({int((down & sig).sum())} significant); mean difference "
            f"{signed(hit['mean_diff'].mean())}, {int(hit['n_seeds'].min())}+ seeds")


def _pairs_glue(diffs: pd.DataFrame, pairs, metrics: Sequence[str], prefix: str, run_suffix: str = "") -> dict:
    out = {}
    missing = "no full-profile run published" if run_suffix == "_full" else "not measured in this build"
    for chapter, a, b in pairs:
        for m in metrics:
            hit = diffs[(diffs["chapter"] == chapter) & (diffs["run"] == chapter + run_suffix) & (diffs["a"] == a)
                        & (diffs["b"] == b) & (diffs["metric"] == m)] if len(diffs) else diffs
            tag = [prefix, "full"] if run_suffix == "_full" else [prefix]
            key = _key(*tag, chapter, a, m.split("/")[-1]) if prefix == "faithful" else \
                _key(*tag, chapter, a, "vs", b, m.split("/")[-1])
            out[key] = _pair_text(hit) if len(hit) else missing
    return out


def faithful_glue(diffs: pd.DataFrame, chapters=None, metrics: Sequence[str] = ("test/acc", "test/auc"),
                  full: bool = False) -> dict:
    """Texts for the hand-written "differences from the reference code" page: for every chapter's
    declared (sound, faithful) pair, in the chapter's main run (the run named after its notebook),
    ``"+0.012 (Holm p 0.41, 3 seeds)"`` per metric (sound − faithful, paired over seeds; a tally when
    the run has several datasets or settings), else a phrase saying it was not measured in this
    build. Keys: ``faithful-<chapter>-<sound>-<metric>`` (spaces as ``_``, commas dropped), so the
    page can ``{glue:text}`` every key in every build. With ``full``, the same from the chapter's
    full-profile run (``<chapter>_full``, usually published), keys ``faithful-full-...``."""
    chapters = chapters or CHAPTERS
    pairs = [(c, a, bs[0]) for c, spec in chapters.items() for a, bs in spec.faithful.items() if bs]
    return _pairs_glue(diffs, pairs, metrics, "faithful", "_full" if full else "")


def headline_glue(diffs: pd.DataFrame, chapters=None, metrics: Sequence[str] = ("test/acc",), full: bool = False) -> dict:
    """Texts for the introduction: each chapter's headline pairs (:attr:`Chapter.headline`, the RL
    method against the control that answers the chapter's question) in its main run, worded as in
    :func:`faithful_glue`. Keys: ``headline-<chapter>-<method>-vs-<control>-<metric>``; with ``full``,
    from the chapter's full-profile run, keys ``headline-full-...``."""
    chapters = chapters or CHAPTERS
    pairs = [(c, a, b) for c, spec in chapters.items() for a, b in spec.headline]
    return _pairs_glue(diffs, pairs, metrics, "headline", "_full" if full else "")


def full_runs_text(cover: pd.DataFrame) -> str:
    """Which full-profile run each chapter's full-profile numbers come from, with its source, device
    and seeds (from :func:`coverage`), e.g. ``"nas_full (published, CPU x2, 3 seeds)"``; for the
    pages that glue them."""
    if cover.empty:
        return "none"
    full = cover[cover["run"] == cover["chapter"] + "_full"]
    def device(r):
        return r.device if isinstance(r.device, str) and r.device else "device not recorded"

    return ", ".join(f"{r.run} ({r.source}, {device(r)}, {r.seeds} seed{'s' * (r.seeds != 1)})"
                     for r in full.itertuples()) or "none"


def for_page(df: pd.DataFrame) -> pd.DataFrame:
    """A table as the page shows it: without the ``chapter`` column (a run's name already starts with
    its chapter's, and the stored CSV keeps it), so the numbers fit beside the names."""
    return df.drop(columns=[c for c in ("chapter",) if c in df.columns])
