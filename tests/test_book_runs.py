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
    assert book_mod.execute_runs("smoke", book) == []   # nothing executed
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
    book_mod.execute_runs("smoke", book)
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


def test_placeholder_without_a_pinned_profile_names_the_books_profile(tmp_path):
    book = _book(tmp_path, "runs:\n  - notebook: notebooks/nas.ipynb\n    params: params/nas.yaml\n    on_demand: long\n")
    book_mod.execute_runs("quick", book)
    text = nbformat.read(tmp_path / "runs" / "nas" / "nas.ipynb", as_version=4).cells[0].source
    assert "params/nas.yaml --profile quick\n" in text
