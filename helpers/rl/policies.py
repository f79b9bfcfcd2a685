"""Tiny learnable policies (no inputs: the parameters *are* the policy).

These are the controllers used in the RL chapters: a categorical choice among
``n`` options, independent Bernoulli decisions over a grid (e.g. which patches
to keep), and independent Beta-distributed values in ``(0, 1)`` over a grid
(e.g. augmentation magnitudes). Each ``forward`` returns a
``torch.distributions`` object; :func:`sample` draws actions with the joint
log-probability needed by :func:`helpers.rl.reinforce.reinforce_loss`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.distributions import Bernoulli, Beta, Categorical, Distribution

__all__ = [
    "MASK_VALUE",
    "masked_logits",
    "CategoricalPolicy",
    "BernoulliPolicy",
    "LogitBernoulli",
    "BetaPolicy",
    "sample",
]

#: Logit given to forbidden actions: ``exp(MASK_VALUE - logsumexp)`` is exactly
#: 0 in float32/float64, so a masked action is never sampled, and its entropy
#: contribution is 0 (no ``-inf * 0 = nan``).
MASK_VALUE = -1e10

Shape = Union[int, Sequence[int]]


def masked_logits(logits: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Set forbidden logits to :data:`MASK_VALUE`.

    Args:
        logits: ``(..., n_actions)``.
        mask: bool, broadcastable to ``logits``; ``True`` = allowed,
            ``False`` = forbidden. ``None`` returns ``logits`` unchanged.

    Raises:
        ValueError: if some row (last dimension) has every action forbidden.
    """
    if mask is None:
        return logits
    mask = torch.as_tensor(mask, device=logits.device)
    if mask.dtype != torch.bool:
        mask = mask.bool()
    try:
        shape = torch.broadcast_shapes(mask.shape, logits.shape)
    except RuntimeError as e:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not broadcast to logits {tuple(logits.shape)}"
        ) from e
    if len(shape) == 0:
        raise ValueError("logits must have an action dimension")
    if not bool(mask.broadcast_to(shape).any(dim=-1).all()):
        raise ValueError("mask forbids every action in at least one row")
    return torch.where(mask, logits, torch.full_like(logits, MASK_VALUE))


def _shape(shape: Shape) -> Tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class CategoricalPolicy(nn.Module):
    """Learnable logits over ``n_actions``; starts uniform (zero logits).

    ``forward(mask)`` returns ``Categorical(logits=masked_logits(logits, mask))``;
    a batched mask ``(B, n_actions)`` gives a distribution with
    ``batch_shape == (B,)``.
    """

    def __init__(self, n_actions: int):
        super().__init__()
        if n_actions < 1:
            raise ValueError("n_actions must be >= 1")
        self.logits = nn.Parameter(torch.zeros(n_actions))

    def forward(self, mask: Optional[Tensor] = None) -> Categorical:
        return Categorical(logits=masked_logits(self.logits, mask))

    def probs(self, mask: Optional[Tensor] = None) -> Tensor:
        """Current action probabilities (detached)."""
        return self.forward(mask).probs.detach()


class LogitBernoulli(Bernoulli):
    """``Bernoulli(logits=...)`` with closed-form ``log_prob``/``entropy``.

    Same values as :class:`torch.distributions.Bernoulli` —
    ``log_prob(v) = v * l - softplus(l)`` and
    ``entropy = softplus(l) - sigmoid(l) * l`` — but computed with elementwise
    ops: the stock implementation goes through
    ``binary_cross_entropy_with_logits``, which is ~1000x slower on some CPU
    builds for the tiny tensors of a policy. Must be built with ``logits``.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return value * logits - F.softplus(logits)

    def entropy(self) -> Tensor:
        return F.softplus(self.logits) - self.probs * self.logits


class BernoulliPolicy(nn.Module):
    """Independent Bernoulli per cell of ``shape``; starts at p = 0.5.

    ``forward()`` returns a :class:`LogitBernoulli` (a ``Bernoulli`` subclass).
    """

    def __init__(self, shape: Shape):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(_shape(shape)))

    def forward(self) -> Bernoulli:
        return LogitBernoulli(logits=self.logits)


class BetaPolicy(nn.Module):
    """Independent ``Beta(exp(log_a), exp(log_b))`` per cell of ``shape``.

    Both log-concentrations start at 0, i.e. ``Beta(1, 1)`` = uniform on (0, 1).
    """

    def __init__(self, shape: Shape):
        super().__init__()
        s = _shape(shape)
        self.log_a = nn.Parameter(torch.zeros(s))
        self.log_b = nn.Parameter(torch.zeros(s))

    def forward(self) -> Beta:
        return Beta(self.log_a.exp(), self.log_b.exp())

    @property
    def mean(self) -> Tensor:
        """Mean ``a / (a + b)`` of every cell (detached)."""
        a, b = self.log_a.exp(), self.log_b.exp()
        return (a / (a + b)).detach()


def sample(
    dist: Distribution, n: Optional[int] = None, batch_dims: int = 0
) -> Tuple[Tensor, Tensor, Tensor]:
    """Draw actions and return ``(action, log_prob, entropy)``.

    Each draw of the *whole* policy gets one joint log-probability: the
    per-cell log-probs are summed over all of ``dist.batch_shape`` (after the
    first ``batch_dims`` dims, which are kept as genuinely independent
    batch entries) and over ``dist.event_shape``. Cells are independent, so
    the joint entropy is the same sum of per-cell entropies.

    Shapes, with ``B = dist.batch_shape[:batch_dims]`` (empty by default):

    * ``action``: ``(n, *dist.batch_shape, *dist.event_shape)``; without the
      leading ``n`` when ``n is None``.
    * ``log_prob``: ``(n, *B)``, or ``B`` (a scalar by default) when
      ``n is None``.
    * ``entropy``: analytic entropy of the distribution (it does not depend
      on the draw), summed like ``log_prob`` and expanded to its shape.

    Examples: ``BernoulliPolicy((4, 4))()`` with ``n=8`` gives action
    ``(8, 4, 4)`` and log_prob ``(8,)``; ``CategoricalPolicy(5)()`` with
    ``n=8`` gives action ``(8,)`` and log_prob ``(8,)``; ``CategoricalPolicy(5)``
    with a ``(3, 5)`` mask and ``batch_dims=1`` gives log_prob ``(8, 3)``.

    Samples are drawn without reparameterisation (``sample``, not ``rsample``):
    gradients flow only through ``log_prob``/``entropy``. Beta samples are
    clamped into ``[eps, 1 - eps]`` before ``log_prob`` so it stays finite.
    """
    batch_shape = tuple(dist.batch_shape)
    if not 0 <= batch_dims <= len(batch_shape):
        raise ValueError(f"batch_dims={batch_dims} but batch_shape is {batch_shape}")
    sample_shape = torch.Size() if n is None else torch.Size([int(n)])
    with torch.no_grad():
        action = dist.sample(sample_shape)
    if isinstance(dist, Beta):
        eps = torch.finfo(action.dtype).eps
        action = action.clamp(eps, 1.0 - eps)
    log_prob = dist.log_prob(action)  # sample_shape + batch_shape
    entropy = dist.entropy()  # batch_shape
    lead = len(sample_shape)
    # sum over the batch dims beyond the first `batch_dims`
    sum_lp = tuple(range(lead + batch_dims, log_prob.dim()))
    sum_ent = tuple(range(batch_dims, entropy.dim()))
    if sum_lp:
        log_prob = log_prob.sum(dim=sum_lp)
    if sum_ent:
        entropy = entropy.sum(dim=sum_ent)
    entropy = entropy.expand_as(log_prob)
    return action, log_prob, entropy
