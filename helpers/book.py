"""Builds the book: executes every run listed in ``book/_runs.yml`` with papermill, then the HTML.

Usage::

    python -m helpers.book --profile quick          # runs (skipping unchanged ones) + HTML
    python -m helpers.book --no-runs                # HTML from the runs already on disk
    python -m helpers.book --on-demand              # also the long runs marked ``on_demand``

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

import nbformat
import yaml

from . import config
from .results import atomic_write_text, read_json
from .run import RunError, command_for, paths, run_notebook

MATHJAX_VERSION = "3.2.2"


def planned_runs(book: Path | None = None) -> list[dict]:
    """The runs the book is made of, from ``book/_runs.yml``.

    Each entry: ``notebook``, ``params`` and optionally ``name`` (default: the params file's stem),
    ``profile`` (pinned; default: the book's profile), ``always`` (re-execute on every build) and
    ``on_demand`` (a run too long for the default build; its value says what it costs). Each
    returned entry carries its resolved ``name``.
    """
    book = book or config.book_dir()
    spec = yaml.safe_load((book / "_runs.yml").read_text()) or {}
    runs = []
    for entry in spec.get("runs", []):
        unknown = set(entry) - {"notebook", "params", "name", "profile", "always", "on_demand", "title"}
        if unknown:
            raise config.ParamsError(f"{book / '_runs.yml'}: unknown key(s) {sorted(unknown)} in the entry for "
                                     f"{entry.get('notebook')}. Fix: use notebook, params, name, profile, always, "
                                     f"on_demand or title.")
        default = Path(entry["params"]).stem if entry.get("params") else "default"
        runs.append({**entry, "name": entry.get("name") or default})
    return runs


def is_placeholder(page: Path) -> bool:
    """True for a page written by :func:`write_placeholder` (no run behind it yet)."""
    return page.is_file() and bool(nbformat.read(page, as_version=4).metadata.get("rlmed", {}).get("placeholder"))


def write_placeholder(entry: dict, profile: str, book: Path | None = None) -> Path:
    """A page for an on-demand run that has not been made yet: says so, and gives the command
    (with the entry's pinned profile, else ``profile``, the book's)."""
    page, _ = paths(entry["notebook"], entry["name"], book)
    cmd = command_for({"notebook": entry["notebook"], "params_file": entry.get("params"), "run_name": entry["name"],
                       "profile": entry.get("profile", profile)})
    title = entry.get("title") or f"{Path(entry['notebook']).stem}: {entry['name']}"
    text = (f"# {title}\n\n````{{admonition}} Not run yet\n:class: warning\n"
            f"This page shows a run too long for the default build ({entry['on_demand']}), and it has not been "
            f"made on this machine. Make it with\n\n```bash\n{cmd}\n```\n\nand rebuild the book (`make book`); "
            f"finished runs are kept from then on. Nothing on this page is a result.\n````")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)], metadata={"rlmed": {"placeholder": True}})
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page, nbformat.writes(nb))
    return page


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


def execute_runs(profile: str, book: Path | None = None, force: bool = False, on_demand: bool = False) -> list[dict]:
    """Execute the planned runs in order; a failure stops the build with the runner's message.

    An ``on_demand`` run is executed only with ``on_demand=True``. Otherwise its finished page is
    kept as it is (its banner names the commit and profile it was made with), and where there is
    none, a placeholder page gives the command. Returns the records of the runs executed or kept.
    """
    records = []
    for entry in planned_runs(book):
        nb = config.repo_root() / entry["notebook"]
        params = config.repo_root() / entry["params"] if entry.get("params") else None
        if entry.get("on_demand") and not on_demand:
            page, results = paths(nb, entry["name"], book)
            prov = results / "provenance.json"
            record = read_json(prov) if prov.is_file() else {}
            if record.get("status") == "complete" and page.is_file() and not is_placeholder(page):
                print(f"[kept] {nb.stem}/{entry['name']} ({record.get('profile')}): on demand, made "
                      f"{record.get('started_utc')}")
                records.append(record)
            else:
                print(f"[todo] {nb.stem}/{entry['name']}: on demand ({entry['on_demand']}); placeholder page "
                      f"{write_placeholder(entry, profile, book)}")
            continue
        records.append(run_notebook(nb, params, entry.get("profile", profile), run_name=entry["name"],
                                    force=force or entry.get("always", False)))
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
    parser.add_argument("--on-demand", action="store_true",
                        help="also execute the long runs marked on_demand in book/_runs.yml")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if not args.no_runs:
            execute_runs(args.profile, force=args.force, on_demand=args.on_demand)
        index = build_html(strict=args.strict)
    except (config.ParamsError, RunError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"book built in {time.perf_counter() - start:.0f} s: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
