"""The conditional Beta noise policy of Yavuz & Yang (2024) and its unconditional random control.

:class:`NoisePolicy` maps each image to ``Beta(exp(a~), exp(b~))`` parameters for every cell of a
``G x G`` grid. As in the reference code, an image encoder (timm ``resnet10t`` there; any registry
name here) feeds two heads ``Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear(G*G)``, and
each head's output is blended with a running unconditional average::

    a~ = blend * b_a + (1 - blend) * head_a(x)          (blend 0.9)
    b_a <- decay * b_a + (1 - decay) * mean_batch(head_a(x)).detach()    (decay 0.99, in training)

``b_a`` and ``b_b`` start ``U(0, 1)``. The unconditional distribution ``Beta(exp b_a, exp b_b)`` is
what the reference validates with. Samples are drawn with ``sample()`` (no reparameterisation), so
the policy learns only through log-probabilities.

One guard the reference lacks: the log-concentrations pass through a soft bound
``B * tanh(a~ / B)`` (``B`` = :data:`LOG_CONC_BOUND` = 6, concentrations within ``[e^-6, e^6]``;
the identity within a few percent for ``|a~| < 2``, where the policies here live). Unbounded, one
outlier image drove a ``resnet10t`` policy's head to ``exp(a~) = 0`` on the full profile, which no
Beta accepts; a non-finite output still stops the run with :class:`helpers.train.NonFiniteLossError`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Beta

from ..models import create_model

__all__ = ["NoisePolicy", "policy_from_config", "RandomBetaMasks", "encoder", "beta_for_mean", "LOG_CONC_BOUND"]

#: Soft bound of the policy's log-concentrations (see the module docstring).
LOG_CONC_BOUND = 6.0


def _bounded(t: torch.Tensor, what: str) -> torch.Tensor:
    """``LOG_CONC_BOUND * tanh(t / LOG_CONC_BOUND)``; a non-finite ``t`` raises NonFiniteLossError."""
    if not torch.isfinite(t).all():
        from ..train import NonFiniteLossError

        raise NonFiniteLossError(f"the noise policy's {what} log-concentrations are not finite (NaN or inf). Fix: lower "
                                 f"policy.lr, or check the inputs for NaN. The last finished epoch is kept in the checkpoint.")
    return LOG_CONC_BOUND * torch.tanh(t / LOG_CONC_BOUND)


def encoder(name: str, in_chans: int, kwargs: dict | None = None, features: int = 128) -> tuple[nn.Module, int]:
    """An image encoder from the registry returning pooled features ``(B, d)``, and ``d``.

    ``timm/<arch>`` is built headless (``num_classes=0``: timm's pooled features, 512 for
    ``resnet10t``); another registry model is built with ``features`` outputs and used as is.
    """
    kwargs = dict(kwargs or {})
    if name.startswith("timm/"):
        net = create_model(name, num_classes=0, in_chans=in_chans, **kwargs)
        return net, int(net.num_features)
    return create_model(name, num_classes=features, in_chans=in_chans, **kwargs), features


def _head(d: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def policy_from_config(grid: int, in_chans: int, cfg) -> "NoisePolicy":
    """A :class:`NoisePolicy` from a :class:`helpers.noise.hooks.PolicyConfig` (``widths`` only for ``cnn``)."""
    kwargs = {"widths": tuple(cfg.widths)} if cfg.backbone == "cnn" else {}
    return NoisePolicy(grid, in_chans, cfg.backbone, kwargs, cfg.hidden, cfg.blend, cfg.decay)


class NoisePolicy(nn.Module):
    """Image -> independent Beta per grid cell (see the module docstring).

    Args:
        grid: cells per side (``G``); the distribution has ``batch_shape (B, G*G)``.
        in_chans: image channels.
        backbone: registry name of the encoder (``"timm/resnet10t"`` is the reference's).
        backbone_kwargs: options of the encoder (e.g. ``{"widths": [8, 16]}`` for ``cnn``).
        hidden: width of the two heads' hidden layers (512 in the reference).
        blend: weight of the running average in ``a~`` and ``b~`` (0.9).
        decay: update rate of the running average (0.99).
    """

    def __init__(self, grid: int, in_chans: int, backbone: str = "cnn", backbone_kwargs: dict | None = None,
                 hidden: int = 128, blend: float = 0.9, decay: float = 0.99):
        super().__init__()
        if not 0.0 <= blend <= 1.0 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"blend and decay must be in [0, 1], got {blend} and {decay}")
        self.grid, self.blend, self.decay = grid, blend, decay
        self.encoder, d = encoder(backbone, in_chans, backbone_kwargs, features=hidden)
        self.head_a = _head(d, hidden, grid * grid)
        self.head_b = _head(d, hidden, grid * grid)
        self.register_buffer("run_a", torch.rand(1, grid * grid))
        self.register_buffer("run_b", torch.rand(1, grid * grid))

    def log_concentrations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended ``(a~, b~)``, each ``(B, G*G)``; in training mode also updates the running averages."""
        feats = self.encoder(x.float())
        ha, hb = self.head_a(feats), self.head_b(feats)
        a = self.blend * self.run_a + (1 - self.blend) * ha
        b = self.blend * self.run_b + (1 - self.blend) * hb
        if self.training:
            with torch.no_grad():
                self.run_a.mul_(self.decay).add_((1 - self.decay) * ha.detach().mean(0, keepdim=True))
                self.run_b.mul_(self.decay).add_((1 - self.decay) * hb.detach().mean(0, keepdim=True))
        return a, b

    def forward(self, x: torch.Tensor) -> Beta:
        a, b = self.log_concentrations(x)
        return Beta(_bounded(a, "alpha").exp(), _bounded(b, "beta").exp())

    def unconditional(self) -> Beta:
        """``Beta(exp b_a, exp b_b)``, shape ``(1, G*G)``: what the reference validates with."""
        return Beta(_bounded(self.run_a, "running alpha").exp(), _bounded(self.run_b, "running beta").exp())


def beta_for_mean(mean: float, concentration: float) -> tuple[float, float]:
    """``(a, b)`` of the Beta with the given mean and ``a + b = concentration``."""
    if not 0.0 < mean < 1.0 or concentration <= 0:
        raise ValueError(f"need 0 < mean < 1 and concentration > 0, got {mean} and {concentration}")
    return mean * concentration, (1.0 - mean) * concentration


class RandomBetaMasks(nn.Module):
    """The control: the same ``Beta(a, b)`` in every cell of every image, not conditioned on anything.

    With ``a, b`` from :func:`beta_for_mean` it matches a trained policy's mean mask strength.
    """

    def __init__(self, grid: int, a: float, b: float):
        super().__init__()
        self.grid = grid
        self.register_buffer("a", torch.tensor(float(a)))
        self.register_buffer("b", torch.tensor(float(b)))

    def forward(self, x: torch.Tensor) -> Beta:
        shape = (x.shape[0], self.grid * self.grid)
        return Beta(self.a.expand(shape), self.b.expand(shape))
