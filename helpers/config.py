"""Params and paths.

Params are merged in one fixed order (later wins)::

    notebook defaults  <-  params/global.yaml  <-  params/profiles/<profile>.yaml
                       <-  the run's YAML (top level)  <-  the run's YAML ``profiles.<profile>``

A key in the run's YAML that the notebook does not declare in its ``parameters`` cell is an
error that names the key and lists the valid ones. ``global.yaml`` and the profile files are
shared by every notebook, so they only set the keys a notebook declares.

Paths come from environment variables with sensible defaults:

* ``RLMED_DATA``   data root holding MedMNIST files by their official names (``{flag}.npz``,
  ``{flag}_64.npz``, ...); default ``~/.medmnist`` like the medmnist package.
* ``RLMED_CACHE``  checkpoints and caches, outside the repository; default ``~/.cache/rlmedbook``.
* ``RLMED_BOOK``   where executed notebooks and results go; default ``<repo>/book``.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROFILES = ("smoke", "quick", "full")
RUNNER_KEYS = ("profile", "run_name", "results_dir")  # injected by helpers.run, never set in YAML


class ParamsError(ValueError):
    """A params file is wrong: unknown key, bad profile, unreadable YAML."""


def repo_root() -> Path:
    """The repository root (the folder holding ``helpers/``)."""
    return Path(__file__).resolve().parent.parent


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Data root: the ``data_root`` param if given, else ``$RLMED_DATA``, else ``~/.medmnist``."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("RLMED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return Path("~/.medmnist").expanduser()


def cache_dir(sub: str | None = None) -> Path:
    """Cache folder for checkpoints (``$RLMED_CACHE``, default ``~/.cache/rlmedbook``), created."""
    root = Path(os.environ.get("RLMED_CACHE", "~/.cache/rlmedbook")).expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def book_dir() -> Path:
    """Where executed notebooks (``runs/``) and results (``results/``) live."""
    env = os.environ.get("RLMED_BOOK")
    return Path(env).expanduser().resolve() if env else repo_root() / "book"


def results_dir(notebook: str, run_name: str, override: str | os.PathLike | None = None,
                book: Path | None = None) -> Path:
    """Deterministic results folder of a run: ``<book>/results/<notebook>/<run_name>``
    (``book`` defaults to :func:`book_dir`; ``override``, when given, is returned as is)."""
    if override:
        return Path(override).expanduser().resolve()
    return (book or book_dir()) / "results" / Path(notebook).stem / run_name


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing or malformed file raises :class:`ParamsError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def check_keys(given: Iterable[str], valid: Iterable[str], source: str) -> None:
    """Raise :class:`ParamsError` for keys not in ``valid``, naming each with a suggestion."""
    valid = sorted(set(valid))
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        lines.append(f"  unknown key '{key}'{hint}")
    raise ParamsError(
        f"{source}:\n" + "\n".join(lines) + f"\nvalid keys: {', '.join(valid)}"
    )


def merge_params(
    defaults: Mapping[str, Any],
    run_params: Mapping[str, Any] | None = None,
    profile: str | None = None,
    shared_layers: Iterable[Mapping[str, Any]] = (),
    source: str = "params",
) -> dict:
    """Merge params in the documented order and refuse unknown keys.

    ``defaults`` are the notebook's parameters; ``shared_layers`` (global file, profile file)
    only set keys the notebook declares; ``run_params`` may hold a ``profiles`` mapping whose
    entry for ``profile`` is applied last. Returns a new dict.
    """
    merged = copy.deepcopy(dict(defaults))
    valid = set(defaults) - set(RUNNER_KEYS)
    for layer in shared_layers:
        merged.update({k: copy.deepcopy(v) for k, v in layer.items() if k in valid})
    run_params = dict(run_params or {})
    profiles = run_params.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ParamsError(f"{source}: 'profiles' must map a profile name to overrides")
    check_keys(run_params, valid, source)
    check_keys(profiles, PROFILES, f"{source} (profiles)")
    merged.update(copy.deepcopy(run_params))
    if profile is not None:
        if profile not in PROFILES:
            raise ParamsError(f"unknown profile '{profile}'; valid profiles: {', '.join(PROFILES)}")
        over = profiles.get(profile) or {}
        check_keys(over, valid, f"{source} (profiles.{profile})")
        merged.update(copy.deepcopy(over))
    return merged
