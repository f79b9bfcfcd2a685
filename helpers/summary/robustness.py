"""Robustness of stored final models: accuracy on corrupted test images, from the stored weights.

For each final unit whose weights are stored (:class:`helpers.summary.chapters.FinalUnit`), the
model is rebuilt with :func:`helpers.models.create_model` and its weights loaded strictly; the test
images it scored are rebuilt from the data files at its stored ``test_index`` and checked against
its stored labels; then each corruption of :mod:`.corruptions` is applied at each severity and the
accuracy recomputed (MedMNIST's rule, :func:`helpers.metrics.get_acc`). Nothing is trained.

Two checks make the rebuild trustworthy, both reported per unit: the rebuilt test labels must
equal the stored ones (else the unit is skipped: its data changed), and on the clean images the
rebuilt model's probabilities are compared with the stored ones (``clean_max_diff``, and
``clean_agree``: the share of images with the same predicted class; 1.0 when the model was rebuilt
exactly; a GPU run evaluated in bfloat16 may differ slightly).

A corrupted test set is made once per (data, images, corruption, severity) and shared by every
model scored on it (and an ensemble's member probabilities by every combiner of those members);
``max_images`` caps the images per unit (a fixed seeded subset of its test
images) to bound the cost on a CPU profile.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..losses import to_scores
from ..metrics import get_acc
from .chapters import FinalUnit
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt

__all__ = ["predict_probs", "evaluate_unit", "robustness_rows", "robustness_summary", "by_corruption", "relative_drop",
           "findings"]


@torch.no_grad()
def predict_probs(models: Sequence[torch.nn.Module], images: torch.Tensor, task: str, mean: float = 0.5,
                  std: float = 0.5, batch_size: int = 512) -> np.ndarray:
    """Probabilities of ``models`` (their mean when several) on uint8 ``images`` (N, C, H, W),
    normalised as the chapters' loaders do: ``(x / 255 - mean) / std``."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().div_(255.0).sub_(mean).div_(std)
        probs = [to_scores(m(x).float(), task) for m in models]
        out.append(torch.stack(probs).mean(0))
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def _subset(n: int, max_images: int | None) -> np.ndarray:
    if max_images is None or n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:max_images])


def evaluate_unit(unit: FinalUnit, split, cache: dict, *, corruptions: Sequence[str] = CORRUPTIONS,
                  severities: Sequence[int] = SEVERITIES, max_images: int | None = None) -> list[dict]:
    """One row per (corruption, severity) for ``unit`` (severity 0 once, as corruption ``none``):
    ``acc`` and ``n`` images, plus the rebuild checks (module docstring). ``split`` is the unit's
    whole test split (:meth:`DataSpec.test_split`); ``cache`` holds corrupted image sets by key."""
    stored = unit.scores()
    if unit.test_index is None and "test_index" not in stored:
        raise ValueError(f"{unit.chapter}/{unit.run} {unit.method} seed {unit.seed}: no test positions stored")
    index = np.asarray(unit.test_index if unit.test_index is not None else stored["test_index"]).astype(int)
    labels = np.asarray(stored["test_labels"])
    rebuilt = split.labels.numpy()[index] if index.max(initial=-1) < len(split) else None
    if rebuilt is None or not np.array_equal(rebuilt, labels.reshape(rebuilt.shape)):
        raise ValueError(f"{unit.chapter}/{unit.run} {unit.method} seed {unit.seed}: the rebuilt test labels differ "
                         f"from the stored ones; the data changed since the run")
    pick = _subset(len(index), max_images)
    positions, y = index[pick], labels[pick]
    images = split.images[torch.as_tensor(positions)]
    predict = unit.model.predictor(cache)
    base = {"chapter": unit.chapter, "run": unit.run, "dataset": unit.dataset, "method": unit.method,
            "role": unit.role, "seed": unit.seed, "n": len(pick)}
    data_key = (unit.data.key, hashlib.sha256(positions.tobytes()).hexdigest()[:16])
    clean = predict(images, key=(data_key, "none", 0))
    ref = np.asarray(stored["test_scores"])[pick]
    check = {"clean_max_diff": float(np.abs(clean - ref.reshape(clean.shape)).max()) if len(pick) else np.nan,
             "clean_agree": float((clean.argmax(1) == ref.reshape(clean.shape).argmax(1)).mean()) if len(pick) else np.nan}
    rows = [{**base, "corruption": "none", "severity": 0, "acc": get_acc(y, clean, unit.task), **check}]
    for name in corruptions:
        for sev in severities:
            key = (data_key, name, sev)
            if key not in cache:
                cache[key] = corrupt(images, name, sev, seed=sev)
            probs = predict(cache[key], key=key)
            rows.append({**base, "corruption": name, "severity": sev, "acc": get_acc(y, probs, unit.task), **check})
    return rows


def robustness_rows(finals: Sequence[FinalUnit], *, corruptions: Sequence[str] = CORRUPTIONS,
                    severities: Sequence[int] = SEVERITIES, max_images: int | None = None, data_root=None,
                    log: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy under every corruption and severity of each rebuildable final unit (module docstring).

    Returns ``(rows, skipped)``: one row per (unit, corruption, severity), and one row per unit that
    could not be scored with the reason (no stored weights, no scores, no data spec, changed data).
    A published unit, whose weights stayed where it ran, is read from the rows computed there when
    its run was published (``derived/robustness.csv``, :mod:`.derived`): the requested corruptions
    and severities that it has. ``computed`` says which (``here`` or ``at publish``)."""
    torch.set_grad_enabled(False)
    rows, skipped, splits, cache = [], [], {}, {}
    try:
        for unit in finals:
            if unit.weights_missing and len(pub := unit.published_rows("robustness")):
                keep = (pub["corruption"] == "none") | (pub["corruption"].isin(list(corruptions))
                                                        & pub["severity"].isin(list(severities)))
                rows += pub[keep].assign(computed="at publish").to_dict("records")
                continue
            why = unit.weights_missing or ("" if unit.has_scores else "no per-sample scores stored") or \
                ("" if unit.data is not None else "its test images cannot be rebuilt here")
            if why:
                skipped.append({"chapter": unit.chapter, "run": unit.run, "dataset": unit.dataset, "method": unit.method,
                                "seed": unit.seed, "why": why})
                continue
            try:
                if unit.data.key not in splits:
                    splits[unit.data.key] = unit.data.test_split(data_root)
                rows += [{**r, "computed": "here"} for r in evaluate_unit(
                    unit, splits[unit.data.key], cache, corruptions=corruptions, severities=severities,
                    max_images=max_images)]
                if log:
                    log(f"robustness: {unit.chapter}/{unit.run} {unit.dataset} {unit.method} seed {unit.seed} done")
            except (ValueError, RuntimeError, FileNotFoundError) as exc:
                skipped.append({"chapter": unit.chapter, "run": unit.run, "dataset": unit.dataset, "method": unit.method,
                                "seed": unit.seed, "why": str(exc).splitlines()[0][:200]})
    finally:
        torch.set_grad_enabled(True)
    return pd.DataFrame(rows), pd.DataFrame(skipped, columns=["chapter", "run", "dataset", "method", "seed", "why"])


def robustness_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (run, dataset, method, corruption, severity), mean over seeds, wide over severity:
    one column per severity (``0`` = clean), plus ``mean corrupted`` (over the severities ≥ 1)."""
    if rows.empty:
        return pd.DataFrame()
    clean = rows[rows["corruption"] == "none"]
    corrupted = rows[rows["corruption"] != "none"]
    keys = ["chapter", "run", "dataset", "method", "role"]
    mean = corrupted.groupby(keys + ["corruption", "severity"], sort=False)["acc"].mean().unstack("severity")
    mean.columns = [f"severity {c}" for c in mean.columns]
    base = clean.groupby(keys, sort=False)["acc"].mean().rename("clean")
    out = mean.reset_index().merge(base.reset_index(), on=keys, how="left")
    sev = [c for c in out.columns if c.startswith("severity ")]
    out["mean corrupted"] = out[sev].mean(1)
    n = rows.groupby(keys, sort=False)["seed"].nunique().rename("seeds").reset_index()
    out = out.merge(n, on=keys, how="left")
    return out[keys + ["seeds", "corruption", "clean", *sev, "mean corrupted"]]


def by_corruption(rows: pd.DataFrame) -> pd.DataFrame:
    """The page's compact view: per (run, dataset, method), clean accuracy and the accuracy under
    each corruption averaged over its severities, then over all corruptions (mean over seeds).

    ``images`` is the number of test images each model was scored on (the fewest over seeds): the
    whole test split, unless ``max_images`` (here) or the publisher (``robust_max_images``) capped it."""
    if rows.empty:
        return pd.DataFrame()
    keys = ["chapter", "run", "dataset", "method"]
    clean = rows[rows["corruption"] == "none"].groupby(keys, sort=False)["acc"].mean().rename("clean")
    corr = rows[rows["corruption"] != "none"]
    wide = corr.groupby(keys + ["corruption"], sort=False)["acc"].mean().unstack("corruption")
    wide = wide[[c for c in dict.fromkeys(corr["corruption"])]]
    seeds = rows.groupby(keys, sort=False)["seed"].nunique().rename("seeds")
    images = rows.groupby(keys, sort=False)["n"].min().astype(int).rename("images")
    out = pd.concat([seeds, images, clean, wide], axis=1)
    out["all corruptions"] = corr.groupby(keys, sort=False)["acc"].mean()
    return out.reset_index()


def relative_drop(rows: pd.DataFrame) -> pd.DataFrame:
    """Per unit: clean accuracy, mean accuracy over every corruption and severity, and the drop
    (clean − corrupted), one row per (run, dataset, method, seed): the per-seed values a paired
    test of robustness (method vs control) needs."""
    if rows.empty:
        return pd.DataFrame()
    keys = ["chapter", "run", "dataset", "method", "role", "seed"]
    clean = rows[rows["corruption"] == "none"].set_index(keys)["acc"].rename("clean")
    corr = rows[rows["corruption"] != "none"].groupby(keys)["acc"].mean().rename("corrupted")
    out = pd.concat([clean, corr], axis=1).reset_index()
    out["drop"] = out["clean"] - out["corrupted"]
    return out


def findings(diffs: pd.DataFrame, chapters=None, metric: str = "corrupted", alpha: float = 0.05) -> list[str]:
    """One generated sentence per RL method against each control on ``metric`` (``corrupted``:
    mean accuracy over every corruption and severity; ``drop``: clean minus that), from
    :func:`helpers.summary.leaderboard.paired_differences` rows."""
    from ..report import comparison_sentence
    from .chapters import CHAPTERS

    chapters = chapters or CHAPTERS
    what = {"corrupted": "mean accuracy on corrupted test images", "drop": "accuracy lost to corruption"}.get(metric, metric)
    out = []
    for _, r in diffs[diffs["metric"] == metric].iterrows():
        if r["chapter"] in chapters and r["a"] in chapters[r["chapter"]].rl:
            out.append(comparison_sentence(r, f"{r['run']} ({r['dataset']}), {what}, {r['a']} vs {r['b']}:",
                                           alpha=alpha, fmt="{:.3f}", diff_fmt="{:+.3f}"))
    return out
