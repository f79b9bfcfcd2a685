"""APGA and its controls as :class:`helpers.train.Hook` s of the shared ``fit`` loop.

The loop takes the clean classifier step of every batch. Each hook here adds exactly one more
classifier update per batch, in ``after_step`` (so every method gets two classifier updates per
batch, the same schedule and the same validation looks):

* :class:`RepeatHook`: a second step on the same clean images (the clean control).
* :class:`CutoutHook`: a step on randomly erased images (one box per image, the reference's cutout).
* :class:`GradCAMHook`: a step on the images with only the pixels a frozen baseline's Grad-CAM
  map marks (> threshold) kept.
* :class:`EndToEndHook`: a mask network trained jointly by backprop: a step on ``x * p`` (soft mask).
* :class:`APGAHook`: the agent. Per batch, in order: (1) the loop's clean step; (2) the agent's
  mask erases pixels; (3) reward = loss on the erased images - loss on the clean images, per image
  (less ``area_cost`` times the erased share), with a moving-average baseline; (4) REINFORCE on
  the agent's actions, steps (2)-(4) repeated ``agent_steps`` times on fresh masks; (5) a step on
  the inverse-masked images (only the erased pixels of the last mask kept). By default both reward
  losses are taken before the clean update in train mode and actions are sampled;
  ``faithful=True`` is the reference: greedy ``p > 0.5`` actions and the erased loss taken after
  the clean update in eval mode (the clean loss before it, in train mode). The agent's other
  settings (:class:`APGAHook`) have sound defaults; the reference's values are
  :data:`helpers.apga.protocol.REFERENCE_APGA`.

The extra steps use the loop's optimiser (and so its learning rate) and the loop's precision
(:meth:`helpers.train.Hook.autocast`: bf16 where fit's ``amp`` / ``cpu_amp`` applies, so that
APGA's erased loss is taken in the precision of the clean loss it is compared with), without the
loop's gradient clipping. Their train-mode passes on masked images also move the
classifier's BatchNorm running statistics; the protocol re-estimates those on the clean training
images before every evaluation (:mod:`helpers.apga.batchnorm`), for every method alike.

Each hook logs its own metrics per epoch, keeps its state (agent weights, optimiser, baseline,
random generator) in ``state_dict`` so that ``fit`` restores the state of the best epoch, and
gives ``unit_arrays`` (its masks of fixed probe images, stored with the unit) for the page's
gallery.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..augment import erase_masks
from ..losses import make_criterion
from ..rl import MovingAverageBaseline, advantages, rl_metrics
from ..train import Hook
from .agent import agent_loss, cell_logits, sample_mask, to_pixels
from .gradcam import gradcam_maps
from .masks import erase, keep_only


class _Means:
    """Running means of named scalars over an epoch."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def _to_device_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)


class SecondStepHook(Hook):
    """Base: one extra classifier update per batch on ``second_batch(x, y, model)`` (see the module doc)."""

    name = "second"

    def __init__(self, task: str, probe: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.task = task
        self.criterion = make_criterion(task)
        self.probe = probe
        self.means = _Means()
        self.device = torch.device("cpu")

    @property
    def fingerprint(self) -> dict:
        return {"hook": type(self).__name__, **self.settings()}

    def settings(self) -> dict:
        return {}

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.device = model, torch.device(device)

    def second_batch(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def classifier_step(self, x2: torch.Tensor, y: torch.Tensor, model: nn.Module,
                        optimizer: torch.optim.Optimizer, extra_loss: torch.Tensor | None = None,
                        extra_optimizer: torch.optim.Optimizer | None = None) -> float:
        """One update of the classifier (and of ``extra_optimizer``'s parameters) on ``x2``; returns its loss."""
        with self.autocast():
            out = model(x2)
        loss = self.criterion(out.float(), y).mean()
        total = loss if extra_loss is None else loss + extra_loss
        optimizer.zero_grad(set_to_none=True)
        if extra_optimizer is not None:
            extra_optimizer.zero_grad(set_to_none=True)   # the reference's end-to-end never did (bug 2)
        total.backward()
        optimizer.step()
        if extra_optimizer is not None:
            extra_optimizer.step()
        return float(loss.detach())

    def after_step(self, x, y, model, optimizer) -> None:
        with torch.no_grad():
            x2 = self.second_batch(x, y, model)
        self.means.add(**{f"{self.name}/loss": self.classifier_step(x2, y, model, optimizer)})

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        return self.means.pop()

    def unit_arrays(self) -> dict[str, np.ndarray]:
        return {}


class RepeatHook(SecondStepHook):
    """The clean control: the second update of each batch is on the same clean images."""

    name = "repeat"

    def second_batch(self, x, y, model):
        return x


class CutoutHook(SecondStepHook):
    """The second update is on images with one random box erased each (the reference's random
    erasing with p = 1, aspect 0.3-3.3, fill black; area ``scale`` of the image)."""

    name = "cutout"

    def __init__(self, task: str, fill: float, *, p: float = 1.0, scale: tuple[float, float] = (0.02, 0.33),
                 seed: int = 0, probe=None):
        super().__init__(task, probe)
        self.fill, self.p, self.scale = fill, p, tuple(scale)
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    def settings(self) -> dict:
        return {"fill": self.fill, "p": self.p, "scale": list(self.scale), "seed": self.seed}

    def second_batch(self, x, y, model):
        mask = erase_masks(x.shape[0], x.shape[-2], x.shape[-1], self.generator, self.p, self.scale)
        return erase(x, mask.to(x.device), self.fill)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.generator.set_state(state["generator"])


class GradCAMHook(SecondStepHook):
    """The second update keeps only the pixels where the Grad-CAM map of ``frozen`` (a copy of the
    baseline, never updated) for the true class exceeds ``threshold``."""

    name = "gradcam"

    def __init__(self, task: str, frozen: nn.Module, fill: float, *, threshold: float = 0.5,
                 layer: str | None = None, probe=None):
        super().__init__(task, probe)
        self.frozen = copy.deepcopy(frozen).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.fill, self.threshold, self.layer = fill, threshold, layer

    def settings(self) -> dict:
        return {"fill": self.fill, "threshold": self.threshold, "layer": self.layer}

    def on_fit_start(self, model, optimizer, device) -> None:
        super().on_fit_start(model, optimizer, device)
        self.frozen.to(self.device)

    def keep_mask(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (gradcam_maps(self.frozen, x, y, self.layer) > self.threshold).float()

    def second_batch(self, x, y, model):
        keep = self.keep_mask(x, y)
        self.means.add(**{"gradcam/keep_area": float(keep.mean())})
        return keep_only(x, keep, self.fill)

    def unit_arrays(self) -> dict[str, np.ndarray]:
        if self.probe is None:
            return {}
        x, y = (t.to(self.device) for t in self.probe)
        return {"probe_gradcam": gradcam_maps(self.frozen, x, y, self.layer).cpu().numpy()}


class EndToEndHook(SecondStepHook):
    """A mask network trained jointly with the classifier by backprop (the reference's end-to-end):
    the second update is on ``keep_only(x, p)`` with the soft keep probability ``p`` of ``masker``,
    plus ``erase_coef * BCE(p, 0) + keep_coef * BCE(p, 1)`` for the masker (reference 0.5 and 0.6)."""

    name = "end2end"

    def __init__(self, task: str, masker: nn.Module, fill: float, *, lr: float = 1e-4, erase_coef: float = 0.5,
                 keep_coef: float = 0.6, probe=None):
        super().__init__(task, probe)
        self.masker, self.fill, self.lr = masker, fill, lr
        self.erase_coef, self.keep_coef = erase_coef, keep_coef
        self.opt = torch.optim.Adam(self.masker.parameters(), lr=lr)

    def settings(self) -> dict:
        return {"fill": self.fill, "lr": self.lr, "erase_coef": self.erase_coef, "keep_coef": self.keep_coef,
                "masker": type(self.masker).__name__}

    def on_fit_start(self, model, optimizer, device) -> None:
        super().on_fit_start(model, optimizer, device)
        self.masker.to(self.device).train()
        _to_device_state(self.opt, self.device)

    def after_step(self, x, y, model, optimizer) -> None:
        with self.autocast():
            z = self.masker(x)
        z = z.float()
        p = torch.sigmoid(z)
        reg = (self.erase_coef * F.binary_cross_entropy_with_logits(z, torch.zeros_like(z))
               + self.keep_coef * F.binary_cross_entropy_with_logits(z, torch.ones_like(z)))
        loss = self.classifier_step(keep_only(x, p, self.fill), y, model, optimizer, extra_loss=reg,
                                    extra_optimizer=self.opt)
        self.means.add(**{"end2end/loss": loss, "end2end/keep_mean": float(p.detach().mean())})

    def state_dict(self) -> dict:
        return {"masker": self.masker.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.masker.load_state_dict(state["masker"])
            self.opt.load_state_dict(state["opt"])

    def unit_arrays(self) -> dict[str, np.ndarray]:
        if self.probe is None:
            return {}
        self.masker.eval()
        with torch.no_grad():
            p = torch.sigmoid(self.masker(self.probe[0].to(self.device)).float())
        self.masker.train()
        return {"probe_keep": p.cpu().numpy()}


class APGAHook(SecondStepHook):
    """Adversarial Policy Gradient Augmentation (see the module docstring for the per-batch order).

    Args:
        task: the dataset's task (for the per-image cross-entropy).
        agent: a dense registry model, one logit per pixel: ``p = sigmoid`` = probability to erase.
        fill: the normalised value of an erased pixel (:func:`helpers.apga.masks.fill_value`).
        faithful: the reference's greedy ``p > 0.5`` actions and its mixed-mode reward (the erased
            loss after the clean update in eval mode, the clean loss before it in train mode).
        lr: the agent's Adam learning rate.
        pg_coef, erase_coef, keep_coef, entropy_coef: :func:`helpers.apga.agent.agent_loss`. The
            reference's area penalties act on p directly, with weights (0.1 and 0.01) that the
            policy gradient's (100) swamps: on their own they do not keep the agent from erasing
            everything, which raises the loss most (see ``area_cost``).
        area_cost: the price of erasing, in nats per whole image: the agent's reward is the loss
            gain minus ``area_cost`` times the share of the image erased, so it erases a region
            only where that raises the classifier's loss by more than the region's price (0: the
            reference's reward, the loss gain alone).
        baseline_decay: the moving-average baseline's decay (the reference's 0.5).
        agent_steps: agent updates per batch (the reference: 1). Each samples a fresh mask of the
            same images and is scored by the same classifier before (faithful: after) its update,
            so the agent learns ``agent_steps`` times as often as the classifier at the cost of one
            agent forward-backward and one classifier forward each; the last mask is the one the
            inverse-masked step uses. k-shot sets have few batches (k = 10 with batch 25: one per
            epoch), and one update per batch leaves the agent where it started. The agent's
            steps dominate an APGA batch's cost (the U-Net's forward-backward at full resolution
            costs more than the small classifier's step); ``benchmarks/apga_step.py`` prints it.
        normalize_advantage: standardise the advantages over the batch, ``(A - mean) / std``
            (:func:`helpers.rl.advantages`). The batch mean then acts as the baseline (the moving
            average is still kept and logged), and the step no longer scales with the size of the
            loss changes, which shrink as the classifier learns. The reference: off.
        init_erase_p: the agent's erase probability at the start, through a constant logit offset
            ``log(p / (1 - p))`` added to its output (the agent's own bias can learn it away). At
            0.5 (the reference) the first masks erase half of every image and the inverse-masked
            step keeps the other half; a small value starts from erased images that are nearly
            clean and inverse-masked ones that keep little, and lets the area price and the reward
            decide where the mask grows.
        mask_cell: the side in pixels of the cells the agent acts on (:mod:`helpers.apga.agent`):
            one Bernoulli action per cell, the mean of the cell's logits; 1 (the reference) acts
            per pixel.
        inverse_step: take step (5), the classifier update on the inverse-masked images.
        probe: ``(images, labels)`` whose erase probabilities at the best epoch ``unit_arrays`` gives.

    Per agent update the hook records ``TRACE`` (mean reward, loss gain, baseline, entropy, erased
    area and mean erase probability); ``unit_arrays`` stores the whole run's record as ``agent_trace``.
    """

    name = "apga"
    DEFAULT_AGENT_STEPS = 16
    #: The columns of the per-update record (``unit_arrays()["agent_trace"]``).
    TRACE = ("reward", "loss_gain", "baseline", "entropy", "erase_area", "p_mean")

    def __init__(self, task: str, agent: nn.Module, fill: float, *, faithful: bool = False, lr: float = 3e-3,
                 pg_coef: float = 100.0, erase_coef: float = 0.1, keep_coef: float = 0.01,
                 entropy_coef: float = 0.0, area_cost: float = 1.0, baseline_decay: float = 0.5,
                 agent_steps: int = DEFAULT_AGENT_STEPS,
                 normalize_advantage: bool = True, init_erase_p: float = 0.2, mask_cell: int = 4,
                 inverse_step: bool = True, probe=None):
        super().__init__(task, probe)
        if int(agent_steps) < 1:
            raise ValueError(f"agent_steps={agent_steps}: give at least 1 agent update per batch")
        if not 0.0 < init_erase_p < 1.0:
            raise ValueError(f"init_erase_p={init_erase_p}: give a probability strictly between 0 and 1")
        self.agent, self.fill, self.faithful, self.lr = agent, fill, faithful, lr
        self.coefs = {"pg_coef": pg_coef, "erase_coef": erase_coef, "keep_coef": keep_coef,
                      "entropy_coef": entropy_coef}
        self.area_cost = float(area_cost)
        self.baseline = MovingAverageBaseline(baseline_decay)
        self.agent_steps, self.normalize_advantage = int(agent_steps), bool(normalize_advantage)
        self.init_erase_p = float(init_erase_p)
        if int(mask_cell) < 1:
            raise ValueError(f"mask_cell={mask_cell}: give a cell side of at least 1 pixel")
        self.mask_cell = int(mask_cell)
        self.offset = math.log(self.init_erase_p / (1.0 - self.init_erase_p))
        self.inverse_step = inverse_step
        self.opt = torch.optim.Adam(self.agent.parameters(), lr=lr)
        self.trace: list[tuple[float, ...]] = []
        self._pending: tuple | None = None

    def settings(self) -> dict:
        return {"fill": self.fill, "faithful": self.faithful, "lr": self.lr, **self.coefs,
                "area_cost": self.area_cost, "baseline_decay": self.baseline.decay, "agent_steps": self.agent_steps,
                "normalize_advantage": self.normalize_advantage, "init_erase_p": self.init_erase_p,
                "mask_cell": self.mask_cell, "inverse_step": self.inverse_step, "agent": type(self.agent).__name__}

    def on_fit_start(self, model, optimizer, device) -> None:
        super().on_fit_start(model, optimizer, device)
        self.agent.to(self.device).train()
        _to_device_state(self.opt, self.device)

    def logits(self, x: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """The policy's erase logits of ``x``, one per cell of ``mask_cell`` pixels (the agent's output
        plus the ``init_erase_p`` offset, averaged over each cell), float32 ``(B, 1, h, w)``; the
        agent runs in the loop's training precision unless ``fp32`` (evaluation, as fit's)."""
        with self.autocast(enabled=not fp32):
            out = self.agent(x)
        return cell_logits(out.float() + self.offset, self.mask_cell)

    def erased_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Per-image loss of ``model`` on ``x`` with the ``action`` pixels erased, in ``model``'s current
        mode (no gradient)."""
        with torch.no_grad(), self.autocast():
            out = model(erase(x, action, self.fill))
        return self.criterion(out.float(), y)

    def agent_update(self, reward: torch.Tensor, logits: torch.Tensor, log_prob: torch.Tensor,
                     entropy: torch.Tensor) -> dict:
        """Steps (3)-(4): baseline, advantage, REINFORCE step of the agent; returns the logged values."""
        baseline = self.baseline.update(reward)
        advantage = advantages(reward, baseline, normalize=self.normalize_advantage)
        loss = agent_loss(logits, log_prob, advantage, entropy=entropy, **self.coefs)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return rl_metrics(reward, baseline, advantage, entropy)

    def agent_steps_on(self, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """``agent_steps`` agent updates on the batch ``x`` against the per-image ``clean`` losses, each
        on a fresh mask scored by ``model`` in its current mode; returns the last mask (no gradient)."""
        action = None
        for _ in range(self.agent_steps):
            z = self.logits(x)
            cells, log_prob, entropy = sample_mask(z, greedy=self.faithful)
            action = to_pixels(cells, self.mask_cell, x.shape[-2:])
            gain = self.erased_loss(model, x, y, action) - clean
            reward = gain - self.area_cost * action.flatten(1).mean(1) if self.area_cost else gain
            self._log(self.agent_update(reward, z, log_prob, entropy), z, action, gain)
        return action

    def on_batch_end(self, x, y, logits, loss_per_sample) -> None:
        clean = loss_per_sample.detach().float()
        # sound: both losses before the clean update, both in train mode
        action = None if self.faithful else self.agent_steps_on(x, y, clean, self.model)
        self._pending = (action, clean)

    def after_step(self, x, y, model, optimizer) -> None:
        if self._pending is None:
            raise RuntimeError("APGAHook.after_step without on_batch_end: the hook must be given to fit's hooks")
        action, clean = self._pending
        self._pending = None
        if self.faithful:       # the reference: erased loss after the clean update, in eval mode
            was = model.training
            model.eval()
            action = self.agent_steps_on(x, y, clean, model)
            model.train(was)
        if self.inverse_step:
            loss = self.classifier_step(keep_only(x, action, self.fill), y, model, optimizer)
            self.means.add(**{"apga/inverse_loss": loss})

    def _log(self, logs: dict, z: torch.Tensor, action: torch.Tensor, gain: torch.Tensor) -> None:
        area, p_mean, gain = float(action.mean()), float(torch.sigmoid(z.detach()).mean()), float(gain.mean())
        self.means.add(**logs, **{"apga/loss_gain": gain, "apga/erase_area": area, "apga/p_mean": p_mean})
        self.trace.append((logs["rl/reward"], gain, logs["rl/baseline"], logs["rl/entropy"], area, p_mean))

    def state_dict(self) -> dict:
        value = self.baseline.value
        return {"agent": self.agent.state_dict(), "opt": self.opt.state_dict(),
                "baseline": None if value is None else float(value),
                "trace": torch.tensor(self.trace, dtype=torch.float32).reshape(-1, len(self.TRACE))}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.agent.load_state_dict(state["agent"])
            self.opt.load_state_dict(state["opt"])
            b = state["baseline"]
            self.baseline.value = None if b is None else torch.tensor(float(b))
            trace = state.get("trace")
            # the record of the run, not state to roll back: a resumed fit takes the stored one, the
            # restore of the best epoch at the end of fit keeps the longer record of the whole run
            if trace is not None and len(trace) > len(self.trace):
                self.trace = [tuple(float(v) for v in row) for row in trace.tolist()]

    def erase_probability(self, x: torch.Tensor) -> torch.Tensor:
        """The agent's per-pixel erase probability (B, 1, H, W) of images ``x`` (eval mode, no gradient)."""
        was = self.agent.training
        self.agent.eval()
        with torch.no_grad():
            x = x.to(self.device)
            p = to_pixels(torch.sigmoid(self.logits(x, fp32=True)), self.mask_cell, x.shape[-2:])
        self.agent.train(was)
        return p

    def unit_arrays(self) -> dict[str, np.ndarray]:
        out = {"agent_trace": np.asarray(self.trace, dtype=np.float32).reshape(-1, len(self.TRACE))}
        if self.probe is not None:
            out["probe_erase_p"] = self.erase_probability(self.probe[0]).cpu().numpy()
        return out


def describe(hook: Any) -> str:
    """A hook's name and settings in one line (for tables)."""
    return f"{type(hook).__name__}({', '.join(f'{k}={v}' for k, v in hook.settings().items())})"
