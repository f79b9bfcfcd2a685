"""Combiners learnt from stored member scores only: averaging, a stacker, weighting networks, a gate.

All of them read a :class:`~helpers.ensemble.members.ScoreStack` (out-of-fold probabilities on
train, fold-mean probabilities on val and test) and never a member's weights. The learnt ones fit on
the out-of-fold **train** scores only; validation selects (the epoch of a network, by val loss) and
test is scored once at the end. A member's "logits" here are its log-probabilities: shifting a logit
vector by a constant changes neither its softmax nor a weighted sum's softmax, so
``sum_k w_k log p_k`` is the reference's ``sum_k w_k logits_k`` up to a class-independent constant.

Weighting network (the reference's "RL" ensemble, with the temperature kept positive)::

    w = softmax(MLP(concat_k log p_k) / T),   T = T_min + softplus(t) > 0,   out = log_softmax(sum_k w_k log p_k)

trained three ways at equal budget (same data, epochs, batches, optimiser):

* ``ce``: cross-entropy of ``out``.
* ``faithful``: the reference's loss, ``CE + 0.1 * mean_i[-r_i sum_k log w_ik]`` with ``r_i = +1``
  when the prediction is right, else -1. Nothing is sampled: it is a **regulariser** (it pulls ``w``
  towards uniform on right cases and away from it on wrong ones), not reinforcement learning.
* ``rl``: REINFORCE. The network's ``w`` is the mean of a Dirichlet policy,
  ``Dirichlet(concentration * w)``; weights are *sampled*, the prediction uses the sample, the reward
  is the sample's log-likelihood of the true class (minus that of uniform weights, a state-dependent
  shift that leaves the expected gradient unchanged) or its correctness; a moving-average baseline
  gives the advantage, and the gradient flows only through the sample's log-probability.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet

from ..metrics import classification_metrics
from ..repro import seed_everything, unit_code_digest
from ..results import Recorder
from ..rl import MovingAverageBaseline, advantages, rl_metrics, sample
from ..train import FitConfig, Hook, fit
from .members import ScoreStack

__all__ = ["WEIGHTING", "COMBINERS", "FloatLoader", "WeightNet", "FaithfulLoss", "ReinforceLoss", "GateNet",
           "to_logp", "average", "fit_stacker", "fit_weighting", "fit_gate", "combiner_unit", "scores_metrics"]

#: the weighting-network variants (equal budget) and every combiner of the chapter
WEIGHTING = ("ce", "faithful", "rl")
COMBINERS = ("average", "stacker") + WEIGHTING
EPS = 1e-7


def to_logp(probs: np.ndarray) -> torch.Tensor:
    """Log-probabilities (float32) of probability arrays, clipped away from 0."""
    return torch.as_tensor(np.log(np.clip(probs, EPS, 1.0)), dtype=torch.float32)


def scores_metrics(probs: np.ndarray, labels: np.ndarray, task: str, prefix: str) -> dict:
    """``{prefix}/acc, /auc, /kappa, /balanced_acc`` of probabilities ``(N, C)``."""
    return {f"{prefix}/{k}": v for k, v in classification_metrics(labels, probs, task).items()}


class FloatLoader:
    """Batches of a float tensor ``x`` (first dim = samples) and labels ``y``, shuffled per epoch with
    its own seeded generator (checkpointable like :class:`helpers.data.TensorLoader`)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, torch.as_tensor(y, dtype=torch.long)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.num_samples = len(x)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.generator) if self.shuffle else torch.arange(len(self.x))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


def combine(logp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``log_softmax(sum_k w_k log p_k)`` for ``logp (B, K, C)`` and weights ``w (B, K)``."""
    return torch.log_softmax((w.unsqueeze(-1) * logp).sum(1), dim=-1)


class WeightNet(nn.Module):
    """Per-image member weights ``softmax(MLP(z) / T)`` with a learnable temperature kept positive.

    ``z`` is the concatenation of the ``K`` members' log-probabilities (``K * C`` inputs); the MLP is
    ``Linear(K*C, hidden) - ReLU - Linear(hidden, K)`` as in the reference. ``T = T_min +
    softplus(t)`` is positive for every value of the raw parameter ``t`` (the reference's ``T`` was
    unconstrained and could reach 0 or below). With ``policy="dirichlet"`` the module is a stochastic
    policy in training mode: it samples ``w ~ Dirichlet(concentration * mean)`` (no gradient through
    the sample) and keeps the sample's ``log_prob`` and ``entropy`` for :class:`ReinforceLoss`; in
    eval mode it uses the mean weights.
    """

    def __init__(self, n_members: int, n_classes: int, hidden: int = 64, init_temperature: float = 1.0,
                 min_temperature: float = 0.05, policy: str = "mean", concentration: float = 20.0):
        super().__init__()
        if policy not in ("mean", "dirichlet"):
            raise ValueError(f"policy must be 'mean' or 'dirichlet', got {policy!r}")
        if init_temperature <= min_temperature or min_temperature <= 0:
            raise ValueError("need 0 < min_temperature < init_temperature")
        self.mlp = nn.Sequential(nn.Linear(n_members * n_classes, hidden), nn.ReLU(), nn.Linear(hidden, n_members))
        self.min_temperature = float(min_temperature)
        gap = init_temperature - min_temperature
        self.raw_temperature = nn.Parameter(torch.tensor(math.log(math.expm1(gap))))  # softplus^-1
        self.policy, self.concentration = policy, float(concentration)
        self.last: dict[str, torch.Tensor] = {}

    @property
    def temperature(self) -> torch.Tensor:
        return self.min_temperature + F.softplus(self.raw_temperature)

    def mean_weights(self, logp: torch.Tensor) -> torch.Tensor:
        """The deterministic weights ``softmax(MLP(z) / T)``, shape ``(B, K)``."""
        return torch.softmax(self.mlp(logp.flatten(1)) / self.temperature, dim=-1)

    def forward(self, logp: torch.Tensor) -> torch.Tensor:
        w = self.mean_weights(logp)
        self.last = {"logp": logp, "mean": w}
        if self.policy == "dirichlet" and self.training:
            dist = Dirichlet(self.concentration * w + 1e-4)
            action, log_prob, entropy = sample(dist, batch_dims=1)
            self.last.update(action=action, log_prob=log_prob, entropy=entropy)
            w = action  # sampled: no gradient flows through the prediction
        return combine(logp, w)


def _correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(1) == y).float()


class FaithfulLoss:
    """The reference's loss: ``CE + coef * (-r_i sum_k log w_ik)``, ``r_i = +1`` right / ``-1`` wrong.

    Deterministic (nothing sampled): an entropy-like regulariser on ``w``, not reinforcement learning.
    """

    def __init__(self, model: WeightNet, coef: float = 0.1):
        self.model, self.coef = model, coef
        self.__name__ = "FaithfulLoss"

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.model.last["mean"]
        r = (2 * _correct(out, y) - 1).detach()
        return F.nll_loss(out, y, reduction="none") + self.coef * (-r * torch.log(w + 1e-12).sum(1))


class ReinforceLoss(Hook):
    """REINFORCE surrogate for a :class:`WeightNet` with ``policy="dirichlet"`` (a criterion and a hook).

    Per image: reward ``r`` (``"loglik"``: log-likelihood of the label under the sampled weights minus
    under uniform weights; ``"correct"``: +1/-1), ``b`` a moving-average baseline, advantage
    ``A = r - b`` (standardised over the batch with ``normalize``); the loss is ``-(log_prob * A) - entropy_coef * entropy``, whose mean is
    :func:`helpers.rl.reinforce_loss`. Logs ``rl/reward``, ``rl/baseline``, ``rl/advantage``,
    ``rl/entropy`` per epoch (means over its batches).
    """

    def __init__(self, model: WeightNet, reward: str = "loglik", decay: float = 0.9, entropy_coef: float = 1e-3,
                 normalize: bool = True):
        if reward not in ("loglik", "correct"):
            raise ValueError(f"reward must be 'loglik' or 'correct', got {reward!r}")
        self.model, self.reward, self.entropy_coef, self.normalize = model, reward, entropy_coef, normalize
        self.baseline = MovingAverageBaseline(decay)
        self.__name__ = "ReinforceLoss"
        self._epoch: list[dict] = []

    def rewards(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.reward == "correct":
                return 2 * _correct(out, y) - 1
            logp = self.model.last["logp"]
            uniform = combine(logp, torch.full(logp.shape[:2], 1.0 / logp.shape[1]))
            return out.gather(1, y[:, None])[:, 0] - uniform.gather(1, y[:, None])[:, 0]

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        last = self.model.last
        if "log_prob" not in last:   # eval mode (no sample): plain NLL, never back-propagated by fit
            return F.nll_loss(out, y, reduction="none")
        r = self.rewards(out, y)
        b = self.baseline.update(r)
        adv = advantages(r, b, normalize=self.normalize)
        self._epoch.append(rl_metrics(r, b, adv, last["entropy"]))
        return -(last["log_prob"] * adv) - self.entropy_coef * last["entropy"]

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        out = pd.DataFrame(self._epoch).mean().to_dict() if self._epoch else {}
        self._epoch = []
        return out

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.value}

    def load_state_dict(self, state: dict) -> None:
        self.baseline.value = state.get("baseline")


class Trajectory(Hook):
    """Logs, per epoch, the mean member weights and the temperature on the validation stack."""

    def __init__(self, model: WeightNet, val_logp: torch.Tensor, names: Sequence[str]):
        self.model, self.val, self.names = model, val_logp, list(names)

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            w = self.model.mean_weights(self.val).mean(0)
        self.model.train(was)
        out = {f"weight/{n}": float(v) for n, v in zip(self.names, w)}
        out["temperature"] = float(self.model.temperature.detach())
        return out


def _fit_cfg(cfg: FitConfig) -> FitConfig:
    """A combiner's fit config: selection on val loss, CPU-friendly formats, no progress output."""
    from dataclasses import replace
    return replace(cfg, monitor="val/loss", mode="min", channels_last=False, amp=False, cpu_amp=False, progress="none")


def average(stack: ScoreStack, split: str) -> np.ndarray:
    """Plain averaging of the members' probabilities on ``split``."""
    return stack.split(split)[0].mean(0)


def fit_stacker(stack: ScoreStack, C: float = 1.0, seed: int = 0):
    """scikit-learn logistic regression on the members' out-of-fold train log-probabilities.

    Returns ``predict(split) -> probabilities``; it fits on train labels only."""
    from sklearn.linear_model import LogisticRegression

    def feats(split):
        return np.log(np.clip(stack.split(split)[0], EPS, 1)).transpose(1, 0, 2).reshape(stack.split(split)[0].shape[1], -1)

    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(feats("train"), stack.y_train)
    n_classes = stack.train.shape[-1]

    def predict(split):
        p = clf.predict_proba(feats(split))
        full = np.zeros((len(p), n_classes))
        full[:, clf.classes_] = p
        return full
    return predict


def fit_weighting(stack: ScoreStack, variant: str, cfg: FitConfig, *, seed: int = 0, batch_size: int = 32,
                  hidden: int = 64, faithful_coef: float = 0.1, concentration: float = 20.0,
                  reward: str = "loglik", baseline_decay: float = 0.9, entropy_coef: float = 1e-3,
                  normalize_advantage: bool = True, task: str = "multi-class") -> dict:
    """Train one weighting-network ``variant`` (``ce``, ``faithful``, ``rl``) on the out-of-fold train
    scores with :func:`helpers.train.fit`, select its epoch on val loss; return probabilities, weights
    and the history (weights' and temperature's trajectories, ``rl/*`` for ``rl``), and the network's
    selected ``state`` (stored with the unit, so the summary page can rebuild the combiner)."""
    if variant not in WEIGHTING:
        raise ValueError(f"weighting variant {variant!r} unknown; use one of {WEIGHTING}")
    seed_everything(seed)
    K, _, C = stack.train.shape
    model = WeightNet(K, C, hidden, policy="dirichlet" if variant == "rl" else "mean", concentration=concentration)
    x = {s: to_logp(stack.split(s)[0]).transpose(0, 1).contiguous() for s in ("train", "val", "test")}
    loader = FloatLoader(x["train"], stack.y_train, batch_size, shuffle=True, seed=seed)
    val_loader = FloatLoader(x["val"], stack.y_val, 512)
    hooks: list[Hook] = [Trajectory(model, x["val"], stack.names)]
    criterion = None
    if variant == "faithful":
        criterion = FaithfulLoss(model, faithful_coef)
    elif variant == "rl":
        criterion = ReinforceLoss(model, reward, baseline_decay, entropy_coef, normalize_advantage)
        hooks.append(criterion)
    result = fit(model, loader, val_loader, task, _fit_cfg(cfg), hooks=hooks, criterion=criterion)
    model.eval()
    with torch.no_grad():
        probs = {s: combine(x[s], model.mean_weights(x[s])).exp().numpy() for s in ("train", "val", "test")}
        weights = {s: model.mean_weights(x[s]).numpy() for s in ("val", "test")}
    return {"probs": probs, "weights": weights, "history": result.history, "best_epoch": result.best_epoch,
            "temperature": float(model.temperature.detach()), "state": model.state_dict()}


class GateNet(nn.Module):
    """``g = sigmoid(MLP(dropout(concat(ensemble, expert))))``; output ``g * expert + (1 - g) * ensemble``.

    Inputs are log-probabilities ``(B, 2, C)`` (ensemble first); the mix is in log-probability space
    as the reference mixes logits, then renormalised. ``MLP = Linear(2C, hidden) - ReLU - Linear(hidden, 1)``.
    """

    def __init__(self, n_classes: int, hidden: int = 32, dropout: float = 0.3):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(2 * n_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(self.drop(x.flatten(1))))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)[:, None]
        return torch.log_softmax(g * x[:, 1] + (1 - g) * x[:, 0], dim=-1)


class _GateLog(Hook):
    def __init__(self, model: GateNet, val_x: torch.Tensor):
        self.model, self.val = model, val_x

    def on_epoch_end(self, epoch: int, logs: dict) -> dict:
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            g = float(self.model.gate(self.val).mean())
        self.model.train(was)
        return {"gate/mean": g}


def fit_gate(ensemble: Mapping[str, np.ndarray], expert: ScoreStack, cfg: FitConfig, *, seed: int = 0,
             batch_size: int = 32, hidden: int = 32, dropout: float = 0.3, task: str = "multi-class") -> dict:
    """Train a :class:`GateNet` on train (the ensemble's train probabilities and the expert's
    out-of-fold ones), select on val loss; return mixed probabilities and gate values per split."""
    seed_everything(seed)
    x = {s: torch.stack([to_logp(ensemble[s]), to_logp(expert.split(s)[0][0])], 1) for s in ("train", "val", "test")}
    model = GateNet(expert.train.shape[-1], hidden, dropout)
    loader = FloatLoader(x["train"], expert.y_train, batch_size, shuffle=True, seed=seed)
    result = fit(model, loader, FloatLoader(x["val"], expert.y_val, 512), task, _fit_cfg(cfg),
                 hooks=[_GateLog(model, x["val"])])
    model.eval()
    with torch.no_grad():
        probs = {s: model(x[s]).exp().numpy() for s in ("val", "test")}
        gates = {s: model.gate(x[s]).numpy() for s in ("val", "test")}
    return {"probs": probs, "gates": gates, "history": result.history, "best_epoch": result.best_epoch}


def _stack_digest(*stacks: ScoreStack) -> str:
    h = hashlib.sha256()
    for st in stacks:
        for arr in (st.train, st.val, st.test, st.y_train, st.y_val, st.y_test):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def combiner_unit(recorder: Recorder, stack: ScoreStack, combiner: str, seed: int, cfg: FitConfig, task: str, *,
                  expert: ScoreStack | None = None, gate_cfg: FitConfig | None = None,
                  settings: Mapping[str, Any] | None = None, unit_tag: Mapping[str, Any] | None = None) -> dict:
    """One stored combiner unit (keys ``role=combiner, combiner, expert, seed``): fit on train scores,
    score val and test once; with ``expert`` a gate mixes the combiner's output with the expert's.

    ``settings``: the combiner options (``hidden``, ``faithful_coef``, ``concentration``, ``reward``,
    ``baseline_decay``, ``entropy_coef``, ``stacker_C``, ``batch_size``, ``gate_hidden``,
    ``gate_dropout``). The unit is reused only for the same inputs (a digest of the stored scores),
    settings and code."""
    if combiner not in COMBINERS:
        raise ValueError(f"combiner {combiner!r} unknown; use one of {COMBINERS}")
    opts = dict(settings or {})
    keys = {"role": "combiner", "combiner": combiner, "expert": expert is not None, "seed": seed, **dict(unit_tag or {})}
    fingerprint = {"keys": keys, "inputs": _stack_digest(stack, *([expert] if expert is not None else [])),
                   "cfg": asdict(cfg), "gate_cfg": asdict(gate_cfg) if gate_cfg else None, "settings": opts}

    def compute() -> dict:
        extra, history, state = {}, None, None
        batch = opts.get("batch_size", 32)
        if expert is not None:   # the gate sits on the stored ungated combiner: it is fitted once, not twice
            base = combiner_unit(recorder, stack, combiner, seed, cfg, task, settings=opts, unit_tag=unit_tag)
            stored = recorder.scores(**base["keys"])
            probs = {s: stored[f"{s}_scores"] for s in ("train", "val", "test")}
            history = recorder.history(**base["keys"]) if combiner in WEIGHTING else None
            extra.update({k: base[k] for k in ("best_epoch", "temperature") if k in base})
        elif combiner == "average":
            probs = {s: average(stack, s) for s in ("train", "val", "test")}
        elif combiner == "stacker":
            predict = fit_stacker(stack, opts.get("stacker_C", 1.0), seed)
            probs = {s: predict(s) for s in ("train", "val", "test")}
        else:
            res = fit_weighting(stack, combiner, cfg, seed=seed, batch_size=batch, task=task,
                                **{k: opts[k] for k in ("hidden", "faithful_coef", "concentration", "reward",
                                                        "baseline_decay", "entropy_coef", "normalize_advantage")
                                   if k in opts})
            probs, history, state = res["probs"], res["history"], res["state"]
            extra.update(best_epoch=res["best_epoch"], temperature=res["temperature"])
        scores = {}
        if expert is not None:
            gate = fit_gate(probs, expert, gate_cfg or cfg, seed=seed, batch_size=batch, task=task,
                            hidden=opts.get("gate_hidden", 32), dropout=opts.get("gate_dropout", 0.3))
            probs = {"val": gate["probs"]["val"], "test": gate["probs"]["test"]}
            scores.update({f"{s}_gate": gate["gates"][s] for s in ("val", "test")})
            history = gate["history"] if history is None else history.merge(
                gate["history"][["epoch", "gate/mean"]], on="epoch", how="outer")
            extra.update(gate_best_epoch=gate["best_epoch"])
        metrics = {}
        if expert is None:
            scores["train_scores"] = probs["train"]   # read by the gated unit (train labels only, never val/test)
        for s in ("val", "test"):
            y = stack.split(s)[1]
            metrics.update(scores_metrics(probs[s], y, task, s))
            scores.update({f"{s}_scores": probs[s], f"{s}_labels": y})
        if expert is not None:
            for s in ("val", "test"):
                g, right = scores[f"{s}_gate"], probs[s].argmax(1) == stack.split(s)[1]
                metrics.update({f"{s}/gate_mean": float(g.mean()),
                                f"{s}/gate_right": float(g[right].mean()) if right.any() else math.nan,
                                f"{s}/gate_wrong": float(g[~right].mean()) if (~right).any() else math.nan})
        return {"metrics": metrics, "history": history, "scores": scores, "extra": extra, "model": state}

    return recorder.unit(keys, compute, fingerprint=fingerprint, code=unit_code_digest(uses=("ensemble", "rl")))
