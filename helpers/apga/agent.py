"""The agent's policy over per-pixel erase actions and its REINFORCE loss.

The agent (a dense model from the registry, e.g. ``unet_small``) gives one logit per pixel;
``p = sigmoid(logit)`` is the probability of erasing that pixel. The policy is a
:class:`helpers.rl.LogitBernoulli` per pixel. By default actions are **sampled**; the reference's
greedy threshold ``a = 1[p > 0.5]`` is the ``greedy`` (faithful) option. In both cases the
gradient reaches the agent only through the log-probability of the taken action.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..rl import LogitBernoulli


def sample_mask(logits: torch.Tensor, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Actions ``(B, 1, H, W)`` in {0, 1} (no gradient), their log-probability per image (mean over
    pixels, with gradient) and the policy's entropy per image (mean over pixels, in nats)."""
    dist = LogitBernoulli(logits=logits.float())
    with torch.no_grad():
        action = (logits > 0).float() if greedy else dist.sample()
    log_prob = dist.log_prob(action).flatten(1).mean(1)
    entropy = dist.entropy().flatten(1).mean(1)
    return action, log_prob, entropy


def agent_loss(logits: torch.Tensor, log_prob: torch.Tensor, advantage: torch.Tensor, *, pg_coef: float = 100.0,
               erase_coef: float = 0.1, keep_coef: float = 0.01, entropy: torch.Tensor | None = None,
               entropy_coef: float = 0.0) -> torch.Tensor:
    """The agent's loss to minimise, after the reference (``apga_mura.py``):

    ``pg_coef * mean(-A * log pi(a))`` (REINFORCE; ``A`` per image, detached)
    ``+ erase_coef * mean(|A| * BCE(p, 0)) + keep_coef * mean(|A| * BCE(p, 1))`` (area penalties:
    the first pulls p towards keeping, the second towards erasing) ``- entropy_coef * mean(H)``.
    The reference's ``100 * A * BCE(p, 1[p > 0.5])`` is the first term with the greedy action.
    """
    adv = advantage.detach().float()
    loss = -pg_coef * (adv * log_prob).mean()
    if erase_coef or keep_coef:
        z = logits.float().flatten(1)
        to_keep = F.binary_cross_entropy_with_logits(z, torch.zeros_like(z), reduction="none").mean(1)
        to_erase = F.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="none").mean(1)
        loss = loss + (adv.abs() * (erase_coef * to_keep + keep_coef * to_erase)).mean()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy.mean()
    return loss
