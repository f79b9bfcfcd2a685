"""The book's run list: names, pinned profiles, on-demand runs (kept or placeholder), the run box."""
from __future__ import annotations

import json

import nbformat
import pytest

from helpers import book as book_mod
from helpers import config
from helpers.run import banner, command_for


def _book(tmp_path, runs_yaml: str):
    (tmp_path / "_runs.yml").write_text(runs_yaml)
    return tmp_path


ON_DEMAND = """
runs:
  - notebook: notebooks/nas.ipynb
    params: params/nas.yaml
    name: nas_full
    profile: full
    on_demand: "about 2 h"
    title: "Full profile"
"""


def test_planned_runs_name_defaults_to_params_stem(tmp_path):
    book = _book(tmp_path, "runs:\n  - notebook: notebooks/nas.ipynb\n    params: params/nas_reference.yaml\n")
    assert book_mod.planned_runs(book)[0]["name"] == "nas_reference"
    assert book_mod.planned_runs(_book(tmp_path, ON_DEMAND))[0]["name"] == "nas_full"


def test_planned_runs_refuses_unknown_keys(tmp_path):
    book = _book(tmp_path, "runs:\n  - notebook: notebooks/nas.ipynb\n    profle: full\n")
    with pytest.raises(config.ParamsError, match="profle"):
        book_mod.planned_runs(book)


def test_on_demand_run_without_results_gets_a_placeholder(tmp_path, capsys):
    book = _book(tmp_path, ON_DEMAND)
    # an empty published folder: this run is published in the repository (book/published/nas/nas_full)
    assert book_mod.execute_runs("smoke", book, published=tmp_path / "published") == []   # nothing executed
    page = tmp_path / "runs" / "nas" / "nas_full.ipynb"
    assert book_mod.is_placeholder(page)
    text = nbformat.read(page, as_version=4).cells[0].source
    assert text.startswith("# Full profile")
    assert "python -m helpers.run notebooks/nas.ipynb params/nas.yaml --profile full --name nas_full" in text
    assert "[todo]" in capsys.readouterr().out


def test_finished_on_demand_run_is_kept_not_executed(tmp_path):
    book = _book(tmp_path, ON_DEMAND)
    page = tmp_path / "runs" / "nas" / "nas_full.ipynb"
    page.parent.mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# real")]), page)
    before = page.read_text()
    res = tmp_path / "results" / "nas" / "nas_full"
    res.mkdir(parents=True)
    record = {"status": "complete", "profile": "full", "run_name": "nas_full", "started_utc": "then"}
    (res / "provenance.json").write_text(json.dumps(record))
    assert book_mod.execute_runs("smoke", book) == [record]
    assert page.read_text() == before and not book_mod.is_placeholder(page)


def test_unfinished_on_demand_run_is_not_shown_as_a_result(tmp_path):
    book = _book(tmp_path, ON_DEMAND)
    res = tmp_path / "results" / "nas" / "nas_full"
    res.mkdir(parents=True)
    (res / "provenance.json").write_text(json.dumps({"status": "running"}))
    book_mod.execute_runs("smoke", book, published=tmp_path / "published")   # none published
    assert book_mod.is_placeholder(tmp_path / "runs" / "nas" / "nas_full.ipynb")


def test_command_names_the_run_only_when_it_differs_from_the_params_stem():
    rec = {"notebook": "notebooks/nas.ipynb", "params_file": "params/nas.yaml", "profile": "full", "run_name": "nas"}
    assert command_for(rec) == "python -m helpers.run notebooks/nas.ipynb params/nas.yaml --profile full"
    assert command_for({**rec, "run_name": "nas_full"}).endswith("--profile full --name nas_full")


def test_banner_states_run_profile_seeds_commit_and_command():
    rec = {"notebook": "notebooks/nas.ipynb", "params_file": "params/nas.yaml", "profile": "quick", "run_name": "nas",
           "seeds": [0, 1, 2], "git": {"commit": "0123456789abcdef", "dirty": True}, "started_utc": "2026-01-01",
           "device": {"cpu_count": 2, "cuda": False}, "wall_s": 12.3}
    text = banner(rec)
    for part in ("**nas**", "**quick**", "seeds 0, 1, 2", "`0123456`", "uncommitted", "2 CPU cores", "took 12 s",
                 "python -m helpers.run notebooks/nas.ipynb params/nas.yaml --profile quick"):
        assert part in text, part
    assert "on GPU NVIDIA H200" in banner({**rec, "device": {"cuda": True, "gpu": "NVIDIA H200", "cpu_count": 16}})


def test_a_resumed_run_counts_the_executions_it_resumed_from(tmp_path):
    """A killed execution (no wall time in its record) is timed to its last write; the banner and the
    provenance rows give the total."""
    import os
    from datetime import datetime

    from helpers.run import _walls, earlier_executions

    killed = {"started_utc": "2026-01-01T10:00:00+00:00", "status": "running"}
    (tmp_path / "units").mkdir()
    unit = tmp_path / "units" / "u.json"
    unit.write_text("{}")
    t0 = datetime.fromisoformat(killed["started_utc"]).timestamp()
    os.utime(unit, (t0 + 600, t0 + 600))
    first = earlier_executions(killed, tmp_path)
    assert first == [{"started_utc": killed["started_utc"], "status": "running", "wall_s": 600.0}]
    failed = {"started_utc": "2026-01-01T11:00:00+00:00", "status": "failed", "wall_s": 30.0, "earlier": first}
    both = earlier_executions(failed, tmp_path)
    assert [e["wall_s"] for e in both] == [600.0, 30.0]
    assert earlier_executions({}, tmp_path) == []
    assert earlier_executions({**failed, "status": "complete"}, tmp_path) == []   # made again: counted afresh
    forced = earlier_executions({**failed, "status": "complete"}, tmp_path, forced=True)   # --force reuses its units
    assert forced == [*first, {"started_utc": failed["started_utc"], "status": "complete", "wall_s": 30.0}]
    rec = {"notebook": "notebooks/nas.ipynb", "params_file": "params/nas.yaml", "profile": "full", "run_name": "nas",
           "seeds": [0], "git": {"commit": "0123456789"}, "device": {"cpu_count": 2}, "earlier": both,
           **_walls(both, 70.0)}
    assert rec["wall_s"] == 70.0 and rec["wall_s_total"] == 700.0
    assert "took 70 s (resumed from 2 earlier executions: 700 s in all)" in banner(rec)
    assert _walls([], 5.0) == {"wall_s": 5.0}


def test_busy_cpus_are_measured_warned_about_and_shown_in_the_run_box(tmp_path):
    """/proc/stat's busy share over an interval; a warning only when torch's threads would not fit
    beside the busy cores; the run box says when a run's time was made on busy CPUs."""
    from helpers.repro import _cpu_ticks, contention_warning, cpu_busy

    assert _cpu_ticks("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4") == (150, 1000)
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 0 900 0 0 0 0 0 0\n")
    assert cpu_busy(0.0, stat) is None                         # no time passed between the reads
    assert cpu_busy(0.0, tmp_path / "missing") is None
    assert contention_warning(None) is None and contention_warning(0.1, 2, 2) is None
    assert contention_warning(0.5, 1, 2) is None               # one busy core, one thread: they fit
    text = contention_warning(0.5, 2, 2)
    assert "1.0 of this machine's 2 CPU cores" in text and "OMP_NUM_THREADS=1" in text
    assert contention_warning(0.95, 1, 2) is not None
    rec = {"notebook": "notebooks/nas.ipynb", "params_file": "params/nas.yaml", "profile": "quick", "run_name": "nas",
           "seeds": [0], "git": {"commit": "0123456789"}, "device": {"cpu_count": 2}, "wall_s": 12.0}
    assert "reads slow" not in banner({**rec, "cpu_busy_at_start": 0.6})        # warned or not: one rule, the runner's
    assert "other work held 60% of the CPU when it started" in banner({**rec, "cpu_busy_at_start": 0.6,
                                                                        "cpu_contended": True})


def test_placeholder_without_a_pinned_profile_names_the_books_profile(tmp_path):
    book = _book(tmp_path, "runs:\n  - notebook: notebooks/nas.ipynb\n    params: params/nas.yaml\n    on_demand: long\n")
    book_mod.execute_runs("quick", book)
    text = nbformat.read(tmp_path / "runs" / "nas" / "nas.ipynb", as_version=4).cells[0].source
    assert "params/nas.yaml --profile quick\n" in text


# ---- one place for the book's metadata: the table of contents and the order come from _runs.yml ----

ROOT = config.repo_root()


def _toc_pages(spec: dict) -> list[tuple[str, str | None]]:
    out = []

    def walk(entries):
        for e in entries:
            out.append((e["file"], e.get("title")))
            walk(e.get("sections", []))

    for part in spec["parts"]:
        walk(part["chapters"])
    return out


def test_toc_is_generated_from_runs_yml_with_titles_and_parents():
    spec = book_mod.toc(ROOT / "book")
    pages = dict(_toc_pages(spec))
    for run in book_mod.planned_runs(ROOT / "book"):
        page = f"runs/{run['notebook'].split('/')[-1][:-6]}/{run['name']}"
        assert page in pages and pages[page] == run.get("title"), page
    nas = next(c for c in spec["parts"][0]["chapters"] if c["file"] == "runs/nas/nas")
    assert [s["file"] for s in nas["sections"]] == ["runs/nas/nas_reference", "runs/nas/nas_full"]
    assert spec["root"] == "intro" and ("reproducibility", None) in _toc_pages(spec)


def test_toc_yml_is_a_build_product():
    """_toc.yml is written at every build from _runs.yml, so no hand-edited copy can disagree with it."""
    import subprocess

    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "book/_toc.yml"], cwd=ROOT).returncode == 0
    assert ignored, "book/_toc.yml must be listed in .gitignore (helpers.book writes it)"


def test_score_files_and_weights_stay_out_of_git_even_in_a_stash():
    """Per-sample arrays hold dataset labels and indices: binary files stay out of git everywhere
    (a stash restored on a clone redoes the units whose score files it lacks, helpers.book.unstash)."""
    import subprocess

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    for path in ("book/partial/apga/some_run/scores/flag=x__seed=0.npz",
                 "book/results/apga/some_run/scores/flag=x__seed=0.npz",
                 "book/partial/apga/some_run/models/flag=x__seed=0.pt"):
        assert ignored(path), path
    tracked = subprocess.run(["git", "ls-files", "*.npz", "*.pt", "*.npy"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert not tracked


def test_write_toc(tmp_path):
    _book(tmp_path, "root: intro\nparts:\n  - caption: Methods\nruns:\n  - notebook: notebooks/nas.ipynb\n"
                    "    params: params/nas.yaml\n    title: NAS\n")
    text = book_mod.write_toc(tmp_path).read_text()
    assert text.startswith("# Generated") and "runs/nas/nas" in text and "title: NAS" in text


NEEDS = """
runs:
  - notebook: notebooks/provenance.ipynb
    params: params/provenance.yaml
    needs: "*"
  - notebook: notebooks/nas.ipynb
    params: params/nas.yaml
    needs: [baselines]
  - notebook: notebooks/baselines.ipynb
    params: params/baselines.yaml
"""


def test_runs_are_ordered_by_what_they_need(tmp_path):
    names = [r["name"] for r in book_mod.planned_runs(_book(tmp_path, NEEDS))]
    assert names == ["baselines", "nas", "provenance"]
    assert [r["name"] for r in book_mod.planned_runs(tmp_path, ordered=False)] == ["provenance", "nas", "baselines"]


def test_the_books_nas_runs_come_after_the_baselines_they_read():
    names = [r["name"] for r in book_mod.planned_runs(ROOT / "book")]
    assert names.index("baselines") < min(names.index(n) for n in ("nas", "nas_reference", "nas_full"))
    assert names[-1] == "provenance"


def test_needs_naming_no_run_or_a_cycle_is_refused(tmp_path):
    with pytest.raises(config.ParamsError, match="'baseline' names no run"):
        book_mod.planned_runs(_book(tmp_path, "runs:\n  - notebook: notebooks/nas.ipynb\n    params: params/nas.yaml\n"
                                               "    needs: [baseline]\n"))
    cycle = ("runs:\n  - notebook: notebooks/nas.ipynb\n    params: params/nas.yaml\n    needs: [baselines]\n"
             "  - notebook: notebooks/baselines.ipynb\n    params: params/baselines.yaml\n    needs: [nas]\n")
    with pytest.raises(config.ParamsError, match="cycle"):
        book_mod.planned_runs(_book(tmp_path, cycle))


def test_a_new_chapter_needs_only_a_notebook_a_params_file_and_one_runs_entry(tmp_path):
    """The method template copied as a new chapter: the table of contents, the run order and the
    params resolution pick it up from its one _runs.yml entry (the slow test also builds it)."""
    import shutil

    from helpers.run import resolve

    nb = tmp_path / "notebooks" / "newmethod.ipynb"
    nb.parent.mkdir()
    shutil.copy(ROOT / "notebooks" / "templates" / "method.ipynb", nb)
    params = tmp_path / "newmethod.yaml"
    params.write_text("seeds: [0]\n")
    book = tmp_path / "book"
    book.mkdir()
    (book / "_runs.yml").write_text((ROOT / "book" / "_runs.yml").read_text()
                                    + f"  - notebook: {nb}\n    params: {params}\n")
    pages = [f for f, _ in _toc_pages(book_mod.toc(book))]
    assert "runs/newmethod/newmethod" in pages
    assert pages.index("runs/newmethod/newmethod") < pages.index("reproducibility")   # in the first part: Methods
    order = [r["name"] for r in book_mod.planned_runs(book)]
    assert order.index("newmethod") < order.index("summary") and order[-1] == "provenance"   # before the pages reading all runs
    assert resolve(nb, params, "smoke")["seeds"] == [0]


# ---- published runs: tracked, small, shown where there is no local run ----

PUBLISHABLE = ON_DEMAND.replace("name: nas_full", "name: nas_ref")


def _finished_run(book, name="nas_ref"):
    """A finished run on disk, as the runner leaves it (a page with its banner, a results folder)."""
    page = book / "runs" / "nas" / f"{name}.ipynb"
    page.parent.mkdir(parents=True, exist_ok=True)
    record = {"notebook": "notebooks/nas.ipynb", "params_file": "params/nas.yaml", "run_name": name, "profile": "full",
              "seeds": [0], "status": "complete", "started_utc": "then", "git": {"commit": "abc1234def"}, "wall_s": 9.0}
    cells = [nbformat.v4.new_markdown_cell("# NAS"),
             nbformat.v4.new_markdown_cell(banner(record), metadata={"tags": ["run-banner"]})]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), page)
    res = book / "results" / "nas" / name
    for rel, data in {"provenance.json": json.dumps(record), "params.yaml": "profile: full\n", "metrics.csv": "k,v\n",
                      "units/strategy=rl__seed=0.json": "{}", "history/strategy=rl__seed=0.csv": "episode\n1\n",
                      "tables/phase_mean_std.csv": "a\n1\n", "figures/reward_curves.png": "png",
                      "figures/reward_curves.svg": "<svg/>", "logs/train.log": "epoch 1\n",
                      "scores/u.npz": "x", "champions/scores/c.npz": "x", "champions/units/c.json": "{}",
                      "big.csv": "x" * (book_mod.PUBLISH_MAX_BYTES + 1)}.items():
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / rel).write_text(data)
    return page, res


def test_publish_copies_the_page_and_small_results_only(tmp_path, capsys):
    book = _book(tmp_path, PUBLISHABLE)
    _finished_run(book)
    dest = tmp_path / "published"
    stashed = tmp_path / "partial" / "nas" / "nas_ref"   # its carry-over from another machine
    (stashed / "units").mkdir(parents=True)
    (stashed / "stash.json").write_text("{}")
    target = book_mod.publish("nas_ref", book, dest, derive=False)   # fake units: nothing to rebuild
    assert not stashed.exists()                                       # spent once the run is published
    assert target == dest / "nas" / "nas_ref"
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert files == {"page.ipynb", "provenance.json", "params.yaml", "metrics.csv", "units/strategy=rl__seed=0.json",
                     "history/strategy=rl__seed=0.csv", "tables/phase_mean_std.csv", "figures/reward_curves.png",
                     "logs/train.log", "champions/units/c.json"}
    page = nbformat.read(target / "page.ipynb", as_version=4)
    assert "book/published/nas/nas_ref/" in page.cells[1].source and "book/results/" not in page.cells[1].source
    assert page.metadata["rlmed"]["published"]["left_out"] == [f"big.csv ({(book_mod.PUBLISH_MAX_BYTES + 1) / 1e6:.1f} MB)"]
    assert "[pub ]" in capsys.readouterr().out
    nbformat.write(page, book / "runs" / "nas" / "nas_ref.ipynb")    # a published copy shown in the book
    with pytest.raises(book_mod.RunError, match="published copy"):   # is not published again
        book_mod.publish("nas_ref", book, tmp_path / "elsewhere", derive=False)


def test_publish_refuses_a_page_over_its_cap(tmp_path):
    book = _book(tmp_path, PUBLISHABLE)
    page, _ = _finished_run(book)
    nb = nbformat.read(page, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("x" * (book_mod.PUBLISH_PAGE_MAX_BYTES + 1)))
    nbformat.write(nb, page)
    with pytest.raises(book_mod.RunError, match="over the 5 MB"):
        book_mod.publish("nas_ref", book, tmp_path / "published", derive=False)
    assert not (tmp_path / "published" / "nas" / "nas_ref").exists()


def test_publish_refuses_an_unfinished_run(tmp_path):
    _book(tmp_path, PUBLISHABLE)
    with pytest.raises(book_mod.RunError, match="no finished run"):
        book_mod.publish("nas_ref", tmp_path, tmp_path / "published")
    with pytest.raises(config.ParamsError, match="names no run"):
        book_mod.publish("nope", tmp_path, tmp_path / "published")


def test_on_demand_run_without_a_local_one_is_shown_from_published(tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    _book(made, PUBLISHABLE)
    _finished_run(made)
    dest = tmp_path / "published"
    book_mod.publish("nas_ref", made, dest, derive=False)
    fresh = tmp_path / "fresh"          # a fresh clone: no book/runs, no book/results
    fresh.mkdir()
    _book(fresh, PUBLISHABLE)
    records = book_mod.execute_runs("smoke", fresh, published=dest)
    page = fresh / "runs" / "nas" / "nas_ref.ipynb"
    assert not book_mod.is_placeholder(page) and records[0]["status"] == "complete"
    assert nbformat.read(page, as_version=4).metadata["rlmed"]["published"]["commit"] == "abc1234def"
    assert not (fresh / "results").exists()          # nothing pretends to be a local run
    assert len(book_mod.published_provenance(dest)) == 1


def test_published_runs_hold_no_weights_data_or_per_sample_arrays():
    folder = book_mod.published_dir()
    if not folder.is_dir():
        pytest.skip("nothing published yet")
    def allowed(p):   # the final models' per-sample test scores are published (helpers.book.publish)
        return p.suffix not in book_mod.UNPUBLISHED_SUFFIXES or (p.suffix == ".npz" and "scores" in p.parts)

    def cap(p):
        return book_mod.PUBLISH_PAGE_MAX_BYTES if p.name == "page.ipynb" else book_mod.PUBLISH_MAX_BYTES

    files = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()]
    bad = [p for p in files if not allowed(p) or (folder / p).stat().st_size > cap(p)]
    assert not bad
    for run in folder.glob("*/*"):
        assert sum(p.stat().st_size for p in run.rglob("*.npz")) <= book_mod.PUBLISH_SCORES_MAX_BYTES
    for page in folder.glob("*/*/page.ipynb"):
        assert nbformat.read(page, as_version=4).metadata["rlmed"]["published"]


def test_stashed_runs_hold_no_weights_or_checkpoints():
    folder = book_mod.partial_dir()
    if not folder.is_dir():
        pytest.skip("nothing stashed")
    files = [p for p in folder.rglob("*") if p.is_file()]
    bad = [p for p in files if set(p.relative_to(folder).parts) & book_mod.UNSTASHED_DIRS
           or p.suffix in {".pt", ".pth", ".ckpt"} or p.stat().st_size > book_mod.STASH_MAX_BYTES]
    assert not bad
    for run in folder.glob("*/*"):
        assert (run / "stash.json").is_file() and (run / "units").is_dir()


def test_every_build_rerenders_every_page_so_glued_numbers_are_never_stale(tmp_path, monkeypatch):
    """Hand-written pages glue numbers from the runs' notebooks, a dependency Sphinx does not track:
    an incremental build kept the previous build's numbers there, so every build renders all pages."""
    import subprocess

    calls = []
    monkeypatch.setattr(book_mod, "ensure_mathjax", lambda folder: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    book_mod.build_html(_book(tmp_path, "root: intro\nruns: []\n"))
    assert len(calls) == 1 and calls[0][1] == "build" and "--all" in calls[0]


def test_published_banner_claims_only_what_reaches_git():
    """A published page says what its folder holds on a clone: score files (.npz) never reach git."""
    import subprocess

    from helpers.book import _published_banner

    text = _published_banner("results in `book/results/apga/apga_full/`.", "apga", "apga_full")
    assert "`book/published/apga/apga_full/`" in text and "score files stay on the machine" in text
    assert "test scores" not in text
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index",
                           "book/published/apga/apga_full/scores/x.npz"], cwd=ROOT).returncode == 0
