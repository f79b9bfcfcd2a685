"""Sentences generated from the numbers of a run (comparisons, caveats), for the pages to display.

Every number in a sentence comes from a table computed by the run (e.g. a
:func:`helpers.stats.paired_comparison` row); nothing here is hand-written per result. A sentence
names the metric it is about (its ``label``); a row with a ``p_holm`` column (from
:func:`helpers.stats.holm`) is judged on the adjusted p-value, the raw one given beside it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["signed", "verdict", "comparison_sentence", "decomposition_sentence", "val_test_sentence", "power_note", "wall_sentence"]


def _finite(row: Mapping, key: str) -> bool:
    v = row.get(key) if hasattr(row, "get") else None
    return v is not None and bool(np.isfinite(v))


def signed(value: float, fmt: str = "{:+.3f}") -> str:
    """``value`` formatted with ``fmt`` (a signed format), where a difference that rounds to zero
    reads ``+0.000``, never ``-0.000``."""
    text = fmt.format(value)
    return "+" + text[1:] if text.startswith("-") and not any(c in "123456789" for c in text) else text


def verdict(row: Mapping, alpha: float = 0.05, unit: str = "seed") -> str:
    """The paired test of ``row`` in words: t, p (and the Holm-adjusted p where ``row`` has one) and
    whether it is significant at ``alpha`` (after the adjustment, where there is one)."""
    if not np.isfinite(row["p"]):
        return f"no test possible (fewer than two {unit}s or no variation)"
    head = f"paired t-test over {int(row[f'n_{unit}s'])} {unit}s: t = {row['t']:.2f}, p = {row['p']:.3f}"
    if _finite(row, "p_holm"):
        sig = "significant" if row["p_holm"] < alpha else "not significant"
        return f"{head}, Holm-adjusted p = {row['p_holm']:.3f}, {sig} at {alpha} after Holm's correction"
    sig = "significant" if row["p"] < alpha else "not significant"
    return f"{head}, {sig} at {alpha}"


def comparison_sentence(row: Mapping, label: str, alpha: float = 0.05, unit: str = "seed",
                        difference: bool = True, fmt: str = "{:.4f}", diff_fmt: str = "{:+.4f}") -> str:
    """``"<label> <mean a> vs <mean b> (difference <d>; <verdict>)"`` for one comparison row."""
    diff = f"difference {signed(row['mean_diff'], diff_fmt)}; " if difference else ""
    return f"{label} {fmt.format(row['mean_a'])} vs {fmt.format(row['mean_b'])} ({diff}{verdict(row, alpha, unit)})"


def decomposition_sentence(total: Mapping, mask: Mapping, rl: Mapping, label: str, alpha: float = 0.05,
                           unit: str = "seed", diff_fmt: str = "{:+.4f}") -> str:
    """How much of ``total`` (a vs c) is ``mask`` (b vs c) and how much is ``rl`` (a vs b), on ``label``.

    Paired over the same units the two parts add up to the total exactly. Shares are given when both
    parts have the total's sign; otherwise the sentence says the parts pull in opposite directions.
    """
    def p(row):
        if _finite(row, "p_holm"):
            return f"Holm-adjusted p = {row['p_holm']:.3f}"
        return f"p = {row['p']:.3f}" if _finite(row, "p") else "no test possible"

    d, m, r = float(total["mean_diff"]), float(mask["mean_diff"]), float(rl["mean_diff"])
    def f(x):
        return signed(x, diff_fmt)
    head = (f"On {label}, {total['a']} vs {total['b']} differs by {f(d)} ({p(total)}): the mask alone "
            f"({mask['a']} vs {mask['b']}) accounts for {f(m)} ({p(mask)}) and learning on top of the mask "
            f"({rl['a']} vs {rl['b']}) for {f(r)} ({p(rl)})")
    if d == 0 or m * d < 0 or r * d < 0:
        return head + "; the two parts do not share the total's sign, so no shares are given."
    share = m / d
    tail = ("the mask explains most of it" if share > 0.5 else "learning explains most of it" if share < 0.5
            else "the mask and learning explain half each")
    return head + f": {share:.0%} of the difference is the mask and {1 - share:.0%} learning, so {tail}."


def val_test_sentence(val: float, test: float, what: str, metric: str = "accuracy") -> str:
    """One sentence on whether ``what``'s val ``metric`` overstates its test ``metric`` (means)."""
    gap = val - test
    if gap > 0:
        return (f"{what}: val {metric} {val:.3f} overstates test {metric} {test:.3f} by {gap:.3f}; "
                f"published test numbers are to be set beside the test column, not beside val.")
    return f"{what}: val {metric} {val:.3f} does not overstate test {metric} {test:.3f} (difference {gap:+.3f})."


def power_note(n: int, unit: str = "seed", below: int = 5) -> str:
    """A caveat when fewer than ``below`` units back the tests (else the empty string)."""
    if n >= below:
        return ""
    return (f"With {n} {unit}s these tests have little power: read the differences and their spread, "
            "not only the p-values.")


def wall_sentence(runs) -> str:
    """The wall time of a set of stored runs (rows of :func:`helpers.results.collect_provenance`):
    the total per profile and device, and the longest run, e.g. ``"quick on CPU x2: 31.2 min
    (1,872 s) over 8 runs, the longest apga/apga 290 s"``."""
    timed = runs[runs["wall_s"].notna()] if len(runs) else runs
    if not len(timed):
        return "no timed runs stored"
    parts = []
    for (profile, device), g in timed.groupby(["profile", "device"], sort=False, dropna=False):
        top = g.loc[g["wall_s"].idxmax()]
        total = float(g["wall_s"].sum())
        parts.append(f"{profile} on {device}: {total / 60:.1f} min ({total:,.0f} s) over {len(g)} run"
                     f"{'s' if len(g) > 1 else ''}, the longest {top['notebook']}/{top['run']} {top['wall_s']:,.0f} s")
    return "; ".join(parts)
