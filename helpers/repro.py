"""Seeding in one place and the provenance stored beside every run."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from .results import read_json

TRACKED_PACKAGES = (
    "torch", "torchvision", "numpy", "pandas", "scikit-learn", "medmnist", "albumentations",
    "matplotlib", "seaborn", "papermill", "jupyter-book", "myst-nb",
)


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch Generator seeded alike.

    ``deterministic=True`` also asks torch for deterministic kernels (slower on GPU).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch.

    Asking for CUDA where PyTorch sees no GPU raises an error that says so and names the fix,
    rather than failing later at the first tensor moved there.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} asked for, but PyTorch sees no CUDA GPU here. Fix: use "
                           f"device 'auto' or 'cpu', or run on a machine with a GPU.")
    return dev


_CODE_DIGEST: dict[tuple, str] = {}

#: Files that only present stored results (pages, tables, figures, sentences, the runner): a change
#: to them re-renders pages but does not redo units. Every other file of the package shapes units.
PRESENTATION = ("book.py", "page.py", "plots.py", "report.py", "stats.py", "run.py", "sphinx_ext.py",
                "reference.py", "nas/analysis.py", "nas/protocol.py", "noise/figures.py")
#: Subpackages of ``helpers`` that every unit may import (the model registry); every other
#: subpackage (``nas``, ``rl``, one per chapter) shapes only the units that use it.
SHARED_SUBPACKAGES = ("models",)


def chapter_packages(root: Path | None = None) -> tuple[str, ...]:
    """The subpackages of ``helpers`` (folders with an ``__init__.py``) other than
    :data:`SHARED_SUBPACKAGES`: a chapter's own code, or a piece some chapters share (``rl``)."""
    root = Path(root) if root else Path(__file__).resolve().parent
    return tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "__init__.py").is_file()
                        and d.name not in SHARED_SUBPACKAGES))


def packages_used(*objects) -> tuple[str, ...] | None:
    """The chapter packages (:func:`chapter_packages`) the given hooks, criteria or functions come
    from (a class's or a function's module, else the object's class's), plus ``rl`` whenever any
    does, since chapter code builds on the RL core. ``None`` (meaning: all of them) when one comes
    from outside ``helpers`` (a notebook, a script), whose dependencies cannot be told."""
    used: set[str] = set()
    for obj in objects:
        if obj is None:
            continue
        plain_function = isinstance(obj, type) or (callable(obj) and hasattr(obj, "__code__"))
        module = getattr(obj if plain_function else type(obj), "__module__", "") or ""
        parts = module.split(".")
        if parts[0] != "helpers":
            return None
        if len(parts) > 2:
            used.update({parts[1], "rl"})
    return tuple(sorted(used))


def code_digest(root: Path | None = None, fresh: bool = False, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 over every file of the ``helpers`` package (``.py``, the ``.c`` kernel, any data file),
    by path and content; ``__pycache__`` and the files or folders named in ``exclude`` (paths relative
    to the package) are skipped. Computed once per process (the code a process runs is the code it
    imported) unless ``fresh``."""
    import hashlib

    root = Path(root) if root else Path(__file__).resolve().parent
    key = (str(root), exclude)
    if fresh or key not in _CODE_DIGEST:
        h = hashlib.sha256()
        for src in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                          and p.suffix not in (".pyc", ".so", ".o")):
            rel = src.relative_to(root).as_posix()
            if any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude):
                continue
            h.update(src.relative_to(root.parent).as_posix().encode())
            h.update(src.read_bytes())
        _CODE_DIGEST[key] = h.hexdigest()
    return _CODE_DIGEST[key]


def unit_code_digest(supervised: bool = False, uses: tuple[str, ...] | None = None,
                     root: Path | None = None) -> str:
    """Digest of the code that makes a unit: the package less :data:`PRESENTATION` and less the
    chapter packages (:func:`chapter_packages`) the unit does not ``use``. ``uses=None`` means all of
    them, except that a plain ``supervised`` unit uses none. Stored in each unit's fingerprint, so a
    unit made by other code is recomputed rather than shown as this code's, while an edit to one
    chapter's package does not redo another chapter's units."""
    packages = chapter_packages(root)
    if uses is None:
        uses = () if supervised else packages
    return code_digest(root, exclude=PRESENTATION + tuple(p for p in packages if p not in uses))


def git_state(root: Path | None = None) -> dict:
    """The git commit of ``root`` and whether its tree had uncommitted changes."""
    root = root or Path(__file__).resolve().parent.parent
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain")) if commit else None  # untracked files count too
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def package_versions(names=TRACKED_PACKAGES) -> dict:
    """Installed versions of the packages results depend on (``None`` if missing)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict:
    """What the run ran on: CPU model, threads, and the GPU when there is one."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def provenance() -> dict:
    """Git state, package versions and device, for ``provenance.json``."""
    return {"git": git_state(), "versions": package_versions(), "device": device_info()}


def run_environment(results_dir: str | os.PathLike | None = None) -> dict:
    """The environment a run was made in, for the end of its page.

    Under the runner, ``results_dir`` holds the run's ``provenance.json``, written when the run
    started: its git commit, versions and device are what the code ran with (the checkout may
    have moved on while a long run was executing). Without one (a notebook opened by hand), the
    current :func:`provenance`.
    """
    path = Path(results_dir) / "provenance.json" if results_dir else None
    if path is not None and path.is_file():
        record = read_json(path)
        return {k: record[k] for k in ("git", "versions", "device") if k in record}
    return provenance()
