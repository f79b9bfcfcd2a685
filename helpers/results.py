"""The run recorder: everything a run stores, written atomically under its results folder.

Layout of ``book/results/<notebook>/<run>/``::

    params.yaml  provenance.json        written by helpers.run
    metrics.csv                         long format: one row per (unit columns..., key, value)
    units/<unit>.json                   one finished unit of work (e.g. flag x model x seed)
    history/<unit>.csv                  its per-epoch history
    scores/<unit>.npz                   raw per-sample scores and labels (summaries never retrain)
    figures/<name>.png|svg

A unit is written only when it is finished, so an interrupted run loses at most the unit in
progress (whose own training checkpoint lives in the cache and resumes too).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _jsonable(obj: Any):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable, allow_nan=True))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def unit_name(**keys: Any) -> str:
    """Deterministic file-safe name of a unit from its key values, e.g. ``flag=breastmnist__seed=0``."""
    parts = [f"{k}={v}" for k, v in keys.items()]
    return "__".join(parts).replace("/", "-").replace(" ", "")


class Recorder:
    """Writes and reads one run's results folder (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- units -------------------------------------------------------------------------
    def has_unit(self, **keys: Any) -> bool:
        return (self.root / "units" / f"{unit_name(**keys)}.json").is_file()

    def load_unit(self, **keys: Any) -> dict:
        return read_json(self.root / "units" / f"{unit_name(**keys)}.json")

    def save_unit(self, keys: Mapping[str, Any], metrics: Mapping[str, float], *,
                  history: pd.DataFrame | None = None, scores: Mapping[str, np.ndarray] | None = None,
                  extra: Mapping[str, Any] | None = None) -> None:
        """Store a finished unit: its metrics, history and raw scores. The JSON is written last,
        so a unit counts as finished only once everything else is on disk."""
        name = unit_name(**keys)
        if history is not None:
            atomic_write_text(self.root / "history" / f"{name}.csv", history.to_csv(index=False))
        if scores is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **{k: np.asarray(v) for k, v in scores.items()})
            atomic_write_bytes(self.root / "scores" / f"{name}.npz", buf.getvalue())
        write_json(self.root / "units" / f"{name}.json",
                   {"keys": dict(keys), "metrics": dict(metrics), **(dict(extra) if extra else {})})
        self._rebuild_metrics()

    def units(self) -> list[dict]:
        folder = self.root / "units"
        return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    def _rebuild_metrics(self) -> None:
        rows = [{**u["keys"], "key": k, "value": v} for u in self.units() for k, v in u["metrics"].items()]
        atomic_write_text(self.root / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))

    # ---- reading -----------------------------------------------------------------------
    def metrics(self) -> pd.DataFrame:
        """All unit metrics in long format (unit key columns, ``key``, ``value``)."""
        path = self.root / "metrics.csv"
        return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()

    def wide_metrics(self) -> pd.DataFrame:
        """One row per unit, one column per metric key."""
        rows = [{**u["keys"], **u["metrics"]} for u in self.units()]
        return pd.DataFrame(rows)

    def history(self, **keys: Any) -> pd.DataFrame:
        return pd.read_csv(self.root / "history" / f"{unit_name(**keys)}.csv")

    def histories(self) -> pd.DataFrame:
        """Every unit's history stacked, with the unit's key columns added."""
        frames = []
        for u in self.units():
            path = self.root / "history" / f"{unit_name(**u['keys'])}.csv"
            if path.is_file():
                frames.append(pd.read_csv(path).assign(**u["keys"]))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def scores(self, **keys: Any) -> dict[str, np.ndarray]:
        with np.load(self.root / "scores" / f"{unit_name(**keys)}.npz") as npz:
            return {k: npz[k] for k in npz.files}

    # ---- figures and tables ----------------------------------------------------------------
    def save_figure(self, fig, name: str, formats: tuple[str, ...] = ("png", "svg")) -> None:
        """Save a matplotlib figure as ``figures/<name>.<fmt>`` (atomically)."""
        paths = []
        for fmt in formats:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight")
            paths.append(atomic_write_bytes(self.root / "figures" / f"{name}.{fmt}", buf.getvalue()))

    def save_table(self, df: pd.DataFrame, name: str) -> Path:
        return atomic_write_text(self.root / "tables" / f"{name}.csv", df.to_csv(index=False))


def collect_provenance(book: str | os.PathLike) -> pd.DataFrame:
    """One row per stored run under ``<book>/results``: what ran, with what, where and how long."""
    rows = []
    for path in sorted(Path(book, "results").glob("*/*/provenance.json")):
        p = read_json(path)
        git, versions, device = p.get("git", {}), p.get("versions", {}), p.get("device", {})
        rows.append({
            "notebook": Path(p.get("notebook", "?")).stem, "run": p.get("run_name"), "profile": p.get("profile"),
            "status": p.get("status"), "seeds": p.get("seeds"),
            "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
            "wall_s": p.get("wall_s"), "device": device.get("gpu") or f"CPU x{device.get('cpu_count')}",
            "torch": versions.get("torch"), "python": versions.get("python"),
            "params": str(path.parent.relative_to(Path(book)) / "params.yaml"),
        })
    return pd.DataFrame(rows)
