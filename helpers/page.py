"""What every method page does the same way: open its recorder, keep logs off the page, show tables
that read like a book's, and close with the environment it ran in.

A method notebook (see ``notebooks/templates/method.ipynb`` for the six-section outline) uses it as::

    page = open_page("baselines", run_name, results_dir)   # after the parameters cell
    recorder = page.recorder                                # the run's results folder
    ...
    page.table(df, digits=3)                                # no index, formatted numbers, human names
    page.log("one line for the log file")                   # not shown on the page
    page.reproduce()                                        # the closing cell: command + environment table

:func:`open_page` points ``RLMED_LOG_FILE`` at ``<results>/logs/train.log``: ``helpers.train.fit``
appends its per-epoch lines there instead of printing them, so pages carry no raw training logs
while progress bars still show in JupyterLab.
"""
from __future__ import annotations

import html
import math
import numbers
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import config
from .results import Recorder

LOG_ENV = "RLMED_LOG_FILE"

#: Column names shown as they are named in the literature.
UPPER = {"acc", "auc", "bacc", "kappa", "f1", "mae", "r2", "ece", "lr", "id", "cpu", "gpu"}
#: Whole words for the short names the helpers use.
WORDS = {"params": "parameters", "val": "val", "n": "n", "p": "p", "t": "t", "sd": "sd", "std": "std",
         "arch": "architecture", "diff": "difference", "n_seeds": "seeds"}
#: Columns holding counts: shown as integers with thousands separators.
COUNTS = {"params", "parameters", "n", "n_seeds", "seeds", "epochs", "epochs_run", "best_epoch", "episode",
          "episodes", "children", "cached_children", "seed", "last", "train", "val", "test", "n_train", "images"}


def human_name(column: Any) -> str:
    """A readable column name: ``test/acc`` -> ``test ACC``, ``train_s`` -> ``train time (s)``,
    ``mean_params`` -> ``mean parameters``, ``rl/entropy`` -> ``entropy``."""
    name = str(column)
    if name in WORDS and name not in {"val", "n", "p", "t", "sd", "std"}:
        return WORDS[name]
    seconds = name.endswith("_s") and len(name) > 2
    if seconds:
        name = name[:-2]
    if name.startswith("rl/"):
        name = name[3:]
    words = [w for w in name.replace("/", " ").replace("_", " ").split(" ") if w]
    words = [w.upper() if w.lower() in UPPER else WORDS.get(w, w) for w in words]
    text = " ".join(words)
    return f"{text} time (s)" if seconds else text


def _is_count(column: str, values: pd.Series) -> bool:
    numeric = pd.to_numeric(values, errors="coerce").dropna()
    if numeric.empty:
        return False
    whole = bool((numeric == numeric.round()).all())
    return (str(column) in COUNTS and whole) or pd.api.types.is_integer_dtype(values)


def format_value(value: Any, column: str = "", digits: int = 4, count: bool = False) -> str:
    """One cell as shown: counts with separators, seconds to 1 decimal, other numbers to ``digits``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if count:
        return f"{int(round(float(value))):,}"
    if str(column).endswith("_s") or str(column) in {"time_s", "seconds"}:
        return f"{float(value):,.1f}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if abs(float(value)) >= 1000:
        return f"{float(value):,.0f}"
    if value != 0 and abs(float(value)) < 10 ** -digits:
        return f"{float(value):.1e}"
    return f"{float(value):.{digits}f}"


class Table:
    """A DataFrame shown as a book table: no index, formatted numbers, readable column names, and a
    box that scrolls sideways when the table is wider than the text column. ``.data`` is the frame."""

    def __init__(self, df: pd.DataFrame, digits: int = 4, names: Mapping[str, str] | None = None,
                 caption: str | None = None, common: bool = False):
        self.data = df
        self.digits = digits
        self.caption = caption
        self.names = {c: (names or {}).get(c, human_name(c)) for c in df.columns}
        self.common = {}
        if common and len(df) > 1:   # a column with one value in every row is said once, in the caption
            for col in df.columns:
                if df[col].nunique(dropna=False) == 1:
                    self.common[col] = format_value(df[col].iloc[0], col, digits, _is_count(col, df[col]))
            said = [f"{self.names[c]}: {v}" for c, v in self.common.items()]
            self.caption = "; ".join(([caption] if caption else []) + said) or None

    def formatted(self) -> pd.DataFrame:
        """The frame as strings, with the shown column names."""
        df = self.data.reset_index(drop=True).drop(columns=list(self.common))
        columns = [[format_value(v, col, self.digits, _is_count(col, df[col])) for v in df[col]] for col in df.columns]
        out = pd.DataFrame(dict(enumerate(columns)), index=range(len(df)))
        out.columns = [self.names[c] for c in df.columns]
        return out

    def _repr_html_(self) -> str:
        shown = self.formatted()
        kinds = ["num" if pd.api.types.is_numeric_dtype(self.data[c]) else "text" for c in self.data.columns
                 if c not in self.common]
        head = "".join(f'<th class="{kind}">{html.escape(str(c))}</th>' for kind, c in zip(kinds, shown.columns))
        rows = []
        for row in shown.itertuples(index=False):
            cells = "".join(f'<td class="{kind}{" long" if len(str(v)) > 60 else ""}">{html.escape(str(v))}</td>'
                            for kind, v in zip(kinds, row))
            rows.append(f"<tr>{cells}</tr>")
        cap = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (f'<div class="rlmed-table" style="overflow-x:auto;max-width:100%">'
                f'<table class="dataframe rlmed">{cap}{f"<thead><tr>{head}</tr></thead>" if any(shown.columns) else ""}'
                f'<tbody>{"".join(rows)}</tbody></table></div>')

    def __repr__(self) -> str:
        text = self.formatted().to_string(index=False)
        return f"{self.caption}\n{text}" if self.caption else text


def table(df: pd.DataFrame, digits: int = 4, names: Mapping[str, str] | None = None,
          caption: str | None = None, common: bool = False) -> Table:
    """Show ``df`` as a book table (see :class:`Table`); stored tables stay as they are. With
    ``common=True`` a column holding one value in every row is given once, in the caption."""
    return Table(df, digits=digits, names=names, caption=caption, common=common)


def _short_commit(git: Mapping) -> str:
    commit = str(git.get("commit") or "?")[:10]
    return commit + (" (uncommitted changes)" if git.get("dirty") else "")


def environment_table(record: Mapping) -> Table:
    """The environment of a run (``git``, ``versions``, ``device`` of its provenance) as a two-column table."""
    git, versions, device = record.get("git") or {}, record.get("versions") or {}, record.get("device") or {}
    rows = [("commit", _short_commit(git))]
    where = device.get("gpu") or f"{device.get('cpu_count', '?')} CPU cores ({device.get('processor') or '?'})"
    rows.append(("device", where))
    if device.get("platform"):
        rows.append(("platform", device["platform"]))
    rows.append(("packages", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    return Table(pd.DataFrame(rows, columns=["what", "value"]), names={"what": "", "value": ""})


class Page:
    """One executed page: its results folder, its log file and its display helpers."""

    def __init__(self, notebook: str, run_name: str = "default", results_dir: str | os.PathLike | None = None,
                 params: Mapping[str, Any] | None = None):
        self.notebook = Path(notebook).stem
        self.run_name = run_name
        self.results_dir = results_dir
        self.recorder = Recorder(config.results_dir(self.notebook, run_name, results_dir),
                                 scope=scope_of(self.notebook, params) if params is not None else None)
        self.log_file = self.recorder.root / "logs" / "train.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        os.environ[LOG_ENV] = str(self.log_file)
        self.log(f"=== {self.notebook}/{run_name}: page opened {datetime.now(timezone.utc).isoformat(timespec='seconds')}")

    def log(self, *parts: Any) -> None:
        """Append a line to the run's log file (``<results>/logs/train.log``), not to the page."""
        with open(self.log_file, "a") as fh:
            fh.write(" ".join(map(str, parts)) + "\n")

    @staticmethod
    def table(df: pd.DataFrame, digits: int = 4, names: Mapping[str, str] | None = None,
              caption: str | None = None, common: bool = False) -> Table:
        """See :func:`table`."""
        return table(df, digits, names, caption, common)

    def needs(self, notebook: str, run_name: str | None = None) -> Recorder:
        """The recorder of another run this page reads (declare it as ``needs:`` in ``book/_runs.yml``)."""
        stem = Path(notebook).stem
        return Recorder(config.results_dir(stem, run_name or stem))

    def reproduce(self) -> None:
        """The closing cell: the command that made the run (from its stored record, when the runner
        made it) and :meth:`environment`; by hand (JupyterLab) it says the parameters cell holds the values."""
        from IPython.display import Markdown, display

        from .results import read_json
        from .run import command_for

        prov = self.recorder.root / "provenance.json"
        record = read_json(prov) if self.results_dir and prov.is_file() else {}
        if record.get("notebook"):
            text = (f"Made with `{command_for(record)}` (profile **{record.get('profile')}**); its params and "
                    f"provenance are stored beside its results.")
        else:
            text = (f"Run by hand with the values of the parameters cell; results in `{self.recorder.root}`. "
                    f"The book's runs of this notebook and their commands are listed in `book/_runs.yml`.")
        display(Markdown(text))
        display(self.environment())

    def environment(self) -> Table:
        """The closing cell: the environment the run was made in (its stored record when run by
        ``helpers.run``, which was written when it started; else this kernel's)."""
        from .repro import run_environment

        return environment_table(run_environment(self.results_dir))


def scope_of(notebook: str, namespace: Mapping[str, Any]) -> dict:
    """The values of the notebook's parameters in ``namespace`` (its ``globals()``), runner keys,
    ``device`` and ``data_root`` aside: what the page's units are made with (see
    :class:`helpers.results.Recorder`). The names come from the template's ``parameters`` cell."""
    from .run import notebook_defaults

    template = config.repo_root() / "notebooks" / f"{Path(notebook).stem}.ipynb"
    names = notebook_defaults(template) if template.is_file() else {}
    skip = set(config.RUNNER_KEYS) | {"device", "data_root"}
    return {k: namespace[k] for k in names if k not in skip and k in namespace}


def inline_figures() -> bool:
    """In a Jupyter kernel, switch matplotlib back to the inline backend if anything imported
    before the page opened chose another (e.g. ``matplotlib.use("Agg")``), under which figures are
    saved but never shown on the page. Returns whether it switched; outside a kernel it does nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    import matplotlib

    if "inline" in matplotlib.get_backend():
        return False
    shell.run_line_magic("matplotlib", "inline")
    return True


def open_page(notebook: str, run_name: str = "default", results_dir: str | os.PathLike | None = None,
              params: Mapping[str, Any] | None = None) -> Page:
    """Open a page's results folder and point the training log at ``<results>/logs/train.log``.

    Pass ``params=globals()``: a results folder holding units made with other parameters (a user
    edited the parameters cell in JupyterLab and ran all) has them set aside first, so the page's
    tables only ever show units of the parameters it was run with. A ``threads`` parameter (an int;
    None or absent: torch's default) sets torch's CPU threads first: small 28 px models gain little
    from a second thread, and lose much when the cores are shared. In a kernel, it also makes sure
    the figures drawn after it show on the page (:func:`inline_figures`)."""
    inline_figures()
    threads = (params or {}).get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return Page(notebook, run_name, results_dir, params)
