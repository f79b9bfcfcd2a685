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
restored from a finished checkpoint still has it). Phase 2's linear LR warm-up and the reference's
checkpoint weight averaging are the shared hooks :class:`helpers.hooks.LinearWarmup` and
:class:`helpers.hooks.WeightAveraging`;
:class:`UnconditionalValidation` scores phase 1's val under unconditional masks, as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..rl import MovingAverageBaseline, advantages, reinforce_loss
from ..hooks import LinearWarmup, WeightAveraging, averaging_config, averaging_hooks  # noqa: F401  (re-exported)
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
