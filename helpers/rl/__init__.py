"""Reinforcement-learning helpers: REINFORCE pieces and tiny policies (masking rules: :mod:`helpers.nas.rules`)."""

from .policies import (
    MASK_VALUE,
    BernoulliPolicy,
    BetaPolicy,
    CategoricalPolicy,
    LogitBernoulli,
    masked_logits,
    sample,
)
from .reinforce import (
    MovingAverageBaseline,
    advantages,
    discounted_returns,
    reinforce_loss,
    rl_metrics,
    update_baseline,
)

__all__ = [
    # reinforce
    "discounted_returns",
    "update_baseline",
    "advantages",
    "reinforce_loss",
    "rl_metrics",
    "MovingAverageBaseline",
    # policies
    "MASK_VALUE",
    "masked_logits",
    "CategoricalPolicy",
    "BernoulliPolicy",
    "LogitBernoulli",
    "BetaPolicy",
    "sample",
]
