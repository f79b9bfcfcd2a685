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
                "reference.py", "nas/analysis.py", "nas/protocol.py", "noise/figures.py", "ensemble/figures.py",
                "folds/figures.py", "apga/plots.py")
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


def _cpu_ticks(stat: str) -> tuple[int, int]:
    """(busy, total) jiffies from the ``cpu`` line of ``/proc/stat`` text."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    total = sum(fields[:8])                                       # guest time is already inside user
    return total - idle, total


def cpu_busy(seconds: float = 0.3, stat_path: str | os.PathLike = "/proc/stat") -> float | None:
    """Share of the whole machine's CPU time (0-1) that was busy over the next ``seconds``, from
    ``/proc/stat``; ``None`` where there is no such file. Call it before a run starts: what it sees
    is other processes."""
    import time

    path = Path(stat_path)
    try:
        b0, t0 = _cpu_ticks(path.read_text())
        time.sleep(seconds)
        b1, t1 = _cpu_ticks(path.read_text())
    except (OSError, ValueError, IndexError):
        return None
    return (b1 - b0) / (t1 - t0) if t1 > t0 else None


# Measured at 7e7e6c8 on this project's 2-core machine (AMX bf16), one training step of the
# ensemble's 28 px SE-ResNet member, batch 32: idle, 925 images/s with torch's 2 threads; beside
# two other runs (load 3.6), 7-12 images/s with 2 threads and 410-620 with 1 thread (fp32-bf16).
BUSY_WARN = 0.25


def contention_warning(busy: float | None, threads: int | None = None, cores: int | None = None) -> str | None:
    """A warning for a run about to start on a machine whose CPUs are already ``busy`` (a share,
    from :func:`cpu_busy`), or ``None`` when they are idle enough (under :data:`BUSY_WARN`) or
    torch will not compete with them (``threads`` plus the busy cores fit in ``cores``).

    torch's CPU threads wait on each other at every operation: when another process holds a core,
    a step can take tens of times longer than on idle cores, not twice."""
    if busy is None or busy < BUSY_WARN:
        return None
    cores = cores or os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    used = busy * cores
    if threads + used <= cores + 0.25:
        return None
    return (f"{used:.1f} of this machine's {cores} CPU cores were already busy when this run started, and "
            f"torch will use {threads} thread(s): the threads wait on each other whenever a core is taken, "
            f"which can make training tens of times slower, and the run's timings will read slow. Run one "
            f"run at a time, or give each run fewer threads (OMP_NUM_THREADS=1, or a notebook's `threads` "
            f"param).")


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
