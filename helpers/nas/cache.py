"""A JSON-lines cache of trained NAS children, keyed by everything that decides their results."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping

from ..models.nas_child import normalize_arch

__all__ = ["ChildCache"]


class ChildCache:
    """Results of trained children in a JSON-lines file, keyed by everything that decides them.

    The key holds the arch, the seed, the training settings (epochs, batch size, lr, data seed,
    number of training images, precision, classes, channels, image size) and a fingerprint of the
    data; not the engine (both engines compute the same results). Lines are appended atomically
    (one ``write`` on an ``O_APPEND`` file); :meth:`compact` rewrites the file atomically. A
    damaged line (e.g. from a killed writer) is skipped. Used only when passed to
    :func:`train_children`, which marks results from it ``cached: True``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, dict] = {}
        self._mtime = None
        self._fingerprints: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(arch, seed: int, settings: Mapping[str, Any]) -> str:
        payload = {"arch": normalize_arch(arch), "seed": int(seed), **settings}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    def data_fingerprint(self, train_split, val_split, n_train: int) -> str:
        """SHA-256 over the used training images and labels and the validation split (memoised)."""
        ident = (id(train_split.images), id(val_split.images), n_train, train_split.images.data_ptr(),
                 val_split.images.data_ptr())
        if ident not in self._fingerprints:
            h = hashlib.sha256()
            for t in (train_split.images[:n_train], train_split.labels[:n_train], val_split.images, val_split.labels):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
            self._fingerprints[ident] = h.hexdigest()[:20]
        return self._fingerprints[ident]

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._entries, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        entries = {}
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    entries[rec["key"]] = rec["result"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._entries, self._mtime = entries, mtime

    def get(self, key: str) -> dict | None:
        with self._lock:
            self._load()
            hit = self._entries.get(key)
            return None if hit is None else dict(hit)

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        rec = {"key": key, "result": {k: v for k, v in result.items() if k != "cached"}}
        line = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self._entries[key] = dict(rec["result"])

    def compact(self) -> None:
        """Rewrite the file with one line per key (atomic rename)."""
        from ..results import atomic_write_text
        with self._lock:
            self._mtime = None
            self._load()
            text = "".join(json.dumps({"key": k, "result": v}, sort_keys=True, separators=(",", ":")) + "\n"
                           for k, v in self._entries.items())
            atomic_write_text(self.path, text)
            self._mtime = None

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None
