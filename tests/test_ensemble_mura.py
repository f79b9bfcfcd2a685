"""The MURA loader on a small generated tree in the release layout (the real data is licensed)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.ensemble import mura


@pytest.fixture()
def tree(tmp_path):
    mura.make_tree(tmp_path, parts=("WRIST", "ELBOW"), patients=3, studies=2, images=2, size=16, seed=0)
    return tmp_path


def test_reads_the_layout_with_labels_from_folder_names(tree):
    df = mura.read_split(tree, "train")
    assert len(df) == 2 * 3 * 2 * 2
    assert set(df["part"]) == {"WRIST", "ELBOW"}
    for _, row in df.iterrows():
        assert row["label"] == int("positive" in row["study_id"])
    # both the parent folder and MURA-v1.1 itself are accepted
    assert len(mura.read_split(tree / "MURA-v1.1", "valid")) == 24


def test_body_parts_are_filtered_and_checked(tree):
    wrist = mura.read_split(tree, "train", parts=["XR_WRIST"])
    assert set(wrist["part"]) == {"WRIST"} and len(wrist) == 12
    with pytest.raises(mura.MuraError, match="unknown body part"):
        mura.read_split(tree, "train", parts=["KNEE"])


def test_study_probability_is_the_mean_of_its_images(tree):
    df = mura.read_split(tree, "valid")
    rng = np.random.default_rng(0)
    p1 = rng.random(len(df))
    probs = np.stack([1 - p1, p1], 1)
    studies = mura.study_scores(df, probs)
    assert len(studies) == df["study_id"].nunique() == 12
    for sid, g in df.assign(p=p1).groupby("study_id"):
        assert studies.set_index("study_id").loc[sid, "prob"] == pytest.approx(g["p"].mean())
    table = mura.per_part(studies)
    assert list(table["part"]) == ["XR_ELBOW", "XR_WRIST", "all"]
    assert table.iloc[-1]["n"] == 12 and 0 <= table.iloc[-1]["acc"] <= 1


def test_study_kappa_matches_sklearn():
    from sklearn.metrics import cohen_kappa_score

    df = pd.DataFrame({"label": [0, 0, 1, 1, 1, 0], "prob": [0.1, 0.7, 0.8, 0.9, 0.2, 0.3]})
    m = mura.study_metrics(df)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(df["label"], (df["prob"] >= 0.5).astype(int)))
    assert m["correct"] == 4 and m["n"] == 6


def test_missing_csv_is_a_clear_error(tree):
    (tree / "MURA-v1.1" / "train_labeled_studies.csv").unlink()
    with pytest.raises(mura.MuraError, match="train_labeled_studies.csv is missing"):
        mura.read_split(tree, "train")


def test_an_image_that_is_not_a_png_is_refused(tree):
    df = mura.read_split(tree, "train")
    with open(df["path"][3], "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 a jpeg, not a png")
    with pytest.raises(mura.MuraError, match="is not a PNG"):
        mura.read_split(tree, "train")


def test_an_empty_study_is_refused(tree):
    csv = tree / "MURA-v1.1" / "valid_image_paths.csv"
    lines = csv.read_text().splitlines()
    first_study = lines[0].rsplit("/", 1)[0]
    csv.write_text("\n".join(l for l in lines if not l.startswith(first_study + "/")) + "\n")
    with pytest.raises(mura.MuraError, match="no images"):
        mura.read_split(tree, "valid")


def test_a_label_contradicting_the_folder_is_refused(tree):
    csv = tree / "MURA-v1.1" / "train_labeled_studies.csv"
    lines = csv.read_text().splitlines()
    path, label = lines[0].rsplit(",", 1)
    lines[0] = f"{path},{1 - int(label)}"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(mura.MuraError, match="folder name says"):
        mura.read_split(tree, "train")


def test_a_missing_tree_names_the_fix(tmp_path):
    with pytest.raises(mura.MuraError, match="mura_root"):
        mura.read_split(tmp_path / "nowhere", "train")


def test_as_dataset_splits_patients_and_uses_valid_as_test(tree):
    ds, meta = mura.as_dataset(tree, size=16, val_fraction=0.34, seed=0)
    assert ds["train"].images.shape[1:] == (1, 16, 16)
    assert len(ds["test"]) == len(meta["test"]) == 24
    assert not set(meta["train"]["patient"]) & set(meta["val"]["patient"])
    assert len(ds["train"]) + len(ds["val"]) == 24
    assert ds["train"].labels.tolist() == meta["train"]["label"].tolist()
