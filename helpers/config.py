"""Params and paths.

Params are merged in one fixed order (later wins)::

    notebook defaults  <-  params/global.yaml  <-  params/profiles/<profile>.yaml
                       <-  the run's YAML (top level)  <-  the run's YAML ``profiles.<profile>``

A key in the run's YAML that the notebook does not declare in its ``parameters`` cell is an
error that names the key and lists the valid ones. ``global.yaml`` and the profile files are
shared by every notebook, so they only set the keys a notebook declares (and a key that no
notebook declares is refused by the runner).

**Types.** Every value is checked against its default before anything runs: an int is fine where
a float is expected, anything where the default is ``None``, and ``None`` only where the default
is ``None`` or the parameters cell annotates the key as optional (``max_eval: int | None = 128``).
PyYAML reads ``1e-3`` as a string; that is refused with the fix (write ``1.0e-3``).

**Groups.** A dict-valued param merges deeply, so a params file can override one key of a group
(``fit: {epochs: 6}``) and keep the others. A group whose default has keys checks the keys and
types of its overrides; an empty default (``epochs_by_flag = {}``) or a ``dict`` annotation is an
open map, whose keys are free.

Paths come from environment variables with sensible defaults:

* ``RLMED_DATA``   data root holding MedMNIST files by their official names (``{flag}.npz``,
  ``{flag}_64.npz``, ...); default ``../shared/data/medmnist`` beside the repository when present,
  else ``~/.medmnist`` like the medmnist package.
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
    """Data root: the ``data_root`` param if given, else ``$RLMED_DATA``, else the ``shared/data/medmnist``
    folder beside the repository when it holds MedMNIST files, else ``~/.medmnist`` (medmnist's own
    default). The one place every notebook, test, benchmark and the Makefile resolve it."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("RLMED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    shared = repo_root().parent / "shared" / "data" / "medmnist"
    if any(shared.glob("*.npz")):
        return shared.resolve()
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


class Replace(dict):
    """A mapping written ``!replace {...}`` in a params file: it replaces the value of a lower layer
    whole instead of merging into it. For a model's keyword arguments when a profile changes the
    model (``expert_kwargs: !replace {small_input: true}``), or to mean "the model's own defaults"
    (``member_kwargs: !replace {}``): a plain mapping would keep every default key it does not name."""


class _ParamsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads the ``!replace`` tag (:class:`Replace`)."""


_ParamsLoader.add_constructor("!replace", lambda loader, node: Replace(loader.construct_mapping(node, deep=True)))


def plain(value: Any) -> Any:
    """``value`` with every :class:`Replace` turned into a plain dict (deep copies throughout)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return copy.deepcopy(value)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping (with the ``!replace`` tag, :class:`Replace`); a missing or malformed
    file raises :class:`ParamsError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_ParamsLoader) or {}
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


#: Params that hold a config group: its keys and types are those of the dataclass (``module:Class``),
#: whose field defaults are the defaults; the notebook's value lists only what differs from them.
GROUP_SCHEMAS = {"fit": "helpers.train:FitConfig", "champion": "helpers.train:FitConfig",
                 "pretrain": "helpers.train:FitConfig", "expert_fit": "helpers.train:FitConfig",
                 "combiner_fit": "helpers.train:FitConfig",
                 "controller": "helpers.nas.search:ControllerConfig", "child": "helpers.nas.search:ChildConfig"}

_ANNOTATION_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict,
                     "None": type(None), "Sequence": list, "Mapping": dict, "Any": object}


def annotation_spec(node, where: str) -> dict:
    """A type spec from an annotation (an :mod:`ast` node or its source text): ``int | None`` ->
    ``{"types": (int, NoneType)}``; ``list[str]`` adds ``item``; ``dict`` makes an open map."""
    import ast

    if isinstance(node, str):
        node = ast.parse(node, mode="eval").body
    spec: dict = {"types": ()}

    def walk(n) -> None:
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
            walk(n.left)
            walk(n.right)
        elif isinstance(n, ast.Constant) and n.value is None:
            spec["types"] += (type(None),)
        elif isinstance(n, ast.Name) and n.id in _ANNOTATION_TYPES:
            spec["types"] += (_ANNOTATION_TYPES[n.id],)
            if n.id in ("dict", "Mapping"):
                spec["open"] = True
        elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id in _ANNOTATION_TYPES:
            walk(n.value)
            if n.value.id in ("list", "Sequence"):
                spec["item"] = annotation_spec(n.slice, where)["types"]
        else:
            raise ParamsError(f"{where}: annotation {ast.unparse(n)!r} is not supported; use int, float, "
                              f"str, bool, list, list[T], dict, None and '|'")
    walk(node)
    if object in spec["types"]:
        spec["types"] = ()
    return spec


def _schema(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def check_group(key: str, value: Any, target: str, source: str) -> None:
    """Check a config group (see :data:`GROUP_SCHEMAS`) against its dataclass: known keys, typed values."""
    import dataclasses

    cls = _schema(target)
    if not isinstance(value, dict):
        raise ParamsError(f"{source}: '{key}' must be a mapping of {cls.__name__} fields, got {_describe(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(value, fields, f"{source} (group '{key}', {cls.__name__})")
    for k, v in value.items():
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else None
        spec = annotation_spec(f.type, f"{cls.__name__}.{k}") if isinstance(f.type, str) else {}
        check_value(f"{key}.{k}", v, default, source, spec)


_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", list: "list", dict: "mapping",
               type(None): "null"}


def _type_name(t) -> str:
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_ok(value: Any, expected: tuple) -> bool:
    if value is None:
        return type(None) in expected
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return any(isinstance(value, t) for t in expected if t is not type(None))


def check_value(key: str, value: Any, default: Any, source: str, spec: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ParamsError` when ``value`` does not have the type of ``default`` (or of the
    annotation in ``spec``: ``{"types": (...), "open": bool}``), naming the key, the expected type,
    the value and where it came from. Mappings are checked key by key (see the module docstring)."""
    spec = spec or {}
    if spec.get("schema"):
        check_group(key, value, spec["schema"], source)
        return
    expected = spec.get("types") or ((type(default),) if default is not None else None)
    if expected is None:
        return
    if float in expected and isinstance(value, str):
        try:
            float(value)
            hint = f" Fix: YAML reads {value} as text; write it with a decimal point and a signed exponent, e.g. 1.0e-3."
        except ValueError:
            hint = " Fix: give a number."
        raise ParamsError(f"{source}: '{key}' must be a number, got the string {_describe(value)}.{hint}")
    if not _type_ok(value, tuple(expected)):
        want = " or ".join(_type_name(t) for t in expected)
        fix = f" Fix: write it as a list, e.g. {key}: [{_describe(value)}]." if list in expected and not isinstance(value, list) else ""
        raise ParamsError(f"{source}: '{key}' must be {want}, got {type(value).__name__} {_describe(value)}.{fix}")
    if isinstance(value, dict) and isinstance(default, dict) and default and not spec.get("open") \
            and not isinstance(value, Replace):   # a replacement is not checked against what it replaces
        check_keys(value, default, f"{source} (group '{key}')")
        for k, v in value.items():
            check_value(f"{key}.{k}", v, default[k], source)
    if isinstance(value, list) and spec.get("item") is not None:
        for i, v in enumerate(value):
            check_value(f"{key}[{i}]", v, None, source, {"types": spec["item"]})


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """``base`` updated by ``over``; where both hold a mapping under a key, merged recursively,
    unless ``over``'s is a :class:`Replace` (``!replace`` in YAML), which is taken as it is."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        merge = isinstance(v, dict) and not isinstance(v, Replace) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if merge else plain(v)
    return out


def merge_params(
    defaults: Mapping[str, Any],
    run_params: Mapping[str, Any] | None = None,
    profile: str | None = None,
    shared_layers: Iterable[Mapping[str, Any]] = (),
    source: str = "params",
    specs: Mapping[str, Mapping[str, Any]] | None = None,
    layer_sources: Iterable[str] | None = None,
) -> dict:
    """Merge params in the documented order, refusing unknown keys and wrong types.

    ``defaults`` are the notebook's parameters (``specs`` their annotations, see
    :func:`check_value`); ``shared_layers`` (global file, profile file) only set keys the notebook
    declares; ``run_params`` may hold a ``profiles`` mapping whose entry for ``profile`` is
    applied last. Dict-valued params merge deeply, except where a layer writes ``!replace``
    (:class:`Replace`). Returns a new dict of plain values.
    """
    specs = specs or {}
    merged = copy.deepcopy(dict(defaults))
    valid = set(defaults) - set(RUNNER_KEYS)

    def apply(layer: Mapping[str, Any], where: str) -> None:
        for k, v in layer.items():
            check_value(k, v, defaults[k], where, specs.get(k))
            merged[k] = deep_merge({k: merged.get(k)}, {k: v})[k]

    shared_layers = list(shared_layers)
    names = list(layer_sources or [f"shared params layer {i + 1}" for i in range(len(shared_layers))])
    for layer, where in zip(shared_layers, names):
        apply({k: v for k, v in layer.items() if k in valid}, where)
    run_params = dict(run_params or {})
    profiles = run_params.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ParamsError(f"{source}: 'profiles' must map a profile name to overrides")
    check_keys(run_params, valid, source)
    check_keys(profiles, PROFILES, f"{source} (profiles)")
    apply(run_params, source)
    if profile is not None:
        if profile not in PROFILES:
            raise ParamsError(f"unknown profile '{profile}'; valid profiles: {', '.join(PROFILES)}")
        over = profiles.get(profile) or {}
        if not isinstance(over, dict):
            raise ParamsError(f"{source}: 'profiles.{profile}' must be a mapping of overrides, got {_describe(over)}")
        check_keys(over, valid, f"{source} (profiles.{profile})")
        apply(over, f"{source} (profiles.{profile})")
    return merged
