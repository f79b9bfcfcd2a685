"""The page helper: tables that read like a book's, the log file, the closing cell; the runner's tidy-up."""
from __future__ import annotations

import os

import nbformat
import pandas as pd
import pytest

from helpers import page as page_mod
from helpers.run import LONG_OUTPUT_LINES, tidy_page


@pytest.mark.parametrize("raw, shown", [("test/acc", "test ACC"), ("val_auc", "val AUC"), ("train_s", "train time (s)"),
                                        ("params", "parameters"), ("mean_params", "mean parameters"),
                                        ("rl/entropy", "entropy"), ("best_epoch", "best epoch"), ("n", "n")])
def test_human_column_names(raw, shown):
    assert page_mod.human_name(raw) == shown


def test_table_formats_numbers_and_drops_the_index():
    df = pd.DataFrame({"model": ["cnn", "seresnet"], "params": [94315, 1234567], "train_s": [12.345, 0.5],
                       "test/acc": [0.91234, 0.5], "mean_params": [23456.7, 999.5]}, index=[7, 9])
    t = page_mod.table(df, digits=3)
    shown = t.formatted()
    assert list(shown.columns) == ["model", "parameters", "train time (s)", "test ACC", "mean parameters"]
    assert shown.iloc[1].tolist() == ["seresnet", "1,234,567", "0.5", "0.500", "999.500"]
    assert shown.iloc[0, 4] == "23,457"
    html = t._repr_html_()
    assert 'overflow-x:auto' in html and "<th" in html and ">7<" not in html and ">9<" not in html
    assert "7" not in repr(t).splitlines()[1].split()[0]     # the text form has no index either
    assert t.data is df                                       # the numbers themselves are untouched


def test_environment_is_a_small_table():
    record = {"git": {"commit": "0123456789abcdef", "dirty": True}, "versions": {"python": "3.11", "torch": "2.1"},
              "device": {"cpu_count": 2, "processor": "x86_64", "platform": "Linux"}}
    shown = page_mod.environment_table(record).formatted()
    assert shown.iloc[:, 0].tolist() == ["commit", "device", "platform", "packages"]
    assert shown.iloc[0, 1] == "0123456789 (uncommitted changes)" and shown.iloc[3, 1] == "python 3.11, torch 2.1"


def test_open_page_points_the_training_log_at_the_results_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(page_mod.LOG_ENV, raising=False)
    page = page_mod.open_page("baselines", "r1", tmp_path / "res")
    assert page.recorder.root == tmp_path / "res"
    assert os.environ[page_mod.LOG_ENV] == str(tmp_path / "res" / "logs" / "train.log")
    page.log("unit", 1, "done")
    assert page.log_file.read_text().splitlines()[-1] == "unit 1 done"
    monkeypatch.delenv(page_mod.LOG_ENV)


def test_tidy_page_collapses_parameters_and_long_outputs():
    long = nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text="".join(f"line {i}\n" for i in range(LONG_OUTPUT_LINES + 1)))])
    short = nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output("stream", name="stdout", text="ok\n")])
    injected = nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["injected-parameters"]})
    nb = nbformat.v4.new_notebook(cells=[injected, long, short])
    tidy_page(nb)
    assert "hide-input" in injected.metadata["tags"]
    assert "hide-output" in long.metadata["tags"] and "hide-output" not in short.metadata.get("tags", [])


def test_columns_common_to_every_row_go_to_the_caption():
    df = pd.DataFrame({"a": ["rl", "rl_masked"], "metric": ["reward", "reward"], "last": [4, 4], "p": [0.5, 0.25]})
    t = page_mod.table(df, caption="Paired tests", common=True)
    assert list(t.formatted().columns) == ["a", "p"]
    assert t.caption == "Paired tests; metric: reward; last: 4"
    assert "<caption>Paired tests; metric: reward; last: 4</caption>" in t._repr_html_()
    assert list(page_mod.table(df).formatted().columns) == ["a", "metric", "last", "p"]   # only when asked


def test_open_page_sets_torch_threads_from_a_threads_param(tmp_path):
    import torch

    from helpers.page import open_page

    before = torch.get_num_threads()
    try:
        open_page("nb", "t", tmp_path / "r", params={"threads": 1})
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        open_page("nb", "t", tmp_path / "r", params={"threads": None})   # None: left as it is
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_figures_show_on_the_page_even_after_a_helper_chose_agg():
    """In a kernel, a module that called matplotlib.use("Agg") at import would leave figures saved but
    never drawn on the page; inline_figures (called by open_page) switches back. Outside a kernel it
    does nothing."""
    from nbclient import NotebookClient

    assert page_mod.inline_figures() is False
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt'),
        nbformat.v4.new_code_cell("from helpers.page import inline_figures\nprint(inline_figures())"),
        nbformat.v4.new_code_cell("fig, ax = plt.subplots()\nax.plot([0, 1], [1, 0])")])
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(page_mod.config.repo_root())}}).execute()
    assert nb.cells[1].outputs[0]["text"].strip() == "True"
    assert any("image/png" in o.get("data", {}) for o in nb.cells[2].outputs)
