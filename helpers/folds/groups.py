"""Subgroup columns beyond the class or grade: which group each training image belongs to.

The write-up's worst subgroup (a time point 4.5x worse than the best) is not a label but a column of
the data. MedMNIST has no such metadata, so a column comes from one of two sources:

* an image statistic cut into quantile bins on the train split the folds are cut from (``source``
  ``brightness``: mean pixel intensity; ``contrast``: its standard deviation over the image), the
  same cut points for every fold and config, e.g. exposure groups of fundus photographs;
* a CSV file (``file``) with a column ``index`` (the image's position in the official train split)
  and a column named like the group column, e.g. acquisition site or time point.

A column never changes training unless a rule applies group-balanced batches (``sampler:
"group:<name>"``, :func:`sample_weights`). The label column itself (``class`` or ``grade``) is
always there and needs no spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

#: Image statistics a column can be cut from (uint8 images scaled to 0..1, over all channels).
STATISTICS = {"brightness": lambda x: x.mean(axis=1), "contrast": lambda x: x.std(axis=1)}
#: The sampler value that balances the batches over a group column's groups.
SAMPLER_PREFIX = "group:"


@dataclass(frozen=True)
class GroupColumn:
    """One subgroup column: ``name`` (its header on the page), and ``source`` (an image statistic of
    :data:`STATISTICS`, cut into ``bins`` quantile bins) or ``file`` (a CSV with ``index`` and ``name``)."""

    name: str
    source: str | None = None
    file: str | None = None
    bins: int = 3

    @classmethod
    def from_params(cls, spec: str | Mapping[str, Any], where: str = "groups") -> "GroupColumn":
        """A column from a params value: a statistic's name (``brightness``) or a mapping with
        ``name`` and ``source`` or ``file`` (and ``bins``); anything else is refused with the fix."""
        from ..config import ParamsError

        if isinstance(spec, str):
            spec = {"name": spec, "source": spec}
        if not isinstance(spec, Mapping):
            raise ParamsError(f"{where}: a group column is a name ({', '.join(STATISTICS)}) or a mapping with name and "
                              f"source or file; got {spec!r}")
        unknown = set(spec) - {"name", "source", "file", "bins"}
        if unknown or "name" not in spec:
            raise ParamsError(f"{where}: a group column has keys name (required), source or file, bins; "
                              f"unknown: {sorted(unknown)}")
        spec = dict(spec)
        if "source" not in spec and "file" not in spec and spec["name"] in STATISTICS:
            spec["source"] = spec["name"]
        col = cls(**spec)
        if col.name in ("class", "grade", "all") or not str(col.name).strip():
            raise ParamsError(f"{where}: the group column name '{col.name}' is taken (class, grade and all name the "
                              f"label groups); choose another")
        if (col.source is None) == (col.file is None):
            raise ParamsError(f"{where}: group column '{col.name}' needs exactly one of source "
                              f"({', '.join(STATISTICS)}) or file (a CSV with index and {col.name})")
        if col.source is not None and col.source not in STATISTICS:
            raise ParamsError(f"{where}: group column '{col.name}': source '{col.source}' unknown; use "
                              f"{' or '.join(STATISTICS)}, or file: a CSV")
        if not isinstance(col.bins, int) or isinstance(col.bins, bool) or col.bins < 2:
            raise ParamsError(f"{where}: group column '{col.name}': bins must be an integer of at least 2")
        if col.file is not None and not _path(col.file).is_file():
            raise ParamsError(f"{where}: group column '{col.name}': no file {_path(col.file)}. Fix: a CSV with columns "
                              f"index (position in the official train split) and {col.name}")
        return col

    def values(self, train) -> np.ndarray:
        """The group of every image of ``train`` (a :class:`helpers.data.Split`), as strings, in its order."""
        if self.source is not None:
            x = train.images.reshape(len(train), -1).numpy().astype(np.float64) / 255.0
            stat = STATISTICS[self.source](x)
            return quantile_groups(stat, self.bins)
        table = pd.read_csv(_path(self.file))
        if "index" not in table or self.name not in table:
            raise ValueError(f"{self.file}: group column '{self.name}' needs CSV columns index and {self.name}; "
                             f"it has {', '.join(table.columns)}")
        lookup = dict(zip(table["index"].astype(int), table[self.name].astype(str)))
        index = train.index.numpy().astype(int)
        missing = [int(i) for i in index if int(i) not in lookup]
        if missing:
            raise ValueError(f"{self.file}: no '{self.name}' for {len(missing)} training image(s), e.g. official train "
                             f"index {missing[:5]}. Fix: give every image of the train split a row.")
        return np.array([lookup[int(i)] for i in index], dtype=object)


def _path(file: str) -> Path:
    from ..config import repo_root

    p = Path(file).expanduser()
    return p if p.is_absolute() else repo_root() / p


def quantile_groups(stat: np.ndarray, bins: int) -> np.ndarray:
    """``stat`` cut at its quantiles into ``bins`` groups named ``Q1 lo-hi`` .. ``Qn lo-hi`` (ranges of
    the statistic; sorted names sort the groups). Ties may leave fewer groups than ``bins``."""
    stat = np.asarray(stat, dtype=float)
    edges = np.unique(np.quantile(stat, np.linspace(0, 1, bins + 1)))
    bin_of = np.clip(np.searchsorted(edges, stat, side="right") - 1, 0, max(len(edges) - 2, 0))
    names = [f"Q{i + 1} {edges[i]:.2f}-{edges[min(i + 1, len(edges) - 1)]:.2f}" for i in range(max(len(edges) - 1, 1))]
    return np.array([names[b] for b in bin_of], dtype=object)


def parse_groups(specs: Sequence | None, where: str = "groups") -> tuple[GroupColumn, ...]:
    """The group columns of a target's ``groups`` param (names must differ)."""
    from ..config import ParamsError

    if specs is None:
        return ()
    if not isinstance(specs, (list, tuple)):
        raise ParamsError(f"{where}: groups is a list of group columns, e.g. [brightness]; got {specs!r}")
    cols = tuple(GroupColumn.from_params(s, where) for s in specs)
    names = [c.name for c in cols]
    if len(set(names)) != len(names):
        raise ParamsError(f"{where}: group column names repeat: {names}")
    return cols


def group_frame(train, columns: Sequence[GroupColumn]) -> pd.DataFrame:
    """One row per image of ``train`` indexed by its official train index, one column per group
    column: what every fold and config of a target reads its groups from (cut points fixed here)."""
    index = pd.Index(train.index.numpy().astype(int), name="index")
    return pd.DataFrame({c.name: c.values(train) for c in columns}, index=index)


def sampler_column(sampler: str | None) -> str | None:
    """The group column a ``sampler`` value balances over (``group:<name>``), else None."""
    if isinstance(sampler, str) and sampler.startswith(SAMPLER_PREFIX):
        return sampler[len(SAMPLER_PREFIX):]
    return None


def sample_weights(frame: pd.DataFrame, column: str, index) -> torch.Tensor:
    """Per-image weights for group-balanced batches: 1 / (count of the image's group among ``index``,
    the official train indices of the images trained on, in their order)."""
    if column not in frame:
        raise ValueError(f"sampler group:{column}: the target has no group column '{column}' "
                         f"(it has {', '.join(frame.columns) or 'none'})")
    groups = frame.loc[np.asarray(index, dtype=int), column].to_numpy()
    _, inverse, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    return torch.as_tensor(1.0 / counts[inverse], dtype=torch.float32)
