"""REINFORCE building blocks (cleanrl-style small pure functions).

Typical step of a REINFORCE controller::

    dist = policy()                                   # helpers.rl.policies
    action, log_prob, entropy = sample(dist, n=16)
    reward = evaluate(action)                         # (16,) tensor
    baseline = update_baseline(baseline, reward, decay=0.9)
    adv = advantages(reward, baseline)
    loss = reinforce_loss(log_prob, adv, entropy, entropy_coef=1e-3)
    opt.zero_grad(); loss.backward(); opt.step()
    logger.log(rl_metrics(reward, baseline, adv, entropy))

Whether the baseline is updated before or after computing the advantage is
the caller's choice; updating first (as above) includes the current batch.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "discounted_returns",
    "update_baseline",
    "advantages",
    "reinforce_loss",
    "rl_metrics",
    "MovingAverageBaseline",
]

Number = Union[float, int]


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_{t+1}``.

    Args:
        rewards: ``(T,)`` or ``(T, *batch)``; time is the first dimension.
        gamma: discount factor in ``[0, 1]``.

    Returns:
        Tensor of the same shape and dtype as ``rewards`` (float).

    Example: ``discounted_returns(tensor([1., 0., 2.]), 0.5) == tensor([1.5, 1., 2.])``.
    """
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() == 0:
        raise ValueError("rewards must have a time dimension (dim 0)")
    out = []
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * running
        out.append(running)
    return torch.stack(out[::-1], dim=0)


def update_baseline(
    baseline: Optional[Union[Number, Tensor]], reward: Tensor, decay: float
) -> Tensor:
    """Exponential moving average baseline.

    ``b <- decay * b + (1 - decay) * mean(reward)``; if ``baseline`` is
    ``None`` it is initialised to ``mean(reward)``. The result is a detached
    0-dim float tensor (a baseline never carries gradients).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    r = torch.as_tensor(reward).detach().float().mean()
    if baseline is None:
        return r
    b = torch.as_tensor(baseline, device=r.device).detach().float()
    return decay * b + (1.0 - decay) * r


def advantages(
    reward: Tensor, baseline: Optional[Union[Number, Tensor]], normalize: bool = False
) -> Tensor:
    """``reward - baseline`` (``baseline=None`` means 0), detached.

    With ``normalize=True`` the advantages are standardised to zero mean and
    unit std over all entries (``(a - mean) / (std + 1e-8)``) when there is more
    than one entry; a single entry is left as ``reward - baseline``.
    """
    reward = torch.as_tensor(reward).detach()
    if not reward.is_floating_point():
        reward = reward.float()
    adv = reward if baseline is None else reward - torch.as_tensor(baseline, device=reward.device).detach()
    if normalize and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


def reinforce_loss(
    log_prob: Tensor,
    advantage: Tensor,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """REINFORCE surrogate loss to *minimise*.

    ``-(log_prob * advantage.detach()).mean() - entropy_coef * entropy.mean()``
    (the entropy term only when ``entropy`` is given). ``log_prob`` and
    ``advantage`` must broadcast, e.g. both ``(n_samples,)``.
    """
    advantage = torch.as_tensor(advantage, device=log_prob.device)
    loss = -(log_prob * advantage.detach()).mean()
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy.mean()
    return loss


def _mean_float(x) -> float:
    if x is None:
        return float("nan")
    if isinstance(x, Tensor):
        return float(x.detach().float().mean().item())
    return float(torch.as_tensor(x, dtype=torch.float32).mean().item())


def rl_metrics(reward, baseline, advantage, entropy=None) -> dict:
    """Plain-float logging dict with keys ``rl/reward``, ``rl/baseline``,
    ``rl/advantage`` and ``rl/entropy`` (means of each; ``None`` -> ``nan``)."""
    return {
        "rl/reward": _mean_float(reward),
        "rl/baseline": _mean_float(baseline),
        "rl/advantage": _mean_float(advantage),
        "rl/entropy": _mean_float(entropy),
    }


class MovingAverageBaseline:
    """Stateful wrapper around :func:`update_baseline`.

    >>> b = MovingAverageBaseline(decay=0.9)
    >>> b.value is None
    True
    >>> float(b.update(torch.tensor([1.0, 3.0])))
    2.0
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.value: Optional[Tensor] = None

    def update(self, reward: Tensor) -> Tensor:
        """Fold ``mean(reward)`` into the average and return the new value."""
        self.value = update_baseline(self.value, reward, self.decay)
        return self.value

    def reset(self) -> None:
        """Forget the running value (next update re-initialises it)."""
        self.value = None

    def __float__(self) -> float:
        return math.nan if self.value is None else float(self.value)

    def __repr__(self) -> str:
        return f"MovingAverageBaseline(decay={self.decay}, value={self.value})"
