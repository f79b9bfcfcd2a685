"""What a published run carries for the summary beyond its small files: the tables that need its
weights or its per-sample scores.

``book/published/`` keeps small files only, never weights. So when a run is published
(:func:`helpers.book.publish`), where its weights and scores still are, its final models'
calibration (each model's ECE and reliability bins, :func:`.calibration.calibration_units`) and
robustness (accuracy on each corrupted test set, :func:`.robustness.robustness_rows`, every
corruption at every severity) are computed with the summary's own functions and written to
``derived/<table>.csv`` in the published folder. The summary reads them for a published unit
whose scores or weights are not on disk (:meth:`.chapters.FinalUnit.published_rows`) and marks
those robustness rows ``computed: at publish``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from ..results import atomic_write_text
from .calibration import DEFAULT_BINS, calibration_units
from .chapters import DERIVED_DIR, FinalUnit, RunRef, final_units
from .corruptions import CORRUPTIONS, SEVERITIES
from .robustness import robustness_rows

__all__ = ["DERIVED_TABLES", "derive_tables", "write_tables"]

#: The tables written at publishing; ``robustness_skipped`` names the units that could not be scored.
DERIVED_TABLES = ("calibration", "reliability", "robustness", "robustness_skipped")


def derive_tables(run: RunRef, *, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES,
                  max_images: int | None = None, bins: int = DEFAULT_BINS, data_root=None,
                  log: Callable[[str], None] | None = None, finals: Sequence[FinalUnit] | None = None,
                  ) -> dict[str, pd.DataFrame]:
    """The :data:`DERIVED_TABLES` of ``run`` (a local run, with its weights and scores on disk);
    ``finals``: its :func:`final_units`, where the caller has them already."""
    finals = final_units([run]) if finals is None else list(finals)
    per, unit_bins, _ = calibration_units(finals, bins)
    rob, skipped = robustness_rows(finals, corruptions=corruptions, severities=severities, max_images=max_images,
                                   data_root=data_root, log=log)
    return {"calibration": per, "reliability": unit_bins, "robustness": rob.drop(columns=["computed"], errors="ignore"),
            "robustness_skipped": skipped}


def write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    """Write ``tables`` as ``<folder>/derived/<name>.csv`` (atomic); returns the files written."""
    out = []
    for name, df in tables.items():
        path = Path(folder) / DERIVED_DIR / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, df.to_csv(index=False))
        out.append(path)
    return out
