"""End to end: every notebook of the book on the smoke profile, the book built with warnings as
errors, and the built HTML opened in headless Chromium.

One session-scoped fixture executes the runs of ``book/_runs.yml`` (smoke profile, on the real
shared data) into a temporary book folder and builds it; the tests then check the runs, the pages
and the browser view. Marked ``slow``.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from helpers import book as book_mod
from helpers import config
from helpers.run import run_notebook

ROOT = config.repo_root()



def _shared_data() -> Path:
    path = config.data_root()
    if not (path / "organamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found in {path}; set RLMED_DATA")
    return path


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """A smoke-profile book in a temporary folder: runs executed, HTML built strictly."""
    shared_data = _shared_data()
    tmp = tmp_path_factory.mktemp("book")
    for item in (ROOT / "book").iterdir():
        if item.suffix in (".md", ".yml") or item.name == "_assets":
            (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp / item.name)
    env = {"RLMED_BOOK": str(tmp), "RLMED_DATA": str(shared_data),
           "RLMED_CACHE": str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    mathjax_cache = Path(old["RLMED_CACHE"] or "~/.cache/rlmedbook").expanduser() / "mathjax"
    if mathjax_cache.is_dir():  # reuse the MathJax already fetched from npm
        shutil.copytree(mathjax_cache, Path(env["RLMED_CACHE"]) / "mathjax")
    try:
        records = book_mod.execute_runs("smoke", tmp)
        index = book_mod.build_html(tmp, strict=True)
        yield {"root": tmp, "index": index, "records": records}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def toc_files(book: Path) -> list[str]:
    """Every page of the table of contents generated from ``<book>/_runs.yml`` (root first)."""
    spec = book_mod.toc(book)
    files = [spec["root"]]

    def walk(entries):
        for entry in entries:
            files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in spec.get("parts", []):
        walk(part.get("chapters", []))
    return files


def test_no_underscore_static_folder():
    """Jupyter Book adds every .js under the static paths to each page once book/_static exists."""
    assert not (ROOT / "book" / "_static").exists()


def test_every_toc_run_page_is_made_by_a_planned_run():
    planned = {f"runs/{Path(r['notebook']).stem}/{r['name']}" for r in book_mod.planned_runs(ROOT / "book")}
    pages = {f for f in toc_files(ROOT / "book") if f.startswith("runs/")}
    assert pages == planned


def test_every_notebook_template_is_in_the_book():
    planned = {Path(r["notebook"]).name for r in book_mod.planned_runs(ROOT / "book")}
    assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} == planned


def test_templates_are_clean_with_one_parameters_cell():
    for nb_path in (ROOT / "notebooks").rglob("*.ipynb"):
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), nb_path
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, nb_path


#: The fixed outline of a method page (design principle 9); the overview opens the title cell.
OUTLINE = ["## Parameters", "## Method", "## Results", "## Diagnostics", "## Reproduce"]
METHOD_NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if p.stem != "provenance")


@pytest.mark.parametrize("nb_path", METHOD_NOTEBOOKS, ids=lambda p: p.stem)
def test_method_pages_follow_the_six_section_outline(nb_path):
    cells = json.loads(nb_path.read_text())["cells"]
    text = ["".join(c["source"]) for c in cells]
    assert text[0].startswith("# ") and "**Overview.**" in text[0]
    headings = [line for t, c in zip(text, cells) if c["cell_type"] == "markdown" for line in t.splitlines()
                if line.startswith("## ")]
    assert [h for h in headings if h in OUTLINE] == OUTLINE, headings
    code = "\n".join(t for t, c in zip(text, cells) if c["cell_type"] == "code")
    assert "open_page(" in code and text[-1].strip() == "page.reproduce()"   # recorder + log file; closing cell


def test_formulas_render_in_jupyterlab_too():
    """JupyterLab's MathJax reads \\text{...} in text mode, where '_' is an error ("'_' allowed only in
    math mode"), and the book's MathJax shows \\_ there literally: a name with '_' goes in \\mathrm{..\\_..}."""
    import re

    for nb_path in (ROOT / "notebooks").rglob("*.ipynb"):
        for cell in json.loads(nb_path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                bad = re.findall(r"\\text\{[^}]*_[^}]*\}", "".join(cell["source"]))
                assert not bad, f"{nb_path.name}: {bad}"


@pytest.mark.slow
def executed(records: list[dict]) -> list[dict]:
    """The runs this build executed (not the published pages it shows, made elsewhere)."""
    return [r for r in records if "published" not in r]


@pytest.mark.slow
def test_published_runs_are_shown_with_their_own_record(built_book):
    for record in [r for r in built_book["records"] if "published" in r]:
        page = built_book["root"] / "runs" / Path(record["notebook"]).stem / f"{record['run_name']}.ipynb"
        box = "".join(json.loads(page.read_text())["cells"][1]["source"])
        assert record["status"] == "complete" and f"--profile {record['profile']}" in box
        assert "book/published/" in box


@pytest.mark.slow
def test_runs_store_results_and_provenance(built_book):
    root = built_book["root"]
    for record in executed(built_book["records"]):
        assert record["status"] == "complete"
        res = root / "results" / Path(record["notebook"]).stem / record["run_name"]
        prov = json.loads((res / "provenance.json").read_text())
        assert prov["status"] == "complete" and prov["profile"] == "smoke"
        assert prov["git"]["commit"] and prov["versions"]["torch"] and prov["wall_s"] > 0
        assert "(profile smoke)" in (res / "params.yaml").read_text().splitlines()[0]
    base = root / "results" / "baselines" / "baselines"
    units = list((base / "units").glob("*.json"))
    assert len(units) >= 6  # 3 flags x 1 model x 2 seeds on smoke
    assert list((base / "scores").glob("*.npz")) and (base / "metrics.csv").is_file()
    assert (base / "figures" / "learning_curves.png").is_file()


@pytest.mark.slow
def test_executed_pages_open_with_their_run_box(built_book):
    for record in executed(built_book["records"]):
        nb = json.loads((built_book["root"] / "runs" / Path(record["notebook"]).stem / f"{record['run_name']}.ipynb").read_text())
        box = nb["cells"][1]
        assert "run-banner" in box["metadata"]["tags"] and record["run_name"] in "".join(box["source"])
        assert "--profile smoke" in "".join(box["source"])


@pytest.mark.slow
def test_pages_show_every_figure_their_run_saved(built_book):
    """A figure saved to figures/ is also drawn on the page (a helper that chose a non-inline
    backend at import once left the ensemble's figures saved but never shown)."""
    for record in executed(built_book["records"]):
        stem = Path(record["notebook"]).stem
        nb = json.loads((built_book["root"] / "runs" / stem / f"{record['run_name']}.ipynb").read_text())
        shown = sum(1 for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                    if "image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {}))
        saved = list((built_book["root"] / "results" / stem / record["run_name"] / "figures").glob("*.png"))
        assert shown >= len(saved), (stem, record["run_name"], shown, [p.name for p in saved])


@pytest.mark.slow
def test_pages_carry_no_raw_training_log(built_book):
    """Per-epoch lines go to <results>/logs/train.log; a long output that is left is collapsed."""
    import nbformat

    from helpers.run import LONG_OUTPUT_LINES, _output_lines

    for record in built_book["records"]:
        stem = Path(record["notebook"]).stem
        nb = nbformat.read(built_book["root"] / "runs" / stem / f"{record['run_name']}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            tags = cell.metadata.get("tags", [])
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            assert " epoch " not in text, (stem, text[:200])
            assert _output_lines(cell) <= LONG_OUTPUT_LINES or "hide-output" in tags or "scroll-output" in tags
            if "injected-parameters" in tags:
                assert "hide-input" in tags
    log = built_book["root"] / "results" / "baselines" / "baselines" / "logs" / "train.log"
    assert " epoch " in log.read_text()


@pytest.mark.slow
def test_a_finished_run_publishes_small(built_book, tmp_path):
    """What `python -m helpers.book --publish` adds to the repository: the page and small results."""
    import pandas as pd

    from helpers.summary import CORRUPTIONS, SEVERITIES, calibration_tables, final_units, robustness_rows
    from helpers.summary.chapters import RunRef

    target = book_mod.publish("nas", built_book["root"], tmp_path, robust_max_images=50)
    files = [p for p in target.rglob("*") if p.is_file()]
    assert (target / "page.ipynb").is_file() and (target / "provenance.json").is_file()
    assert (target / "figures" / "reward_curves.png").is_file() and list((target / "tables").glob("*.csv"))
    assert not [p for p in files if p.suffix in (".pt", ".svg")]
    npz = [p.relative_to(target).as_posix() for p in files if p.suffix == ".npz"]
    assert npz and all(p.startswith("champions/scores/") for p in npz)   # the final models' test scores only
    assert sum(p.stat().st_size for p in files) < 5_000_000
    # computed here, where the weights are: robustness at every corruption and severity, calibration
    rob = pd.read_csv(target / "derived" / "robustness.csv")
    assert set(rob["corruption"]) == {"none", *CORRUPTIONS} and set(rob["severity"]) == {0, *SEVERITIES}
    assert (rob["n"] == 50).all() and (rob["clean_agree"] == 1.0).all()
    import nbformat

    assert nbformat.read(target / "page.ipynb", as_version=4).metadata["rlmed"]["published"]["robust_max_images"] == 50
    finals = final_units([RunRef("nas", "nas", target, "published")])
    assert len(pd.read_csv(target / "derived" / "calibration.csv")) == len(finals) == len(npz)
    # the summary reads them for the published run, whose weights stayed behind
    assert all(f.weights_missing for f in finals)
    rows, skipped = robustness_rows(finals, corruptions=("pixelate",), severities=(1, 5))
    assert skipped.empty and (rows["computed"] == "at publish").all()
    assert set(zip(rows["corruption"], rows["severity"])) == {("none", 0), ("pixelate", 1), ("pixelate", 5)}
    assert calibration_tables(finals)[2].empty


@pytest.mark.slow
def test_a_new_chapter_builds_from_one_runs_entry(tmp_path_factory):
    """The method template as a new chapter: one notebook, one params file, one _runs.yml entry;
    executed on smoke and built strictly, with nothing else edited."""
    shared_data = _shared_data()
    tmp = tmp_path_factory.mktemp("chapter")
    nb = tmp / "notebooks" / "newmethod.ipynb"
    nb.parent.mkdir()
    shutil.copy(ROOT / "notebooks" / "templates" / "method.ipynb", nb)
    (tmp / "newmethod.yaml").write_text("seeds: [0]\n")
    book = tmp / "book"
    book.mkdir()
    shutil.copy(ROOT / "book" / "intro.md", book)
    shutil.copytree(ROOT / "book" / "_assets", book / "_assets", ignore=shutil.ignore_patterns("mathjax"))
    (book / "_runs.yml").write_text(f"root: intro\nruns:\n  - notebook: {nb}\n    params: {tmp / 'newmethod.yaml'}\n")
    env = {"RLMED_BOOK": str(book), "RLMED_DATA": str(shared_data), "RLMED_CACHE": str(tmp / "cache")}
    old = {k: os.environ.get(k) for k in env}
    mathjax_cache = Path(old["RLMED_CACHE"] or "~/.cache/rlmedbook").expanduser() / "mathjax"
    if mathjax_cache.is_dir():
        shutil.copytree(mathjax_cache, tmp / "cache" / "mathjax")
    os.environ.update(env)
    try:
        records = book_mod.execute_runs("smoke", book)
        index = book_mod.build_html(book, strict=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert records[0]["status"] == "complete"
    page = (index.parent / "runs" / "newmethod" / "newmethod.html").read_text()
    assert "<table" in page and "<img" in page and "Reproduce" in page


@pytest.mark.slow
def test_unchanged_run_is_not_redone(built_book):
    first = built_book["records"][0]
    again = run_notebook(ROOT / first["notebook"], ROOT / first["params_file"], "smoke")
    assert again["started_utc"] == first["started_utc"]


@pytest.mark.slow
def test_pages_have_tables_and_figures(built_book):
    html = built_book["index"].parent
    for name in ("baselines", "nas"):
        page = (html / "runs" / name / f"{name}.html").read_text()
        assert "<table" in page and "<img" in page and "±" in page, name
    summary_page = (html / "runs" / "summary" / "summary.html").read_text()   # the leaderboard, with numbers
    assert "Leaderboard: test metrics" in summary_page and "±" in summary_page and "ECE" in summary_page
    for glued in ("differences", "findings", "reproducibility"):   # numbers glued from the summary and provenance runs
        assert "pasted-text" in (html / f"{glued}.html").read_text(), glued
    assert "cdn.jsdelivr" not in (html / "intro.html").read_text()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served(built_book):
    html = built_book["index"].parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


CHROMIUM = "/usr/bin/chromium"
#: Longest output block a page may show uncollapsed, in lines (longer ones carry hide-output / scroll-output).
MAX_SHOWN_OUTPUT_LINES = 40
#: In the browser: the page height, the longest output block shown (in lines, as rendered: a
#: collapsed one shows none, a scroll box shows its own height) and every table that sticks out of
#: the text column with no scroll box around it.
PAGE_CHECKS_JS = """() => {
  const article = document.querySelector('article') || document.body;
  const shown = el => { const r = el.getBoundingClientRect(); return el.offsetParent !== null && r.height > 0 && r.width > 0; };
  let longest = 0, longestText = '';
  for (const pre of article.querySelectorAll('div.cell_output pre')) {
    if (!shown(pre)) continue;
    let h = pre.getBoundingClientRect().height;
    for (let a = pre.parentElement; a && a !== article; a = a.parentElement) {
      if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowY)) h = Math.min(h, a.getBoundingClientRect().height);
    }
    const lines = Math.round(h / (parseFloat(getComputedStyle(pre).lineHeight) || 16));
    if (lines > longest) { longest = lines; longestText = pre.innerText.slice(0, 160); }
  }
  const right = article.getBoundingClientRect().right;
  const overflow = [];
  for (const t of article.querySelectorAll('table')) {
    if (!shown(t)) continue;
    let scrolls = false;
    for (let a = t.parentElement; a && a !== article; a = a.parentElement) {
      const ox = getComputedStyle(a).overflowX;
      if ((ox === 'auto' || ox === 'scroll') && a.getBoundingClientRect().right <= right + 1) { scrolls = true; break; }
    }
    const r = t.getBoundingClientRect();
    if (!scrolls && r.right > right + 1) overflow.push(`${Math.round(r.width)} px table sticks out ${Math.round(r.right - right)} px: ` + t.innerText.slice(0, 80));
  }
  return {height: document.documentElement.scrollHeight, longest, longestText, overflow};
}"""
# notebook -> (tables, rendered figures) its page must show at least
FIGURES_AND_TABLES = {"baselines": (2, 2), "nas": (5, 4), "provenance": (1, 0),
                      "summary": (8, 3)}   # leaderboard, controls, calibration, robustness...; reliability, robustness, RL curves
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _playwright():
    """playwright's sync API, with Debian's chromium; under CI a missing browser is a failure, else a skip."""
    if os.environ.get("CI"):
        import playwright.sync_api  # noqa: F401
        assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing under CI: the Makefile's browser target must install it"
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    return playwright


def _stay_local(page, served: str, errors: list) -> None:
    """Abort and report every request that would leave the machine (the book must be self-contained)."""
    def route(r):
        url = r.request.url
        if url.startswith((served, "data:", "blob:", "about:")):
            r.continue_()
        else:
            errors.append(f"request leaving the machine: {url}")
            r.abort()
    page.route("**/*", route)


@pytest.mark.slow
def test_every_page_loads_in_headless_chromium(served, built_book, tmp_path):
    playwright = _playwright()
    pages = toc_files(ROOT / "book")
    problems, heights = [], {}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        for name in pages:
            page = browser.new_page()
            errors = []
            page.on("console", lambda m, e=errors: e.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda exc, e=errors: e.append(f"page error: {exc}"))
            page.on("requestfailed", lambda r, e=errors: e.append(f"request failed: {r.url}"))
            page.on("response", lambda r, e=errors: e.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            _stay_local(page, served, errors)
            # index.html is only a redirect to the root page (and has no icon link, so Chromium
            # may ask for /favicon.ico there); the pages themselves are checked.
            url = f"{served}/{name}.html"
            response = page.goto(url, wait_until="networkidle")
            if response is None or response.status != 200:
                problems.append(f"{name}: HTTP {response.status if response else 'none'}")
            title = page.locator("h1").first.inner_text()
            if not title.strip():
                problems.append(f"{name}: no title")
            placeholder = name.startswith("runs/") and book_mod.is_placeholder(built_book["root"] / f"{name}.ipynb")
            if placeholder and "python -m helpers.run" not in page.locator("article").inner_text():
                problems.append(f"{name}: placeholder page without the command that makes it")
            if name.startswith("runs/") and not placeholder:
                want_tables, want_figs = FIGURES_AND_TABLES.get(name.split("/")[1], (1, 0))
                if page.locator("table").count() < want_tables:
                    problems.append(f"{name}: expected {want_tables}+ tables")
                ok = page.evaluate("() => Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
                if ok < want_figs:
                    problems.append(f"{name}: expected {want_figs}+ rendered figures, {ok} loaded")
            if name == "runs/summary/summary":   # the leaderboard is there, with numbers
                board = page.locator("table", has=page.locator("caption", has_text="Leaderboard")).first
                if not board.count() or not re.search(r"\b[01]\.\d{3}\b", board.inner_text()):
                    problems.append(f"{name}: no leaderboard table with numbers")
            if name == "intro":
                page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=10000)
                page.evaluate("() => MathJax.startup.promise")
                if page.locator("mjx-container").count() == 0:
                    problems.append("intro: MathJax did not typeset the formula")
            if page.evaluate("() => !!(window.MathJax && MathJax.startup && MathJax.startup.promise)"):
                page.evaluate("() => MathJax.startup.promise")
                # TeX that MathJax shows literally (e.g. \_ inside \text{}) leaves a backslash in the output
                literal = page.evaluate("() => Array.from(document.querySelectorAll('mjx-assistive-mml'))"
                                        ".map(e => e.textContent).filter(t => t.includes('\\\\'))")
                problems += [f"{name}: formula shown with a literal backslash: {t!r}" for t in literal]
            checks = page.evaluate(PAGE_CHECKS_JS)
            heights[name] = checks["height"]
            if checks["longest"] > MAX_SHOWN_OUTPUT_LINES:
                problems.append(f"{name}: an output block of {checks['longest']} lines is shown uncollapsed "
                                f"(more than {MAX_SHOWN_OUTPUT_LINES}): {checks['longestText']!r}")
            problems += [f"{name}: {t}" for t in checks["overflow"]]
            if name.startswith("runs/"):
                page.screenshot(path=str(tmp_path / f"{name.split('/')[1]}.png"), full_page=False)
            problems += [f"{name}: {e}" for e in errors]
            page.close()
        browser.close()
    (built_book["root"] / "page_heights.json").write_text(json.dumps(heights, indent=1))
    print("page heights (px):", heights)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("query, page_name", [("REINFORCE", "runs/nas/nas"), ("APGA", "runs/apga/apga"),
                                              ("leaderboard", "runs/summary/summary")])
def test_the_search_page_finds_a_method_by_name(served, built_book, query, page_name):
    playwright = _playwright()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        errors = []
        _stay_local(page, served, errors)
        page.goto(f"{served}/search.html?q={query}", wait_until="networkidle")
        page.wait_for_function("() => document.querySelectorAll('#search-results ul.search li').length > 0",
                               timeout=20000)
        hits = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(a => a.getAttribute('href'))")
        browser.close()
    assert not errors, errors
    assert any(h and h.split("?")[0].split("#")[0].endswith(f"{page_name}.html") for h in hits), hits


def _notebook_for(params_file: Path) -> Path:
    """Params files are named after their notebook: ``nas.yaml``, ``nas_reference.yaml`` -> nas."""
    names = sorted((p.stem for p in (ROOT / "notebooks").glob("*.ipynb")), key=len, reverse=True)
    stem = params_file.stem
    match = next((n for n in names if stem == n or stem.startswith(n + "_")), None)
    assert match, f"{params_file.name} names no notebook (expected <notebook>.yaml or <notebook>_<run>.yaml)"
    return ROOT / "notebooks" / f"{match}.ipynb"


@pytest.mark.parametrize("params_file", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_resolves_on_every_profile(params_file):
    if params_file.name == "global.yaml":
        return
    from helpers.run import resolve
    for profile in config.PROFILES:
        resolved = resolve(_notebook_for(params_file), params_file, profile)
        assert resolved  # unknown keys would have raised ParamsError naming them


@pytest.mark.slow
def test_index_redirects_to_the_root_page(built_book):
    index = (built_book["index"]).read_text()
    assert 'http-equiv="Refresh"' in index and "intro.html" in index


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", sorted((ROOT / "notebooks").rglob("*.ipynb")), ids=lambda p: p.stem)
def test_run_all_as_in_jupyterlab(nb_path, tmp_path, monkeypatch):
    """A template run as it stands (JupyterLab's Run All: its own folder as cwd, progress as bars,
    no runner): no error, nothing on stderr (a missing ipywidgets prints TqdmWarning there)."""
    import nbclient
    import nbformat

    _shared_data()
    for var in ("RLMED_PROGRESS", "RLMED_LOG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RLMED_BOOK", str(tmp_path / "book"))
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RLMED_DATA", str(config.data_root()))
    nb = nbformat.read(nb_path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}}).execute()
    bad = [(i, o.get("name") or o.get("ename"), (o.get("text") or o.get("evalue") or "")[:300])
           for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs
           if o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")]
    assert not bad, bad
