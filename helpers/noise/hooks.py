"""The noise policy inside the shared loop: a :class:`helpers.train.Hook` and the reference's loss.

:class:`NoiseMaskHook` samples a mask per image in ``transform_batch`` (before the classifier's
forward pass) and learns from the classifier's per-sample loss in ``on_batch_end``:

* ``mode="reinforce"`` (the default, sound): reward = -CE of the masked image, per sample; a
  moving-average baseline; the policy's own optimiser steps on
  :func:`helpers.rl.reinforce_loss` of the joint log-probability (sum over cells).
* ``mode="faithful"``: the reference code's coupled loss, with :class:`FaithfulCriterion`:
  ``L = mean_b CE * mean_b logsumexp_j log p_bj``, one backward pass for both networks, no
  baseline. The policy's gradient arrives in ``fit``'s own ``loss.backward()``, so the hook steps
  the policy's optimiser at the start of the next batch (and at the end of the epoch).
* ``mode="random"``: the control: masks from a fixed unconditional Beta
  (:class:`helpers.noise.policy.RandomBetaMasks`), nothing learned.

Every epoch it logs ``rl/reward``, ``rl/baseline``, ``rl/advantage``, ``rl/entropy`` and the masks'
``noise/mask_mean``, ``noise/mask_std`` and ``noise/concentration`` (mean ``a + b``); ``trace``
keeps the same per batch for the reward curves, and travels in the hook's checkpointed state (a unit
restored from a finished checkpoint still has it). :class:`LinearWarmup` is phase 2's linear LR
warm-up; :class:`WeightAveraging` is the reference's checkpoint weight averaging;
:class:`UnconditionalValidation` scores phase 1's val under unconditional masks, as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..rl import MovingAverageBaseline, advantages, reinforce_loss
from ..train import Hook
from .mask import MaskConfig, apply_mask, make_mask

__all__ = ["PolicyConfig", "NoiseMaskHook", "FaithfulCriterion", "LinearWarmup", "WeightAveraging",
           "UnconditionalValidation", "averaging_config", "averaging_hooks", "MODES"]

MODES = ("reinforce", "faithful", "random")


@dataclass
class PolicyConfig:
    """How the policy is built and trained (the notebook's ``policy`` group)."""

    backbone: str = "cnn"                 # registry name; the reference's is "timm/resnet10t"
    widths: list = field(default_factory=lambda: [8, 16])   # stage widths of a "cnn" encoder (else unused)
    hidden: int = 128                     # head width (512 in the reference)
    blend: float = 0.9                    # weight of the running unconditional average
    decay: float = 0.99                   # its update rate
    lr: float = 0.01                      # policy optimiser (SGD, as the reference)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    baseline_decay: float = 0.9           # moving-average reward baseline (reinforce only)
    entropy_coef: float = 0.0
    normalize_advantage: bool = False


class NoiseMaskHook(Hook):
    """Masks every training batch with the policy's (or the control's) Beta noise; see the module doc."""

    def __init__(self, policy: nn.Module, masks: MaskConfig, mode: str = "reinforce",
                 cfg: PolicyConfig | None = None):
        if mode not in MODES:
            raise ValueError(f"noise mode {mode!r} unknown; use one of {', '.join(MODES)}")
        self.policy, self.masks, self.mode = policy, masks, mode
        self.cfg = cfg or PolicyConfig()
        learns = mode != "random" and any(p.requires_grad for p in policy.parameters())
        self.optimizer = (torch.optim.SGD(policy.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                          weight_decay=self.cfg.weight_decay) if learns else None)
        self.baseline = MovingAverageBaseline(self.cfg.baseline_decay)
        self.trace: list[dict] = []
        self.steps = 0
        self._pending = False
        self._lp = self._entropy = None
        self._batch: dict = {}
        self._sums: dict = {}

    # ---- the loop's extension points ---------------------------------------------------------
    def on_fit_start(self, model, optimizer, device) -> None:
        self.policy.to(device)
        if self.optimizer is not None:   # a state loaded on resume follows the parameters' device
            self.optimizer.load_state_dict(self.optimizer.state_dict())

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module):
        if self._pending:
            self._step_policy()
        self.policy.train()
        dist = self.policy(x)
        with torch.no_grad():
            cells = dist.sample()
            eps = torch.finfo(cells.dtype).eps
            cells = cells.clamp(eps, 1 - eps)
        mask = make_mask(cells, self.masks, tuple(x.shape[-2:]))
        if self.optimizer is not None:
            lp = dist.log_prob(cells)                         # (B, G*G), carries the policy's graph
            self._lp = lp.sum(1) if self.mode == "reinforce" else torch.logsumexp(lp, 1)
            self._entropy = dist.entropy().sum(1)
        with torch.no_grad():
            ent = dist.entropy().sum(1).mean() if self._entropy is None else self._entropy.detach().mean()
            self._batch = {"noise/mask_mean": float(mask.mean()), "noise/mask_std": float(mask.std()),
                           "noise/concentration": float((dist.concentration1 + dist.concentration0).mean()),
                           "rl/entropy": float(ent)}
        return apply_mask(x, mask), y

    def on_batch_end(self, x, y, logits, loss_per_sample) -> None:
        reward = -loss_per_sample.detach().float()
        if self.mode == "reinforce" and self.optimizer is not None:
            baseline = self.baseline.update(reward)
            adv = advantages(reward, baseline, normalize=self.cfg.normalize_advantage)
            loss = reinforce_loss(self._lp, adv, self._entropy, self.cfg.entropy_coef)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            b = float(baseline)
        else:   # faithful: no baseline (the reward enters the coupled loss as is); random: nothing learned
            adv, b = reward, 0.0
            self._pending = self.mode == "faithful" and self.optimizer is not None
        if self.mode != "faithful":
            self._lp = self._entropy = None
        self.steps += 1
        row = {"step": self.steps, "rl/reward": float(reward.mean()), "rl/baseline": b,
               "rl/advantage": float(adv.mean()), **self._batch}
        self.trace.append(row)
        for k, v in row.items():
            if k != "step":
                self._sums[k] = self._sums.get(k, 0.0) + v
        self._sums["n"] = self._sums.get("n", 0) + 1

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        if self._pending:
            self._step_policy()
        n = self._sums.pop("n", 0)
        out = {k: v / n for k, v in self._sums.items()} if n else {}
        self._sums = {}
        return out

    def state_dict(self) -> dict:
        """The policy, its optimiser and baseline, and the whole per-batch ``trace`` so far (as a
        table: ``trace_columns`` and a float64 ``trace`` tensor), so that a unit restored from a
        finished checkpoint still has its trace and policy without training again."""
        cols = list(self.trace[0]) if self.trace else []
        values = torch.tensor([[row[c] for c in cols] for row in self.trace], dtype=torch.float64)
        return {"policy": self.policy.state_dict(), "steps": self.steps,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "baseline": None if self.baseline.value is None else self.baseline.value.detach().cpu(),
                "trace_columns": cols, "trace": values.reshape(len(self.trace), len(cols))}

    def load_state_dict(self, state: dict) -> None:
        """Restores the policy, optimiser, baseline and step count. The trace is a log, not a state:
        it is replaced only by a stored trace at least as long, never rewound (``fit`` loads the
        state of the *best* epoch at its end; the trace keeps every batch, as the history keeps
        every epoch)."""
        self.policy.load_state_dict(state["policy"])
        self.steps = state["steps"]
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.value = state["baseline"]
        cols, values = state.get("trace_columns"), state.get("trace")
        if cols is not None and values is not None and len(values) >= len(self.trace):
            self.trace = [{c: (int(v) if c == "step" else float(v)) for c, v in zip(cols, row.tolist())}
                          for row in values]

    # ---- faithful: the coupled loss ----------------------------------------------------------
    def _step_policy(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = False
        self._lp = None

    def coupled_factor(self) -> torch.Tensor:
        """``mean_b logsumexp_j log p_bj`` of the current batch, with its graph (faithful mode)."""
        if self.mode != "faithful" or self._lp is None:
            raise RuntimeError("the faithful criterion needs NoiseMaskHook(mode='faithful') in the same fit")
        return self._lp.mean()


class FaithfulCriterion(nn.Module):
    """The reference's loss: per-sample CE, reduced as ``mean(CE) * mean_b logsumexp_j log p_bj``.

    The factor is *not* detached: one backward pass updates the classifier (its gradient scaled by
    the factor, which can be negative) and the policy (REINFORCE with reward -CE and no baseline).
    """

    def __init__(self, hook: NoiseMaskHook):
        super().__init__()
        self.hook = hook
        self.ce = nn.CrossEntropyLoss(reduction="none")

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, y)

    def reduce(self, per_sample: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample.mean() * self.hook.coupled_factor()


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


class UnconditionalValidation:
    """A ``scorer`` for :func:`helpers.experiment.train_and_test` that scores a split under masks from
    the hook's *unconditional* Beta, as the reference validates phase 1: the policy's
    ``Beta(exp b_a, exp b_b)`` (:meth:`helpers.noise.policy.NoisePolicy.unconditional`, its running
    averages at that moment), or the random control's fixed Beta. Masks are upsampled, blurred and
    multiplied in as in training.

    The masks are drawn from ``seed`` inside a forked RNG, so every epoch's validation sees the same
    random draws (only the distribution moves) and the training's random stream is untouched. The
    classification metrics and ``{prefix}/loss`` are those of :func:`helpers.train.evaluate`.
    """

    def __init__(self, hook: "NoiseMaskHook", task: str, seed: int = 0):
        self.hook, self.task, self.seed = hook, task, int(seed)

    def __repr__(self) -> str:   # enters the unit's fingerprint: no memory address
        return f"UnconditionalValidation(mode={self.hook.mode!r}, masks={self.hook.masks!r}, seed={self.seed})"

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        src = self.hook.policy
        dist = src.unconditional() if hasattr(src, "unconditional") else src(x[:1])   # batch shape (1, G*G)
        cells = dist.sample((x.shape[0],)).reshape(x.shape[0], -1)
        eps = torch.finfo(cells.dtype).eps
        return cells.clamp(eps, 1 - eps)

    def masked(self, loader):
        """``loader``'s batches with unconditional masks applied (call inside :meth:`__call__`'s RNG)."""
        for x, y in loader:
            yield apply_mask(x, make_mask(self._cells(x), self.hook.masks, tuple(x.shape[-2:]))), y

    def __call__(self, model: nn.Module, loader, prefix: str):
        from ..losses import make_criterion
        from ..train import evaluate

        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        was_training = self.hook.policy.training
        self.hook.policy.eval()
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.manual_seed(self.seed)
                if cuda:
                    torch.cuda.manual_seed_all(self.seed)
                return evaluate(model, self.masked(loader), self.task, prefix=prefix,
                                criterion=make_criterion(self.task), device=next(model.parameters()).device)
        finally:
            self.hook.policy.train(was_training)


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
