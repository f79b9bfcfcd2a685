"""Published figures beside the leaderboard, from one data file: ``helpers/summary/published.yaml``.

Each group of the file is one source (MedMNIST v2, MedMNIST+, and each reference method's own
publication), with its protocol; each entry is a method with its numbers per dataset. Groups that
apply to a *dataset* (the MedMNIST benchmarks) are set beside our rows of that dataset; groups that
apply to a *chapter* (a reference method's own claims) are shown with that chapter, always with
their dataset and protocol, since most were measured on other data or splits than ours.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

__all__ = ["PUBLISHED_FILE", "load", "published_table", "beside_datasets", "for_chapters"]

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


@lru_cache(maxsize=None)
def load(path: str | None = None) -> dict:
    """The file's groups as written (``source``, ``protocol``, ``applies_to``, ``entries``, ...)."""
    return yaml.safe_load(Path(path or PUBLISHED_FILE).read_text())["groups"]


def published_table(path: str | None = None) -> pd.DataFrame:
    """Long table: ``group, method, dataset, metric, value, protocol, source, verified, applies_to,
    chapter`` (one row per number)."""
    rows = []
    for group, spec in load(path).items():
        for entry in spec["entries"]:
            for dataset, metrics in entry["rows"].items():
                for metric, value in metrics.items():
                    rows.append({"group": group, "method": entry["method"], "dataset": dataset, "metric": metric,
                                 "value": value, "protocol": spec["protocol"], "source": spec["source"],
                                 "verified": spec.get("verified", True), "applies_to": spec["applies_to"],
                                 "chapter": spec.get("chapter")})
    return pd.DataFrame(rows)


def _wide(long: pd.DataFrame, metrics: Iterable[str]) -> pd.DataFrame:
    index = ["group", "method", "dataset", "protocol", "source", "verified"]
    wide = long.pivot_table(index=index, columns="metric", values="value", aggfunc="first", sort=False).reset_index()
    wide.columns.name = None
    return wide[[c for c in [*index[:3], *metrics, *index[3:]] if c in wide]]


def beside_datasets(datasets: Iterable[str], path: str | None = None) -> pd.DataFrame:
    """The benchmark numbers (ACC, AUC; the model for "best ACC") for the MedMNIST ``datasets`` of
    our leaderboard, one row per (source, method, dataset)."""
    t = published_table(path)
    t = t[(t["applies_to"] == "dataset") & t["dataset"].isin(list(datasets))]
    if t.empty:
        return pd.DataFrame(columns=["group", "method", "dataset", "acc", "auc"])
    return _wide(t, ["acc", "auc", "model"]).sort_values(["dataset", "group"], kind="stable", ignore_index=True)


def for_chapters(chapters: Iterable[str], path: str | None = None) -> pd.DataFrame:
    """What each reference method published, for the ``chapters`` on the leaderboard: one row per
    (source, method, dataset) with every metric it gave, its protocol and whether it was verified."""
    t = published_table(path)
    t = t[(t["applies_to"] == "chapter") & t["chapter"].isin(list(chapters))]
    if t.empty:
        return pd.DataFrame(columns=["group", "method", "dataset"])
    metrics = list(dict.fromkeys(t["metric"]))
    out = _wide(t.astype({"value": object}), metrics)
    return out
