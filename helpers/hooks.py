"""Training hooks that any chapter can pass to the shared loop (:func:`helpers.train.fit`).

* :class:`WeightAveraging`: the final weights are the mean of the last N epochs' weights
  (checkpoint averaging, as the noise-mask reference does); :func:`averaging_config` makes ``fit``
  keep them, :func:`averaging_hooks` builds the hook list.
* :class:`LinearWarmup`: a linear LR warm-up per step, then constant.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .train import Hook

__all__ = ["WeightAveraging", "averaging_config", "averaging_hooks", "LinearWarmup"]


class WeightAveraging(Hook):
    """Checkpoint weight averaging, as the reference's ``utils/weight_averaging.py`` (the mean of the
    weights saved after the last three epochs of a run): the model's weights after each of the last
    ``last`` of ``epochs`` epochs are summed (float64), and after the final epoch the model's weights
    are replaced by their element-wise mean. Every floating-point tensor of the state dict is
    averaged, BatchNorm's running statistics included (as the reference does); integer buffers
    (BatchNorm's batch counter) keep the final epoch's value. ``last`` larger than ``epochs``
    averages every epoch.

    The averaged weights are the unit's final weights: there is no selection on val (the reference
    has none either). ``fit`` keeps the weights of the best epoch on its monitor, so the unit's config
    must monitor :attr:`MONITOR` (the epoch number, rising: the final epoch is always the best; see
    :func:`averaging_config`); the state (the running sum) is checkpointed, so an interrupted fit
    resumes and a finished one returns the averaged weights.
    """

    MONITOR = "avg/epoch"

    def __init__(self, last: int, epochs: int):
        if int(last) < 1 or int(epochs) < 1:
            raise ValueError(f"weight averaging over the last {last} of {epochs} epochs: both must be >= 1")
        self.last, self.epochs = int(last), int(epochs)
        self.first = max(1, self.epochs - self.last + 1)
        self.fingerprint = {"weight_averaging": self.last}
        self._model: nn.Module | None = None
        self._sum: dict[str, torch.Tensor] = {}
        self.n = 0

    def on_fit_start(self, model, optimizer, device) -> None:
        self._model = model

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        if epoch >= self.first:
            for k, v in self._model.state_dict().items():
                v = v.detach().to("cpu")
                if v.is_floating_point():
                    self._sum[k] = self._sum.get(k, 0) + v.double()
                else:
                    self._sum[k] = v.clone()          # integer buffers: the latest value
            self.n += 1
        if epoch == self.epochs and self.n:
            self._model.load_state_dict(self.average())
        return {self.MONITOR: float(epoch), "avg/n_averaged": float(self.n)}

    def average(self) -> dict[str, torch.Tensor]:
        """The mean of the weights summed so far, in the model's dtypes."""
        ref = self._model.state_dict()
        return {k: (v / self.n).to(ref[k].dtype) if v.is_floating_point() else v.clone() for k, v in self._sum.items()}

    def state_dict(self) -> dict:
        return {"sum": dict(self._sum), "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self.n = dict(state["sum"]), int(state["n"])


def averaging_config(cfg, average_last: int):
    """``cfg`` for a fit whose final weights are :class:`WeightAveraging`'s (``average_last`` >= 1):
    monitored on the rising epoch number, so the final (averaged) epoch is the one kept; unchanged
    when ``average_last`` is 0 (the best epoch on val)."""
    if not average_last:
        return cfg
    return replace(cfg, monitor=WeightAveraging.MONITOR, mode="max", min_delta=0.0)


def averaging_hooks(average_last: int, epochs: int) -> list:
    """``[WeightAveraging(average_last, epochs)]``, or no hook when ``average_last`` is 0."""
    return [WeightAveraging(average_last, epochs)] if average_last else []


class LinearWarmup(Hook):
    """Linear LR warm-up over ``epochs * steps_per_epoch`` steps from ``start_factor`` x the LR, then
    constant (phase 2 of the reference: 7 warm-up epochs from 0.01; use with ``schedule="none"``)."""

    def __init__(self, epochs: float, steps_per_epoch: int, start_factor: float = 0.01):
        self.total = max(1, round(epochs * steps_per_epoch))
        self.start_factor = start_factor
        self.step = 0
        self._optimizer = None
        self._base: list[float] = []

    def on_fit_start(self, model, optimizer, device) -> None:
        self._optimizer = optimizer
        self._base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self._base):
            g["initial_lr"] = base

    def factor(self, step: int) -> float:
        return self.start_factor + (1.0 - self.start_factor) * min(1.0, step / self.total)

    def transform_batch(self, x, y, model):
        f = self.factor(self.step)
        for g, base in zip(self._optimizer.param_groups, self._base):
            g["lr"] = base * f
        self.step += 1
        return x, y

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
