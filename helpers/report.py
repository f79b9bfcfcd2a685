"""Sentences generated from the numbers of a run (comparisons, caveats), for the pages to display.

Every number in a sentence comes from a table computed by the run (e.g. a
:func:`helpers.stats.paired_comparison` row); nothing here is hand-written per result.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["verdict", "comparison_sentence", "power_note"]


def verdict(row: Mapping, alpha: float = 0.05, unit: str = "seed") -> str:
    """The paired test of ``row`` in words: t, p and whether it is significant at ``alpha``."""
    if not np.isfinite(row["p"]):
        return f"no test possible (fewer than two {unit}s or no variation)"
    sig = "significant" if row["p"] < alpha else "not significant"
    return (f"paired t-test over {int(row[f'n_{unit}s'])} {unit}s: t = {row['t']:.2f}, p = {row['p']:.3f}, "
            f"{sig} at {alpha}")


def comparison_sentence(row: Mapping, label: str, alpha: float = 0.05, unit: str = "seed",
                        difference: bool = True) -> str:
    """``"<label> <mean a> vs <mean b> (difference <d>; <verdict>)"`` for one comparison row."""
    diff = f"difference {row['mean_diff']:+.4f}; " if difference else ""
    return f"{label} {row['mean_a']:.4f} vs {row['mean_b']:.4f} ({diff}{verdict(row, alpha, unit)})"


def power_note(n: int, unit: str = "seed", below: int = 5) -> str:
    """A caveat when fewer than ``below`` units back the tests (else the empty string)."""
    if n >= below:
        return ""
    return (f"With {n} {unit}s these tests have little power: read the differences and their spread, "
            "not only the p-values.")
