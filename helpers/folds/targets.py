"""What a fold trains for: a classification target (the loop's defaults) or an ordinal label
treated as a number (one output, MSE or L1), with the metrics of each and a probe that records,
every epoch, the clean training metrics and the LR the optimiser ended the epoch with.

Ordinal metrics: MAE and R² of the real-valued prediction; quadratic-weighted Cohen's kappa (QWK)
and accuracy of the prediction rounded and clipped to the grades ``0..n_grades-1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import cohen_kappa_score

from ..data import Split, TensorLoader
from ..losses import make_criterion
from ..metrics import classification_metrics, regression_metrics
from ..train import Hook, evaluate

#: The kinds of target a fold can train for.
KINDS = ("classification", "regression")
#: Headline metrics per kind and whether larger is better (the first one picks the chosen config).
HEADLINE = {"classification": (("auc", True), ("acc", True), ("kappa", True)),
            "regression": (("r2", True), ("mae", False), ("qwk", True))}


def round_grades(pred, n_grades: int) -> np.ndarray:
    """Real-valued predictions rounded to the nearest grade and clipped to ``0..n_grades-1``."""
    return np.clip(np.rint(np.asarray(pred, dtype=float).reshape(-1)), 0, n_grades - 1).astype(int)


def ordinal_metrics(y_true, y_pred, n_grades: int) -> dict:
    """MAE, R² (sklearn, of the real values), QWK and ACC (of the rounded, clipped grades)."""
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    out = regression_metrics(y_true, y_pred)
    grades = round_grades(y_pred, n_grades)
    out["qwk"] = float(cohen_kappa_score(y_true, grades, weights="quadratic", labels=list(range(n_grades))))
    out["acc"] = float(np.mean(grades == y_true))
    return out


class RegressionLoss(nn.Module):
    """Per-sample MSE or L1 between the single output and the label as a number (``fit``'s criterion)."""

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in ("mse", "l1"):
            raise ValueError(f"regression loss '{kind}' unknown; use mse or l1")
        self.kind = kind

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = out.reshape(len(y), -1)[:, 0] - y.float()
        return diff.pow(2) if self.kind == "mse" else diff.abs()

    def __repr__(self) -> str:
        return f"RegressionLoss({self.kind!r})"


class RegressionScorer:
    """``scorer(model, loader, prefix) -> (metrics, predictions, labels)`` for a single-output model:
    ``{prefix}/loss`` (the training loss), ``mae``, ``r2``, ``qwk``, ``acc`` (see :func:`ordinal_metrics`)."""

    def __init__(self, n_grades: int, loss: str = "mse"):
        self.n_grades, self.loss = n_grades, RegressionLoss(loss)

    def __repr__(self) -> str:
        return f"RegressionScorer(n_grades={self.n_grades}, loss={self.loss.kind!r})"

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader: Iterable, prefix: str = "val"):
        model.eval()
        preds, labels = [], []
        for x, y in loader:
            preds.append(model(x).float().reshape(len(y), -1)[:, 0].cpu())
            labels.append(y.cpu())
        pred, lab = torch.cat(preds), torch.cat(labels)
        metrics = {"loss": float(self.loss(pred, lab).mean())}
        metrics.update(ordinal_metrics(lab.numpy(), pred.numpy(), self.n_grades))
        return {f"{prefix}/{k}": v for k, v in metrics.items()}, pred.numpy()[:, None], lab.numpy()


@dataclass(frozen=True)
class Target:
    """One dataset and how it is learned: ``kind`` classification or regression (with ``loss``)."""

    flag: str
    kind: str = "classification"
    loss: str = "mse"                   # regression only: mse | l1
    ablate: bool = False                # also run each applied recommendation alone (when several are)
    groups: tuple = ()                  # subgroup columns beyond the class or grade (helpers.folds.groups)

    @classmethod
    def from_params(cls, spec: Mapping[str, Any]) -> "Target":
        """A target from a params mapping; an unknown key or kind names the fix."""
        from ..config import ParamsError
        from .groups import parse_groups

        unknown = set(spec) - {"flag", "kind", "loss", "ablate", "groups"}
        if unknown or "flag" not in spec:
            raise ParamsError(f"target {dict(spec)}: keys are flag (required), kind, loss, ablate, groups; "
                              f"unknown: {sorted(unknown)}")
        target = cls(**{**spec, "groups": parse_groups(spec.get("groups"), f"target {spec['flag']}: groups")})
        if target.kind not in KINDS:
            raise ParamsError(f"target {target.flag}: kind '{target.kind}' unknown; use {' or '.join(KINDS)}")
        if target.loss not in ("mse", "l1"):
            raise ParamsError(f"target {target.flag}: loss '{target.loss}' unknown; use mse or l1")
        from ..data import DataError, info

        try:
            task = info(target.flag)["task"]
        except DataError as exc:
            raise ParamsError(f"target {target.flag}: {exc}") from exc
        if task.startswith("multi-label"):
            raise ParamsError(f"target {target.flag}: a multi-label flag cannot be cut into stratified folds by one "
                              f"label. Fix: choose a binary, multi-class or ordinal flag.")
        if target.regression and task != "ordinal-regression":
            raise ParamsError(f"target {target.flag}: kind regression needs ordinal labels (its task is {task}). "
                              f"Fix: kind classification, or an ordinal flag such as retinamnist.")
        return target

    @property
    def name(self) -> str:
        return f"{self.flag}-{'reg-' + self.loss if self.kind == 'regression' else 'class'}"

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    def headline(self) -> tuple[str, bool]:
        """The metric that picks a config (R² or AUC) and whether larger is better."""
        return HEADLINE[self.kind][0]

    def metrics(self) -> tuple[tuple[str, bool], ...]:
        return HEADLINE[self.kind]

    @property
    def label_column(self) -> str:
        """The name of the label's own subgroup column: ``grade`` (regression) or ``class``."""
        return "grade" if self.regression else "class"

    def unit_options(self, n_classes: int) -> dict:
        """The keyword arguments of :func:`helpers.experiment.train_and_test` for this target."""
        if not self.regression:
            return {}
        return {"criterion": RegressionLoss(self.loss), "scorer": RegressionScorer(n_classes, self.loss),
                "num_outputs": 1}


class FoldProbe(Hook):
    """Records per epoch the LR the optimiser holds when the epoch's training ends (``lr_end``: after a
    per-batch schedule's last step; a plateau cut decided on this epoch's val loss shows from the next
    epoch) and the metrics of a
    clean pass over the fold's training images (``train_eval/...``: eval mode, no augmentation; a
    fixed random subset of ``max_images``), so the train/val gap compares like with like."""

    def __init__(self, train: Split, target: Target, n_classes: int, task: str, batch_size: int = 512,
                 mean: float = 0.5, std: float = 0.5, max_images: int | None = 512):
        if max_images is not None and len(train) > max_images:   # a fixed random subset keeps the probe cheap
            train = train.take(np.sort(np.random.default_rng(0).choice(len(train), max_images, replace=False)))
        self.train, self.target, self.n_classes, self.task = train, target, n_classes, task
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.model = self.optimizer = self.loader = None

    def on_fit_start(self, model, optimizer, device):
        self.model, self.optimizer = model, optimizer
        self.loader = TensorLoader(self.train, self.batch_size, device=device, mean=self.mean, std=self.std)

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        out = {"lr_end": float(self.optimizer.param_groups[0]["lr"])}
        if self.target.regression:
            metrics, _, _ = RegressionScorer(self.n_classes, self.target.loss)(self.model, self.loader, "train_eval")
        else:
            metrics, _, _ = evaluate(self.model, self.loader, self.task, prefix="train_eval",
                                     criterion=make_criterion(self.task))
        self.model.train()
        return {**out, **{k: v for k, v in metrics.items() if k.split("/")[1] in ("loss", "acc", "auc", "mae", "r2")}}


def group_errors(y_true, pred, target: Target, n_classes: int, groups=None, column: str | None = None) -> "pd.DataFrame":
    """Per subgroup (by default the true class or grade; else ``groups``) the count and the error:
    MAE for a regression target, error rate (1 - accuracy) for classification; plus the ``all`` row.
    ``column`` names the grouping (default the target's label column, ``class`` or ``grade``)."""
    import pandas as pd

    y_true = np.asarray(y_true).reshape(-1)
    groups = y_true if groups is None else np.asarray(groups).reshape(-1)
    if target.regression:
        err = np.abs(np.asarray(pred, dtype=float).reshape(-1) - y_true)
        metric = "mae"
    else:
        scores = np.asarray(pred)
        hard = scores.argmax(1) if scores.ndim == 2 and scores.shape[1] > 1 else (scores.reshape(-1) > 0.5).astype(int)
        err = (hard != y_true).astype(float)
        metric = "error"
    df = pd.DataFrame({"group": groups, "err": err})
    table = df.groupby("group", sort=True)["err"].agg(n="size", value="mean").reset_index()
    table = pd.concat([table.astype({"group": object}),
                       pd.DataFrame({"group": ["all"], "n": [len(df)], "value": [float(df["err"].mean())]})],
                      ignore_index=True)
    return table.assign(metric=metric, column=column or target.label_column)


def classification_summary(y_true, scores, task: str) -> dict:
    """ACC, AUC and (unweighted) kappa of a classification prediction, MedMNIST definitions."""
    m = classification_metrics(y_true, scores, task)
    return {k: m[k] for k in ("acc", "auc", "kappa")}
