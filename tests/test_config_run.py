"""helpers.config (params merging), helpers.run (the papermill runner) and helpers.results (Recorder)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import config, repro, results, run
from helpers.config import ParamsError, check_keys, merge_params
from helpers.results import Recorder, atomic_write_bytes, atomic_write_text, unit_name


# ---- merging -------------------------------------------------------------------------------
DEFAULTS = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "learning_rate": 0.1, "nested": {"x": [1, 2]},
            "profile": "smoke", "run_name": "default", "results_dir": None}


def test_merge_order():
    global_layer = {"a": 1, "b": 1, "c": 1, "d": 1, "undeclared": 7}
    profile_layer = {"b": 2, "c": 2, "d": 2}
    run_params = {"c": 3, "d": 3, "profiles": {"quick": {"d": 4}, "smoke": {"d": 99}}}
    out = merge_params(DEFAULTS, run_params, "quick", [global_layer, profile_layer])
    assert (out["a"], out["b"], out["c"], out["d"], out["e"]) == (1, 2, 3, 4, 0)
    assert "undeclared" not in out and "profiles" not in out
    out = merge_params(DEFAULTS, run_params, "smoke", [global_layer, profile_layer])
    assert out["d"] == 99
    out = merge_params(DEFAULTS, run_params, "full", [global_layer, profile_layer])
    assert out["d"] == 3  # no entry for this profile: the run's top level wins
    out = merge_params(DEFAULTS, None, None, [])
    assert out == DEFAULTS


def test_merge_does_not_alias_inputs():
    run_params = {"nested": {"x": [5]}}
    out = merge_params(DEFAULTS, run_params, "quick")
    out["nested"]["x"].append(6)
    assert run_params == {"nested": {"x": [5]}}
    out = merge_params(DEFAULTS, {}, "quick")
    out["nested"]["x"].append(3)
    assert DEFAULTS["nested"] == {"x": [1, 2]}


def test_unknown_key_names_it_suggests_and_lists():
    with pytest.raises(ParamsError) as err:
        merge_params(DEFAULTS, {"lerning_rate": 0.5}, "quick", source="params/x.yaml")
    msg = str(err.value)
    assert "params/x.yaml" in msg
    assert "'lerning_rate'" in msg and "did you mean 'learning_rate'" in msg
    assert "valid keys: a, b, c, d, e, learning_rate, nested" in msg
    # the runner's own keys are never set in a params file
    for key in config.RUNNER_KEYS:
        with pytest.raises(ParamsError, match=key):
            merge_params(DEFAULTS, {key: "x"}, "quick")
    with pytest.raises(ParamsError, match=r"(?s)profiles\.quick.*'zzz'"):
        merge_params(DEFAULTS, {"profiles": {"quick": {"zzz": 1}}}, "quick")
    with pytest.raises(ParamsError, match="'quik'.*did you mean 'quick'"):
        merge_params(DEFAULTS, {"profiles": {"quik": {"a": 1}}}, "quick")
    with pytest.raises(ParamsError, match="profiles"):
        merge_params(DEFAULTS, {"profiles": ["quick"]}, "quick")


def test_unknown_profile():
    with pytest.raises(ParamsError) as err:
        merge_params(DEFAULTS, {}, "medium")
    assert "'medium'" in str(err.value)
    for p in config.PROFILES:
        assert p in str(err.value)


def test_check_keys_without_close_match():
    check_keys(["a"], ["a", "b"], "src")
    with pytest.raises(ParamsError) as err:
        check_keys(["qqqq", "a"], ["alpha", "a"], "src")
    msg = str(err.value)
    assert "'qqqq'" in msg and "did you mean" not in msg and "valid keys: a, alpha" in msg


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        config.load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        config.load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        config.load_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert config.load_yaml(empty) == {}


def test_paths_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RLMED_BOOK", str(tmp_path / "book"))
    monkeypatch.setenv("RLMED_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    assert config.book_dir() == (tmp_path / "book").resolve()
    assert config.results_dir("notebooks/nb.ipynb", "r1") == (tmp_path / "book").resolve() / "results" / "nb" / "r1"
    assert config.data_root() == (tmp_path / "data").resolve()
    assert config.data_root(tmp_path / "other") == (tmp_path / "other").resolve()
    assert config.cache_dir("ck") == tmp_path / "cache" / "ck" and (tmp_path / "cache" / "ck").is_dir()
    monkeypatch.delenv("RLMED_DATA")
    fake = tmp_path / "repo"
    monkeypatch.setattr(config, "repo_root", lambda: fake)
    assert config.data_root() == Path("~/.medmnist").expanduser()   # no shared folder beside the repo
    (tmp_path / "shared" / "data" / "medmnist").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "medmnist" / "breastmnist.npz").write_bytes(b"")
    assert config.data_root() == (tmp_path / "shared" / "data" / "medmnist").resolve()
    monkeypatch.undo()
    monkeypatch.setenv("RLMED_BOOK", str(tmp_path / "book"))
    monkeypatch.delenv("RLMED_BOOK")
    assert config.book_dir() == config.repo_root() / "book"
    assert (config.repo_root() / "helpers" / "config.py").is_file()


# ---- a tiny notebook ------------------------------------------------------------------------
PARAMS_SRC = """alpha = 1
name = "x"
fail = False
items = [1, 2]
profile = "smoke"
run_name = "default"
results_dir = None"""

BODY_SRC = """import json, pathlib
if fail:
    raise ValueError("boom from the notebook")
pathlib.Path(results_dir, "out.json").write_text(json.dumps(
    {"alpha": alpha, "name": name, "items": items, "profile": profile, "run_name": run_name}))
print("alpha is", alpha)"""


def make_notebook(path: Path, params_src: str = PARAMS_SRC, body: str = BODY_SRC) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params_src)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def write_params(path: Path, mapping: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_notebook_defaults(tmp_path):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    assert run.notebook_defaults(nb) == {"alpha": 1, "name": "x", "fail": False, "items": [1, 2],
                                         "profile": "smoke", "run_name": "default", "results_dir": None}
    with pytest.raises(ParamsError, match="'alpha' must be a literal"):
        run.notebook_defaults(make_notebook(tmp_path / "expr.ipynb", "alpha = max(1, 2)"))
    with pytest.raises(ParamsError, match="only 'name = literal'"):
        run.notebook_defaults(make_notebook(tmp_path / "imp.ipynb", "import math\nalpha = 1"))
    # strings holding '==' (mask rules) parse, unlike with papermill's line-based inspection
    rules = make_notebook(tmp_path / "rules.ipynb", 'rules = {"filters == 128": "why, a = b"}\nlam = 1e-06')
    assert run.notebook_defaults(rules) == {"rules": {"filters == 128": "why, a = b"}, "lam": 1e-06}
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1")]
    nbformat.write(nb, tmp_path / "untagged.ipynb")
    with pytest.raises(ParamsError, match="parameters"):
        run.notebook_defaults(tmp_path / "untagged.ipynb")
    with pytest.raises(ParamsError, match="not found"):
        run.notebook_defaults(tmp_path / "nope.ipynb")


def test_resolve_reads_global_profile_and_run_files(tmp_path, monkeypatch):
    fake_repo = tmp_path / "repo"
    write_params(fake_repo / "params" / "global.yaml", {"alpha": 10, "name": "global"})
    write_params(fake_repo / "params" / "profiles" / "quick.yaml", {"name": "quick-profile", "items": [9]})
    monkeypatch.setattr(config, "repo_root", lambda: fake_repo)
    nb = make_notebook(tmp_path / "tiny.ipynb")
    run_file = write_params(tmp_path / "r.yaml", {"items": [3], "profiles": {"quick": {"alpha": 42}}})
    out = run.resolve(nb, run_file, "quick")
    assert out["alpha"] == 42 and out["name"] == "quick-profile" and out["items"] == [3]
    out = run.resolve(nb, run_file, "smoke")  # no smoke.yaml, no profiles.smoke entry
    assert out["alpha"] == 10 and out["name"] == "global" and out["items"] == [3]
    assert run.resolve(nb, None, "full")["alpha"] == 10
    bad = write_params(tmp_path / "bad.yaml", {"alhpa": 1})
    with pytest.raises(ParamsError) as err:
        run.resolve(nb, bad, "quick")
    assert str(bad) in str(err.value) and "did you mean 'alpha'" in str(err.value)
    # a typo in a shared layer is refused too, naming the file (no notebook declares it)
    write_params(fake_repo / "params" / "global.yaml", {"alpah": 10})
    with pytest.raises(ParamsError, match="(?s)global.yaml.*no notebook declares.*alpah.*did you mean 'alpha'"):
        run.resolve(nb, run_file, "quick")


# ---- run_notebook end to end ----------------------------------------------------------------------
@pytest.fixture
def book(tmp_path, monkeypatch):
    """RLMED_BOOK in tmp; git is not called (others work in the repository at the same time)."""
    monkeypatch.setenv("RLMED_BOOK", str(tmp_path / "book"))
    monkeypatch.setattr(repro, "git_state", lambda root=None: {"commit": "0" * 40, "dirty": False})
    return tmp_path / "book"


def test_run_notebook_end_to_end(tmp_path, book, capsys):
    nb = make_notebook(tmp_path / "nbs" / "tiny.ipynb")
    pf = write_params(tmp_path / "params" / "myrun.yaml", {"alpha": 5, "profiles": {"smoke": {"name": "s"}}})
    record = run.run_notebook(nb, pf, "smoke")
    executed = book / "runs" / "tiny" / "myrun.ipynb"
    res_dir = book / "results" / "tiny" / "myrun"
    assert executed.is_file()
    assert not executed.with_suffix(".partial.ipynb").exists()
    assert not executed.with_suffix(".failed.ipynb").exists()
    out = json.loads((res_dir / "out.json").read_text())
    assert out == {"alpha": 5, "name": "s", "items": [1, 2], "profile": "smoke", "run_name": "myrun"}
    text = (res_dir / "params.yaml").read_text()
    params = yaml.safe_load(text)
    assert params == {"alpha": 5, "name": "s", "fail": False, "items": [1, 2]}  # no runner keys
    assert "profile smoke" in text and "--name myrun" in text
    prov = json.loads((res_dir / "provenance.json").read_text())
    assert prov == json.loads(json.dumps(record))
    assert prov["status"] == "complete" and prov["run_name"] == "myrun" and prov["profile"] == "smoke"
    assert prov["params_file"] == str(pf) and prov["wall_s"] >= 0
    assert prov["git"] == {"commit": "0" * 40, "dirty": False}
    assert prov["versions"]["torch"] and prov["versions"]["python"]
    assert {"platform", "cpu_count", "cuda"} <= set(prov["device"])
    assert 0.0 <= prov["cpu_busy_at_start"] <= 1.0          # what else held the CPU when it started (Linux)
    # the executed notebook is the page: it holds the cell output and the injected params
    done = nbformat.read(executed, as_version=4)
    text = json.dumps([c.get("outputs", []) for c in done.cells])
    assert "alpha is 5" in text
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in done.cells)

    # unchanged: skipped, nothing rewritten
    mtime = executed.stat().st_mtime_ns
    capsys.readouterr()
    again = run.run_notebook(nb, pf, "smoke")
    assert "[skip]" in capsys.readouterr().out
    assert again == prov and executed.stat().st_mtime_ns == mtime

    # a changed params file runs again
    write_params(pf, {"alpha": 6})
    third = run.run_notebook(nb, pf, "smoke")
    assert third["inputs_sha256"] != prov["inputs_sha256"]
    assert json.loads((res_dir / "out.json").read_text())["alpha"] == 6
    assert executed.stat().st_mtime_ns != mtime
    assert yaml.safe_load((res_dir / "params.yaml").read_text())["alpha"] == 6


def test_unknown_key_fails_before_execution(tmp_path, book):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    pf = write_params(tmp_path / "bad.yaml", {"alpah": 3})
    with pytest.raises(ParamsError, match="did you mean 'alpha'"):
        run.run_notebook(nb, pf, "smoke")
    assert not (book / "runs").exists()
    assert not (book / "results").exists()
    # the CLI reports it and exits 2
    assert run.main([str(nb), str(pf), "--profile", "smoke"]) == 2


def test_failing_notebook(tmp_path, book):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    pf = write_params(tmp_path / "run1.yaml", {"fail": True})
    with pytest.raises(run.RunError) as err:
        run.run_notebook(nb, pf, "smoke")
    executed = book / "runs" / "tiny" / "run1.ipynb"
    failed = executed.with_suffix(".failed.ipynb")
    msg = str(err.value)
    assert str(failed) in msg and "boom from the notebook" in msg
    assert failed.is_file() and not executed.exists()
    assert not executed.with_suffix(".partial.ipynb").exists()
    prov = json.loads((book / "results" / "tiny" / "run1" / "provenance.json").read_text())
    assert prov["status"] == "failed" and "boom from the notebook" in prov["error"]
    assert "ValueError" in prov["error"]
    # fixed: the next run completes and removes the failed copy
    write_params(pf, {"fail": False})
    record = run.run_notebook(nb, pf, "smoke")
    assert record["status"] == "complete" and executed.is_file() and not failed.exists()


def test_inputs_digest_tracks_notebook_and_params(tmp_path):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    d1 = run.inputs_digest(nb, {"a": 1})
    assert d1 == run.inputs_digest(nb, {"a": 1})
    assert d1 != run.inputs_digest(nb, {"a": 2})
    make_notebook(nb, body=BODY_SRC + "\nprint('changed')")
    assert d1 != run.inputs_digest(nb, {"a": 1})


# ---- Recorder and atomic writes -------------------------------------------------------------
def _no_temp_files(root: Path):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "old")
    assert target.read_text() == "old"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _no_temp_files(tmp_path) == []


def test_unit_name():
    assert unit_name(flag="breastmnist", model="cnn", seed=0) == "flag=breastmnist__model=cnn__seed=0"
    assert unit_name(a="x/y", b="p q") == "a=x-y__b=pq"


def test_recorder_round_trip(tmp_path):
    rec = Recorder(tmp_path / "res")
    keys1 = {"flag": "breastmnist", "model": "cnn", "seed": 0}
    keys2 = {"flag": "breastmnist", "model": "cnn", "seed": 1}
    assert not rec.has_unit(**keys1)
    assert rec.metrics().empty and rec.histories().empty and rec.units() == []
    hist = pd.DataFrame({"epoch": [1, 2], "train/loss": [0.9, 0.5]})
    scores = {"test_scores": np.random.default_rng(0).random((5, 2)), "test_labels": np.arange(5)}
    rec.save_unit(keys1, {"test/acc": 0.75, "test/auc": np.float64(0.8), "n": np.int64(3)}, history=hist,
                  scores=scores, extra={"resumed_from": None})
    rec.save_unit(keys2, {"test/acc": 0.85, "test/auc": 0.9, "n": 3}, history=hist.assign(**{"train/loss": [1.0, 0.4]}))
    assert rec.has_unit(**keys1) and rec.has_unit(**keys2)
    unit = rec.load_unit(**keys1)
    assert unit["keys"] == keys1 and unit["metrics"] == {"test/acc": 0.75, "test/auc": 0.8, "n": 3}
    assert unit["resumed_from"] is None
    long = rec.metrics()
    assert len(long) == 6 and set(long.columns) == {"flag", "model", "seed", "key", "value"}
    assert long.query("seed == 1 and key == 'test/acc'")["value"].item() == 0.85
    wide = rec.wide_metrics()
    assert list(wide["test/auc"]) == [0.8, 0.9]
    pd.testing.assert_frame_equal(rec.history(**keys1), hist)
    both = rec.histories()
    assert len(both) == 4 and list(both["seed"]) == [0, 0, 1, 1]
    got = rec.scores(**keys1)
    assert np.array_equal(got["test_scores"], scores["test_scores"])
    assert np.array_equal(got["test_labels"], scores["test_labels"])
    assert _no_temp_files(rec.root) == []
    # a fresh Recorder on the same folder reads the same
    again = Recorder(rec.root)
    assert again.units() == rec.units()
    pd.testing.assert_frame_equal(again.metrics(), long)


def test_recorder_unit_json_written_last(tmp_path, monkeypatch):
    """A unit counts as finished only once its history and scores are on disk."""
    rec = Recorder(tmp_path)
    order = []
    real = results.atomic_write_bytes

    def spy(path, data):
        order.append(Path(path).parent.name)
        return real(path, data)

    monkeypatch.setattr(results, "atomic_write_bytes", spy)
    rec.save_unit({"u": 1}, {"m": 1.0}, history=pd.DataFrame({"epoch": [1]}), scores={"s": np.zeros(2)})
    assert order.index("units") > order.index("history")
    assert order.index("units") > order.index("scores")


def test_recorder_figures_and_tables(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = Recorder(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    rec.save_figure(fig, "curve")
    plt.close(fig)
    assert (tmp_path / "figures" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "figures" / "curve.svg").read_bytes()[:500]
    df = pd.DataFrame({"a": [1, 2]})
    path = rec.save_table(df, "t")
    pd.testing.assert_frame_equal(pd.read_csv(path), df)
    assert _no_temp_files(tmp_path) == []


def test_write_json_numpy_and_nan(tmp_path):
    path = results.write_json(tmp_path / "x.json", {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"),
                                                    "p": tmp_path})
    back = results.read_json(path)
    assert back["a"] == 0.5 and back["b"] == [0, 1, 2] and np.isnan(back["c"]) and back["p"] == str(tmp_path)
    with pytest.raises(TypeError, match="set"):
        results.write_json(tmp_path / "y.json", {"s": {1, 2}})
    assert not (tmp_path / "y.json").exists() and _no_temp_files(tmp_path) == []


#: A notebook body that makes one "unit" (a marker file) unless its results folder already holds it.
UNIT_BODY = """import pathlib
marker = pathlib.Path(results_dir, "unit.txt")
if not marker.exists():
    marker.write_text(str(alpha))
print("unit made with alpha", marker.read_text())"""


def test_stored_units_are_reused_only_for_the_same_params(tmp_path, book, capsys, monkeypatch):
    """Resume reuses units made with the same notebook and params; other params set them aside."""
    nb = make_notebook(tmp_path / "unitnb.ipynb", body=UNIT_BODY)
    pf = write_params(tmp_path / "r.yaml", {"alpha": 1})
    res = book / "results" / "unitnb" / "r"
    run.run_notebook(nb, pf, "smoke")
    run.run_notebook(nb, pf, "smoke", force=True)          # same params: the unit is reused
    assert (res / "unit.txt").read_text() == "1"
    write_params(pf, {"alpha": 2})                          # new params: the old unit is set aside
    capsys.readouterr()
    run.run_notebook(nb, pf, "smoke")
    assert "[new ]" in capsys.readouterr().out
    assert (res / "unit.txt").read_text() == "2"
    stale = list((book / "results" / "unitnb" / ".stale").glob("r-*/unit.txt"))
    assert [p.read_text() for p in stale] == ["1"]
    from helpers.experiment import checkpoint_dir
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    ckpt = checkpoint_dir(res) / "seed=0-0123456789ab.pt"   # an interrupted unit's checkpoint
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text("ckpt")
    run.run_notebook(nb, pf, "smoke", fresh=True)           # --fresh retrains with the same params
    assert (res / "unit.txt").read_text() == "2" and len(list((res.parent / ".stale").iterdir())) == 2
    assert not ckpt.exists()                                # and resumes from no checkpoint


def test_run_environment_is_the_runs_own_record_not_the_checkout_now(tmp_path):
    from helpers.repro import provenance, run_environment
    record = {"git": {"commit": "a" * 40, "dirty": False}, "versions": {"torch": "0.0"}, "device": {"cuda": True},
              "status": "complete"}
    (tmp_path / "provenance.json").write_text(json.dumps(record))
    assert run_environment(tmp_path) == {k: record[k] for k in ("git", "versions", "device")}
    now = run_environment(None)
    assert set(now) == {"git", "versions", "device"} and now["versions"] == provenance()["versions"]
    assert run_environment(tmp_path / "missing")["git"] == now["git"]


def test_resolve_device_names_the_fix_when_cuda_is_missing():
    import torch

    from helpers.repro import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU.*Fix"):
            resolve_device("cuda")


# ---- types, groups, names: refused before anything runs ---------------------------------------
TYPED_SRC = """lr = 0.001
seeds = [0, 1]
max_eval: int | None = 128
models = ["cnn"]
fit = {"epochs": 1}
group = {"width": 8, "depth": 2}
open_map = {}
kwargs: dict = {"cnn": {"widths": [8]}}
profile = "smoke"
run_name = "default"
results_dir = None"""


@pytest.mark.parametrize("bad, match", [
    ({"lr": "1e-3"}, r"'lr' must be a number, got the string '1e-3'.*1\.0e-3"),
    ({"lr": "fast"}, r"'lr' must be a number.*'fast'"),
    ({"seeds": 3}, r"'seeds' must be list, got int 3.*seeds: \[3\]"),
    ({"max_eval": "all"}, r"'max_eval' must be int or null"),
    ({"models": ["resnet9000"]}, r"unknown model 'resnet9000'.*did you mean 'resnet'"),
    ({"models": ["timm/notanet"]}, r"timm does not know"),
    ({"fit": {"lr": "1e-3"}}, r"'fit.lr' must be a number"),
    ({"fit": {"epoch": 3}}, r"group 'fit', FitConfig.*did you mean 'epochs'"),
    ({"fit": {"patience": "ten"}}, r"'fit.patience' must be int or null"),
    ({"group": {"widht": 3}}, r"group 'group'.*did you mean 'width'"),
    ({"group": {"width": 2.5}}, r"'group.width' must be int"),
    ({"profiles": {"quick": {"seeds": 1}}}, r"profiles.quick.*'seeds' must be list"),
])
def test_wrong_values_fail_before_papermill_starts(tmp_path, book, monkeypatch, bad, match):
    import papermill

    nb = make_notebook(tmp_path / "typed.ipynb", TYPED_SRC, body="print(1)")
    pf = write_params(tmp_path / "bad.yaml", bad)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("papermill started"))
    with pytest.raises(ParamsError, match="(?s)" + match) as err:
        run.run_notebook(nb, pf, "quick")
    assert str(pf) in str(err.value)
    assert not (book / "results" / "typed" / "bad").exists()


def test_accepted_values_and_deep_merge(tmp_path):
    nb = make_notebook(tmp_path / "typed.ipynb", TYPED_SRC, body="print(1)")
    pf = write_params(tmp_path / "ok.yaml", {
        "lr": 1, "max_eval": None, "models": ["cnn", "timm/resnet10t"], "open_map": {"anything": [1]},
        "kwargs": {"seresnet": {"depth": 3}}, "fit": {"lr": 0.01},
        "group": {"width": 16}, "profiles": {"quick": {"group": {"depth": 5}, "fit": {"epochs": 4}}}})
    out = run.resolve(nb, pf, "quick")
    assert out["lr"] == 1 and out["max_eval"] is None
    assert out["group"] == {"width": 16, "depth": 5}            # the profile kept the key it did not override
    assert out["fit"] == {"epochs": 4, "lr": 0.01}
    assert out["kwargs"] == {"cnn": {"widths": [8]}, "seresnet": {"depth": 3}}
    assert out["open_map"] == {"anything": [1]}


def test_deep_merge_keeps_what_it_does_not_override():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [1]}
    out = config.deep_merge(base, {"a": {"y": {"q": 9}}, "b": [2]})
    assert out == {"a": {"x": 1, "y": {"p": 1, "q": 9}}, "b": [2]}
    assert base["a"]["y"]["q"] == 2  # inputs are not changed


def test_stored_params_file_feeds_back_to_the_same_run(tmp_path, book):
    nb = make_notebook(tmp_path / "nbs" / "tiny.ipynb")
    pf = write_params(tmp_path / "params" / "myrun.yaml", {"alpha": 5, "profiles": {"quick": {"name": "q"}}})
    first = run.run_notebook(nb, pf, "quick")
    stored = book / "results" / "tiny" / "myrun" / "params.yaml"
    assert run.resolve(nb, stored, "quick") == run.resolve(nb, pf, "quick")
    again = run.run_notebook(nb, stored, "quick", run_name="myrun")  # refused before the fix: runner keys in it
    assert again["params_sha256"] == first["params_sha256"]
    out = json.loads((book / "results" / "tiny" / "myrun" / "out.json").read_text())
    assert (out["alpha"], out["name"]) == (5, "q")


def test_inputs_digest_covers_every_helpers_file(tmp_path, monkeypatch):
    """Editing any file of the package (a .py source or a non-Python file such as a C kernel)
    changes the digest, so a finished run is marked stale."""
    fake = tmp_path / "repo"
    (fake / "helpers" / "sub").mkdir(parents=True)
    (fake / "helpers" / "a.py").write_text("x = 1\n")
    (fake / "helpers" / "sub" / "kernel.c").write_text("int f(void) { return 1; }\n")
    monkeypatch.setattr(config, "repo_root", lambda: fake)
    nb = make_notebook(tmp_path / "tiny.ipynb")
    d0 = run.inputs_digest(nb, {"a": 1})
    assert d0 == run.inputs_digest(nb, {"a": 1})
    (fake / "helpers" / "a.py").write_text("x = 2\n")
    d1 = run.inputs_digest(nb, {"a": 1})
    (fake / "helpers" / "sub" / "kernel.c").write_text("int f(void) { return 2; }\n")
    d2 = run.inputs_digest(nb, {"a": 1})
    assert len({d0, d1, d2}) == 3
    assert d2 != run.params_digest(nb, {"a": 1})


def test_global_and_profile_files_hold_only_declared_keys_and_params_files_only_differences():
    """The real params/: shared layers name keys some notebook declares; a run's file repeats no default."""
    root = config.repo_root()
    declared = run.declared_anywhere()
    for path in [root / "params" / "global.yaml", *sorted((root / "params" / "profiles").glob("*.yaml"))]:
        check_keys(config.load_yaml(path), declared, str(path))
    notebooks = {p.stem: p for p in (root / "notebooks").glob("*.ipynb")}
    for pf in sorted((root / "params").glob("*.yaml")):
        if pf.name == "global.yaml":
            continue
        nb = notebooks[pf.stem.split("_")[0]]
        defaults = run.notebook_defaults(nb)
        top = {k: v for k, v in config.load_yaml(pf).items() if k != "profiles"}
        repeated = [k for k, v in top.items() if defaults.get(k) == v]
        assert not repeated, f"{pf} repeats the notebook's defaults for {repeated}"


def test_untracked_files_mark_the_tree_dirty(tmp_path):
    import subprocess
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(["git", "-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a"],
                   check=True)
    assert repro.git_state(tmp_path)["dirty"] is False
    (tmp_path / "new.py").write_text("x = 1")
    assert repro.git_state(tmp_path)["dirty"] is True


# ---- Recorder.unit, scopes, stored weights ----------------------------------------------------
def test_recorder_unit_is_computed_once_and_redone_for_other_settings(tmp_path, capsys):
    rec = Recorder(tmp_path / "r")
    calls = []

    def compute(v=1.0):
        calls.append(v)
        return {"metrics": {"m": v}, "history": pd.DataFrame({"epoch": [1], "loss": [v]})}

    a = rec.unit({"seed": 0}, compute, fingerprint={"lr": 1})
    b = rec.unit({"seed": 0}, compute, fingerprint={"lr": 1})
    assert a == b and a["metrics"] == {"m": 1.0} and calls == [1.0]
    c = rec.unit({"seed": 0}, lambda: compute(2.0), fingerprint={"lr": 2})
    assert c["metrics"] == {"m": 2.0} and calls == [1.0, 2.0] and "[redo]" in capsys.readouterr().out
    assert rec.unit({"seed": 1}, lambda: None) is None and not rec.has_unit(seed=1)  # a non-main rank stores nothing


def test_recorder_unit_is_redone_when_the_code_changes(tmp_path, monkeypatch):
    rec = Recorder(tmp_path / "r")
    calls = []
    compute = lambda: calls.append(1) or {"metrics": {"m": 1}}  # noqa: E731
    rec.unit({"seed": 0}, compute)
    assert rec.is_current({"seed": 0}) and rec.load_unit(seed=0)["code_digest"] == repro.unit_code_digest()
    monkeypatch.setattr(repro, "unit_code_digest", lambda *a, **k: "other code")
    assert not rec.is_current({"seed": 0})
    rec.unit({"seed": 0}, compute)
    assert len(calls) == 2 and rec.load_unit(seed=0)["code_digest"] == "other code"


def test_unit_code_digest_covers_training_code_but_not_presentation(tmp_path):
    fake = tmp_path / "helpers"
    (fake / "nas" / "fast").mkdir(parents=True)
    for name in ("train.py", "plots.py", "book.py"):
        (fake / name).write_text("x = 1\n")
    (fake / "nas" / "fast" / "kernels.c").write_text("int f(void);\n")
    digest = lambda: repro.code_digest(fake, fresh=True, exclude=repro.PRESENTATION)  # noqa: E731
    d0 = digest()
    (fake / "plots.py").write_text("x = 2\n")
    (fake / "book.py").write_text("x = 2\n")
    assert digest() == d0                       # a new figure style does not retrain anything
    (fake / "train.py").write_text("x = 2\n")
    d1 = digest()
    (fake / "nas" / "fast" / "kernels.c").write_text("int g(void);\n")
    assert len({d0, d1, digest()}) == 3
    # a unit depends only on the chapter packages it uses
    (fake / "nas" / "__init__.py").write_text("")
    (fake / "ensemble").mkdir()
    (fake / "ensemble" / "__init__.py").write_text("")
    (fake / "models").mkdir()
    (fake / "models" / "__init__.py").write_text("")
    assert repro.chapter_packages(fake) == ("ensemble", "nas")

    def unit(**k):
        repro._CODE_DIGEST.clear()          # the digest is memoised per process
        return repro.unit_code_digest(root=fake, **k)

    s0, n0, a0 = unit(supervised=True), unit(uses=("nas",)), unit()
    (fake / "nas" / "fast" / "kernels.c").write_text("int h(void);\n")
    s1, n1, a1 = unit(supervised=True), unit(uses=("nas",)), unit()
    assert s1 == s0 and n1 != n0 and a1 != a0
    (fake / "ensemble" / "__init__.py").write_text("x = 1\n")
    assert unit(uses=("nas",)) == n1 and unit() != a1
    (fake / "models" / "__init__.py").write_text("x = 1\n")   # the registry shapes every unit
    assert unit(supervised=True) != s1


def test_packages_used_names_the_chapter_packages_of_hooks():
    from helpers.nas.search import run_search
    from helpers.train import Hook

    assert repro.packages_used() == () and repro.packages_used(None, Hook()) == ()
    assert repro.packages_used(run_search) == ("nas", "rl")
    assert repro.packages_used(lambda x: x) is None        # defined outside helpers: all packages


def test_recorder_scope_sets_aside_units_of_other_params(tmp_path):
    root = tmp_path / "nb" / "default"
    rec = Recorder(root, scope={"seeds": [0, 1], "epochs": 2})
    for s in (0, 1):
        rec.unit({"seed": s}, lambda s=s: {"metrics": {"m": s}})
    (root / "provenance.json").write_text("{}")  # the runner's files stay where they are
    assert len(Recorder(root, scope={"seeds": [0, 1], "epochs": 2}).units()) == 2
    edited = Recorder(root, scope={"seeds": [0], "epochs": 2})      # a user edited the parameters cell
    assert edited.units() == [] and (root / "provenance.json").is_file()
    stale = list((tmp_path / "nb" / ".stale").glob("default-*/units/*.json"))
    assert len(stale) == 2


def test_recorder_stores_weights_and_loads_them_without_unpickling(tmp_path):
    import torch
    rec = Recorder(tmp_path)
    state = {"w": torch.arange(4.0), "b": torch.zeros(2)}
    rec.save_model({"seed": 0}, state)
    back = rec.load_model(seed=0)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="keep_model=True"):
        rec.load_model(seed=1)
    assert rec.model_path(seed=0).suffix == ".pt"  # *.pt is git-ignored


def test_a_notebook_edit_re_executes_the_page_but_keeps_its_units(tmp_path, book, capsys):
    nb = make_notebook(tmp_path / "unitnb.ipynb", body=UNIT_BODY)
    pf = write_params(tmp_path / "r.yaml", {"alpha": 1})
    first = run.run_notebook(nb, pf, "smoke")
    make_notebook(nb, body=UNIT_BODY + "\nprint('new prose')")
    capsys.readouterr()
    second = run.run_notebook(nb, pf, "smoke")
    out = capsys.readouterr().out
    assert "[skip]" not in out and "[new ]" not in out            # re-executed, nothing set aside
    assert second["inputs_sha256"] != first["inputs_sha256"] and second["params_sha256"] == first["params_sha256"]
    assert (book / "results" / "unitnb" / "r" / "unit.txt").read_text() == "1"


@pytest.mark.parametrize("notebook, bad, match", [
    ("apga", {"pretrain": {"epoch": 3}}, r"group 'pretrain', FitConfig\):\n  unknown key 'epoch' \(did you mean 'epochs'"),
    ("apga", {"pretrain": {"cpu_amp": "yes"}}, r"'pretrain.cpu_amp' must be bool"),
    ("ensemble", {"expert_fit": {"lr": "1e-4"}}, r"'expert_fit.lr' must be a number"),
    ("ensemble", {"combiner_fit": {"shedule": "cosine"}}, r"group 'combiner_fit', FitConfig\):\n  unknown key 'shedule' \(did you mean 'schedule'"),
])
def test_every_fit_group_of_the_chapters_is_a_checked_fit_config(tmp_path, notebook, bad, match):
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ParamsError, match=match):
        run.resolve(root / "notebooks" / f"{notebook}.ipynb", write_params(tmp_path / "bad.yaml", bad), "smoke")


def test_the_ensemble_full_profile_builds_the_reference_models():
    root = Path(__file__).resolve().parents[1]
    for params in ("ensemble", "ensemble_organamnist"):
        p = run.resolve(root / "notebooks" / "ensemble.ipynb", root / "params" / f"{params}.yaml", "full")
        assert p["member_kwargs"] == {} and p["expert_kwargs"] == {"small_input": True}
        assert p["expert_model"] == "densenet121" and p["fit"]["cpu_amp"] is True


def test_replace_tag_replaces_a_mapping_whole(tmp_path):
    defaults = {"fit": {"epochs": 1, "lr": 0.1}, "member_kwargs": {"widths": [8], "stem_width": 4},
                "agent": {"model": "unet_small", "kwargs": {"widths": [8, 16]}}}
    path = tmp_path / "p.yaml"
    path.write_text("fit: {epochs: 5}\nmember_kwargs: !replace {}\n"
                    "agent: {model: smp_unet, kwargs: !replace {encoder: vgg11}}\n"
                    "profiles:\n  quick:\n    member_kwargs: {widths: [16]}\n")
    params = config.load_yaml(path)
    out = merge_params(defaults, params)
    assert out["fit"] == {"epochs": 5, "lr": 0.1}                          # a plain mapping merges deeply
    assert out["member_kwargs"] == {} and type(out["member_kwargs"]) is dict   # !replace {}: nothing kept
    assert out["agent"] == {"model": "smp_unet", "kwargs": {"encoder": "vgg11"}}   # no widths leak into vgg11
    assert merge_params(defaults, params, profile="quick")["member_kwargs"] == {"widths": [16]}   # merged into {}
    assert yaml.safe_dump(out)                                             # stored params stay plain YAML


@pytest.mark.parametrize("override, match", [
    # a plain mapping merges into the small DenseNet's defaults: growth_rate reaches densenet121
    ({"expert_model": "densenet121", "expert_kwargs": {"small_input": True}},
     r"'expert_kwargs' holds .*growth_rate.*which densenet121 does not take.*!replace"),
    ({"member_kwargs": {"widht": [8]}}, r"'member_kwargs' holds .*which seresnet_mura does not take.*widht"),
])
def test_model_kwargs_a_model_does_not_take_fail_before_anything_runs(tmp_path, override, match):
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ParamsError, match=match):
        run.resolve(root / "notebooks" / "ensemble.ipynb", write_params(tmp_path / "bad.yaml", override), "smoke")


def test_the_per_model_kwargs_map_of_the_baselines_is_checked_per_model(tmp_path):
    root = Path(__file__).resolve().parents[1]
    bad = {"models": ["cnn", "densenet121"], "model_kwargs": {"densenet121": {"small_inputs": True}}}
    with pytest.raises(ParamsError, match=r"'model_kwargs.densenet121' holds .*small_inputs"):
        run.resolve(root / "notebooks" / "baselines.ipynb", write_params(tmp_path / "bad.yaml", bad), "smoke")


def test_an_agents_kwargs_are_checked_against_its_model(tmp_path):
    root = Path(__file__).resolve().parents[1]
    bad = tmp_path / "bad.yaml"   # !replace: not checked against the keys it replaces, so the model checks it
    bad.write_text("agent_small: {model: unet_small, kwargs: !replace {encoder: vgg11}}\n")   # smp_unet's option
    with pytest.raises(ParamsError, match=r"'agent_small.kwargs' holds .*which unet_small does not take"):
        run.resolve(root / "notebooks" / "apga.ipynb", bad, "smoke")


def test_a_stashed_run_resumes_on_a_machine_that_has_none_of_its_units(tmp_path, book, monkeypatch, capsys):
    """helpers.book.stash carries an unfinished run's units (never weights) to book/partial/; the runner
    restores them into an empty results folder made with the same params, counts the stashed
    execution in the run's wall time, and leaves a stash of other params alone."""
    import os

    from helpers import book as book_mod

    nb = make_notebook(tmp_path / "nbs" / "tiny.ipynb")
    pf = write_params(tmp_path / "params" / "long.yaml", {"fail": True})
    with pytest.raises(run.RunError):   # an execution that stopped half-way, leaving units behind
        run.run_notebook(nb, pf, "smoke")
    res = book / "results" / "tiny" / "long"
    rec = Recorder(res)
    rec.save_unit({"seed": 0}, {"val/acc": 0.5}, history=pd.DataFrame({"epoch": [1]}),
                  scores={"test_scores": np.zeros((3, 2))})
    rec.save_model({"seed": 0}, {"w": __import__("torch").zeros(2)})
    atomic_write_text(res / "checkpoints" / "seed=0.pt", "ckpt")
    atomic_write_text(res / "folds" / "seed0.json", "[]")
    prov = json.loads((res / "provenance.json").read_text())
    partial = tmp_path / "partial"
    target = book_mod.stash_folder(res, partial / "tiny" / "long", "tiny/long")
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert {"units/seed=0.json", "history/seed=0.csv", "scores/seed=0.npz", "folds/seed0.json", "params.yaml",
            "provenance.json", "stash.json", "metrics.csv"} <= files
    assert not any(f.startswith(("models/", "checkpoints/")) or f.endswith(".pt") for f in files)
    info = json.loads((target / "stash.json").read_text())
    assert info["units"] == 1 and info["weights_left_behind"] == ["seed=0"] and info["scores"] == ["seed=0"]
    assert info["params_sha256"] == prov["params_sha256"] and info["commit"] == "0" * 40
    closed = json.loads((target / "provenance.json").read_text())
    assert closed["status"] == "stashed" and closed["wall_s"] == prov["wall_s"] and "earlier" not in closed
    killed = {**prov, "status": "running", "started_utc": "2026-01-01T10:00:00+00:00"}   # stopped with its machine
    del killed["wall_s"]
    (res / "provenance.json").write_text(json.dumps(killed))
    t0 = __import__("datetime").datetime.fromisoformat(killed["started_utc"]).timestamp()
    for f in res.rglob("*"):
        os.utime(f, (t0 + 900, t0 + 900))
    other = book_mod.stash_folder(res, partial / "killed", "tiny/long")
    assert json.loads((other / "provenance.json").read_text())["wall_s"] == 900.0   # timed to its last write
    (res / "provenance.json").write_text(json.dumps(prov))

    # another machine: no results at all; the runner restores the stash, then the run finishes
    import shutil
    shutil.rmtree(book)
    monkeypatch.setattr(book_mod, "partial_dir", lambda: partial)
    write_params(pf, {"fail": False})   # other params than the stash's
    capsys.readouterr()
    record = run.run_notebook(nb, pf, "smoke")
    assert "made with other params; not restored" in capsys.readouterr().out and record["status"] == "complete"
    assert not (res / "units").exists()           # a stash of other params is not restored
    shutil.rmtree(book)
    write_params(pf, {"fail": True})
    with pytest.raises(run.RunError):             # same params as the stash: restored before executing
        run.run_notebook(nb, pf, "smoke")
    assert (res / "units" / "seed=0.json").is_file() and (res / "scores" / "seed=0.npz").is_file()
    assert not (res / "models").exists()
    again = json.loads((res / "provenance.json").read_text())
    assert [e["wall_s"] for e in again["earlier"]] == [prov["wall_s"]]   # the stashed execution counts
    assert again["wall_s_total"] == pytest.approx(again["wall_s"] + prov["wall_s"])
    # a clone: score files stay out of git, so the stash lacks them; that unit is redone, not restored bare
    shutil.rmtree(res)
    os.remove(target / "scores" / "seed=0.npz")
    capsys.readouterr()
    assert book_mod.unstash("tiny", "long", res, again["params_sha256"], partial) == 0
    assert "1 unit whose score files are not here" in capsys.readouterr().out
    assert not (res / "units" / "seed=0.json").exists() and (res / "history" / "seed=0.csv").is_file()
    shutil.rmtree(res)
    shutil.copytree(target, res)   # back to a folder holding its own unit
    os.remove(res / "params.yaml")   # a folder with units of its own is never overwritten by a stash
    assert book_mod.unstash("tiny", "long", res, again["params_sha256"], partial) == 0
    assert not (res / "params.yaml").exists()
    with pytest.raises(run.RunError):             # --fresh ignores the stash
        run.run_notebook(nb, pf, "smoke", fresh=True)
    assert not (res / "units").exists()
