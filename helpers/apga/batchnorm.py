"""BatchNorm statistics for evaluation: re-estimated on the clean training images ("precise BN").

In train mode BatchNorm normalises a batch by the batch's own statistics and keeps running
averages (momentum 0.1) for eval mode. k-shot training makes few batches (k = 10 with batches of
25: one per epoch), so the running averages lag far behind the weights; and the chapter's methods
run extra train-mode passes on masked images (APGA: the erased and the inverse-masked batches),
which pull the averages towards half-black images. Either way the classifier is evaluated with
statistics of neither the weights it has nor the images it sees, and its scores shift, mostly
towards one class: a k-shot baseline can score below the share of the larger class in accuracy
with its running averages and well above it with the same weights and re-estimated statistics.

:class:`PreciseBNScorer` re-estimates them (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021, call this precise BN) from the clean training images before every evaluation, of val at
each epoch and of test once, for every method alike, and then scores as the shared loop would.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .. import data as data_mod
from ..losses import make_criterion
from ..train import evaluate


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, loader: Iterable) -> int:
    """Set the running mean and variance of every BatchNorm layer of ``model`` to their plain
    average over the batches of ``loader`` (train-mode forward passes without gradient; the
    layers' momentum is restored afterwards). The model is left in eval mode. Returns the number
    of images seen (0: no BatchNorm layer, nothing done)."""
    norms = _norms(model)
    if not norms:
        model.eval()
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None            # cumulative average over the batches
    seen = 0
    model.train()
    try:
        for x, _ in loader:
            model(x)
            seen += len(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return seen


class PreciseBNScorer:
    """A ``scorer`` for :func:`helpers.experiment.train_and_test`: re-estimate the BatchNorm
    statistics on ``train`` (clean, normalised like the training loader, batches of
    ``batch_size``), then score ``loader`` as ``fit`` would (the split's metrics and its loss).

    Its ``repr`` names its settings only (a unit's fingerprint holds the data and so the training
    split), so that the fingerprint is the same from one run to the next."""

    def __init__(self, train: data_mod.Split, task: str, batch_size: int, mean: float = 0.5, std: float = 0.5):
        self.train, self.task, self.batch_size, self.mean, self.std = train, task, int(batch_size), mean, std
        self.criterion = make_criterion(task)

    def __repr__(self) -> str:
        return f"PreciseBNScorer(batch_size={self.batch_size}, mean={self.mean}, std={self.std})"

    def __call__(self, model: nn.Module, loader: Iterable, prefix: str):
        device = next(model.parameters()).device
        recompute_bn_stats(model, data_mod.TensorLoader(self.train, self.batch_size, device=device, mean=self.mean,
                                                        std=self.std))
        return evaluate(model, loader, self.task, prefix=prefix, device=device, criterion=self.criterion)


__all__ = ["recompute_bn_stats", "PreciseBNScorer"]
