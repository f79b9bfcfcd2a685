"""The summary package: ECE on known inputs, each corruption, the leaderboard, calibration,
robustness and the RL curves on small fake results trees, the chapters' stored weights rebuilt to
their stored scores (a one-epoch NAS champion and small weighting networks are trained for that),
and the published figures against the copies the chapters keep."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from helpers import config
from helpers.results import Recorder
from helpers.summary import calibration as cal
from helpers.summary import chapters as ch
from helpers.summary.corruptions import CORRUPTIONS, LEVELS, SEVERITIES, corrupt


# ---- expected calibration error ------------------------------------------------------------------
def _probs(conf: float, right: bool, n_classes: int = 2) -> list[float]:
    """A probability row whose top class (class 0) has ``conf``; the label is 0 when ``right``."""
    rest = (1 - conf) / (n_classes - 1)
    return [conf] + [rest] * (n_classes - 1)


def test_ece_is_zero_when_accuracy_equals_confidence_in_every_bin():
    rows, labels = [], []
    for conf, n, n_right in ((0.8, 10, 8), (0.6, 5, 3), (1.0, 4, 4)):
        for i in range(n):
            rows.append(_probs(conf, True, 3))
            labels.append(0 if i < n_right else 1)
    assert cal.ece(np.array(rows), labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_a_hand_computed_case():
    # 4 images at confidence 0.6 with 1 right (gap 0.35), 6 at 0.95 all right (gap 0.05):
    # ECE = 0.4 * 0.35 + 0.6 * 0.05 = 0.17
    probs = np.array([_probs(0.6, True)] * 4 + [_probs(0.95, True)] * 6)
    labels = [0, 1, 1, 1] + [0] * 6
    assert cal.ece(probs, labels, bins=15) == pytest.approx(0.17)
    table = cal.reliability(probs, labels, bins=15)
    assert len(table) == 15 and table["n"].sum() == 10
    full = table[table["n"] > 0]
    assert full["n"].tolist() == [4, 6]
    assert full["accuracy"].tolist() == pytest.approx([0.25, 1.0])
    assert full["confidence"].tolist() == pytest.approx([0.6, 0.95])
    # one bin pools everything: |0.7 - 0.83| = 0.13
    assert cal.ece(probs, labels, bins=1) == pytest.approx(abs(0.7 - (0.4 * 0.6 + 0.6 * 0.95)))


def test_ece_reads_a_binary_positive_score_and_puts_confidence_one_in_the_last_bin():
    pos = np.array([0.9, 0.9, 0.1, 1.0])      # confidences 0.9, 0.9, 0.9, 1.0
    labels = [1, 0, 0, 1]                     # right, wrong, right, right
    two = np.stack([1 - pos, pos], 1)
    assert cal.ece(pos, labels) == pytest.approx(cal.ece(two, labels))
    table = cal.reliability(pos, labels, bins=10)
    assert int(table.loc[table["bin"] == 9, "n"].iloc[0]) == 1
    assert cal.ece(pos, labels, bins=10) == pytest.approx(0.75 * abs(2 / 3 - 0.9))


def test_ece_refuses_logits():
    with pytest.raises(ValueError, match="not probabilities"):
        cal.ece(np.array([[2.0, -1.0], [0.5, 0.3]]), [0, 1])


# ---- corruptions ---------------------------------------------------------------------------------
def _fields(n: int = 12, side: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Smooth random images (uint8, N x C x H x W), like downsampled scans: structure at several scales."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    f = np.stack([gaussian_filter(rng.normal(size=(side, side)), 1.5 * side / 28) for _ in range(n)])
    f = (f - f.min((1, 2), keepdims=True)) / np.ptp(f, (1, 2), keepdims=True)
    img = (f * 200 + 28).astype(np.uint8)[:, None]
    return np.repeat(img, channels, 1)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_corruption_keeps_shape_type_and_range(name, channels):
    x = _fields(channels=channels)
    for sev in SEVERITIES:
        out = corrupt(x, name, sev)
        assert out.shape == x.shape and out.dtype == np.uint8
    t = corrupt(torch.from_numpy(x), name, 3)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == x.shape
    if channels == 3:   # a gray image replicated to RGB stays gray
        assert (t[:, 0] == t[:, 1]).all() and (t[:, 1] == t[:, 2]).all()


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("side", [28, 64])
def test_each_corruption_moves_images_further_at_each_severity(name, side):
    x = _fields(side=side)
    dist = [float(np.abs(corrupt(x, name, s).astype(float) - x).mean()) for s in (0, *SEVERITIES)]
    assert dist[0] == 0
    assert all(b > a for a, b in zip(dist, dist[1:])), dist


def test_corruptions_are_deterministic_for_a_seed():
    x = _fields()
    assert np.array_equal(corrupt(x, "gaussian_noise", 2, seed=5), corrupt(x, "gaussian_noise", 2, seed=5))
    assert not np.array_equal(corrupt(x, "gaussian_noise", 2, seed=5), corrupt(x, "gaussian_noise", 2, seed=6))


def test_contrast_and_noise_strengths_are_the_documented_ones():
    x = np.full((1, 1, 28, 28), 100, np.uint8)
    x[..., :14] = 200   # mean 150
    out = corrupt(x, "contrast", 5).astype(float)   # blended towards the mean gray by factor 0.05
    assert out[0, 0, 0, 20] == pytest.approx(150 + 0.05 * (100 - 150), abs=1)
    flat = np.full((1, 1, 64, 64), 128, np.uint8)
    noisy = corrupt(flat, "gaussian_noise", 3).astype(float)
    assert noisy.std() == pytest.approx(LEVELS["gaussian_noise"][2] * 255, rel=0.15)


def test_corrupt_refuses_unknown_names_severities_and_dtypes():
    x = _fields(2)
    with pytest.raises(ValueError, match="unknown"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "jpeg", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.astype(np.float32), "jpeg", 1)
    assert corrupt(x, "jpeg", 0) is x


# ---- a fake results tree -------------------------------------------------------------------------
RUNS_YML = """root: intro
runs:
  - notebook: notebooks/nas.ipynb
    params: params/nas.yaml
  - notebook: notebooks/baselines.ipynb
    params: params/baselines.yaml
  - notebook: notebooks/summary.ipynb
    params: params/summary.yaml
    needs: "*"
"""


def _scores(rng, n: int, n_classes: int, acc: float):
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    right = rng.random(n) < acc
    logits[np.arange(n), labels] += np.where(right, 4.0, -4.0)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p, labels


@pytest.fixture
def fake_book(tmp_path, monkeypatch):
    """A book folder with a NAS run (champions of rl, random and rl_masked over three seeds; no
    weights) and a baselines run (one model, two seeds), each unit with metrics, scores and histories."""
    book = tmp_path / "book"
    book.mkdir()
    (book / "_runs.yml").write_text(RUNS_YML)
    monkeypatch.setenv("RLMED_BOOK", str(book))
    rng = np.random.default_rng(0)
    nas_root = book / "results" / "nas" / "nas"
    nas_root.mkdir(parents=True)
    (nas_root / "params.yaml").write_text("flag: organamnist\nsize: 28\n")
    champ = Recorder(nas_root / "champions")
    search = Recorder(nas_root)
    acc = {"random": [0.70, 0.72, 0.71], "rl": [0.74, 0.75, 0.71], "rl_masked": [0.69, 0.70, 0.72]}
    for strategy, values in acc.items():
        for seed, a in enumerate(values):
            p, y = _scores(rng, 40, 11, 0.7)
            champ.save_unit({"strategy": strategy, "seed": seed, "arch": "f16-k3-d0.1"},
                            {"test/acc": a, "test/auc": a + 0.2, "test/balanced_acc": a - 0.1, "test/kappa": a - 0.3},
                            scores={"test_scores": p, "test_labels": y, "test_index": np.arange(40)})
            if strategy != "random":
                hist = pd.DataFrame({"episode": [1, 2, 3], "reward": [0.1, 0.2, 0.3], "rl/reward": [0.1, 0.2, 0.3],
                                     "rl/baseline": [0.0, 0.05, 0.1], "rl/entropy": [3.1, 3.0, 2.9]})
            else:
                hist = pd.DataFrame({"episode": [1, 2, 3], "reward": [0.1, 0.2, 0.3]})
            search.save_unit({"strategy": strategy, "seed": seed}, {"mean_reward": 0.2}, history=hist)
    base = Recorder(book / "results" / "baselines" / "baselines")
    (base.root / "params.yaml").write_text("size: 28\nmodel_kwargs: {}\n")
    for seed, a in enumerate([0.80, 0.84]):
        base.save_unit({"flag": "breastmnist", "model": "cnn", "seed": seed}, {"test/acc": a, "test/auc": 0.9})
    return book


def test_stored_runs_read_the_runs_yml_and_skip_summary_pages(fake_book):
    from helpers.summary import stored_runs

    found = stored_runs(fake_book, published=fake_book / "none")
    assert [(r.notebook, r.name, r.source) for r in found] == [("nas", "nas", "local"), ("baselines", "baselines", "local")]


def test_leaderboard_means_roles_and_paired_differences_on_a_fake_tree(fake_book):
    from helpers.summary import leaderboard, paired_differences, per_seed, stored_runs

    finals = ch.final_units(stored_runs(fake_book, published=fake_book / "none"))
    rows = per_seed(finals)
    assert len(rows) == 9 + 2
    board = leaderboard(rows)
    rl = board[(board["run"] == "nas") & (board["method"] == "rl")].iloc[0]
    assert rl["n"] == 3 and rl["role"] == "RL"
    assert rl["test/acc mean"] == pytest.approx(np.mean([0.74, 0.75, 0.71]))
    assert rl["test/acc"] == f"{np.mean([0.74, 0.75, 0.71]):.3f} ± {np.std([0.74, 0.75, 0.71], ddof=1):.3f}"
    roles = dict(zip(board["method"], board["role"]))
    assert roles["random"] == "control" and roles["cnn"] == "model"
    assert np.isnan(board.loc[board["method"] == "cnn", "test/kappa mean"]).all()   # not stored: NaN, not 0

    diffs = paired_differences(rows)
    # rl_masked's control is random_masked, which did not run: no row for it
    assert set(zip(diffs["a"], diffs["b"])) == {("rl", "random")}
    row = diffs[(diffs["a"] == "rl") & (diffs["metric"] == "test/acc")].iloc[0]
    d = np.array([0.74, 0.75, 0.71]) - np.array([0.70, 0.72, 0.71])
    assert row["mean_diff"] == pytest.approx(d.mean()) and row["n_seeds"] == 3
    assert row["p"] == pytest.approx(sps.ttest_rel([0.74, 0.75, 0.71], [0.70, 0.72, 0.71]).pvalue)
    assert row["p_holm"] >= row["p"]
    assert not (diffs["chapter"] == "baselines").any()   # a yardstick has no control
    from helpers.summary import headline_glue

    texts = headline_glue(diffs)
    assert texts["headline-nas-rl-vs-random-acc"] == f"{d.mean():+.3f} (Holm p {row['p_holm']:.2g}, 3 seeds)"
    assert texts["headline-nas-rl_masked-vs-random_masked-acc"] == "not measured in this build"
    assert texts["headline-noise-policy-vs-random-acc"] == "not measured in this build"


def test_glued_texts_tally_a_pair_over_several_settings():
    from helpers.summary import faithful_glue, headline_glue

    def row(dataset, diff, p):
        return {"chapter": "apga", "run": "apga", "dataset": dataset, "a": "apga", "b": "cutout", "metric": "test/acc",
                "n_seeds": 3, "mean_diff": diff, "p_holm": p}

    diffs = pd.DataFrame([row("a", 0.02, 0.01), row("b", 0.01, 0.4), row("c", -0.03, 0.02), row("d", np.nan, np.nan)])
    text = headline_glue(diffs)["headline-apga-apga-vs-cutout-acc"]
    assert text == ("higher in 2 of 3 settings (1 significant after Holm), lower in 1 (1 significant); "
                    "mean difference +0.000, 3+ seeds")
    faithful = diffs.assign(b="apga_faithful")
    assert faithful_glue(faithful)["faithful-apga-apga-acc"] == text
    assert faithful_glue(faithful.iloc[:1])["faithful-apga-apga-acc"] == "+0.020 (Holm p 0.01, 3 seeds)"
    # the full-profile columns read the chapter's <chapter>_full run only, under their own keys
    assert headline_glue(diffs, full=True)["headline-full-apga-apga-vs-cutout-acc"] == "no full-profile run published"
    full = pd.concat([diffs, diffs.iloc[:1].assign(run="apga_full", mean_diff=-0.05, p_holm=0.5, n_seeds=5)])
    assert headline_glue(full, full=True)["headline-full-apga-apga-vs-cutout-acc"] == "-0.050 (Holm p 0.5, 5 seeds)"
    assert headline_glue(full)["headline-apga-apga-vs-cutout-acc"] == text
    tiny = full.iloc[-1:].assign(mean_diff=-0.0002)
    assert headline_glue(tiny, full=True)["headline-full-apga-apga-vs-cutout-acc"] == "+0.000 (Holm p 0.5, 5 seeds)"
    assert faithful_glue(full.assign(b="apga_faithful"), full=True)["faithful-full-apga-apga-acc"] == "-0.050 (Holm p 0.5, 5 seeds)"


def test_full_runs_text_names_each_chapters_full_run_with_its_device():
    from helpers.summary import full_runs_text

    cover = pd.DataFrame([{"chapter": "nas", "run": "nas", "source": "local", "device": "CPU x2", "seeds": 3},
                          {"chapter": "nas", "run": "nas_full", "source": "published", "device": "NVIDIA H200", "seeds": 3},
                          {"chapter": "folds", "run": "folds_full", "source": "published", "device": None, "seeds": 1}])
    assert full_runs_text(cover) == ("nas_full (published, NVIDIA H200, 3 seeds), "
                                     "folds_full (published, device not recorded, 1 seed)")
    assert full_runs_text(cover.iloc[:1]) == "none"


def test_calibration_of_the_fake_tree_is_each_units_ece(fake_book):
    from helpers.summary import calibration_tables, stored_runs

    finals = ch.final_units(stored_runs(fake_book, published=fake_book / "none"))
    per, diagram, skipped = calibration_tables(finals, bins=10)
    assert len(per) == 9 and set(skipped["chapter"]) == {"baselines"}   # baselines stored no scores
    u = next(f for f in finals if f.method == "rl" and f.seed == 1)
    sc = u.scores()
    assert per[(per["method"] == "rl") & (per["seed"] == 1)]["ece"].iloc[0] == pytest.approx(
        cal.ece(sc["test_scores"], sc["test_labels"], 10))
    pooled = diagram[diagram["method"] == "rl"]
    assert pooled["n"].sum() == 3 * 40 and len(pooled) == 10


def test_rl_curves_read_the_rl_keys_of_every_unit(fake_book):
    from helpers.summary import rl_curves, stored_runs

    curves = rl_curves(stored_runs(fake_book, published=fake_book / "none"))
    assert set(curves["method"]) == {"rl", "rl_masked"}
    assert set(curves["key"]) == {"rl/reward", "rl/baseline", "rl/entropy"}
    assert set(curves["x_name"]) == {"episode"} and len(curves) == 2 * 3 * 3 * 3


def test_units_without_weights_are_left_out_of_robustness_with_the_reason(fake_book):
    from helpers.summary import robustness_rows, stored_runs

    finals = ch.final_units(stored_runs(fake_book, published=fake_book / "none"))
    rows, skipped = robustness_rows(finals, severities=(1,))
    assert rows.empty and len(skipped) == len(finals)
    assert skipped["why"].str.contains("weights file").all()


@pytest.fixture
def baselines_book(tmp_path, monkeypatch):
    """An empty book whose baselines run is to be filled by the test: ``(book folder, its recorder)``;
    skips without the real BreastMNIST (the units' scores point into its test split)."""
    if not (config.data_root() / "breastmnist.npz").is_file():
        pytest.skip("real BreastMNIST not found; set RLMED_DATA")
    book = tmp_path / "book"
    book.mkdir()
    (book / "_runs.yml").write_text(RUNS_YML)
    monkeypatch.setenv("RLMED_BOOK", str(book))
    return book, Recorder(book / "results" / "baselines" / "baselines")


def test_robustness_rebuilds_a_stored_model_exactly_and_scores_corrupted_images(baselines_book):
    """A baselines-like unit whose weights and scores were made here (an untrained CNN, no training):
    the rebuilt model reproduces the stored scores, and every corruption and severity gets a row."""
    from helpers import data as data_mod
    from helpers.models import create_model
    from helpers.summary import by_corruption, robustness_rows, robustness_summary, stored_runs
    from helpers.summary.robustness import predict_probs

    book, rec = baselines_book
    (rec.root / "params.yaml").write_text("size: 28\nmodel_kwargs: {cnn: {widths: [8, 16]}}\n")
    split = data_mod.load("breastmnist", 28, splits=("test",))["test"]
    index = np.arange(0, len(split), 3)
    torch.manual_seed(0)
    for seed in (0, 1):
        model = create_model("cnn", num_classes=2, in_chans=1, widths=[8, 16]).eval()
        keys = {"flag": "breastmnist", "model": "cnn", "seed": seed}
        probs = predict_probs([model], split.images[torch.as_tensor(index)], "binary-class")
        labels = split.labels.numpy()[index]
        rec.save_model(keys, model.state_dict())
        rec.save_unit(keys, {"test/acc": float((probs.argmax(1) == labels).mean())},
                      scores={"test_scores": probs, "test_labels": labels, "test_index": index})
    finals = ch.final_units(stored_runs(book, published=book / "none"))
    rows, skipped = robustness_rows(finals, corruptions=("gaussian_noise", "pixelate"), severities=(1, 5), max_images=30)
    assert skipped.empty
    assert len(rows) == 2 * (1 + 2 * 2) and (rows["n"] == 30).all()
    assert (rows["clean_agree"] == 1.0).all() and rows["clean_max_diff"].max() < 1e-5
    compact = by_corruption(rows)
    assert len(compact) == 1 and compact["images"].iloc[0] == 30 and compact["seeds"].iloc[0] == 2
    table = robustness_summary(rows)
    assert list(table["corruption"]) == ["gaussian_noise", "pixelate"]
    assert {"clean", "severity 1", "severity 5", "mean corrupted"} <= set(table.columns)


def test_robustness_refuses_a_unit_whose_data_changed(baselines_book):
    from helpers.models import create_model
    from helpers.summary import robustness_rows, stored_runs

    book, rec = baselines_book
    (rec.root / "params.yaml").write_text("size: 28\n")
    keys = {"flag": "breastmnist", "model": "cnn", "seed": 0}
    rec.save_model(keys, create_model("cnn", num_classes=2, in_chans=1).state_dict())
    index = np.arange(10)
    wrong = 1 - np.asarray([0] * 10)   # labels the data file does not have at these positions (not all 1)
    wrong[::2] = 0
    from helpers import data as data_mod
    true = data_mod.load("breastmnist", 28, splits=("test",))["test"].labels.numpy()[index]
    if np.array_equal(true, wrong):
        wrong = 1 - wrong
    rec.save_unit(keys, {"test/acc": 0.5}, scores={"test_scores": np.full((10, 2), 0.5), "test_labels": wrong,
                                                    "test_index": index})
    rows, skipped = robustness_rows(ch.final_units(stored_runs(book, published=book / "none")), severities=(1,))
    assert rows.empty and skipped["why"].str.contains("data changed").all()


def _published_copy(local, dest):
    """``local`` as ``helpers.book.publish`` leaves it without the final models' scores: no weights, no npz."""
    import shutil

    shutil.copytree(local, dest, ignore=shutil.ignore_patterns("*.npz", "*.pt", "models", "scores"))
    return dest


def test_a_published_run_without_scores_is_calibrated_from_its_derived_tables(fake_book, tmp_path):
    from helpers.summary import calibration_tables, coverage
    from helpers.summary.derived import derive_tables, write_tables

    local = fake_book / "results" / "nas" / "nas"
    tables = derive_tables(ch.RunRef("nas", "nas", local), severities=(1,))
    assert len(tables["calibration"]) == 9 and len(tables["robustness_skipped"]) == 9   # no weights here
    pub = _published_copy(local, tmp_path / "pub" / "nas" / "nas")
    write_tables(tables, pub)
    local_finals = ch.final_units([ch.RunRef("nas", "nas", local)])
    pub_finals = ch.final_units([ch.RunRef("nas", "nas", pub, "published")])
    assert not any(f.has_scores for f in pub_finals)
    here, there = calibration_tables(local_finals), calibration_tables(pub_finals)
    assert there[2].empty
    pd.testing.assert_frame_equal(here[0], there[0], check_dtype=False)
    pd.testing.assert_frame_equal(here[1], there[1], check_dtype=False)
    assert calibration_tables(pub_finals, bins=10)[2]["why"].str.contains("published with 15 bins").all()
    assert coverage(pub_finals, [ch.RunRef("nas", "nas", pub, "published")])["with scores"].iloc[0] == 9
    # a local unit never reads a derived table, even when one lies beside it
    write_tables(tables, local)
    assert not len(local_finals[0].published_rows("calibration"))


def test_a_published_runs_robustness_is_read_from_the_rows_computed_at_publishing(baselines_book, tmp_path):
    from helpers.models import create_model
    from helpers.summary import coverage, robustness_rows
    from helpers.summary.derived import derive_tables, write_tables
    from helpers.summary.robustness import predict_probs

    book, rec = baselines_book
    (rec.root / "params.yaml").write_text("size: 28\nmodel_kwargs: {cnn: {widths: [8, 16]}}\n")
    from helpers import data as data_mod

    split = data_mod.load("breastmnist", 28, splits=("test",))["test"]
    index = np.arange(0, len(split), 5)
    torch.manual_seed(1)
    model = create_model("cnn", num_classes=2, in_chans=1, widths=[8, 16]).eval()
    keys = {"flag": "breastmnist", "model": "cnn", "seed": 0}
    probs = predict_probs([model], split.images[torch.as_tensor(index)], "binary-class")
    rec.save_model(keys, model.state_dict())
    rec.save_unit(keys, {"test/acc": 0.5}, scores={"test_scores": probs, "test_labels": split.labels.numpy()[index],
                                                    "test_index": index})
    run = ch.RunRef("baselines", "baselines", rec.root)
    tables = derive_tables(run, corruptions=("gaussian_blur", "jpeg"), severities=(2, 4), max_images=40)
    pub = _published_copy(rec.root, tmp_path / "pub" / "baselines" / "baselines")
    write_tables(tables, pub)
    pub_run = ch.RunRef("baselines", "baselines", pub, "published")
    finals = ch.final_units([pub_run])
    assert finals[0].weights_missing
    here, _ = robustness_rows(ch.final_units([run]), corruptions=("gaussian_blur", "jpeg"), severities=(2, 4),
                              max_images=40)
    there, skipped = robustness_rows(finals, corruptions=("jpeg", "pixelate"), severities=(4,))
    assert skipped.empty and (there["computed"] == "at publish").all() and (here["computed"] == "here").all()
    # the requested corruptions and severities that were computed: jpeg at 4 (and clean); no pixelate
    assert set(zip(there["corruption"], there["severity"])) == {("none", 0), ("jpeg", 4)}
    want = here[here["corruption"].isin(["none", "jpeg"]) & here["severity"].isin([0, 4])]
    assert np.allclose(there["acc"].to_numpy(), want["acc"].to_numpy())
    cover = coverage(finals, [pub_run]).iloc[0]
    assert cover["robustness at publish"] == 1 and cover["rebuildable"] == 0 and cover["why not"] == "–"


# ---- declared facts against the chapters' own ----------------------------------------------------
def test_declared_controls_are_the_chapters_own():
    from helpers.apga.protocol import CONTROLS as APGA_CONTROLS, METHODS as APGA_METHODS
    from helpers.ensemble.pipeline import GATED, LABELS
    from helpers.nas.strategies import STRATEGIES
    from helpers.noise.protocol import METHODS as NOISE_METHODS

    for name, s in STRATEGIES.items():
        if s.control:
            assert s.control in ch.CHAPTERS["nas"].controls[name], name
    assert set(ch.CHAPTERS["nas"].rl) == {n for n, s in STRATEGIES.items() if s.learns}
    apga = ch.CHAPTERS["apga"]
    assert set(apga.controls) | {c for v in apga.controls.values() for c in v} <= set(APGA_METHODS)
    assert set(apga.controls["apga"]) == set(APGA_CONTROLS)
    noise = ch.CHAPTERS["noise"]
    assert set(noise.controls) | {c for v in noise.controls.values() for c in v} <= set(NOISE_METHODS)
    ens = ch.CHAPTERS["ensemble"]
    names = set(LABELS.values()) | {v + GATED for v in LABELS.values()}
    assert set(ens.controls) <= names and set(ens.rl) <= names and ch.ENSEMBLE_AVERAGE == LABELS["average"]
    assert set(ens.controls) == names - {LABELS["average"]}
    for key, spec in ch.CHAPTERS.items():   # each headline pair is a declared method and one of its controls
        for a, b in spec.headline:
            assert b in spec.controls.get(a, ()), (key, a, b)


def test_published_file_agrees_with_the_copies_the_chapters_keep():
    from helpers.ensemble.pipeline import REFERENCE
    from helpers.noise.figures import PUBLISHED as NOISE
    from helpers.reference import MEDMNIST_V2, RLMEDNAS
    from helpers.summary.published import load, published_table

    groups = load()
    v2 = {e["method"]: e["rows"] for e in groups["medmnist_v2"]["entries"]}
    assert set(v2) == set(MEDMNIST_V2)
    for method, per in MEDMNIST_V2.items():
        for flag, (auc, acc) in per.items():
            assert v2[method][flag] == {"auc": auc, "acc": acc}, (method, flag)
    nas = {e["method"]: next(iter(e["rows"].values())) for e in groups["rlmednas"]["entries"]}
    for phase, (reward, params, acc) in RLMEDNAS.items():
        assert nas[phase] == {"reward": reward, "params": params, "acc": acc}
    v3 = groups["ensemble"]["entries"][0]["rows"]["MURA valid (image level)"]
    assert v3 == {"acc": REFERENCE["acc"], "kappa": REFERENCE["kappa"]}
    noise = {e["method"]: next(iter(e["rows"].values())) for e in groups["noise"]["entries"]}
    assert noise["plain (baseline)"]["f1"] == NOISE.loc[NOISE["method"] == "plain", "f1"].iloc[0]
    assert noise["policy gradient"]["balanced_acc"] == NOISE.loc[NOISE["method"] == "policy", "balanced_acc"].iloc[0]
    table = published_table()
    assert table["source"].str.len().gt(10).all() and table["protocol"].str.len().gt(10).all()
    assert not table.loc[table["group"] == "noise", "verified"].any()   # the unverified ones say so


def test_an_ensembles_average_and_weighting_network_are_rebuilt_from_stored_weights(tmp_path, monkeypatch):
    """An ensemble-like run: two members x two fold models (untrained CNNs) and a weighting network,
    stored as the chapter stores them; the summary rebuilds the plain average and the weighted
    combination and reproduces their stored test scores."""
    from helpers import data as data_mod
    from helpers.ensemble.combine import WeightNet, combine, to_logp
    from helpers.models import create_model
    from helpers.summary import robustness_rows, stored_runs
    from helpers.summary.robustness import predict_probs

    if not (config.data_root() / "breastmnist.npz").is_file():
        pytest.skip("real BreastMNIST not found; set RLMED_DATA")
    book = tmp_path / "book"
    book.mkdir()
    (book / "_runs.yml").write_text("root: intro\nruns:\n  - notebook: notebooks/ensemble.ipynb\n    params: params/ensemble.yaml\n")
    monkeypatch.setenv("RLMED_BOOK", str(book))
    rec = Recorder(book / "results" / "ensemble" / "ensemble")
    (rec.root / "params.yaml").write_text("flag: breastmnist\nsize: 28\nmember_model: cnn\n"
                                          "member_kwargs: {widths: [8, 16]}\ncombiner: {hidden: 8}\n")
    split = data_mod.load("breastmnist", 28, splits=("test",))["test"]
    index = np.arange(0, len(split), 4)
    images, labels = split.images[torch.as_tensor(index)], split.labels.numpy()[index]
    torch.manual_seed(1)
    members = []
    for member in range(2):
        folds = []
        for fold in range(2):
            model = create_model("cnn", num_classes=2, in_chans=1, widths=[8, 16]).eval()
            keys = {"role": "member", "member": member, "fold": fold, "seed": 0}
            probs = predict_probs([model], images, "binary-class")
            rec.save_model(keys, model.state_dict())
            rec.save_unit(keys, {"test/acc": 0.5}, scores={"test_scores": probs, "test_labels": labels,
                                                            "test_index": index})
            folds.append(probs)
        members.append(np.mean(folds, 0))
    stack = np.stack(members)
    net = WeightNet(2, 2, 8)
    with torch.no_grad():
        net.mlp[0].weight.normal_()   # weights that differ per image, so a wrong rebuild shows
        x = to_logp(stack).transpose(0, 1).contiguous()
        weighted = combine(x, net.mean_weights(x)).exp().numpy()
    for name, probs in (("average", stack.mean(0)), ("rl", weighted)):
        keys = {"role": "combiner", "combiner": name, "expert": False, "seed": 0}
        if name == "rl":
            rec.save_model(keys, net.state_dict())
        rec.save_unit(keys, {"test/acc": float((probs.argmax(1) == labels).mean())},
                      scores={"test_scores": probs, "test_labels": labels})
    finals = ch.final_units(stored_runs(book, published=book / "none"))
    assert {f.method for f in finals} == {"plain average", "weighting, REINFORCE"}
    rows, skipped = robustness_rows(finals, corruptions=("contrast",), severities=(2,))
    assert skipped.empty and len(rows) == 2 * 2
    assert (rows["clean_agree"] == 1.0).all() and rows["clean_max_diff"].max() < 1e-5
    assert not np.allclose(weighted, stack.mean(0))   # the two combiners really differ


def test_nas_champions_keep_weights_that_the_summary_rebuilds_exactly(tmp_path, make_npz, monkeypatch):
    """The chapter -> summary contract on a real chapter function: a retrained NAS champion stores its
    weights (``keep_model``), and the summary's reader rebuilds it to the stored test scores."""
    from helpers import data, nas
    from helpers.train import FitConfig

    monkeypatch.setenv("RLMED_CACHE", str(tmp_path / "cache"))
    make_npz(tmp_path, "organamnist", size=28, n=(33, 11, 11))
    ds = data.load("organamnist", 28, tmp_path, verify=False, download=False)
    episodes = pd.DataFrame({"strategy": ["rl"], "seed": [0], "episode": [1], "reward": [0.5], "arch": ["f16-k3-d0.25"]})
    root = tmp_path / "book" / "results" / "nas" / "nas"
    root.mkdir(parents=True)
    (root / "params.yaml").write_text("flag: organamnist\nsize: 28\n")
    nas.retrain_champions(Recorder(root), ds, episodes, FitConfig(epochs=1, schedule="none", progress="none"),
                          batch_size=8, device="cpu")
    [unit] = ch.final_units([ch.RunRef("nas", "nas", root)])
    assert unit.weights_missing == "" and unit.role == "RL"
    sc = unit.scores()
    probs = unit.model.predictor()(ds["test"].images[torch.as_tensor(sc["test_index"])])
    np.testing.assert_allclose(probs, sc["test_scores"], atol=1e-5)


@pytest.mark.parametrize("combiner", ["rl", "faithful", "ce"])
def test_the_ensembles_weighting_networks_keep_the_weights_of_their_stored_scores(combiner, tmp_path):
    """The ensemble chapter stores each weighting network's selected state with its unit, and a
    WeightNet loaded from it reproduces the unit's stored test scores (what the summary rebuilds)."""
    from helpers.ensemble import combine as C
    from helpers.ensemble.members import ScoreStack
    from helpers.train import FitConfig

    rng = np.random.default_rng(0)

    def split(m):
        y = rng.integers(0, 2, m)
        p = rng.dirichlet(np.ones(2), size=(3, m))
        p[0] = 0.7 * np.eye(2)[y] + 0.3 * p[0]
        return p, y
    (tr, ytr), (va, yva), (te, yte) = split(120), split(40), split(40)
    stack = ScoreStack(tr, va, te, ytr, yva, yte, names=["member 0", "member 1", "member 2"])
    rec = Recorder(tmp_path / "r")
    unit = C.combiner_unit(rec, stack, combiner, 0, FitConfig(epochs=2, lr=1e-2, schedule="none", progress="none"),
                           "binary-class", settings={"hidden": 8})
    net = C.WeightNet(3, 2, 8)
    net.load_state_dict(rec.load_model(**unit["keys"]))
    net.eval()
    with torch.no_grad():
        x = C.to_logp(stack.test).transpose(0, 1).contiguous()
        probs = C.combine(x, net.mean_weights(x)).exp().numpy()
    np.testing.assert_allclose(probs, rec.scores(**unit["keys"])["test_scores"], atol=1e-5)
