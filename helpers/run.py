"""The papermill runner: one notebook, one params file, one profile, one deterministic place.

Usage::

    python -m helpers.run notebooks/baselines.ipynb params/baselines.yaml --profile quick

writes ``<book>/runs/<notebook>/<run>.ipynb`` (the executed copy, i.e. the book page) and
``<book>/results/<notebook>/<run>/`` holding ``params.yaml`` and ``provenance.json`` beside what
the notebook stored. ``<run>`` is the params file's stem. Params are resolved as documented in
:mod:`helpers.config`; an unknown key stops the run before anything executes.

A run whose notebook, resolved params and helpers are unchanged since it last finished is not
redone (``--force`` redoes it). A run that was interrupted or failed is simply started again: the
notebook skips the units it already stored and ``fit`` resumes from its checkpoint. Units are
reused only if made with the same notebook and params; otherwise (or with ``--fresh``) the old
results folder is moved to ``results/<notebook>/.stale/`` first.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import config
from .repro import contention_warning, cpu_busy, provenance
from .results import atomic_write_text, read_json, write_json


class _PapermillParamNoise(logging.Filter):
    """Drop papermill's line-based parameter warnings: it cannot parse a line with two '=' (a
    rule such as ``"filters == 128"``) and then calls that parameter unknown. Params are
    validated here instead (:func:`notebook_defaults`, :func:`helpers.config.check_keys`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Unable to parse line") or msg.startswith("Passed unknown parameter"))


for _name in ("papermill", "papermill.translators", "papermill.parameterize"):
    logging.getLogger(_name).addFilter(_PapermillParamNoise())


class RunError(RuntimeError):
    """A notebook run failed; the message says where its partial output and log are."""


def notebook_params(notebook: str | os.PathLike) -> tuple[dict, dict]:
    """``(defaults, specs)`` of the notebook's ``parameters`` cell, parsed with :mod:`ast`.

    Every statement must be ``name = <literal>`` or ``name: <type> = <literal>``; the annotation
    (e.g. ``int | None``, ``list[str]``, ``dict``) becomes the key's type spec (see
    :func:`helpers.config.check_value`). papermill's own inspection skips any line holding two
    ``=`` (e.g. a rule ``"filters == 128"``), so the cell is parsed as Python.
    """
    import nbformat

    nb_path = Path(notebook)
    if not nb_path.is_file():
        raise config.ParamsError(f"notebook not found: {nb_path}")
    nb = nbformat.read(nb_path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise config.ParamsError(f"{nb_path} has {len(cells)} cells tagged 'parameters'; it needs exactly one")
    out, specs = {}, {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
            specs[name] = config.annotation_spec(node.annotation, f"{nb_path}: parameter '{name}'")
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        else:
            raise config.ParamsError(f"{nb_path}: the parameters cell may hold only 'name = literal' lines, "
                                     f"got: {ast.unparse(node)}")
        try:
            out[name] = ast.literal_eval(value)
        except ValueError as exc:
            raise config.ParamsError(f"{nb_path}: parameter '{name}' must be a literal, got "
                                     f"{ast.unparse(value)!r}") from exc
        if name in config.GROUP_SCHEMAS:
            specs[name] = {**specs.get(name, {}), "schema": config.GROUP_SCHEMAS[name]}
        if name in specs:
            config.check_value(name, out[name], None, f"{nb_path} (its own default)", specs[name])
    return out, specs


def notebook_defaults(notebook: str | os.PathLike) -> dict:
    """The literal defaults of the notebook's ``parameters`` cell (see :func:`notebook_params`)."""
    return notebook_params(notebook)[0]


def declared_anywhere(notebooks_dir: Path | None = None) -> set[str]:
    """Every key some notebook in ``notebooks/`` declares: what ``global.yaml`` and profiles may set."""
    folder = notebooks_dir or config.repo_root() / "notebooks"
    keys: set[str] = set()
    for nb in sorted(folder.glob("*.ipynb")):
        keys |= set(notebook_defaults(nb))
    return keys - set(config.RUNNER_KEYS)


# Params whose values name things of a registry, checked before a run starts: key -> (what, names()).
def _model_names() -> list[str]:
    from .models import list_models
    return list_models()


def _flag_names() -> list[str]:
    from .data import flags_2d
    return flags_2d()


def _strategy_names() -> list[str]:
    from . import nas
    table = getattr(nas, "STRATEGIES", None)
    return sorted(table) if table is not None else []


NAME_CHECKS = {"model": ("model", _model_names), "models": ("model", _model_names),
               "member_model": ("model", _model_names), "expert_model": ("model", _model_names),
               "flag": ("MedMNIST 2D flag", _flag_names), "flags": ("MedMNIST 2D flag", _flag_names),
               "strategies": ("search strategy", _strategy_names)}


def check_names(params: dict, source: str) -> None:
    """Refuse a value of a name-holding param (models, flags, strategies) that its registry lacks,
    before anything runs; ``timm/<name>`` models are checked against timm's list."""
    for key, (what, names) in NAME_CHECKS.items():
        if key not in params or params[key] is None:
            continue
        given = params[key] if isinstance(params[key], list) else [params[key]]
        valid = names()
        if not valid:
            continue
        for name in given:
            if not isinstance(name, str):
                raise config.ParamsError(f"{source}: '{key}' holds {name!r}; it must name a {what}")
            if what == "model" and name.startswith("timm/"):
                import timm
                if timm.is_model(name[5:]):
                    continue
                raise config.ParamsError(f"{source}: '{key}' names {name!r}, which timm does not know. Fix: pick a "
                                         f"name from timm.list_models(), e.g. timm/resnet18.")
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise config.ParamsError(f"{source}: '{key}' names unknown {what} '{name}'{hint}. "
                                         f"Valid: {', '.join(valid)}" + (", or timm/<name>" if what == "model" else ""))


def _kwargs_pairs(params: dict) -> list[tuple[str, str, dict]]:
    """(kwargs key, model name, kwargs) for every ``<x>_kwargs`` param beside the model it is for:
    ``<x>_model`` or ``<x>`` naming one model, or ``<x>s`` listing models, whose kwargs are then a
    map from model name to kwargs (e.g. the baselines' ``model_kwargs``); and every mapping param
    holding a ``model`` name beside its ``kwargs`` (e.g. the APGA agents)."""
    pairs = [(f"{key}.kwargs", v["model"], v["kwargs"]) for key, v in params.items()
             if isinstance(v, dict) and isinstance(v.get("model"), str) and isinstance(v.get("kwargs"), dict)]
    for key, kwargs in params.items():
        if not key.endswith("_kwargs") or not isinstance(kwargs, dict):
            continue
        stem = key[: -len("_kwargs")]
        model = params.get(f"{stem}_model", params.get(stem))
        if isinstance(model, str):
            pairs.append((key, model, kwargs))
        elif isinstance(params.get(f"{stem}s"), list):
            pairs += [(f"{key}.{m}", m, kwargs[m]) for m in params[f"{stem}s"]
                      if isinstance(m, str) and isinstance(kwargs.get(m), dict)]
    return pairs


def check_model_kwargs(params: dict, source: str) -> None:
    """Refuse, before anything runs, keyword arguments that the model they are for does not take
    (e.g. a small DenseNet's ``growth_rate`` left beside ``densenet121``). Each model is built once on
    PyTorch's ``meta`` device (no memory, no weights); only a ``TypeError`` about its arguments is
    reported here, anything else is left to the run."""
    import torch

    from .models import create_model

    for key, model, kwargs in _kwargs_pairs(params):
        try:
            with torch.device("meta"):
                create_model(model, num_classes=2, in_chans=1, **kwargs)
        except TypeError as exc:
            if "argument" not in str(exc):
                continue
            raise config.ParamsError(f"{source}: '{key}' holds {config._describe(kwargs)}, which {model} does not take: {exc}. "
                                     f"Fix: give only its own options; when a profile swaps the model, write "
                                     f"{key.split('.')[0]}: !replace {{...}} so the other model's keys are not merged in.") from None
        except Exception:   # noqa: BLE001 - not an argument error: the run reports it where it happens
            continue


def resolve(notebook: str | os.PathLike, params_file: str | os.PathLike | None, profile: str) -> dict:
    """Resolved params of a run (see :func:`helpers.config.merge_params`), type- and name-checked."""
    params_dir = config.repo_root() / "params"
    shared, names = [], []
    declared = None
    for path in (params_dir / "global.yaml", params_dir / "profiles" / f"{profile}.yaml"):
        if path.is_file():
            layer = config.load_yaml(path)
            if declared is None:
                declared = declared_anywhere() | (set(notebook_defaults(notebook)) - set(config.RUNNER_KEYS))
            config.check_keys(layer, declared, f"{path} (a key no notebook declares)")
            shared.append(layer)
            names.append(str(path))
    run_params = config.load_yaml(params_file) if params_file else {}
    defaults, specs = notebook_params(notebook)
    source = str(params_file or "defaults")
    params = config.merge_params(defaults, run_params, profile, shared, source=source, specs=specs,
                                 layer_sources=names)
    check_names(params, source)
    check_model_kwargs(params, source)
    return params


def params_digest(notebook: Path, params: dict) -> str:
    """SHA-256 over the notebook's name and the resolved params: what decides whether a results
    folder's units belong to this run. An edit of the notebook alone re-executes the page
    (:func:`inputs_digest`) but keeps the units: each carries its own fingerprint (settings, data,
    unit code; :meth:`helpers.results.Recorder.unit`) and is redone when that differs."""
    h = hashlib.sha256()
    h.update(Path(notebook).stem.encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


def inputs_digest(notebook: Path, params: dict) -> str:
    """SHA-256 over the notebook, the resolved params and every file of the helpers package
    (sources, the C kernel, package data: :func:`helpers.repro.code_digest`)."""
    from .repro import code_digest

    h = hashlib.sha256(params_digest(notebook, params).encode())
    h.update(Path(notebook).read_bytes())
    h.update(code_digest(config.repo_root() / "helpers", fresh=True).encode())
    return h.hexdigest()


def paths(notebook: str | os.PathLike, run_name: str, book: Path | None = None) -> tuple[Path, Path]:
    """(executed notebook path, results folder) of a run, in ``book`` (default: the book folder)."""
    stem = Path(notebook).stem
    return (book or config.book_dir()) / "runs" / stem / f"{run_name}.ipynb", config.results_dir(stem, run_name, book=book)


def _rel(path: str | os.PathLike | None) -> str | None:
    """``path`` relative to the repository when it lies inside it (records stay portable)."""
    if path is None:
        return None
    path = Path(path).resolve()
    return str(path.relative_to(config.repo_root())) if path.is_relative_to(config.repo_root()) else str(path)


def command_for(record: dict) -> str:
    """The shell command that re-makes the run described by a provenance ``record``."""
    cmd = ["python -m helpers.run", record["notebook"]]
    if record.get("params_file"):
        cmd.append(record["params_file"])
    cmd.append(f"--profile {record['profile']}")
    default_name = Path(record["params_file"]).stem if record.get("params_file") else "default"
    if record["run_name"] != default_name:
        cmd.append(f"--name {record['run_name']}")
    return " ".join(cmd)


def earlier_executions(old: dict, results: Path, forced: bool = False) -> list[dict]:
    """The executions of a run before this one, whose units it resumes from, oldest first: start,
    status and wall time. An execution that was killed before it could write its record is timed to
    the last file it wrote in ``results``. After a finished execution the count starts afresh, except
    for a ``forced`` one (``--force``: the same notebook and params made again, reusing the units of
    the executions before it, e.g. to re-render the page with newer presentation code); ``--fresh``
    or changed params always start afresh (the runner moves the old results aside)."""
    if not old.get("started_utc") or (old.get("status") == "complete" and not forced):
        return []
    wall = old.get("wall_s")
    if wall is None:
        last = max((f.stat().st_mtime for f in results.rglob("*") if f.is_file()), default=0.0)
        started = datetime.fromisoformat(old["started_utc"]).timestamp()
        wall = round(last - started, 2) if last > started else None
    return [*(old.get("earlier") or []), {"started_utc": old["started_utc"], "status": old.get("status"), "wall_s": wall}]


def _walls(earlier: list[dict], seconds: float) -> dict:
    """``wall_s`` of this execution and ``wall_s_total`` with the earlier ones it resumed from."""
    out = {"wall_s": round(seconds, 2)}
    if earlier:
        out["wall_s_total"] = round(seconds + sum(e.get("wall_s") or 0.0 for e in earlier), 2)
    return out


def banner(record: dict) -> str:
    """Markdown for the top of an executed page: which run made it, how, and how to make it again."""
    seeds = record.get("seeds")
    seeds = ", ".join(map(str, seeds)) if isinstance(seeds, (list, tuple)) else seeds
    git = record.get("git") or {}
    commit = f"`{str(git.get('commit'))[:7]}`" + (" (uncommitted changes)" if git.get("dirty") else "")
    device = record.get("device") or {}
    where = (f"GPU {device['gpu']}" if device.get("gpu") else "a CUDA GPU") if device.get("cuda") \
        else f"{device.get('cpu_count', '?')} CPU cores"
    return (f"````{{admonition}} This run\n:class: note\n"
            f"Run **{record['run_name']}** of `{record['notebook']}`, profile **{record['profile']}**, seeds {seeds}; "
            f"commit {commit}; started {record.get('started_utc', '?')} on {where}, took {_took(record)}. Params, provenance and raw "
            f"results: `book/results/{Path(record['notebook']).stem}/{record['run_name']}/`. Make it again with\n\n"
            f"```bash\n{command_for(record)}\n```\n````")


def _took(record: dict) -> str:
    took = f"{record.get('wall_s', 0):.0f} s"
    if record.get("earlier"):
        n = len(record["earlier"])
        took += (f" (resumed from {n} earlier execution{'s' if n > 1 else ''}: "
                 f"{record.get('wall_s_total', record.get('wall_s', 0)):,.0f} s in all)")
    if record.get("cpu_contended"):
        took += (f"; other work held {record.get('cpu_busy_at_start', 0):.0%} of the CPU when it started, "
                 f"so this time reads slow")
    return took


#: An output longer than this many lines is collapsed on the page (Jupyter Book's ``hide-output``).
LONG_OUTPUT_LINES = 40
# Seconds a notebook's kernel may take to start. papermill's default (60 s) failed runs on a loaded
# 2-core machine (a test run beside a long training run: "Kernel didn't respond in 60 seconds").
KERNEL_START_TIMEOUT_S = 600


def _output_lines(cell) -> int:
    """Lines of text a code cell's outputs show (streams and plain-text results)."""
    n = 0
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            n += "".join(out.get("text", "")).count("\n")
        elif "data" in out and not ({"text/html", "image/png", "image/svg+xml", "text/markdown"} & set(out["data"])):
            n += "".join(out["data"].get("text/plain", "")).count("\n") + 1
    return n


def _tag(cell, tag: str) -> None:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def tidy_page(nb) -> None:
    """Presentation of an executed page, in place: the parameters cells (the template's defaults
    and papermill's injected values) are collapsed (``hide-input``: a reader opens them with one
    click), and any output longer than :data:`LONG_OUTPUT_LINES` lines is collapsed (``hide-output``)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            _tag(cell, "hide-input")
        if _output_lines(cell) > LONG_OUTPUT_LINES:
            _tag(cell, "hide-output")


def _add_banner(path: Path, record: dict) -> None:
    """Insert :func:`banner` after the executed notebook's first (title) cell and tidy the page
    (:func:`tidy_page`), in place."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cell = nbformat.v4.new_markdown_cell(banner(record), metadata={"tags": ["run-banner"]})
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, cell)
    tidy_page(nb)
    nbformat.write(nb, path)


def run_notebook(notebook: str | os.PathLike, params_file: str | os.PathLike | None = None,
                 profile: str = "quick", *, force: bool = False, fresh: bool = False, run_name: str | None = None,
                 log_output: bool = False) -> dict:
    """Execute one run (or skip it if unchanged and finished); returns its provenance record.

    Stored units are reused (resume) only when they were made with the same notebook and params;
    a results folder with no units first takes those of a stash of the same params (``book/partial/``,
    :func:`helpers.book.stash`), so a run carried over from another machine resumes;
    otherwise, or with ``fresh=True``, the old results folder is moved to ``.stale/`` and the run
    starts afresh. ``force=True`` re-executes an unchanged run, reusing its units.
    """
    import papermill

    notebook = Path(notebook).resolve()
    run_name = run_name or (Path(params_file).stem if params_file else "default")
    params = resolve(notebook, params_file, profile)
    executed, results = paths(notebook, run_name)
    digest = inputs_digest(notebook, params)
    pdigest = params_digest(notebook, params)
    prov_path = results / "provenance.json"
    old = read_json(prov_path) if prov_path.is_file() else {}
    if not force and not fresh and executed.is_file():
        if old.get("status") == "complete" and old.get("inputs_sha256") == digest:
            print(f"[skip] {notebook.stem}/{run_name} ({profile}): unchanged since its last finished run")
            return old
    if results.is_dir() and any(results.iterdir()) and (fresh or old.get("params_sha256") != pdigest):
        stale = results.parent / ".stale" / f"{run_name}-{(old.get('params_sha256') or 'unknown')[:12]}"
        shutil.rmtree(stale, ignore_errors=True)
        stale.parent.mkdir(parents=True, exist_ok=True)
        os.replace(results, stale)
        from .experiment import checkpoint_dir
        shutil.rmtree(checkpoint_dir(results), ignore_errors=True)   # --fresh must not resume an old checkpoint
        why = "--fresh" if fresh else "its notebook or params changed"
        print(f"[new ] {notebook.stem}/{run_name}: {why}; earlier results moved to {stale}")
    results.mkdir(parents=True, exist_ok=True)
    if not fresh:   # units stashed by an earlier session on another machine (helpers.book.stash)
        from .book import unstash
        if unstash(notebook.stem, run_name, results, pdigest):
            old = read_json(prov_path) if prov_path.is_file() else {}
    earlier = earlier_executions(old, results, forced=force)
    atomic_write_text(results / "params.yaml", stored_params_text(notebook, params, profile, run_name))
    busy = cpu_busy()
    warning = contention_warning(busy, params.get("threads"))
    if warning:
        print(f"[warn] {notebook.stem}/{run_name}: {warning}", file=sys.stderr, flush=True)
    record = {"notebook": _rel(notebook), "params_file": _rel(params_file), "run_name": run_name, "profile": profile,
              "seeds": params.get("seeds", params.get("seed")), "inputs_sha256": digest, "params_sha256": pdigest, "status": "running",
              "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance(),
              **({"cpu_busy_at_start": round(busy, 3)} if busy is not None else {}),
              **({"cpu_contended": True} if warning else {}),
              **({"earlier": earlier} if earlier else {})}
    write_json(prov_path, record)
    injected = {**params, "profile": profile, "run_name": run_name, "results_dir": str(results)}
    partial = executed.with_suffix(".partial.ipynb")
    partial.parent.mkdir(parents=True, exist_ok=True)
    env_before = os.environ.get("RLMED_PROGRESS")
    os.environ["RLMED_PROGRESS"] = "log"
    print(f"[run ] {notebook.stem}/{run_name} ({profile}) -> {executed}", flush=True)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(partial), parameters=injected, kernel_name="python3",
                                   cwd=str(config.repo_root()), progress_bar=False, log_output=log_output,
                                   start_timeout=KERNEL_START_TIMEOUT_S)
    except BaseException as exc:
        failed = executed.with_suffix(".failed.ipynb")
        if partial.is_file():
            os.replace(partial, failed)
        record.update(status="failed", **_walls(earlier, time.perf_counter() - start), error=_short(exc))
        write_json(prov_path, record)
        if not isinstance(exc, Exception):  # Ctrl-C and friends: partial work is kept, re-raise as is
            raise
        raise RunError(f"{notebook.name} with {params_file or 'defaults'} ({profile}) failed: {_short(exc)}\n"
                       f"The executed notebook up to the error is {failed}; finished units under {results} "
                       f"are kept and the next run resumes from them.") from exc
    finally:
        if env_before is None:
            os.environ.pop("RLMED_PROGRESS", None)
        else:
            os.environ["RLMED_PROGRESS"] = env_before
    record.update(status="complete", **_walls(earlier, time.perf_counter() - start))
    _add_banner(partial, record)
    os.replace(partial, executed)
    executed.with_suffix(".failed.ipynb").unlink(missing_ok=True)
    write_json(prov_path, record)
    print(f"[done] {notebook.stem}/{run_name} in {record['wall_s']:.0f} s", flush=True)
    return record


def stored_params_text(notebook: Path, params: dict, profile: str, run_name: str) -> str:
    """The resolved params of a run as a params file that can be fed back: every key the notebook
    declares (runner keys aside), under a header naming the profile, the run and the command."""
    body = {k: v for k, v in params.items() if k not in config.RUNNER_KEYS}
    header = (f"# Resolved params of run '{run_name}' (profile {profile}) of {_rel(notebook)}.\n"
              f"# Every key is given, so feeding this file back remakes the run:\n"
              f"#   python -m helpers.run {_rel(notebook)} <this file> --profile {profile} --name {run_name}\n")
    return header + yaml.safe_dump(body, sort_keys=False)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", None)
    return f"{ename}: {evalue}" if evalue else (text[-1] if text else type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="template notebook, e.g. notebooks/baselines.ipynb")
    parser.add_argument("params", nargs="?", help="params YAML (its stem names the run)")
    parser.add_argument("--profile", default="quick", choices=config.PROFILES)
    parser.add_argument("--force", action="store_true", help="re-execute even if unchanged (reuses stored units)")
    parser.add_argument("--fresh", action="store_true", help="set stored units aside and retrain everything")
    parser.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    parser.add_argument("--name", help="run name (default: the params file's stem); results go to "
                                       "book/results/<notebook>/<name>/")
    args = parser.parse_args(argv)
    try:
        run_notebook(args.notebook, args.params, args.profile, force=args.force, fresh=args.fresh,
                     run_name=args.name, log_output=args.log_output)
    except (config.ParamsError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
