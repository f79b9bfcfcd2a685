"""The run recorder: everything a run stores, written atomically under its results folder.

Layout of ``book/results/<notebook>/<run>/``::

    params.yaml  provenance.json        written by helpers.run
    metrics.csv                         long format: one row per (unit columns..., key, value)
    scope.json                          digest of the params the units were made with
    units/<unit>.json                   one finished unit of work (e.g. flag x model x seed)
    history/<unit>.csv                  its per-epoch history
    scores/<unit>.npz                   raw per-sample scores and labels (summaries never retrain)
    models/<unit>.pt                    best weights of a unit that keeps them (git-ignored)
    figures/<name>.png|svg

A unit is written only when it is finished, so an interrupted run loses at most the unit in
progress (whose own training checkpoint lives in the cache and resumes too). The rule "a stored
unit is not redone" holds by construction in :meth:`Recorder.unit`: a unit is reused only when
its *fingerprint* (everything that shapes it, the helpers code included) is the one stored with it.
Opened with a ``scope`` (a notebook's params), a results folder made with other params has its
units set aside in ``.stale/`` first, so tables never show units of parameters that were edited.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

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


def digest(obj: Any) -> str:
    """SHA-256 of a JSON-able object (keys sorted), e.g. a unit's settings or a notebook's params."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable_loose).encode()).hexdigest()


def _jsonable_loose(obj: Any):
    try:
        return _jsonable(obj)
    except TypeError:
        return repr(obj)


def unit_name(**keys: Any) -> str:
    """Deterministic file-safe name of a unit from its key values, e.g. ``flag=breastmnist__seed=0``."""
    parts = [f"{k}={v}" for k, v in keys.items()]
    return "__".join(parts).replace("/", "-").replace(" ", "")


UNIT_PARTS = ("units", "history", "scores", "models", "tables", "figures", "metrics.csv", "scope.json")


class Recorder:
    """Writes and reads one run's results folder (see the module docstring for the layout).

    ``scope``: the params the run's units are made with (a notebook passes its parameters). When
    the folder holds units made with other params, they are moved to ``<parent>/.stale/`` first,
    with a message, so nothing made with the old params is shown as a result of the new ones.
    """

    def __init__(self, root: str | os.PathLike, scope: Mapping[str, Any] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if scope is not None:
            self._enter_scope(dict(scope))

    def _enter_scope(self, scope: dict) -> None:
        new = digest(scope)
        path = self.root / "scope.json"
        old = read_json(path).get("sha256") if path.is_file() else None
        if old is not None and old != new:
            stale = self.root.parent / ".stale" / f"{self.root.name}-{old[:12]}"
            shutil.rmtree(stale, ignore_errors=True)
            stale.mkdir(parents=True)
            for part in UNIT_PARTS:
                if (self.root / part).exists():
                    os.replace(self.root / part, stale / part)
            print(f"[new ] {self.root.name}: params changed since its units were made; they are set aside in {stale}",
                  flush=True)
        elif old is None and (self.root / "units").is_dir() and any((self.root / "units").iterdir()):
            pass  # units from before scopes were recorded: their own fingerprints decide reuse
        write_json(path, {"sha256": new, "params": scope})

    # ---- units -------------------------------------------------------------------------
    def unit(self, keys: Mapping[str, Any], compute: Callable[[], Mapping[str, Any] | None], *,
             fingerprint: Mapping[str, Any] | None = None, code: str | None = None) -> dict | None:
        """The stored unit ``keys`` when it was made with the same ``fingerprint``; else ``compute()``
        it, store it and return it. Returns the unit record (``keys``, ``metrics``, extras).

        ``compute()`` returns a mapping with ``metrics`` and optionally ``history`` (DataFrame),
        ``scores`` (arrays), ``model`` (a state dict, stored as ``models/<unit>.pt``) and ``extra``
        (JSON-able). It may return ``None`` (e.g. a non-main DDP rank): nothing is stored.
        The fingerprint always includes the digest of the code that makes units (``code``, default
        :func:`helpers.repro.unit_code_digest`), so a change to that code redoes the unit.
        """
        from .repro import unit_code_digest

        code = code or unit_code_digest()
        if self.is_current(keys, fingerprint=fingerprint, code=code):
            return self.load_unit(**keys)
        if self.has_unit(**keys):
            print(f"[redo] unit {unit_name(**keys)}: made with other settings or code", flush=True)
        out = compute()
        if out is None:
            return None
        if out.get("model") is not None:
            self.save_model(keys, out["model"])
        fp = digest({"unit": dict(fingerprint or {}), "code": code})
        self.save_unit(keys, out["metrics"], history=out.get("history"), scores=out.get("scores"),
                       extra={**dict(out.get("extra") or {}), "fingerprint": fp, "code_digest": code})
        return self.load_unit(**keys)

    def is_current(self, keys: Mapping[str, Any], *, fingerprint: Mapping[str, Any] | None = None,
                   code: str | None = None) -> bool:
        """Whether unit ``keys`` is stored with this ``fingerprint`` and ``code`` (what :meth:`unit`
        reuses). Each unit made by :meth:`unit` also holds its ``code_digest`` in the clear, so a
        caller can tell whether a unit came from this code without rebuilding its whole fingerprint."""
        from .repro import unit_code_digest

        path = self.root / "units" / f"{unit_name(**keys)}.json"
        fp = digest({"unit": dict(fingerprint or {}), "code": code or unit_code_digest()})
        return path.is_file() and read_json(path).get("fingerprint") == fp

    def save_model(self, keys: Mapping[str, Any], state: Mapping[str, Any]) -> Path:
        """Store a unit's weights (a state dict) as ``models/<unit>.pt``, atomically."""
        import torch

        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
        return atomic_write_bytes(self.model_path(**keys), buf.getvalue())

    def model_path(self, **keys: Any) -> Path:
        return self.root / "models" / f"{unit_name(**keys)}.pt"

    def load_model(self, **keys: Any) -> dict:
        """A unit's stored weights, loaded with ``weights_only=True``; a missing file names the fix."""
        import torch

        path = self.model_path(**keys)
        if not path.is_file():
            raise FileNotFoundError(f"no stored weights for unit {unit_name(**keys)} at {path}. Fix: train it "
                                    f"with keep_model=True (train_and_test) or check the unit's keys.")
        return torch.load(path, map_location="cpu", weights_only=True)

    def forget(self, **keys: Any) -> None:
        """Drop a unit's record, so the next :meth:`unit` call recomputes it (its files are overwritten
        then); e.g. a unit restored without the weights a later unit starts from."""
        (self.root / "units" / f"{unit_name(**keys)}.json").unlink(missing_ok=True)

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


def provenance_row(p: dict) -> dict:
    """The fields of a run's ``provenance.json`` that the provenance tables show: what ran, with
    what, where and how long (``wall_s`` counts the earlier executions a resumed run continued)."""
    git, versions, device = p.get("git") or {}, p.get("versions") or {}, p.get("device") or {}
    return {"notebook": Path(p.get("notebook", "?")).stem, "run": p.get("run_name"), "profile": p.get("profile"),
            "status": p.get("status"), "seeds": p.get("seeds"),
            "commit": (git.get("commit") or "")[:10] + ("+dirty" if git.get("dirty") else ""),
            "wall_s": p.get("wall_s_total", p.get("wall_s")),
            "device": device.get("gpu") or f"CPU x{device.get('cpu_count')}",
            "torch": versions.get("torch"), "python": versions.get("python")}


def collect_provenance(book: str | os.PathLike) -> pd.DataFrame:
    """One row per stored run under ``<book>/results``: what ran, with what, where and how long."""
    rows = [{**provenance_row(read_json(path)), "params": str(path.parent.relative_to(Path(book)) / "params.yaml")}
            for path in sorted(Path(book, "results").glob("*/*/provenance.json"))]
    return pd.DataFrame(rows)
