"""Builds the book: executes every run listed in ``book/_runs.yml`` with papermill, then the HTML.

Usage::

    python -m helpers.book --profile quick          # runs (skipping unchanged ones) + HTML
    python -m helpers.book --no-runs                # HTML from the runs already on disk

Notebooks are executed once, by papermill; jupyter-book only renders them (``execute_notebooks:
"off"``), so pages and stored results never disagree. MathJax is served from the book itself
(npm ``mathjax@3``, cached under ``$RLMED_CACHE``), so pages render without internet.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from . import config
from .run import RunError, run_notebook

MATHJAX_VERSION = "3.2.2"


def planned_runs(book: Path | None = None) -> list[dict]:
    """The runs the book is made of: ``[{notebook, params, always?}, ...]`` from ``book/_runs.yml``."""
    book = book or config.book_dir()
    spec = yaml.safe_load((book / "_runs.yml").read_text()) or {}
    return spec.get("runs", [])


def ensure_mathjax(static: Path) -> Path:
    """Put MathJax 3 (es5 build) at ``static/mathjax`` from the npm registry, cached between builds.

    ``static`` is ``book/_assets``, the Sphinx static path (served as ``_static/``). Not
    ``book/_static``: if that exists, Jupyter Book adds every ``.js`` file of the static paths to
    every page.
    """
    target = static / "mathjax"
    if (target / "tex-chtml.js").is_file():
        return target
    cached = config.cache_dir("mathjax") / MATHJAX_VERSION / "es5"
    if not (cached / "tex-chtml.js").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                subprocess.run(["npm", "pack", f"mathjax@{MATHJAX_VERSION}", "--silent"], cwd=tmp, check=True,
                               capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                raise RuntimeError(f"could not fetch mathjax@{MATHJAX_VERSION} with npm ({exc}). Fix: install "
                                   f"Node.js/npm, or copy MathJax's es5 folder to {target}") from exc
            tgz = next(Path(tmp).glob("mathjax-*.tgz"))
            with tarfile.open(tgz) as tar:
                tar.extractall(tmp, filter="data")
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(cached, ignore_errors=True)
            shutil.copytree(Path(tmp) / "package" / "es5", cached)
    shutil.copytree(cached, target, dirs_exist_ok=True)
    return target


def execute_runs(profile: str, book: Path | None = None, force: bool = False) -> list[dict]:
    """Execute the planned runs in order; a failure stops the build with the runner's message."""
    records = []
    for entry in planned_runs(book):
        nb = config.repo_root() / entry["notebook"]
        params = config.repo_root() / entry["params"] if entry.get("params") else None
        records.append(run_notebook(nb, params, profile, force=force or entry.get("always", False)))
    return records


def build_html(book: Path | None = None, strict: bool = False) -> Path:
    """Run ``jupyter-book build`` on the book folder; returns the path of ``index.html``."""
    book = (book or config.book_dir()).resolve()
    ensure_mathjax(book / "_assets")
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book),
           "--config", str(config.repo_root() / "_config.yml"), "--path-output", str(book)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed ({' '.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return book / "_build" / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.book", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick", choices=config.PROFILES)
    parser.add_argument("--no-runs", action="store_true", help="render what is on disk, execute nothing")
    parser.add_argument("--force", action="store_true", help="re-execute every run")
    parser.add_argument("--strict", action="store_true", help="warnings are errors")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if not args.no_runs:
            execute_runs(args.profile, force=args.force)
        index = build_html(strict=args.strict)
    except (config.ParamsError, RunError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"book built in {time.perf_counter() - start:.0f} s: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
