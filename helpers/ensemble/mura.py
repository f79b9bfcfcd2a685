"""The MURA v1.1 release layout (Rajpurkar et al. 2017, arXiv:1712.06957): image- and study-level.

MURA is licensed (Stanford AIMI): it is never downloaded or committed here. A user with the licence
unpacks it and points the chapter at the folder that holds ``MURA-v1.1/`` (or at ``MURA-v1.1``
itself) with the ``mura_root`` parameter. The layout read::

    MURA-v1.1/train_image_paths.csv        one image path per line, e.g.
                                           MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive/image1.png
    MURA-v1.1/train_labeled_studies.csv    study folder, label (1 abnormal, 0 normal)
    MURA-v1.1/valid_image_paths.csv, MURA-v1.1/valid_labeled_studies.csv
    MURA-v1.1/{train,valid}/XR_<PART>/patient<ID>/study<N>_{positive,negative}/image<K>.png

Labels come from the study folder's name and must agree with the labeled-studies CSV. A study's
probability is the mean of its images' probabilities (as the MURA paper does); the paper reports
Cohen's kappa at study level. The official test set is hidden, so here MURA's ``valid`` split is the
test split, and the validation split is a patient-disjoint slice of ``train``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .. import data as data_mod

__all__ = ["PARTS", "PUBLISHED", "MuraError", "release_dir", "read_split", "load_images", "as_dataset",
           "study_scores", "study_metrics", "per_part", "make_tree"]

PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
#: published study-level kappa anchors (Rajpurkar et al. 2017, table 1: overall, on the hidden test set)
PUBLISHED = {"model (MURA paper)": 0.705, "best radiologist (MURA paper)": 0.778}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PATH = re.compile(r"(?:.*/)?(train|valid)/XR_([A-Z]+)/patient(\d+)/study(\d+)_(positive|negative)/(image\d+\.png)$")


class MuraError(RuntimeError):
    """A missing or malformed MURA tree; the message names the file and the fix."""


def release_dir(root: str | Path) -> Path:
    """The ``MURA-v1.1`` folder under ``root`` (or ``root`` itself); a clear error when absent."""
    root = Path(root).expanduser()
    for cand in (root / "MURA-v1.1", root):
        if (cand / "train").is_dir() or (cand / "valid").is_dir() or any(cand.glob("*_image_paths.csv")):
            return cand
    raise MuraError(f"no MURA release under {root}: expected {root}/MURA-v1.1/{{train,valid}}/XR_<PART>/... and its "
                    f"CSV files. Fix: unpack MURA-v1.1 (licence from Stanford AIMI) and set mura_root to its parent.")


def _csv(release: Path, name: str) -> Path:
    path = release / name
    if not path.is_file():
        raise MuraError(f"{path} is missing. Fix: MURA-v1.1 ships train/valid _image_paths.csv and "
                        f"_labeled_studies.csv beside the image folders; restore the release's CSV files.")
    return path


def read_split(root: str | Path, split: str, parts: Sequence[str] | None = None, check_png: bool = True) -> pd.DataFrame:
    """One row per image of ``split`` (``train`` or ``valid``): path, part, patient, study, label.

    ``parts`` keeps only those body parts (``"WRIST"`` or ``"XR_WRIST"``). Refused, naming the
    file: a missing CSV, a path outside the layout, a missing file or one that is not a PNG, a label
    that contradicts the study folder's name, and a study with no images.
    """
    if split not in ("train", "valid"):
        raise MuraError(f"MURA split {split!r} unknown; the release has 'train' and 'valid'")
    release = release_dir(root)
    wanted = None
    if parts is not None:
        wanted = {p.upper().removeprefix("XR_") for p in parts}
        unknown = wanted - set(PARTS)
        if unknown:
            raise MuraError(f"unknown body part(s) {sorted(unknown)}; MURA's parts are {', '.join(PARTS)}")
    images = pd.read_csv(_csv(release, f"{split}_image_paths.csv"), header=None, names=["path"], dtype=str)
    studies = pd.read_csv(_csv(release, f"{split}_labeled_studies.csv"), header=None, names=["study_dir", "label"],
                          dtype={"study_dir": str, "label": int})
    rows = []
    for rel in images["path"]:
        m = _PATH.match(rel.strip())
        if not m or m.group(1) != split:
            raise MuraError(f"{release}/{split}_image_paths.csv: {rel!r} does not follow "
                            f"{split}/XR_<PART>/patient<ID>/study<N>_<positive|negative>/image<K>.png")
        _, part, patient, study, verdict, image = m.groups()
        if wanted is not None and part not in wanted:
            continue
        path = release / rel.strip().split("MURA-v1.1/", 1)[-1]
        rows.append({"path": str(path), "part": part, "patient": patient, "study": int(study),
                     "study_id": f"{split}/XR_{part}/patient{patient}/study{study}_{verdict}",
                     "label": int(verdict == "positive"), "image": image})
    df = pd.DataFrame(rows, columns=["path", "part", "patient", "study", "study_id", "label", "image"])
    if check_png:
        for path in df["path"]:
            p = Path(path)
            if not p.is_file():
                raise MuraError(f"{p} is listed in {split}_image_paths.csv but missing. Fix: restore the release.")
            with open(p, "rb") as fh:
                if fh.read(8) != PNG_MAGIC:
                    raise MuraError(f"{p} is not a PNG image. Fix: replace it with the release's file.")
    studies["study_id"] = studies["study_dir"].str.strip().str.rstrip("/").str.split("MURA-v1.1/", n=1).str[-1]
    studies["part"] = studies["study_id"].str.extract(r"XR_([A-Z]+)/")[0]
    if wanted is not None:
        studies = studies[studies["part"].isin(wanted)]
    labels = dict(zip(studies["study_id"], studies["label"]))
    for sid, lab in df.groupby("study_id")["label"].first().items():
        if sid in labels and labels[sid] != lab:
            raise MuraError(f"study {sid}: folder name says label {lab} but {split}_labeled_studies.csv says "
                            f"{labels[sid]}. Fix: restore the release's CSV files.")
    empty = sorted(set(labels) - set(df["study_id"]))
    if empty:
        raise MuraError(f"{len(empty)} labelled stud{'y has' if len(empty) == 1 else 'ies have'} no images in "
                        f"{split}_image_paths.csv, e.g. {empty[0]}. Fix: restore the missing images or paths.")
    return df.reset_index(drop=True)


def load_images(df: pd.DataFrame, size: int) -> torch.Tensor:
    """The images of ``df`` as grey uint8 ``(N, 1, size, size)`` (resized with PIL's bilinear filter)."""
    from PIL import Image

    out = np.empty((len(df), 1, size, size), dtype=np.uint8)
    for i, path in enumerate(df["path"]):
        with Image.open(path) as im:
            out[i, 0] = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out)


def as_dataset(root: str | Path, size: int = 28, parts: Sequence[str] | None = None, val_fraction: float = 0.1,
               seed: int = 0) -> tuple[data_mod.MedMNIST, dict]:
    """MURA as a dataset of this book: ``train`` and a patient-disjoint ``val`` from MURA's train,
    ``test`` = MURA's ``valid``; plus each split's image table (for study-level scores and parts)."""
    train = read_split(root, "train", parts)
    test = read_split(root, "valid", parts)
    rng = np.random.default_rng(seed)
    patients = np.array(sorted(train["patient"].unique()))
    n_val = max(1, int(round(val_fraction * len(patients))))
    val_patients = set(rng.choice(patients, n_val, replace=False))
    is_val = train["patient"].isin(val_patients).to_numpy()
    meta = {"train": train[~is_val].reset_index(drop=True), "val": train[is_val].reset_index(drop=True),
            "test": test}
    splits = {s: data_mod.Split(load_images(df, size), torch.tensor(df["label"].to_numpy(), dtype=torch.long))
              for s, df in meta.items()}
    ds = data_mod.MedMNIST("mura", size, "binary-class", 1, {"0": "normal", "1": "abnormal"}, splits)
    return ds, meta


def study_scores(meta: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """One row per study: part, label, the mean of its images' abnormal probabilities, and its images."""
    probs = np.asarray(probs)
    p1 = probs[:, 1] if probs.ndim == 2 else probs
    if len(p1) != len(meta):
        raise ValueError(f"{len(p1)} probabilities for {len(meta)} images")
    df = meta[["study_id", "part", "label"]].assign(prob=p1)
    return df.groupby("study_id", sort=True).agg(part=("part", "first"), label=("label", "first"),
                                                 prob=("prob", "mean"), images=("prob", "size")).reset_index()


def study_metrics(df: pd.DataFrame, threshold: float = 0.5) -> dict:
    """Accuracy, Cohen's kappa and AUC of a table with ``label`` and ``prob`` (studies or images)."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    pred = (df["prob"].to_numpy() >= threshold).astype(int)
    y = df["label"].to_numpy()
    both = len(np.unique(y)) > 1
    return {"n": len(df), "correct": int((pred == y).sum()), "acc": float((pred == y).mean()),
            "kappa": float(cohen_kappa_score(y, pred)) if both or len(np.unique(pred)) > 1 else float("nan"),
            "auc": float(roc_auc_score(y, df["prob"])) if both else float("nan")}


def per_part(df: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """:func:`study_metrics` per body part, then overall (the reference's table form)."""
    rows = [{"part": f"XR_{p}", **study_metrics(g, threshold)} for p, g in df.groupby("part")]
    rows.append({"part": "all", **study_metrics(df, threshold)})
    return pd.DataFrame(rows)


def make_tree(root: str | Path, parts: Sequence[str] = ("WRIST", "ELBOW"), patients: int = 3, studies: int = 2,
              images: int = 2, size: int = 32, seed: int = 0) -> Path:
    """Write a small generated MURA-v1.1 tree (PNGs and the four CSVs) under ``root``, for tests and demos.

    Abnormal studies get a bright square, so a model can learn something. Returns the release folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    release = Path(root) / "MURA-v1.1"
    pid = 0
    for split in ("train", "valid"):
        paths, labelled = [], []
        for part in parts:
            for _ in range(patients):
                pid += 1
                for s in range(1, studies + 1):
                    label = int(rng.random() < 0.5)
                    sdir = f"{split}/XR_{part}/patient{pid:05d}/study{s}_{'positive' if label else 'negative'}"
                    (release / sdir).mkdir(parents=True, exist_ok=True)
                    labelled.append(f"MURA-v1.1/{sdir}/,{label}")
                    for k in range(1, images + 1):
                        arr = rng.integers(0, 80, (size, size), dtype=np.uint8)
                        if label:
                            arr[size // 4: size // 2, size // 4: size // 2] = 230
                        Image.fromarray(arr).save(release / sdir / f"image{k}.png")
                        paths.append(f"MURA-v1.1/{sdir}/image{k}.png")
        (release / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
        (release / f"{split}_labeled_studies.csv").write_text("\n".join(labelled) + "\n")
    return release
