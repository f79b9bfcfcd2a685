"""Subgroup columns beyond the class or grade in the fold diagnostics (helpers.folds.groups): how a
column is made (an image statistic cut once on train, or a CSV), the rule that reads it, the
group-balanced sampler that applies it, and the tables and figure the page shows; plus the full
profile's structure (L1, PneumoniaMNIST, OrganAMNIST, 50 epochs)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import folds
from helpers.config import ParamsError
from helpers.data import Split
from helpers.folds import groups as groups_mod
from helpers.results import Recorder
from helpers.train import FitConfig

REG = folds.Target("retinamnist", kind="regression", groups=(folds.GroupColumn("brightness", source="brightness"),))


def split_with_brightness(levels, index=None):
    """A split whose image i is uniformly ``levels[i]`` (uint8); labels cycle over 0..4."""
    levels = np.asarray(levels, dtype=np.uint8)
    images = torch.from_numpy(np.repeat(levels, 3 * 4 * 4).reshape(len(levels), 3, 4, 4).copy())
    index = torch.arange(len(levels)) * 10 + 7 if index is None else torch.as_tensor(index)
    return Split(images, torch.arange(len(levels)) % 5, index)


# ---- making a column -----------------------------------------------------------------------------
def test_a_brightness_column_is_cut_once_into_tertiles_keyed_by_the_official_index():
    train = split_with_brightness(np.arange(0, 240, 10))          # 24 images, mean intensity rising
    col = folds.GroupColumn.from_params("brightness")
    frame = folds.group_frame(train, [col])
    assert list(frame.index) == train.index.tolist() and list(frame.columns) == ["brightness"]
    names = sorted(frame["brightness"].unique())
    assert len(names) == 3 and [n[:2] for n in names] == ["Q1", "Q2", "Q3"]
    assert frame["brightness"].value_counts().tolist() == [8, 8, 8]
    # the darkest images are in Q1, the brightest in Q3, and the names give the ranges of the statistic
    assert frame["brightness"].iloc[0].startswith("Q1 0.00-") and frame["brightness"].iloc[-1].startswith("Q3 ")
    assert frame["brightness"].iloc[-1].endswith(f"-{230 / 255:.2f}")
    contrast = folds.GroupColumn.from_params({"name": "spread", "source": "contrast", "bins": 2})
    assert folds.group_frame(train, [contrast])["spread"].nunique() == 1   # flat images: one spread, one group


def test_a_group_column_from_a_csv_file(tmp_path):
    train = split_with_brightness([10, 20, 30, 40], index=[3, 5, 8, 13])
    path = tmp_path / "site.csv"
    pd.DataFrame({"index": [13, 3, 5, 8, 99], "site": ["b", "a", "a", "b", "c"]}).to_csv(path, index=False)
    col = folds.GroupColumn.from_params({"name": "site", "file": str(path)})
    assert folds.group_frame(train, [col])["site"].tolist() == ["a", "a", "b", "b"]
    pd.DataFrame({"index": [3, 5], "site": ["a", "a"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no 'site' for 2 training image\(s\), e.g. official train index \[8, 13\]"):
        folds.group_frame(train, [col])
    with pytest.raises(ParamsError, match="no file"):
        folds.GroupColumn.from_params({"name": "site", "file": str(tmp_path / "absent.csv")})


@pytest.mark.parametrize("spec, match", [
    (["weight"], "source 'weight' unknown"),
    ([{"name": "grade", "source": "brightness"}], "is taken"),
    ([{"name": "b", "source": "brightness", "file": "x.csv"}], "exactly one of source"),
    ([{"name": "b", "source": "brightness", "bins": 1}], "bins must be an integer of at least 2"),
    ([{"name": "b", "source": "brightness", "colour": 1}], r"unknown: \['colour'\]"),
    (["brightness", {"name": "brightness", "source": "contrast"}], "repeat"),
    ("brightness", "is a list"),
])
def test_bad_group_columns_are_refused_before_work(spec, match):
    with pytest.raises(ParamsError, match=match):
        folds.Target.from_params({"flag": "retinamnist", "groups": spec})


def test_a_target_takes_its_group_columns_from_params():
    t = folds.Target.from_params({"flag": "retinamnist", "kind": "regression", "groups": ["brightness"]})
    assert t.groups == (folds.GroupColumn("brightness", source="brightness"),) and t.label_column == "grade"
    assert t.name == "retinamnist-reg-mse"   # the units' key does not change with the columns
    assert folds.Target.from_params({"flag": "pneumoniamnist"}).groups == ()


# ---- the rule ------------------------------------------------------------------------------------
def diagnostics(k=5):
    cfg = FitConfig(epochs=15, patience=7, monitor="val/loss")
    rows = []
    for fold in range(1, k + 1):
        loss = np.concatenate([np.linspace(1.0, 0.5, 8), 0.5 + 0.01 * np.arange(1, 8)])
        h = pd.DataFrame({"epoch": np.arange(1, 16), "lr": 1e-3, "lr_end": 1e-3, "val/loss": loss,
                          "val/acc": 0.8, "train_eval/acc": 0.82})
        rows.append({"target": "t", "config": "before", "fold": fold,
                     **folds.diagnose_fold(h, 8, False, cfg, folds.Target("pneumoniamnist")), "auc": 0.9, "group_ratio": 1.2})
    return pd.DataFrame(rows)


def long_groups(column, errors_per_fold, metric="error"):
    """A subgroup table: ``errors_per_fold[fold - 1]`` maps group -> error."""
    return pd.DataFrame([{"column": column, "group": g, "value": e, "n": 10, "metric": metric, "fold": f}
                         for f, errs in enumerate(errors_per_fold, start=1) for g, e in errs.items()])


def test_the_group_column_rule_reads_the_means_over_folds_and_names_the_sampler():
    label = long_groups("class", [{0: 0.10, 1: 0.12}] * 5)
    site = long_groups("site", [{"a": 0.05, "b": 0.30}] * 4 + [{"a": 0.10, "b": 0.20}])   # means 0.06 and 0.28: 4.7x
    calm = long_groups("brightness", [{"Q1": 0.10, "Q2": 0.12, "Q3": 0.11}] * 5)
    recs = folds.evaluate_rules(diagnostics(), pd.concat([label, site, calm]), headline="auc")
    assert list(recs["rule"]) == ["group_column"]
    row = recs.iloc[0]
    assert row["folds"] == [1, 2, 3, 4] and row["changes"] == [("sampler", "set", "group:site")]
    assert "column site: group b error 0.280 is 4.7x group a's 0.060 (mean over folds)" in row["evidence"]
    assert folds.apply_recommendations({"fit": {"lr": 1e-3}}, recs)["sampler"] == "group:site"
    # a 3.7x disparity is below the rule's 4x: nothing fires
    mild = long_groups("site", [{"a": 0.05, "b": 0.30}] * 3 + [{"a": 0.10, "b": 0.20}] * 2)
    assert folds.evaluate_rules(diagnostics(), pd.concat([label, mild, calm]), headline="auc").empty
    # the listed rule shows the change with a placeholder
    assert folds.rules_table().set_index("rule").loc["group_column", "applied as"] == "sampler = group:<column>"


def test_label_and_column_disparities_apply_one_sampler_only():
    label = long_groups("class", [{0: 0.02, 1: 0.40}] * 5)
    site = long_groups("site", [{"a": 0.05, "b": 0.30}] * 5)
    table = diagnostics().assign(group_ratio=20.0)
    recs = folds.evaluate_rules(table, pd.concat([label, site]), headline="auc").set_index("rule")
    assert set(recs.index) == {"subgroup", "group_column"}
    assert recs.loc["subgroup", "applied"] and not recs.loc["group_column", "applied"]   # a tie: the label's
    assert folds.apply_recommendations({}, recs.reset_index())["sampler"] == "weighted"


def test_the_class_rule_ignores_the_group_columns():
    label = long_groups("grade", [{0: 0.3, 1: 0.35, 2: 0.4}] * 5, metric="mae")
    site = long_groups("site", [{"a": 0.01, "b": 0.9}] * 5, metric="mae")
    recs = folds.evaluate_rules(diagnostics(), pd.concat([label, site]), headline="auc")
    assert "subgroup" not in set(recs["rule"]) and "group_column" in set(recs["rule"])


# ---- the sampler that applies it ----------------------------------------------------------------
def test_group_sampler_weights_balance_the_column_over_the_images_trained_on():
    frame = pd.DataFrame({"site": ["a", "a", "a", "b", "c", "c"]}, index=pd.Index([10, 11, 12, 13, 14, 15], name="index"))
    w = groups_mod.sample_weights(frame, "site", [15, 10, 11, 13, 14])      # a twice, b once, c twice
    assert w.tolist() == pytest.approx([0.5, 0.5, 0.5, 1.0, 0.5])
    assert groups_mod.sampler_column("group:site") == "site" and groups_mod.sampler_column("weighted") is None
    with pytest.raises(ValueError, match="no group column 'scanner'"):
        groups_mod.sample_weights(frame, "scanner", [10])
    assert folds.Arm.from_dict("x", {"sampler": "group:site"}).sampler == "group:site"
    with pytest.raises(ParamsError, match="group:<column>"):
        folds.Arm.from_dict("x", {"sampler": "site"})


BASE = {"epochs": 1, "monitor": "val/loss", "progress": "none", "schedule": "plateau", "patience": 1}


def test_a_fold_unit_with_a_group_sampler_trains_on_group_balanced_weights(retina, tmp_path, monkeypatch):
    seen = []

    def fake(recorder, ds, *args, **kwargs):
        seen.append((ds["train"].index.numpy().copy(), kwargs.get("sample_weights"), kwargs.get("sampler")))
        return {}

    monkeypatch.setattr(folds.cv, "train_and_test", fake)
    frame = folds.group_frame(retina["train"], REG.groups)
    arm = folds.Arm.from_dict("after", {"fit": BASE, "sampler": "group:brightness"})
    folds.run_folds(Recorder(tmp_path / "res"), retina, REG, arm, k=2, device="cpu", frame=frame)
    assert len(seen) == 2
    for index, weights, sampler in seen:
        assert sampler == "group:brightness" and weights is not None and len(weights) == len(index)
        g = frame.loc[index, "brightness"].to_numpy()
        totals = {name: float(weights[g == name].sum()) for name in np.unique(g)}
        assert all(t == pytest.approx(1.0) for t in totals.values())   # every group drawn as often
    seen.clear()
    folds.run_folds(Recorder(tmp_path / "res2"), retina, REG, folds.Arm.from_dict("before", {"fit": BASE}), k=2,
                    device="cpu", frame=frame)
    assert all(w is None for _, w, _ in seen)                            # no group sampler: no weights
    with pytest.raises(ParamsError, match="names no group column"):
        folds.close_loop(Recorder(tmp_path / "res3"), retina, dataclasses.replace(REG, groups=()),
                         {"sampler": "group:brightness"}, k=2, base_fit=BASE, device="cpu")


def test_a_group_sampler_trains_real_fold_units_of_their_own(retina, tmp_path):
    rec = Recorder(tmp_path / "res")
    frame = folds.group_frame(retina["train"], REG.groups)
    kw = dict(k=2, model="cnn", model_kwargs={"widths": [4, 8]}, batch_size=16, device="cpu", frame=frame)
    plain = folds.Arm.from_dict("before", {"fit": BASE})
    balanced = folds.Arm.from_dict("after", {"fit": BASE, "sampler": "group:brightness"})
    folds.run_folds(rec, retina, REG, plain, **kw)
    rows = folds.run_folds(rec, retina, REG, balanced, **kw)
    assert len(rows) == 2 and rows["val/mae"].notna().all()
    variants = {u["keys"]["config"]: u["keys"].get("variant") for u in rec.units()}
    assert variants["after"] == folds.unit_variant(balanced, "cnn", {"widths": [4, 8]}) != variants["before"]


# ---- the tables and figure of the page ------------------------------------------------------------
def test_fold_units_report_their_group_columns_in_the_tables_and_figure(retina, tmp_path):
    import matplotlib.pyplot as plt
    from helpers.folds import figures

    rec = Recorder(tmp_path / "res")
    frame = folds.group_frame(retina["train"], REG.groups)
    arm = folds.Arm.from_dict("before", {"fit": BASE})
    folds.run_folds(rec, retina, REG, arm, k=2, model="cnn", model_kwargs={"widths": [4, 8]}, batch_size=16,
                    device="cpu", frame=frame)
    table = folds.fold_table(rec, REG, "before", arm.fit_config(), retina.n_classes, frame=frame)
    assert {"worst_group", "group_ratio", "worst_brightness", "ratio_brightness"} <= set(table.columns)
    assert table["worst_brightness"].str.startswith("Q").all()
    groups = folds.subgroup_table(rec, REG, "before", retina.n_classes, frame=frame)
    assert set(groups["column"]) == {"grade", "brightness"}
    b = groups[(groups["column"] == "brightness") & (groups["group"] != "all")]
    assert b.groupby("fold")["n"].sum().tolist() == [20, 20] and (b["metric"] == "mae").all()
    # every image's error is counted once per column: the per-column "all" rows agree
    alls = groups[groups["group"] == "all"].pivot_table(index="fold", columns="column", values="value")
    assert np.allclose(alls["grade"], alls["brightness"])
    result = folds.TargetResult(REG, {"before": {}}, table, groups, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(),
                                pd.DataFrame(), "before", columns=("grade", "brightness"))
    summary = folds.subgroup_summary(result)
    assert list(dict.fromkeys(summary["column"])) == ["grade", "brightness"]
    bright = summary[summary["column"] == "brightness"]
    assert bright["group"].iloc[-1] == "worst-to-best" and bright["images"].iloc[:-1].sum() == 40
    assert bright["before"].iloc[-1].endswith("x") and bright["images"].iloc[-1] == ""
    assert bright["before"].iloc[0].count("±") == 1
    view = folds.diagnostics_view(result)
    assert {"worst grade", "worst-to-best grade error", "worst brightness", "worst-to-best brightness error"} <= set(view.columns)
    fig = figures.subgroup_bars(groups.assign(config="before"))
    assert [ax.get_xlabel() for ax in fig.axes] == ["grade", "brightness"]
    plt.close(fig)


# ---- the full profile's structure ----------------------------------------------------------------
def test_the_full_profile_has_the_issues_targets_and_budget():
    from helpers.run import resolve

    p = resolve("notebooks/folds.ipynb", "params/folds.yaml", "full")
    targets = [folds.Target.from_params(t) for t in p["targets"]]
    names = [t.name for t in targets]
    assert {"retinamnist-reg-mse", "retinamnist-reg-l1", "retinamnist-class", "pneumoniamnist-class",
            "organamnist-class"} == set(names) and len(names) == len(set(names))
    assert all(t.groups for t in targets) and p["fit"]["epochs"] == 50 and p["k"] == 5
    assert p["max_train"] is None and p["max_eval"] is None
    arms = folds.check_configs(p["before"], p["extra_configs"], p["fit"])
    assert set(arms) == {"before", "write-up"}
    w = arms["write-up"].fit_config()
    assert (w.lr, w.weight_decay, w.patience, w.min_delta, w.min_epochs, w.plateau_patience, w.grad_clip) == \
        (5e-5, 1e-4, 15, 1e-4, 5, 7, 0.5)
    b = arms["before"].fit_config()
    assert (b.lr, b.weight_decay, b.patience, b.plateau_patience, b.schedule) == (1e-4, 1e-5, 10, 5, "plateau")


def test_an_l1_target_trains_its_folds_with_the_l1_loss(retina, tmp_path):
    rec = Recorder(tmp_path / "res")
    l1 = folds.Target.from_params({"flag": "retinamnist", "kind": "regression", "loss": "l1"})
    rows = folds.run_folds(rec, retina, l1, folds.Arm.from_dict("before", {"fit": BASE}), k=2, model="cnn",
                           model_kwargs={"widths": [4, 8]}, batch_size=16, device="cpu")
    assert len(rows) == 2 and {"val/mae", "val/r2", "val/qwk"} <= set(rows.columns)
    for u in rec.units():
        sc = rec.scores(**u["keys"])
        pred, y = sc["val_scores"][:, 0], sc["val_labels"]
        assert u["metrics"]["val/loss"] == pytest.approx(np.abs(pred - y).mean(), rel=1e-5)   # L1, not MSE


@pytest.mark.slow
def test_the_page_runs_the_full_profiles_structure_on_smoke_sized_data(tmp_path, monkeypatch, shared_data):
    """The full profile of params/folds.yaml (its five targets with L1, PneumoniaMNIST and OrganAMNIST,
    the write-up's config, the group columns) with only its sizes made small: the page runs end to end
    and shows every target's subgroup table with its group column."""
    import json

    import yaml

    from helpers.config import repo_root
    from helpers.run import run_notebook

    root = repo_root()
    params = yaml.safe_load((root / "params" / "folds.yaml").read_text())
    full = params["profiles"]["full"]
    full.update(threads=1, k=2, max_train=160, max_eval=40, batch_size=64, model_kwargs={"widths": [4, 8]},
                fit={"epochs": 2})
    params["profiles"] = {"full": full}
    path = tmp_path / "folds_fullshape.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("RLMED_BOOK", str(tmp_path / "book"))
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    record = run_notebook(root / "notebooks" / "folds.ipynb", path, "full")
    assert record["status"] == "complete"
    results = tmp_path / "book" / "results" / "folds" / "folds_fullshape"
    names = [folds.Target.from_params(t).name for t in full["targets"]]
    assert len(names) == 5
    for name in names:
        sub = pd.read_csv(results / "tables" / f"subgroups_{name}.csv")
        assert list(dict.fromkeys(sub["column"])) == ["grade" if "-reg-" in name else "class", "brightness"]
        assert {"before", "write-up"} <= set(sub.columns)
        assert "ratio_brightness" in pd.read_csv(results / "tables" / f"diagnostics_{name}.csv")
    assert list(pd.read_csv(results / "tables" / "final_test.csv")["target"]) == names
    page = json.loads((tmp_path / "book" / "runs" / "folds" / "folds_fullshape.ipynb").read_text())
    shown = "".join("".join(o.get("data", {}).get("text/html", "")) for c in page["cells"] for o in c.get("outputs", []))
    assert "worst-to-best brightness error" in shown and "Q3 " in shown   # headers as page.table writes them
