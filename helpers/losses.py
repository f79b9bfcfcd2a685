"""Losses as the one loop uses them: per-sample values and their reduction.

``fit`` calls ``criterion(logits, y)`` for per-sample losses (what a hook's ``on_batch_end`` sees,
e.g. a policy's reward) and back-propagates their reduction; :class:`Criterion` pairs the two.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ParamsError


class Criterion(nn.Module):
    """A per-sample loss and its reduction: ``criterion(logits, y)`` returns a ``(B,)`` tensor and
    ``criterion.reduce(per_sample, y)`` the batch loss that is back-propagated and logged.

    ``fit`` accepts any callable returning per-sample losses; without a ``reduce`` method they
    are averaged.
    """

    def __init__(self, loss: nn.Module, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.loss = loss
        self.class_weights = class_weights

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per = self.loss(logits, y)
        return per.mean(dim=tuple(range(1, per.dim()))) if per.dim() > 1 else per

    def reduce(self, per_sample: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.class_weights is not None and y.dim() == 1:  # weighted mean, as reduction="mean" does
            return per_sample.sum() / self.class_weights[y].sum()
        return per_sample.mean()


def make_criterion(task: str, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> Criterion:
    """BCE-with-logits for multi-label tasks, cross-entropy otherwise (binary tasks use 2 logits),
    as a per-sample :class:`Criterion`."""
    if task.startswith("multi-label"):
        return Criterion(nn.BCEWithLogitsLoss(reduction="none"))
    return Criterion(nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing, reduction="none"),
                     class_weights)


def reduce_loss(criterion, per_sample: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch loss from per-sample losses: the criterion's own ``reduce``, else the mean."""
    if per_sample.dim() == 0:
        raise ParamsError("the criterion returned a scalar; fit needs per-sample losses. Fix: build it with "
                          "reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none')).")
    reduce = getattr(criterion, "reduce", None)
    return reduce(per_sample, y) if reduce is not None else per_sample.mean()


def to_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities from logits: sigmoid for multi-label, softmax otherwise."""
    return torch.sigmoid(logits) if task.startswith("multi-label") else torch.softmax(logits, dim=1)
