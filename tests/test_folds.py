"""The fold diagnostics chapter (helpers.folds): diagnostics of generated runs, the rules that turn
them into recommendations, min_epochs in the shared fit, fold units that never see test, and the
ordinal metrics against scikit-learn."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, mean_absolute_error, r2_score

from helpers import folds
from helpers.data import Split, TensorLoader, load
from helpers.folds import rules as rules_mod
from helpers.results import Recorder
from helpers.train import FitConfig, fit

CLASS = folds.Target("pneumoniamnist")
REG = folds.Target("retinamnist", kind="regression")


# ---- generated runs ----------------------------------------------------------------------------
def history(val_loss, gap=0.0, lr=1e-3):
    """A fold's per-epoch history with the given val losses; train ACC ``gap`` points above val."""
    val_loss = np.asarray(val_loss, dtype=float)
    n = len(val_loss)
    val_acc = np.clip(0.9 - 0.2 * val_loss, 0, 1)
    return pd.DataFrame({"epoch": np.arange(1, n + 1), "lr": lr, "lr_end": lr, "val/loss": val_loss,
                         "val/acc": val_acc, "train_eval/acc": np.clip(val_acc + gap / 100, 0, 1)})


def run_table(histories, cfg, stopped, auc=None, ratio=1.5, target=CLASS):
    """The diagnostics table of a generated k-fold run (one history per fold); the best epoch is the
    val loss minimum, as early stopping on val/loss with min_delta 0 picks it."""
    rows = []
    for i, (h, s) in enumerate(zip(histories, stopped), start=1):
        best = int(h["val/loss"].idxmin()) + 1
        row = {"target": target.name, "config": "before", "fold": i,
               **folds.diagnose_fold(h, best, s, cfg, target)}
        row.update(auc=(auc[i - 1] if auc is not None else 0.80 + 0.005 * i), group_ratio=ratio)
        rows.append(row)
    return pd.DataFrame(rows)


def groups_table(errors):
    return pd.DataFrame([{"group": g, "value": e, "metric": "error", "fold": 1, "n": 10} for g, e in enumerate(errors)])


def fired(table, groups=None):
    return set(folds.evaluate_rules(table, groups, headline="auc")["rule"])


def rising_from_first(n, start=0.5, step=0.02, rng=None):
    rng = rng or np.random.default_rng(0)
    return start + step * np.arange(n) + rng.uniform(0, 0.002, n)


def healthy(n_best=8, n=15, rng=None):
    rng = rng or np.random.default_rng(1)
    down = np.linspace(1.0, 0.5, n_best)
    up = 0.5 + 0.01 * np.arange(1, n - n_best + 1)
    return np.concatenate([down, up]) + rng.uniform(0, 0.001, n)


def test_val_loss_rising_from_epoch_one_triggers_the_lr_rule_not_patience():
    cfg = FitConfig(epochs=50, patience=10, monitor="val/loss")
    hs = [history(rising_from_first(11, rng=np.random.default_rng(i))) for i in range(6)] + \
         [history(healthy(rng=np.random.default_rng(10 + i))) for i in range(3)]
    table = run_table(hs, cfg, stopped=[True] * 9)
    assert list(table["best_epoch"][:6]) == [1] * 6 and list(table["epochs_trained"][:6]) == [11] * 6
    assert table["best_at_first"].sum() == 6 and table["stopped_early"].all()   # two facts, kept apart
    recs = folds.evaluate_rules(table, headline="auc")
    assert set(recs["rule"]) == {"lr_too_high"}
    row = recs.iloc[0]
    assert row["folds"] == [1, 2, 3, 4, 5, 6] and "6 of 9 folds" in row["evidence"]
    assert "patience is not the cause" in row["advice"]
    # the same folds behind a short patience stop before epoch 5, and still point at the LR only
    short = FitConfig(epochs=50, patience=2, monitor="val/loss")
    table = run_table([history(rising_from_first(3, rng=np.random.default_rng(i))) for i in range(5)], short,
                      stopped=[True] * 5)
    assert fired(table) == {"lr_too_high"}


def test_stopping_before_min_epochs_would_allow_triggers_min_epochs():
    cfg = FitConfig(epochs=30, patience=1, monitor="val/loss")
    # best at epoch 2, a noisy uptick at 3: patience 1 stops at epoch 3 in 4 of 5 folds
    hs = [history([1.0, 0.8, 0.82 + 0.01 * i]) for i in range(4)] + [history(healthy())]
    table = run_table(hs, cfg, stopped=[True] * 4 + [True])
    recs = folds.evaluate_rules(table, headline="auc")
    assert "min_epochs" in set(recs["rule"]) and "lr_too_high" not in set(recs["rule"])
    row = recs.set_index("rule").loc["min_epochs"]
    assert row["folds"] == [1, 2, 3, 4] and "4 of 5 folds" in row["evidence"]
    new = folds.apply_recommendations({"fit": {"patience": 1}}, recs)
    assert new["fit"]["min_epochs"] == 5


def test_an_overfitting_fold_triggers_the_regularisation_rule_with_its_number():
    cfg = FitConfig(epochs=15, patience=7, monitor="val/loss")
    hs = [history(healthy(rng=np.random.default_rng(i)), gap=3.0) for i in range(5)]
    hs[2] = history(healthy(rng=np.random.default_rng(2)), gap=18.0)
    table = run_table(hs, cfg, stopped=[False] * 5)
    recs = folds.evaluate_rules(table, headline="auc")
    assert set(recs["rule"]) == {"overfit"}
    row = recs.iloc[0]
    assert row["folds"] == [3] and "fold 3: gap 18.0 points" in row["evidence"]
    new = folds.apply_recommendations({"fit": {"weight_decay": 1e-5}, "augment": {"rotate": 10}}, recs)
    assert new["fit"]["weight_decay"] == pytest.approx(1e-4) and new["augment"]["rotate"] == 15


def test_a_healthy_run_triggers_no_rule():
    cfg = FitConfig(epochs=15, patience=7, monitor="val/loss")
    hs = [history(healthy(rng=np.random.default_rng(i)), gap=2.0) for i in range(5)]
    table = run_table(hs, cfg, stopped=[False] * 5)
    assert not table["best_at_first"].any() and (table["val_loss_slope"] > 0).all()
    assert fired(table, groups_table([0.10, 0.12, 0.15])) == set()
    recs = folds.evaluate_rules(table, groups_table([0.10, 0.12, 0.15]), headline="auc")
    assert folds.apply_recommendations({"fit": {"lr": 1e-3}}, recs) == {"fit": {"lr": 1e-3}, "augment": {}, "sampler": None}
    assert "no rule fired" in folds.recommendation_sentences(recs, "x")


def test_subgroup_and_spread_rules_are_run_level():
    cfg = FitConfig(epochs=15, patience=7, monitor="val/loss")
    table = run_table([history(healthy(rng=np.random.default_rng(i))) for i in range(5)], cfg, stopped=[False] * 5,
                      auc=[0.6, 0.9, 0.7, 0.95, 0.65])
    assert fired(table, groups_table([0.05, 0.1, 0.225])) == {"subgroup", "spread"}
    recs = folds.evaluate_rules(table, groups_table([0.05, 0.1, 0.225]), headline="auc").set_index("rule")
    assert "4.5x" in recs.loc["subgroup", "evidence"] and not recs.loc["spread", "applied"]   # advice only
    assert folds.apply_recommendations({}, recs.reset_index())["sampler"] == "weighted"


def test_opposed_rules_apply_only_the_one_with_more_folds():
    cfg = FitConfig(epochs=3, patience=10, monitor="val/loss")
    hs = [history(rising_from_first(3, rng=np.random.default_rng(i))) for i in range(3)] + \
         [history([1.0, 0.9, 0.8]) for _ in range(2)]
    recs = folds.evaluate_rules(run_table(hs, cfg, stopped=[False] * 5), headline="auc", rules=[
        dataclasses.replace(r, min_share=0.3) if r.name in ("lr_too_high", "underfit") else r for r in folds.RULES])
    applied = recs.set_index("rule")["applied"]
    assert applied["lr_too_high"] and not applied["underfit"]
    assert folds.apply_recommendations({"fit": {"lr": 1e-3}}, recs)["fit"]["lr"] == pytest.approx(3e-4)


def test_diagnostics_of_one_fold():
    cfg = FitConfig(epochs=20, patience=3, schedule="plateau", monitor="val/loss")
    h = history([1.0, 0.8, 0.7, 0.75, 0.8, 0.85], gap=12.5)
    h["lr_end"] = [1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4]
    d = folds.diagnose_fold(h, 3, True, cfg, CLASS)
    assert d["epochs_trained"] == 6 and d["best_epoch"] == 3 and not d["best_at_first"]
    assert d["stop_reason"] == "patience 3" and d["lr_at_stop"] == pytest.approx(1e-4) and d["lr_drops"] == 1
    assert d["gap_at_best"] == pytest.approx(12.5)
    expected = np.polyfit([3, 4, 5, 6], [0.7, 0.75, 0.8, 0.85], 1)[0] / 0.7
    assert d["val_loss_slope"] == pytest.approx(expected)
    assert folds.diagnose_fold(h, 6, False, dataclasses.replace(cfg, epochs=6), CLASS)["stop_reason"] == "epoch budget"
    assert math.isnan(folds.diagnose_fold(h, 6, False, cfg, CLASS)["val_loss_slope"])


def test_the_rules_are_listed_with_their_thresholds():
    table = folds.rules_table()
    assert list(table["rule"]) == [r.name for r in folds.RULES]
    assert "above 10 points" in table.set_index("rule").loc["overfit", "trigger"]
    assert all(name in rules_mod.CHECKS for name in (r.check for r in folds.RULES))


# ---- metrics -----------------------------------------------------------------------------------
def test_ordinal_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    pred = y + rng.normal(0, 0.8, 200)
    m = folds.ordinal_metrics(y, pred, 5)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert m["r2"] == pytest.approx(r2_score(y, pred))
    grades = np.clip(np.rint(pred), 0, 4).astype(int)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, grades, weights="quadratic"))
    assert m["acc"] == pytest.approx(np.mean(grades == y))
    assert folds.round_grades([-0.7, 0.49, 2.5, 3.51, 9.0], 5).tolist() == [0, 0, 2, 4, 4]


def test_regression_loss_and_scorer():
    out = torch.tensor([[0.5], [2.0], [4.0]])
    y = torch.tensor([0, 2, 3])
    assert folds.RegressionLoss("mse")(out, y).tolist() == pytest.approx([0.25, 0.0, 1.0])
    assert folds.RegressionLoss("l1")(out, y).tolist() == pytest.approx([0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="mse or l1"):
        folds.RegressionLoss("huber")

    class Const(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :1]

    split = Split(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    metrics, preds, labels = folds.RegressionScorer(5)(Const(), TensorLoader(split, 2, mean=0.0, std=1.0), "val")
    assert preds.shape == (4, 1) and metrics["val/mae"] == pytest.approx(1.5)
    assert metrics["val/loss"] == pytest.approx(np.mean([0, 1, 4, 9]))


# ---- the shared fit honours min_epochs ---------------------------------------------------------
def test_min_epochs_is_honoured():
    torch.manual_seed(0)
    split = Split(torch.randint(0, 255, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    losses = iter(np.linspace(1.0, 2.0, 20))   # the val loss rises from epoch 1

    def validate(m):
        return {"val/loss": float(next(losses))}

    def run(**kw):
        nonlocal losses
        losses = iter(np.linspace(1.0, 2.0, 20))
        cfg = FitConfig(epochs=20, patience=1, monitor="val/loss", schedule="none", progress="none", **kw)
        return fit(model, TensorLoader(split, 8, shuffle=True), None, "binary-class", cfg, validate=validate)

    plain = run()
    assert len(plain.history) == 2 and plain.best_epoch == 1 and plain.stopped_early
    held = run(min_epochs=5)
    assert len(held.history) == 5 and held.best_epoch == 1 and held.stopped_early


def test_min_lr_floors_the_plateau_and_cosine_schedules():
    from helpers.train import make_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched, per_batch = make_scheduler(opt, FitConfig(schedule="plateau", plateau_patience=0, plateau_factor=0.1,
                                                     min_lr=0.05, monitor="val/loss"), 1)
    for _ in range(5):
        sched.step(1.0)
    assert not per_batch and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt = torch.optim.SGD([p], lr=1.0)
    sched, per_batch = make_scheduler(opt, FitConfig(schedule="cosine", epochs=2, min_lr=0.1), 3)
    for _ in range(6):
        opt.step()
        sched.step()
    assert per_batch and opt.param_groups[0]["lr"] == pytest.approx(0.1)


# ---- fold units on generated data --------------------------------------------------------------
class Poison:
    """A split that fails on any use: proves the fold units never touch the official test split."""

    def __getattr__(self, name):
        raise AssertionError(f"a fold unit touched the test split ({name})")

    def __len__(self):
        raise AssertionError("a fold unit touched the test split (len)")


BASE = {"epochs": 2, "monitor": "val/loss", "progress": "none", "schedule": "plateau", "patience": 1}


def test_fold_units_never_touch_test(retina, tmp_path):
    ds = dataclasses.replace(retina, splits={**retina.splits, "test": Poison(), "val": Poison()})
    rec = Recorder(tmp_path / "res")
    path = folds.fold_file(rec, ds, 2, 0)
    parts = folds.fold_datasets(ds, 2, 0, path)
    assert path.is_file() and all(set(p.splits) == {"train", "val"} for p in parts)
    vals = np.concatenate([p["val"].index.numpy() for p in parts])
    assert sorted(vals.tolist()) == list(range(40))                               # every train image once
    assert all(not set(p["train"].index.tolist()) & set(p["val"].index.tolist()) for p in parts)
    arm = folds.Arm.from_dict("before", {"fit": {**BASE, "epochs": 1}})
    for target in (REG, folds.Target("retinamnist")):
        rows = folds.run_folds(rec, ds, target, arm, k=2, model="cnn", model_kwargs={"widths": [4, 8]},
                               batch_size=16, device="cpu")
        assert len(rows) == 2 and not any(c.startswith("test/") for c in rows.columns)
    for u in rec.units():
        assert not any(k.startswith("test") for k in rec.scores(**u["keys"]))
    assert folds.fold_datasets(ds, 2, 0, path)[0]["val"].index.tolist() == parts[0]["val"].index.tolist()  # reused file


@pytest.mark.slow
def test_the_loop_closes_and_only_the_chosen_config_sees_test(retina, tmp_path):
    rec = Recorder(tmp_path / "res")
    before = {"fit": {"lr": 1e-4, "patience": 10}, "augment": {"hflip": 0.5}}
    r = folds.close_loop(rec, retina, REG, before, k=2, base_fit=BASE, model="cnn",
                         model_kwargs={"widths": [4, 8]}, batch_size=16, device="cpu", ablate=True)
    assert set(r.diagnostics["config"]) == set(r.configs) and "before" in r.configs
    assert set(folds.COLUMNS) - {"target", "config", "fold"} <= set(r.diagnostics.columns)
    assert {"r2", "mae", "qwk"} <= set(r.diagnostics.columns)
    if "after" in r.configs:   # a rule fired: after differs from before, on the same folds, paired
        assert not r.changes.empty and set(r.tests["metric"]) == {"r2", "mae", "qwk"}
        assert (r.tests["n_folds"] == 2).all()
    tested = [u["keys"] for u in rec.units() if any(k.startswith("test") for k in rec.scores(**u["keys"]))]
    assert len(tested) == 1 and tested[0]["fold"] == "final" and tested[0]["config"] == r.chosen
    assert "test/r2" in r.final and "test/qwk" in r.final
    assert folds.out_of_fold(rec, REG, "before")["index"].size == 40
    applied = list(r.recommendations.loc[r.recommendations["applied"], "rule"])
    assert {f"only {a}" for a in applied if len(applied) > 1} <= set(r.configs)
    assert set(r.tests["a"]) == set(r.configs) - {"before"}
    # the page's figures and tables draw from the result
    import matplotlib.pyplot as plt
    from helpers.folds import figures

    hist = folds.fold_histories(rec.histories(), r)
    assert set(hist["config"]) == set(r.configs) and "lr_end" in hist and "train_eval/loss" in hist
    oof = folds.out_of_fold(rec, REG, r.chosen, r.variants[r.chosen])
    for fig in (figures.fold_curves(hist, list(r.configs), r.diagnostics),
                figures.metric_heatmap(r.diagnostics, REG.metrics(), list(r.configs)),
                figures.subgroup_bars(r.groups), figures.predicted_vs_true(oof["labels"], oof["scores"][:, 0], 5)):
        plt.close(fig)
    view = folds.diagnostics_view(r)
    assert {"stopped early", "best was epoch 1", "LR at stop", "QWK"} <= set(view.columns)
    assert list(folds.summary_over_folds(r)["config"]) == list(r.configs)


def test_bad_configs_and_targets_are_refused_before_work():
    from helpers.config import ParamsError

    with pytest.raises(ParamsError, match="lrr"):
        folds.Arm.from_dict("before", {"fit": {"lrr": 1e-3}})
    with pytest.raises(ParamsError, match="sampler"):
        folds.Arm.from_dict("before", {"sampler": "balanced"})
    with pytest.raises(ParamsError, match="kind"):
        folds.Target.from_params({"flag": "retinamnist", "kind": "ordinal"})
    with pytest.raises(ParamsError, match="loss"):
        folds.Target.from_params({"flag": "retinamnist", "kind": "regression", "loss": "huber"})
    with pytest.raises(ParamsError, match="taken"):
        folds.check_configs({}, {"after": {}}, {"epochs": 1})
    assert set(folds.check_configs({"fit": {"lr": 1e-3}}, {"w": {"sampler": "weighted"}}, {"epochs": 2})) == {"before", "w"}
    with pytest.raises(ParamsError, match="ordinal labels"):
        folds.Target.from_params({"flag": "pneumoniamnist", "kind": "regression"})
    with pytest.raises(ParamsError, match="multi-label"):
        folds.Target.from_params({"flag": "chestmnist"})
    with pytest.raises(ParamsError, match="unknown MedMNIST"):
        folds.Target.from_params({"flag": "retina"})


def test_a_binary_flag_gets_its_diagnostics_and_subgroup_errors(tmp_path, make_npz, monkeypatch):
    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    make_npz(tmp_path / "data", "pneumoniamnist", n=(30, 8, 8))
    ds = load("pneumoniamnist", 28, tmp_path / "data", verify=False, download=False)
    rec = Recorder(tmp_path / "res")
    arm = folds.Arm.from_dict("before", {"fit": {**BASE, "epochs": 2}})
    rows = folds.run_folds(rec, ds, CLASS, arm, k=3, model="cnn", model_kwargs={"widths": [4, 8]}, batch_size=16,
                           device="cpu")
    assert {"val/acc", "val/auc", "val/kappa"} <= set(rows.columns) and len(rows) == 3
    table = folds.fold_table(rec, CLASS, "before", arm.fit_config(), ds.n_classes)
    assert list(table["fold"]) == [1, 2, 3] and table["gap_at_best"].notna().all()
    groups = folds.subgroup_table(rec, CLASS, "before", ds.n_classes)
    assert set(groups["group"]) == {0, 1, "all"} and (groups["metric"] == "error").all()
    oof = folds.pooled_metrics(rec, CLASS, "before", ds.n_classes, ds.task)
    assert set(oof) == {"auc", "acc", "kappa"}


def test_small_val_loss_slopes_read_as_numbers_not_as_zero():
    from helpers.folds.rules import _slope

    assert _slope(-0.00041) == "-4.1e-04" and _slope(0.0123) == "+0.012" and _slope(0.0) == "+0.000"
