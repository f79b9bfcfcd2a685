"""Calibration from stored per-sample scores: expected calibration error and reliability diagrams.

A model's *confidence* on an image is its top-label probability ``max_c p_c``; it is *right* when
that class (the argmax, the first on a tie) is the label. The unit interval is cut into ``bins``
equal-width bins, bin ``b`` (0-based) holding the confidences in ``(b/B, (b+1)/B]`` and the first
bin also holding 0. Then

    ECE = sum_b (n_b / N) * | acc_b - conf_b |

with ``acc_b`` the share right and ``conf_b`` the mean confidence of the ``n_b`` images of bin ``b``
(Naeini et al., AAAI 2015; Guo et al., ICML 2017, who use 15 bins, the default here). Empty bins
add nothing. A reliability diagram plots ``acc_b`` against the bin (the diagonal is perfect
calibration). Binary scores given as one column (the positive class) are read as ``(1 - p, p)``.
Regression outputs (one column that is not a probability) have no calibration in this sense.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_BINS", "as_probabilities", "reliability", "ece", "calibration_units", "calibration_tables"]

DEFAULT_BINS = 15


def as_probabilities(scores) -> np.ndarray:
    """``scores`` as ``(N, C)`` class probabilities: a 1-d vector is a binary positive-class score.
    Rows must be probabilities (non-negative, summing to 1 within 1e-3), else ``ValueError``."""
    p = np.asarray(scores, dtype=float)
    if p.ndim == 1:
        p = np.stack([1 - p, p], 1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"scores must be (N,) binary or (N, C >= 2) probabilities, got shape {p.shape}")
    if len(p) and ((p < -1e-6).any() or np.abs(p.sum(1) - 1).max() > 1e-3):
        raise ValueError("scores are not probabilities (negative, or rows not summing to 1): calibration needs "
                         "the softmax of a classifier, not logits or a regression output")
    return p


def reliability(scores, labels, bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """One row per bin (all ``bins`` of them, empty ones with ``n = 0``): ``bin``, ``lo``, ``hi``,
    ``n``, ``confidence`` (mean top-label probability), ``accuracy`` (share right) and ``gap``
    (accuracy − confidence); NaN where a bin is empty. See the module docstring for the bins."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = as_probabilities(scores)
    y = np.asarray(labels).reshape(len(p), -1)[:, 0].astype(int)
    conf = p.max(1)
    right = p.argmax(1) == y
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        c = float(conf[sel].mean()) if n else np.nan
        a = float(right[sel].mean()) if n else np.nan
        rows.append({"bin": b, "lo": b / bins, "hi": (b + 1) / bins, "n": n, "confidence": c, "accuracy": a,
                     "gap": a - c if n else np.nan})
    return pd.DataFrame(rows)


def ece(scores, labels, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error with ``bins`` equal-width bins (module docstring); NaN for no images."""
    table = reliability(scores, labels, bins)
    total = table["n"].sum()
    if total == 0:
        return float("nan")
    full = table[table["n"] > 0]
    return float((full["n"] / total * (full["accuracy"] - full["confidence"]).abs()).sum())


UNIT_COLUMNS = ["chapter", "run", "dataset", "method", "role", "seed"]


def calibration_units(finals, bins: int = DEFAULT_BINS) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """ECE and reliability bins of every final unit with stored test scores, one unit at a time.

    Returns ``(per_unit, unit_bins, skipped)``: one row per unit (``chapter, run, dataset, method,
    role, seed, n, ece``, with ``test/acc`` for reference); one row per (unit, bin) (:func:`reliability`);
    and the units left out with the reason (no stored scores, or scores that are not class
    probabilities). A published unit without its scores on disk is read from the tables computed
    when its run was published (``derived/``, :mod:`.derived`), when they have ``bins`` bins."""
    per_unit, bins_rows, skipped = [], [], []
    for f in finals:
        base = {"chapter": f.chapter, "run": f.run, "dataset": f.dataset, "method": f.method, "role": f.role,
                "seed": f.seed}
        if not f.has_scores:
            row, table = f.published_rows("calibration"), f.published_rows("reliability")
            if len(row) and len(table) == bins:
                per_unit.append({**base, **{k: row.iloc[0][k] for k in ("n", "ece", "test/acc")}})
                bins_rows.append(table.assign(**base))
            else:
                skipped.append({**base, "why": "no per-sample scores stored" if not len(row) else
                                f"published with {len(table)} bins, not {bins}"})
            continue
        sc = f.scores()
        try:
            table = reliability(sc["test_scores"], sc["test_labels"], bins)
        except (KeyError, ValueError) as exc:
            skipped.append({**base, "why": str(exc).split(":")[0] if isinstance(exc, ValueError) else f"no {exc}"})
            continue
        n = int(table["n"].sum())
        full = table[table["n"] > 0]
        value = float((full["n"] / n * (full["accuracy"] - full["confidence"]).abs()).sum()) if n else np.nan
        per_unit.append({**base, "n": n, "ece": value, "test/acc": f.metrics.get("test/acc", np.nan)})
        bins_rows.append(table.assign(**base))
    bin_cols = ["bin", "lo", "hi", "n", "confidence", "accuracy", "gap"]
    unit_bins = pd.concat(bins_rows, ignore_index=True)[[*UNIT_COLUMNS, *bin_cols]] if bins_rows else \
        pd.DataFrame(columns=[*UNIT_COLUMNS, *bin_cols])
    return (pd.DataFrame(per_unit, columns=[*UNIT_COLUMNS, "n", "ece", "test/acc"]), unit_bins,
            pd.DataFrame(skipped, columns=[*UNIT_COLUMNS, "why"]))


def calibration_tables(finals, bins: int = DEFAULT_BINS) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """ECE of every final unit with stored test scores, and reliability data pooled over seeds.

    Returns ``(per_unit, diagram, skipped)``: ``per_unit`` and ``skipped`` as :func:`calibration_units`
    gives them; ``diagram`` one row per (run, dataset, method, bin) with the counts, mean confidence
    and accuracy of the seeds' images pooled."""
    per, unit_bins, skipped = calibration_units(finals, bins)
    keys = ["chapter", "run", "dataset", "method", "role", "bin", "lo", "hi"]
    if unit_bins.empty:
        return per, pd.DataFrame(columns=[*keys, "n", "accuracy", "confidence"]), skipped
    allb = unit_bins.assign(right=unit_bins["accuracy"].fillna(0) * unit_bins["n"],
                            conf_sum=unit_bins["confidence"].fillna(0) * unit_bins["n"])
    diagram = allb.groupby(keys, sort=False)[["n", "right", "conf_sum"]].sum().reset_index()
    diagram["accuracy"] = diagram["right"] / diagram["n"].where(diagram["n"] > 0)
    diagram["confidence"] = diagram["conf_sum"] / diagram["n"].where(diagram["n"] > 0)
    return per, diagram.drop(columns=["right", "conf_sum"]), skipped
