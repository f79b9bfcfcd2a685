"""Builds the book: executes every run listed in ``book/_runs.yml`` with papermill, then the HTML.

Usage::

    python -m helpers.book --profile quick          # runs (skipping unchanged ones) + HTML
    python -m helpers.book --no-runs                # HTML from the runs already on disk
    python -m helpers.book --on-demand              # also the long runs marked ``on_demand``
    python -m helpers.book --publish nas_reference  # copy a finished run to book/published/ (tracked)
    python -m helpers.book --stash ensemble_full    # copy an unfinished run's units to book/partial/ (tracked)

``book/_runs.yml`` is the one place for the book's metadata: its parts, the runs (notebook, params,
title, parent page, what each run reads: ``needs``) and the measured cost of the long ones. The
table of contents (``_toc.yml``) is generated from it at every build, and runs execute in an order
that puts every run after the runs it needs. Adding a chapter is one notebook, one params file and
one entry in ``_runs.yml``.

A long (``on_demand``) run that has not been made on this machine is shown from ``book/published/``
when it was published there (tracked in git: its executed page and small results, its final models'
per-sample test scores, and their calibration and robustness computed at publishing where the
weights were; never weights, checkpoints or data), and otherwise as a placeholder giving the command.

A long run that outlasts the machine it runs on is carried over by ``--stash``: its finished units
(records, histories, per-sample scores, folds, logs; never weights or checkpoints) go to
``book/partial/`` (tracked), and the runner restores them on a machine that has none, so a later
session resumes where the stash left off (:func:`stash`, :func:`unstash`).

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
from .results import atomic_write_text, provenance_row, read_json, write_json
from .run import RunError, command_for, paths, run_notebook

MATHJAX_VERSION = "3.2.2"


RUN_KEYS = ("notebook", "params", "name", "profile", "always", "on_demand", "title", "part", "parent", "needs")
#: Files of a results folder that are never published (weights, checkpoints, data, per-sample arrays).
UNPUBLISHED_DIRS = {"scores", "checkpoints"}
UNPUBLISHED_SUFFIXES = {".npz", ".npy", ".pt", ".pth", ".ckpt", ".pkl", ".svg", ".tmp"}
#: A published file larger than this is left out (and named when publishing).
PUBLISH_MAX_BYTES = 2_000_000
#: The final models' per-sample score files are published up to this total (the rest named as left out).
PUBLISH_SCORES_MAX_BYTES = 20_000_000
#: An executed page (its figures embedded) larger than this is refused: a full run's page of five
#: targets' fold curves is about 2.2 MB.
PUBLISH_PAGE_MAX_BYTES = 5_000_000
#: Folders of a results folder a stash leaves out (weights and checkpoints), and its per-file cap.
UNSTASHED_DIRS = {"models", "checkpoints"}
STASH_MAX_BYTES = 5_000_000


def book_spec(book: Path | None = None) -> dict:
    """``book/_runs.yml`` as written: ``root``, ``parts`` and ``runs``."""
    book = book or config.book_dir()
    spec = yaml.safe_load((book / "_runs.yml").read_text()) or {}
    unknown = set(spec) - {"root", "parts", "runs"}
    if unknown:
        raise config.ParamsError(f"{book / '_runs.yml'}: unknown top-level key(s) {sorted(unknown)}. Fix: use "
                                 f"root, parts or runs.")
    return spec


def _run_id(entry: dict) -> str:
    return f"{Path(entry['notebook']).stem}/{entry['name']}"


def _find(runs: list[dict], ref: str, source: str) -> dict:
    """The run named ``ref`` (its name, or ``<notebook>/<name>``)."""
    hits = [r for r in runs if ref in (r["name"], _run_id(r))]
    if len(hits) != 1:
        known = ", ".join(r["name"] for r in runs)
        why = "names no run" if not hits else f"is ambiguous ({', '.join(map(_run_id, hits))})"
        raise config.ParamsError(f"{source}: '{ref}' {why}. Fix: use a run name of _runs.yml ({known}) or "
                                 f"<notebook>/<name>.")
    return hits[0]


def _ordered(runs: list[dict], source: str) -> list[dict]:
    """``runs`` in file order, except that each comes after every run it ``needs`` (``"*"``: all others)."""
    deps = {}
    for r in runs:
        needs = r.get("needs") or []
        needs = [needs] if isinstance(needs, str) else list(needs)
        if "*" in needs:
            deps[_run_id(r)] = {_run_id(o) for o in runs if o is not r and "*" not in (o.get("needs") or [])}
        else:
            deps[_run_id(r)] = {_run_id(_find(runs, n, f"{source}: needs of {_run_id(r)}")) for n in needs}
    done, out = set(), []
    while len(out) < len(runs):
        ready = [r for r in runs if _run_id(r) not in done and deps[_run_id(r)] <= done]
        if not ready:
            left = [_run_id(r) for r in runs if _run_id(r) not in done]
            raise config.ParamsError(f"{source}: the needs of {', '.join(left)} form a cycle. Fix: a run may only "
                                     f"need runs that do not need it.")
        done.add(_run_id(ready[0]))
        out.append(ready[0])
    return out


def planned_runs(book: Path | None = None, ordered: bool = True) -> list[dict]:
    """The runs the book is made of, from ``book/_runs.yml``, in execution order.

    Each entry: ``notebook``, ``params`` and optionally ``name`` (default: the params file's stem),
    ``profile`` (pinned; default: the book's profile), ``always`` (re-execute on every build),
    ``on_demand`` (a run too long for the default build; its value says what it costs, as measured),
    ``title`` (in the table of contents), ``part`` (its caption; default: the first part), ``parent``
    (a run whose page it is a section of) and ``needs`` (runs whose results it reads; ``"*"``: every
    other run). Each returned entry carries its resolved ``name``. With ``ordered=False`` the file's order.
    """
    book = book or config.book_dir()
    source = str(book / "_runs.yml")
    runs = []
    for entry in book_spec(book).get("runs", []):
        unknown = set(entry) - set(RUN_KEYS)
        if unknown:
            raise config.ParamsError(f"{source}: unknown key(s) {sorted(unknown)} in the entry for "
                                     f"{entry.get('notebook')}. Fix: use {', '.join(RUN_KEYS)}.")
        default = Path(entry["params"]).stem if entry.get("params") else "default"
        runs.append({**entry, "name": entry.get("name") or default})
    ids = [_run_id(r) for r in runs]
    if len(set(ids)) != len(ids):
        raise config.ParamsError(f"{source}: two runs share a page ({sorted(i for i in ids if ids.count(i) > 1)}). "
                                 f"Fix: give one a `name`.")
    return _ordered(runs, source) if ordered else runs


def toc(book: Path | None = None) -> dict:
    """The table of contents generated from ``_runs.yml``: the root page; per part, its hand-written
    ``pages`` then its runs, each run's sections being the runs naming it as ``parent``."""
    book = book or config.book_dir()
    spec, source = book_spec(book), str(book / "_runs.yml")
    parts = [dict(p) for p in spec.get("parts") or [{"caption": "Methods"}]]
    captions = [p["caption"] for p in parts]
    chapters = {p["caption"]: [{"file": f} for f in p.get("pages", [])] for p in parts}
    runs = planned_runs(book, ordered=False)
    items = {}
    for r in runs:
        item = {"file": f"runs/{Path(r['notebook']).stem}/{r['name']}"}
        if r.get("title"):
            item["title"] = r["title"]
        items[_run_id(r)] = item
    for r in runs:
        item = items[_run_id(r)]
        if r.get("parent"):
            items[_run_id(_find(runs, r["parent"], f"{source}: parent of {_run_id(r)}"))].setdefault(
                "sections", []).append(item)
            continue
        part = r.get("part", captions[0])
        if part not in chapters:
            raise config.ParamsError(f"{source}: part '{part}' of {_run_id(r)} is not among the parts "
                                     f"({', '.join(captions)}). Fix: add it under `parts`.")
        chapters[part].append(item)
    return {"format": "jb-book", "root": spec.get("root", "intro"),
            "parts": [{"caption": c, "chapters": chapters[c]} for c in captions if chapters[c]]}


def write_toc(book: Path | None = None) -> Path:
    """Write ``<book>/_toc.yml`` from ``_runs.yml`` (see :func:`toc`); it is a build product."""
    book = book or config.book_dir()
    text = ("# Generated by helpers.book from _runs.yml at every build; edit _runs.yml instead.\n"
            + yaml.safe_dump(toc(book), sort_keys=False, allow_unicode=True))
    path = book / "_toc.yml"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def published_dir() -> Path:
    """Where published runs live, tracked in git: ``<repo>/book/published/<notebook>/<run>/``."""
    return config.repo_root() / "book" / "published"


def published_page(entry: dict, published: Path | None = None) -> Path:
    """The executed page of a published run (it may not exist)."""
    return (published or published_dir()) / Path(entry["notebook"]).stem / entry["name"] / "page.ipynb"


def _published_banner(text: str, stem: str, name: str) -> str:
    where = f"`book/results/{stem}/{name}/`"
    note = (f"`book/published/{stem}/{name}/` (published with the repository: params, provenance, metrics, "
            f"units, tables, figures, logs under {PUBLISH_MAX_BYTES / 1e6:.0f} MB, and the final models' calibration "
            f"and robustness computed at publishing in `derived/`; weights, checkpoints and per-sample score "
            f"files stay on the machine that made the run)")
    return text.replace(where, note) if where in text else text


def _copy_small_files(results: Path, tmp: Path, skip_dirs: set, skip_suffixes: set, max_bytes: int,
                      skip_names: set = frozenset()) -> list[str]:
    """Copy the files of ``results`` to ``tmp`` but those under ``skip_dirs``, hidden ones, those with
    ``skip_suffixes`` or ``skip_names``, and those over ``max_bytes`` (returned, with their sizes)."""
    skipped = []
    for src in sorted(results.rglob("*")):
        rel = src.relative_to(results)
        if not src.is_file() or set(rel.parts[:-1]) & skip_dirs or rel.parts[0].startswith(".") \
                or src.suffix in skip_suffixes or rel.name in skip_names:
            continue
        if src.stat().st_size > max_bytes:
            skipped.append(f"{rel} ({src.stat().st_size / 1e6:.1f} MB)")
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp / rel)
    return skipped


def publish(run: str, book: Path | None = None, dest: Path | None = None, derive: bool = True,
            robust_max_images: int | None = None, data_root=None) -> Path:
    """Copy a finished run (``name`` or ``<notebook>/<name>``) from ``book`` to ``dest``
    (default :func:`published_dir`), so the book shows it on any clone.

    Copied: the executed page (``page.ipynb``, its run box pointing at the published folder) and
    the results folder's small files (params, provenance, metrics, units, histories, tables,
    PNG figures, logs); never weights, checkpoints, data or SVG copies of figures. With ``derive``
    (the default), also the per-sample test scores of the run's final models (the summary's
    :func:`helpers.summary.final_units`, up to :data:`PUBLISH_SCORES_MAX_BYTES`) and, computed here
    from the weights, their calibration and robustness tables (:mod:`helpers.summary.derived`;
    every corruption and severity on at most ``robust_max_images`` test images per model, all by
    default), which the summary reads for a published run. Returns the published folder.
    """
    book = book or config.book_dir()
    entry = _find(planned_runs(book, ordered=False), run, str(book / "_runs.yml"))
    stem = Path(entry["notebook"]).stem
    page, results = paths(entry["notebook"], entry["name"], book)
    prov = results / "provenance.json"
    record = read_json(prov) if prov.is_file() else {}
    if record.get("status") != "complete" or not page.is_file() or is_placeholder(page):
        raise RunError(f"{stem}/{entry['name']} has no finished run in {book} to publish (status "
                       f"{record.get('status', 'none')!r}). Fix: make it first: {command_for_entry(entry)}")
    nb = nbformat.read(page, as_version=4)
    if nb.metadata.get("rlmed", {}).get("published"):
        raise RunError(f"{page} is itself a published copy; publish from the machine that made the run.")
    target = (dest or published_dir()) / stem / entry["name"]
    tmp = target.with_name(f".{entry['name']}.publishing")
    shutil.rmtree(tmp, ignore_errors=True)
    skipped = _copy_small_files(results, tmp, UNPUBLISHED_DIRS, UNPUBLISHED_SUFFIXES, PUBLISH_MAX_BYTES)
    if derive:
        skipped += _publish_derived(stem, entry["name"], results, tmp, robust_max_images, data_root)
    for cell in nb.cells:
        if "run-banner" in cell.get("metadata", {}).get("tags", []):
            cell.source = _published_banner(cell.source, stem, entry["name"])
    info = {"run": _run_id(entry), "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": (record.get("git") or {}).get("commit"), "profile": record.get("profile"),
            "left_out": skipped, "robust_max_images": robust_max_images if derive else None}
    nb.metadata.setdefault("rlmed", {})["published"] = info
    tmp.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, tmp / "page.ipynb")
    if (size := (tmp / "page.ipynb").stat().st_size) > PUBLISH_PAGE_MAX_BYTES:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{page} is {size / 1e6:.1f} MB, over the {PUBLISH_PAGE_MAX_BYTES / 1e6:.0f} MB a published page "
                       f"may take. Fix: show fewer or smaller figures on the page (they stay in figures/).")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    stashed = target.parent.parent.parent / "partial" / stem / entry["name"]
    if (stashed / "stash.json").is_file():   # the run is finished and published: its carry-over is spent
        shutil.rmtree(stashed)
        print(f"[pub ] {_run_id(entry)}: its stash {stashed} is deleted")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"[pub ] {_run_id(entry)} -> {target} ({sum(1 for f in target.rglob('*') if f.is_file())} files, "
          f"{size / 1e6:.2f} MB)" + (f"; left out (too large): {', '.join(skipped)}" if skipped else ""))
    return target


def _publish_derived(stem: str, name: str, results: Path, tmp: Path, robust_max_images: int | None,
                     data_root) -> list[str]:
    """Into ``tmp``: the final models' score files and the derived tables (see :func:`publish`);
    returns what was left out."""
    from .results import unit_name
    from .summary.chapters import RunRef, final_units
    from .summary.derived import derive_tables, write_tables

    ref = RunRef(stem, name, results, "local")
    skipped, budget, finals = [], PUBLISH_SCORES_MAX_BYTES, final_units([ref])
    for unit in finals:
        src = unit.root / "scores" / f"{unit_name(**unit.keys)}.npz"
        if not src.is_file() or (tmp / src.relative_to(results)).exists():
            continue
        size = src.stat().st_size
        if size > min(PUBLISH_MAX_BYTES, budget):
            skipped.append(f"{src.relative_to(results)} ({size / 1e6:.1f} MB)")
            continue
        budget -= size
        (tmp / src.relative_to(results)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp / src.relative_to(results))
    start = time.perf_counter()
    tables = derive_tables(ref, max_images=robust_max_images, data_root=data_root, finals=finals)
    write_tables(tables, tmp)
    print(f"[pub ] {stem}/{name}: calibration of {len(tables['calibration'])} and robustness of "
          f"{tables['robustness'].groupby(['method', 'dataset', 'seed']).ngroups if len(tables['robustness']) else 0} "
          f"final models computed ({len(tables['robustness_skipped'])} skipped) in {time.perf_counter() - start:.0f} s")
    return skipped


def partial_dir() -> Path:
    """Where stashed (unfinished) runs live, tracked in git: ``<repo>/book/partial/<notebook>/<run>/``."""
    return config.repo_root() / "book" / "partial"


def stash(run: str, book: Path | None = None, dest: Path | None = None) -> Path:
    """Copy the finished units of a run in progress (``name`` or ``<notebook>/<name>``) from ``book``
    to ``dest`` (default :func:`partial_dir`), so that a later session on another machine resumes
    from them: :func:`helpers.run.run_notebook` restores a stash into a results folder that holds no
    units (:func:`unstash`).

    Copied: the unit records, histories, per-sample scores, folds, logs, params and scope, each up
    to :data:`STASH_MAX_BYTES`; never weights or checkpoints (:data:`UNSTASHED_DIRS`). Units whose
    weights stay behind are listed in ``stash.json``; calibration and robustness at publishing cover
    only units whose weights are on the machine that publishes. The
    provenance record is closed with this execution's wall time so far, so the run's total counts it.
    Unit fingerprints hold the code digest: units made by other code are redone, never reused.
    Reading a left-behind unit's weights raises :meth:`helpers.results.Recorder.load_model`'s error,
    which names the unit, except where a chapter retrains it (the APGA chapter's baselines).
    """
    book = book or config.book_dir()
    entry = _find(planned_runs(book, ordered=False), run, str(book / "_runs.yml"))
    stem = Path(entry["notebook"]).stem
    _, results = paths(entry["notebook"], entry["name"], book)
    if not (results / "units").is_dir() or not any((results / "units").glob("*.json")):
        raise RunError(f"{stem}/{entry['name']} has no finished units in {results} to stash. "
                       f"Fix: run it first: {command_for_entry(entry)}")
    return stash_folder(results, (dest or partial_dir()) / stem / entry["name"], _run_id(entry))


def stash_folder(results: Path, target: Path, run_id: str) -> Path:
    """The copy behind :func:`stash`: ``results`` (a run's results folder) to ``target``."""
    from .run import earlier_executions

    units = sorted((results / "units").glob("*.json"))
    tmp = target.with_name(f".{target.name}.stashing")
    shutil.rmtree(tmp, ignore_errors=True)
    skipped = _copy_small_files(results, tmp, UNSTASHED_DIRS, {".pt", ".pth", ".ckpt", ".tmp"}, STASH_MAX_BYTES,
                                skip_names={"provenance.json"})
    prov = read_json(results / "provenance.json") if (results / "provenance.json").is_file() else {}
    if prov.get("status") != "complete":   # close this execution: its wall time so far joins the total
        prov = {**prov, "status": "stashed", "wall_s": (earlier_executions(prov, results) or [{}])[-1].get("wall_s")}
    weights = {p.stem for p in (results / "models").glob("*.pt")} if (results / "models").is_dir() else set()
    scores = sorted(p.stem for p in (tmp / "scores").glob("*.npz")) if (tmp / "scores").is_dir() else []
    info = {"run": run_id, "stashed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": (prov.get("git") or {}).get("commit"), "params_sha256": prov.get("params_sha256"),
            "units": len(units), "weights_left_behind": sorted(weights), "scores": scores, "left_out": skipped}
    write_json(tmp / "provenance.json", prov)
    write_json(tmp / "stash.json", info)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"[stsh] {run_id} -> {target}: {len(units)} units ({size / 1e6:.2f} MB; weights of "
          f"{len(weights)} left behind)" + (f"; left out (too large): {', '.join(skipped)}" if skipped else ""))
    return target


def unstash(stem: str, name: str, results: Path, params_sha256: str | None, source: Path | None = None) -> int:
    """Restore the stash of run ``<stem>/<name>`` (see :func:`stash`) into ``results`` when that folder
    holds no units of its own and the stash was made with the same params (``params_sha256``, as the
    runner computes it). Returns the number of units restored (0: nothing to restore, or a stash of
    other params, which is named and left alone). A unit whose score file the stash lists but does not
    hold (score files stay out of git, so a clone lacks them) is not restored: the run redoes it."""
    src = (source or partial_dir()) / stem / name
    if not (src / "stash.json").is_file() or ((results / "units").is_dir() and any((results / "units").iterdir())):
        return 0
    info = read_json(src / "stash.json")
    if info.get("params_sha256") != params_sha256:
        print(f"[stsh] {stem}/{name}: the stash in {src} was made with other params; not restored "
              f"(delete it, or restore those params to resume from it)", flush=True)
        return 0
    # score files are binary and stay out of git (.gitignore): on a clone they are missing, and a unit
    # without its arrays (per-sample scores, agent traces) is redone rather than shown without them
    lost = {u for u in info.get("scores", []) if not (src / "scores" / f"{u}.npz").is_file()}
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_file() and rel.name != "stash.json" and not (results / rel).exists() \
                and not (rel.parts[0] == "units" and f.stem in lost):
            (results / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, results / rel)
    restored = int(info["units"]) - len(lost)
    print(f"[stsh] {stem}/{name}: restored {restored} units stashed {info['stashed_utc']} at commit "
          f"{(info.get('commit') or 'unknown')[:10]}; weights of {len(info['weights_left_behind'])} were left "
          f"behind there" + (f"; {len(lost)} unit{'s' if len(lost) > 1 else ''} whose score files are not here (kept out of "
                             f"git) will be redone"
                             if lost else ""), flush=True)
    return restored


def published_provenance(published: Path | None = None):
    """One row per published run (read by the provenance page)."""
    import pandas as pd

    rows = []
    for prov in sorted((published or published_dir()).glob("*/*/provenance.json")):
        p = read_json(prov)
        meta = nbformat.read(prov.parent / "page.ipynb", as_version=4).metadata.get("rlmed", {}) \
            if (prov.parent / "page.ipynb").is_file() else {}
        row = {k: v for k, v in provenance_row(p).items() if k not in ("status", "torch", "python")}
        pub = meta.get("published") or {}
        cap = pub.get("robust_max_images", "not recorded") if (prov.parent / "derived" / "robustness.csv").is_file() \
            else "not computed"
        rows.append({**row, "published": pub.get("published_utc"),
                     "robustness images": "all" if cap is None else cap,
                     "folder": str(prov.parent.relative_to(config.repo_root()))
                     if prov.parent.is_relative_to(config.repo_root()) else str(prov.parent)})
    return pd.DataFrame(rows)


def command_for_entry(entry: dict, profile: str = "quick") -> str:
    """The command that makes the run of a ``_runs.yml`` entry."""
    return command_for({"notebook": entry["notebook"], "params_file": entry.get("params"), "run_name": entry["name"],
                        "profile": entry.get("profile", profile)})


def is_placeholder(page: Path) -> bool:
    """True for a page written by :func:`write_placeholder` (no run behind it yet)."""
    return page.is_file() and bool(nbformat.read(page, as_version=4).metadata.get("rlmed", {}).get("placeholder"))


def write_placeholder(entry: dict, profile: str, book: Path | None = None) -> Path:
    """A page for an on-demand run that has not been made yet: says so, and gives the command
    (with the entry's pinned profile, else ``profile``, the book's)."""
    page, _ = paths(entry["notebook"], entry["name"], book)
    cmd = command_for_entry(entry, profile)
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


def show_published(entry: dict, book: Path | None = None, published: Path | None = None) -> dict | None:
    """Put a published run's page in the book (``runs/<notebook>/<name>.ipynb``); its record, or
    ``None`` when the run was never published."""
    src = published_page(entry, published)
    if not src.is_file():
        return None
    page, _ = paths(entry["notebook"], entry["name"], book)
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page, src.read_text())
    prov = src.parent / "provenance.json"
    return {**(read_json(prov) if prov.is_file() else {}), "published": str(src.parent)}


def execute_runs(profile: str, book: Path | None = None, force: bool = False, on_demand: bool = False,
                 published: Path | None = None) -> list[dict]:
    """Execute the planned runs in order (each after the runs it needs); a failure stops the build
    with the runner's message.

    An ``on_demand`` run is executed only with ``on_demand=True``. Otherwise its finished page is
    kept as it is (its banner names the commit and profile it was made with); where there is none,
    its published page (``book/published/``) is shown, and failing that a placeholder page gives the
    command. Returns the records of the runs executed, kept or shown from ``published``.
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
            elif (shown := show_published(entry, book, published)) is not None:
                print(f"[pub ] {nb.stem}/{entry['name']}: on demand; shown as published in {shown['published']} "
                      f"(made {shown.get('started_utc')}, profile {shown.get('profile')})")
                records.append(shown)
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
    write_toc(book)
    exe = Path(sys.executable).with_name("jupyter-book")
    # --all: Sphinx re-renders only the pages whose own source changed, but the hand-written pages
    # glue numbers from the runs' notebooks (findings, differences, reproducibility), a dependency it
    # does not track; an incremental build showed the previous build's wall times there.
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book), "--all",
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
    parser.add_argument("--publish", metavar="RUN", action="append",
                        help="copy the finished run RUN (a name of book/_runs.yml, e.g. nas_reference) to "
                             "book/published/ and stop; repeatable")
    parser.add_argument("--stash", metavar="RUN", action="append",
                        help="copy the finished units of the run RUN, finished or not, to book/partial/ (no "
                             "weights) so a later session resumes from them, and stop; repeatable")
    parser.add_argument("--robust-max-images", type=int, default=None, metavar="N",
                        help="with --publish: score robustness on at most N test images per final model "
                             "(default: all)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.stash:
            for run in args.stash:
                stash(run)
            return 0
        if args.publish:
            for run in args.publish:
                publish(run, robust_max_images=args.robust_max_images)
            return 0
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
