"""The agent's policy over per-pixel erase actions and its REINFORCE loss.

The agent (a dense model from the registry, e.g. ``unet_small``) gives one logit per pixel;
``p = sigmoid(logit)`` is the probability of erasing that pixel. The policy is a
:class:`helpers.rl.LogitBernoulli` per pixel, or per cell of ``cell`` x ``cell`` pixels
(:func:`cell_logits`: the mean of the cell's logits; the action then erases the whole cell,
:func:`to_pixels`). By default actions are **sampled**; the reference's greedy threshold
``a = 1[p > 0.5]`` is the ``greedy`` (faithful) option. In both cases the gradient reaches the
agent only through the log-probability of the taken action.

Why cells: a per-pixel Bernoulli mask at p < 1 erases a scatter of single pixels, which a CNN
with pooling notices less than a patch (max-pooling keeps a 2x2 block's peak unless all four
pixels are erased), so the reward depends less on which pixels were drawn, and one scalar reward
per image is shared by H x W actions. Cells of 4 x 4 pixels at 28 px (7 x 7 actions) erase
patches; at the same number of updates their agent learned faster in the chapter's checks (on a
toy task and on BreastMNIST), and the inverse-masked step then keeps patches, not a scatter.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..rl import LogitBernoulli


def cell_logits(logits: torch.Tensor, cell: int = 1) -> torch.Tensor:
    """The policy's logits per cell of ``cell`` x ``cell`` pixels: the mean of the pixel logits
    ``(B, 1, H, W)`` over each cell (the last row and column of cells may be partial). ``cell=1``:
    the pixel logits themselves."""
    if cell <= 1:
        return logits.float()
    return F.avg_pool2d(logits.float(), int(cell), ceil_mode=True)


def to_pixels(cells: torch.Tensor, cell: int, size: tuple[int, int]) -> torch.Tensor:
    """A per-cell map ``(B, 1, h, w)`` repeated over each cell's pixels and cut to ``size`` (H, W)."""
    if cell <= 1:
        return cells
    out = cells.repeat_interleave(int(cell), -2).repeat_interleave(int(cell), -1)
    return out[..., :size[0], :size[1]]


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
