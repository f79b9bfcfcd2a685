"""Tests for helpers.metrics (MedMNIST-compatible metrics and tables)."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

from helpers.metrics import (
    classification_metrics,
    format_mean_std,
    get_acc,
    get_auc,
    mean_std,
    per_group_accuracy,
    predict_labels,
    regression_metrics,
)

medmnist_eval = pytest.importorskip("medmnist.evaluator")

TASKS = ["binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression"]


def _random_data(task, seed, n=60, c=5, y_shape_2d=True):
    rng = np.random.default_rng(seed)
    if task == "multi-label, binary-class":
        y_true = rng.integers(0, 2, size=(n, c))
        # sigmoid-like independent probabilities
        y_score = rng.random((n, c))
        return y_true, y_score
    k = 2 if task == "binary-class" else c
    y_true = rng.integers(0, k, size=(n, 1) if y_shape_2d else (n,))
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y_true.reshape(-1)] * rng.random((n, 1))
    y_score = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y_true, y_score


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_acc_auc_match_medmnist(task, seed):
    y_true, y_score = _random_data(task, seed)
    assert get_acc(y_true, y_score, task) == pytest.approx(
        medmnist_eval.getACC(y_true, y_score, task), abs=1e-12
    )
    assert get_auc(y_true, y_score, task) == pytest.approx(
        medmnist_eval.getAUC(y_true, y_score, task), abs=1e-12
    )


@pytest.mark.parametrize("task", TASKS)
def test_acc_auc_match_medmnist_other_shapes_and_threshold(task):
    y_true, y_score = _random_data(task, 7, y_shape_2d=False)
    for thr in (0.3, 0.5, 0.7):
        assert get_acc(y_true, y_score, task, threshold=thr) == pytest.approx(
            medmnist_eval.getACC(y_true, y_score, task, threshold=thr)
        )
    if task == "binary-class":
        # positive-class column only, (N,) and (N, 1) score shapes
        for s in (y_score[:, 1], y_score[:, 1:]):
            assert get_acc(y_true, s, task) == pytest.approx(medmnist_eval.getACC(y_true, s, task))
            assert get_auc(y_true, s, task) == pytest.approx(medmnist_eval.getAUC(y_true, s, task))


def test_known_values():
    y = np.array([0, 0, 1, 1])
    s = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    assert get_acc(y, s, "binary-class") == pytest.approx(0.75)
    assert get_auc(y, s, "binary-class") == pytest.approx(1.0)
    # the last column is the positive score: a swapped matrix flips the AUC
    assert get_auc(y, s[:, ::-1], "binary-class") == pytest.approx(0.0)


def test_auc_single_class_is_nan():
    y = np.zeros(5, dtype=int)
    s = np.random.default_rng(0).random((5, 2))
    assert math.isnan(get_auc(y, s, "binary-class"))
    # multi-class with a class absent from y_true -> that one-vs-rest AUC undefined
    y3 = np.array([0, 1, 0, 1])
    assert math.isnan(get_auc(y3, np.full((4, 3), 1 / 3), "multi-class"))
    m = classification_metrics(y, s, "binary-class")
    assert math.isnan(m["auc"]) and isinstance(m["acc"], float)


def test_torch_inputs():
    torch = pytest.importorskip("torch")
    y_true, y_score = _random_data("multi-class", 3)
    a = get_acc(torch.tensor(y_true), torch.tensor(y_score, requires_grad=True), "multi-class")
    assert a == pytest.approx(medmnist_eval.getACC(y_true, y_score, "multi-class"))


@pytest.mark.parametrize("task", ["binary-class", "multi-class", "ordinal-regression"])
def test_classification_metrics_vs_sklearn(task):
    y_true, y_score = _random_data(task, 11)
    m = classification_metrics(y_true, y_score, task)
    pred = np.argmax(y_score, axis=1)
    y = y_true.reshape(-1)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["acc"] == pytest.approx(medmnist_eval.getACC(y_true, y_score, task))
    assert m["auc"] == pytest.approx(medmnist_eval.getAUC(y_true, y_score, task))
    expected_keys = {"acc", "auc", "balanced_acc", "kappa"}
    if task == "ordinal-regression":
        expected_keys.add("mae")
        assert m["mae"] == pytest.approx(np.abs(pred - y).mean())
    assert set(m) == expected_keys
    assert all(type(v) is float for v in m.values())
    # kappa is not just accuracy: sanity check that they differ on this data
    assert m["kappa"] != pytest.approx(m["acc"])


def test_classification_metrics_multilabel_means_over_labels():
    task = "multi-label, binary-class"
    y_true, y_score = _random_data(task, 5)
    m = classification_metrics(y_true, y_score, task)
    pred = (y_score > 0.5).astype(int)
    L = y_true.shape[1]
    assert m["balanced_acc"] == pytest.approx(
        np.mean([balanced_accuracy_score(y_true[:, i], pred[:, i]) for i in range(L)])
    )
    assert m["kappa"] == pytest.approx(
        np.mean([cohen_kappa_score(y_true[:, i], pred[:, i]) for i in range(L)])
    )
    assert "mae" not in m
    np.testing.assert_array_equal(predict_labels(y_score, task), pred)


def test_ordinal_mae_known():
    y = np.array([[0], [1], [2], [3]])
    s = np.eye(4)[[0, 3, 2, 1]]  # predictions 0, 3, 2, 1
    m = classification_metrics(y, s, "ordinal-regression")
    assert m["mae"] == pytest.approx((0 + 2 + 0 + 2) / 4)
    assert m["acc"] == pytest.approx(0.5)


def test_regression_metrics():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 4.0])
    r = regression_metrics(y, p)
    assert set(r) == {"mae", "r2"}
    assert r["mae"] == pytest.approx(0.25)
    assert r["r2"] == pytest.approx(1 - 0.5 / 5.0)


def test_per_group_accuracy():
    y_true = [0, 1, 1, 0, 2, 2]
    y_pred = [0, 1, 0, 0, 1, 2]
    groups = ["b", "a", "a", "b", "c", "c"]
    t = per_group_accuracy(y_true, y_pred, groups)
    assert list(t.columns) == ["group", "n", "correct", "acc"]
    assert list(t["group"]) == ["a", "b", "c", "all"]
    assert list(t["n"]) == [2, 2, 2, 6]
    assert list(t["correct"]) == [1, 2, 1, 4]
    np.testing.assert_allclose(t["acc"], [0.5, 1.0, 0.5, 4 / 6])


def test_mean_std_numbers():
    df = pd.DataFrame(
        {
            "method": ["rl", "rl", "rl", "base", "base", "solo"],
            "dataset": ["d"] * 6,
            "acc": [0.90, 0.92, 0.94, 0.80, 0.84, 0.70],
            "auc": [0.95, 0.95, 0.98, 0.90, 0.92, 0.75],
        }
    )
    out = mean_std(df, ["method", "dataset"], ["acc", "auc"])
    assert list(out.columns) == ["method", "dataset", "acc_mean", "acc_std", "auc_mean", "auc_std", "n"]
    out = out.set_index("method")
    assert out.loc["rl", "acc_mean"] == pytest.approx(0.92)
    assert out.loc["rl", "acc_std"] == pytest.approx(0.02)  # ddof=1
    assert out.loc["rl", "auc_mean"] == pytest.approx(0.96)
    assert out.loc["rl", "auc_std"] == pytest.approx(np.std([0.95, 0.95, 0.98], ddof=1))
    assert out.loc["base", "acc_std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert out.loc["rl", "n"] == 3 and out.loc["base", "n"] == 2 and out.loc["solo", "n"] == 1
    assert math.isnan(out.loc["solo", "acc_std"])
    pop = mean_std(df, "method", "acc", ddof=0).set_index("method")
    assert pop.loc["rl", "acc_std"] == pytest.approx(np.std([0.90, 0.92, 0.94]))
    assert pop.loc["solo", "acc_std"] == pytest.approx(0.0)


def test_format_mean_std():
    assert format_mean_std(0.93512, 0.00412) == "0.935 ± 0.004"
    assert format_mean_std(0.93512, 0.00412, digits=2) == "0.94 ± 0.00"
    assert format_mean_std(0.935, float("nan")) == "0.935 ± –"
    assert format_mean_std(np.float32(0.5), None) == "0.500 ± –"
    assert format_mean_std(52846.84, 1203.4) == "52,847 ± 1,203"
    assert format_mean_std(34667.0, float("nan")) == "34,667 ± –"
    assert format_mean_std(999.5, 2.0) == "999.500 ± 2.000"


def test_paired_test_reads_differences_equal_up_to_rounding_as_no_variation():
    """Two seeds whose differences match but for float noise once gave t = 5.6e13, p = 0.000."""
    import math

    import pandas as pd

    from helpers.stats import paired_test

    a = pd.Series([0.3820, 0.9115]); b = a - 0.0016   # the same difference, rounded differently
    assert (a - b).std(ddof=1) > 0                     # float noise: not exactly equal
    res = paired_test(pd.DataFrame({"a": a, "b": b}), "a", "b")
    assert math.isnan(res["t"]) and math.isnan(res["p"]) and res["mean_diff"] == pytest.approx(0.0016)
    real = paired_test(pd.DataFrame({"a": [0.5, 0.6, 0.7], "b": [0.45, 0.58, 0.66]}), "a", "b")
    assert real["t"] > 0 and 0 < real["p"] < 1
