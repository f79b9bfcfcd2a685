"""The chapter's protocol per seed, and the tables and sentences its page shows.

:func:`run_seed` trains (or loads) the cross-fitted members and expert of one replicate seed and
fits every combiner from their stored scores; :func:`results_table` reads the stored units back
into one row per (method, seed); :func:`main_table`, :func:`paired_vs_average`,
:func:`group_table` and :func:`finding` make what the page displays. Nothing here is typed by
hand: every number comes from the stored units.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .. import data as data_mod
from ..report import comparison_sentence, power_note
from ..results import Recorder
from ..stats import compare_pairs, holm, summary_table
from ..train import FitConfig
from . import augment as aug_mod
from .combine import COMBINERS, combiner_unit, scores_metrics
from .members import ScoreStack, cross_fit_folds, member_stack, misclassified, train_experts, train_members

__all__ = ["LABELS", "REFERENCE", "REFERENCE_SOURCE", "run_seed", "results_table", "main_table",
           "paired_vs_average", "group_table", "reference_parts_table", "finding", "augment_sentence",
           "oversampler_table", "gate_table", "majority_note"]

#: how the page names each combiner
LABELS = {"average": "plain average", "stacker": "stacker (logistic regression)", "ce": "weighting, CE",
          "faithful": "weighting, faithful loss", "rl": "weighting, REINFORCE"}
GATED = " + expert gate"

REFERENCE_SOURCE = ("blahmin/MURA-DeepEnsembleV3-82.98 README and evaluation_results.txt: image-level accuracy and "
                    "Cohen's kappa on the MURA v1.1 valid split (3196 images), the split that also selected the "
                    "checkpoint; warm-started from the V2 model")
#: the reference's reported figures (MURA valid, image level), and per part (images, correct)
REFERENCE = {"acc": 0.8298, "kappa": 0.6565, "gate_mean": 0.4051,
             "parts": {"XR_ELBOW": (465, 402), "XR_FINGER": (461, 375), "XR_FOREARM": (300, 246),
                       "XR_HAND": (460, 372), "XR_HUMERUS": (288, 245), "XR_SHOULDER": (563, 436),
                       "XR_WRIST": (659, 576)}}


def run_seed(recorder: Recorder, ds: data_mod.MedMNIST, seed: int, *, n_members: int, n_folds: int,
             member_model: str, member_kwargs: Mapping[str, Any], fit_cfg: FitConfig,
             expert_model: str | None, expert_kwargs: Mapping[str, Any], expert_cfg: FitConfig,
             oversample: float, combiner_cfg: FitConfig, combiner_settings: Mapping[str, Any],
             augment_backend: str = "tensor", batch_size: int = 32, device: str = "auto",
             combiners: Sequence[str] = COMBINERS) -> dict:
    """Members, expert and every combiner (without and with the expert's gate) of one seed.

    Returns the member and expert :class:`ScoreStack` s, the unit rows of the members and experts
    (with the expert sampler's measured share of misclassified images) and the combiner records.
    """
    folds = cross_fit_folds(ds, n_folds, seed, recorder.root / "folds" / f"seed{seed}.json")
    augment, hooks = aug_mod.backend_setup(augment_backend, ds.size, seed)
    members = train_members(recorder, ds, seed, folds, n_members, member_model, fit_cfg, model_kwargs=member_kwargs,
                            batch_size=batch_size, augment=augment, hooks=hooks, device=device)
    stack = member_stack(recorder, ds, seed, n_folds, range(n_members))
    out = {"stack": stack, "members": members, "expert_stack": None, "experts": None}
    if expert_model:
        wrong = misclassified(stack.train.mean(0), stack.y_train)   # out-of-fold, training images only
        out["experts"] = train_experts(recorder, ds, seed, folds, wrong, expert_model, expert_cfg, factor=oversample,
                                       model_kwargs=expert_kwargs, batch_size=batch_size, augment=augment,
                                       hooks=hooks, device=device)
        out["expert_stack"] = member_stack(recorder, ds, seed, n_folds, [None], role="expert")
    out["combiners"] = {}
    for name in combiners:
        for expert in ([None, out["expert_stack"]] if expert_model else [None]):
            rec = combiner_unit(recorder, stack, name, seed, combiner_cfg, ds.task, expert=expert,
                                settings=combiner_settings)
            out["combiners"][(name, expert is not None)] = rec
    return out


def results_table(recorder: Recorder, runs: Mapping[int, dict], task: str) -> pd.DataFrame:
    """One row per (method, seed): val and test acc/kappa/auc of each member alone, the expert alone,
    and every combiner without and with the gate (gate statistics where there is one)."""
    rows = []
    for seed, run in runs.items():
        single = [(n, run["stack"].take([i])) for i, n in enumerate(run["stack"].names)]
        if run["expert_stack"] is not None:
            single.append(("expert alone", run["expert_stack"]))
        for name, st in single:
            m = {}
            for s in ("val", "test"):
                p, y = st.split(s)
                m.update(scores_metrics(p[0], y, task, s))
            rows.append({"method": name, "kind": "single model", "seed": seed, **m})
        for (name, gated), rec in run["combiners"].items():
            rows.append({"method": LABELS[name] + (GATED if gated else ""), "kind": "combiner", "combiner": name,
                         "gated": gated, "seed": seed, **rec["metrics"]})
    return pd.DataFrame(rows)


def main_table(results: pd.DataFrame, metrics: Sequence[str] = ("test/acc", "test/kappa", "test/auc", "val/acc")) -> pd.DataFrame:
    """``mean ± std`` over seeds per method, in the order the methods first appear."""
    order = list(dict.fromkeys(results["method"]))
    table = summary_table(results, ["method"], list(metrics))
    return table.set_index("method").loc[order].reset_index()


def paired_vs_average(results: pd.DataFrame, metrics: Sequence[str] = ("test/acc", "test/kappa", "test/auc")) -> pd.DataFrame:
    """Every other combiner (and gated version) against plain averaging, paired over seeds, per
    metric; Holm's correction over all the rows of a metric."""
    control = LABELS["average"]
    others = [m for m in dict.fromkeys(results.loc[results["kind"] == "combiner", "method"]) if m != control]
    frames = []
    for metric in metrics:
        cmp = compare_pairs(results, [(m, control) for m in others], metric, by="method", unit="seed")
        if len(cmp):
            cmp["p_holm"] = holm(cmp["p"].to_numpy())
        frames.append(cmp)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def group_table(recorder: Recorder, combiner: str, gated: bool, seed: int, label_names: Mapping[str, str]) -> pd.DataFrame:
    """The reference's table form for one stored combiner unit on test: accuracy, total and correct per
    group (the classes here; body parts on MURA), then all images."""
    keys = {"role": "combiner", "combiner": combiner, "expert": gated, "seed": seed}
    sc = recorder.scores(**keys)
    pred, y = sc["test_scores"].argmax(1), sc["test_labels"]
    rows = []
    for c in sorted(np.unique(y)):
        sel = y == c
        rows.append({"group": label_names.get(str(int(c)), str(c)), "accuracy": float((pred[sel] == c).mean()),
                     "total": int(sel.sum()), "correct": int((pred[sel] == c).sum())})
    rows.append({"group": "all", "accuracy": float((pred == y).mean()), "total": len(y), "correct": int((pred == y).sum())})
    return pd.DataFrame(rows)


def reference_parts_table() -> pd.DataFrame:
    """The reference's own per-part figures (MURA v1.1 valid, image level; not comparable one-to-one)."""
    rows = [{"group": p, "accuracy": c / n, "total": n, "correct": c} for p, (n, c) in REFERENCE["parts"].items()]
    n, c = sum(v[0] for v in REFERENCE["parts"].values()), sum(v[1] for v in REFERENCE["parts"].values())
    rows.append({"group": "all", "accuracy": c / n, "total": n, "correct": c})
    return pd.DataFrame(rows)


def finding(comparisons: pd.DataFrame, metrics: Sequence[str] | str = ("test/acc", "test/auc"), alpha: float = 0.05) -> str:
    """The honest finding, from the paired comparisons: did weighting (faithful or RL, no gate) beat
    plain averaging at equal budget on each of ``metrics``?"""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    out, n = [], 0
    for metric in metrics:
        rows = comparisons[comparisons["metric"] == metric].set_index("a")
        parts, beat = [], []
        for key in ("faithful", "rl"):
            label = LABELS[key]
            if label not in rows.index:
                continue
            row = rows.loc[label]
            n = max(n, int(row["n_seeds"]))
            parts.append(comparison_sentence(row, f"{label} vs plain average on {metric}:"))
            if np.isfinite(row.get("p_holm", math.nan)) and row["p_holm"] < alpha and row["mean_diff"] > 0:
                beat.append(label)
        if not parts:
            continue
        if beat:
            head = f"At equal budget, {' and '.join(beat)} beat plain averaging on {metric} (Holm-adjusted)."
        else:
            head = (f"At equal budget, neither the faithful nor the REINFORCE weighting beat plain averaging on "
                    f"{metric} (no Holm-adjusted p below {alpha} with a positive difference).")
        out.append(" ".join([head] + [p + "." for p in parts]))
    if not out:
        return "No weighting variant ran, so there is nothing to compare with plain averaging."
    note = power_note(n)
    return " ".join(out + ([note] if note else []))


def majority_note(results: pd.DataFrame, labels: np.ndarray, split: str = "test") -> str:
    """A sentence when single models or combiners predict one class for (almost) every image: their
    accuracy is then the class share whatever their AUC, which averaging cannot move (empty otherwise)."""
    share = float(np.bincount(np.asarray(labels)).max() / len(labels))
    means = results.groupby("method")[[f"{split}/acc", f"{split}/auc"]].mean()
    flat = means[(means[f"{split}/acc"] - share).abs() < 0.005]
    if flat.empty:
        return ""
    names = ", ".join(flat.index)
    return (f"On {split}, {names} score an accuracy of {share:.3f}, the share of the most frequent class: they put "
            f"nearly every image in that class, whatever their ranking of the images (mean AUC "
            f"{flat[f'{split}/auc'].mean():.3f}). A mix of such members keeps the bias, so its accuracy cannot move, "
            f"while a stacker's intercept or the gate's expert can correct it; on this profile compare AUC and kappa too.")


def augment_sentence(bench: Mapping[str, Any], used: str) -> str:
    """Which augmentation implementation was faster on this machine, by how much, and which one ran."""
    slow = "albumentations" if bench["faster"] == "tensor" else "tensor"
    ratio = bench["ratio"] if bench["faster"] == "tensor" else 1 / bench["ratio"]
    names = {"tensor": "the batched tensor path (helpers.augment)", "albumentations": "the per-image albumentations pipeline"}
    return (f"On {bench['images']} training images of {bench['size']} px, {names['tensor']} ran at "
            f"{bench['tensor_img_s']:,.0f} images/s and {names['albumentations']} at {bench['albumentations_img_s']:,.0f} "
            f"images/s: {names[bench['faster']]} is {ratio:.1f}x faster than {names[slow]}. This run trained with "
            f"{names.get(used, used)}" + (", the faster one." if used == bench["faster"] else
                                          ", not the faster one (set augment_backend to change it)."))


def oversampler_table(runs: Mapping[int, dict]) -> pd.DataFrame:
    """Per seed and expert fold: the share of out-of-fold misclassified training images in the data
    and in the expert sampler's draws (and its expectation from the weights)."""
    frames = [run["experts"][["seed", "fold", "share_in_data", "share_expected", "share_in_batches", "draws"]]
              for run in runs.values() if run["experts"] is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def gate_table(results: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean gate value per gated combiner, overall and on right and wrong cases (mean ± std over seeds)."""
    gated = results[results.get("gated", pd.Series(False, index=results.index)).fillna(False).astype(bool)]
    cols = [f"{split}/gate_mean", f"{split}/gate_right", f"{split}/gate_wrong"]
    if gated.empty:
        return pd.DataFrame()
    return summary_table(gated, ["method"], cols)
