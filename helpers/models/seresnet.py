"""Small SE-ResNet with optional spatial attention, modelled on a MURA ensemble member.

The network is a compact ResNet (He et al., CVPR 2016) with stage-level
squeeze-and-excitation (Hu et al., CVPR 2018), heavy dropout and a spatial attention map
before pooling, the configuration of one member of a musculoskeletal-radiograph (MURA,
Rajpurkar et al. 2017, arXiv:1712.06957) ensemble. It is scaled for 28x28 to 224x224
inputs: a stride-1 3x3 stem and three stride-2 stages (28 -> 4, 224 -> 28 spatially).

Registered names:
    - ``"seresnet"``: stage-level SE on, spatial attention off, no dropout.
    - ``"resnet"``: the same class with ``se=False, spatial_attention=False``.
    - ``"seresnet_mura"``: the reference "mura" configuration, :data:`MURA_CONFIG`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blocks import ResidualBlock, SEModule, SpatialAttention
from .registry import register_model

__all__ = ["SEResNet", "MURA_CONFIG", "seresnet", "resnet", "seresnet_mura"]

#: Reference hyper-parameters of the MURA ensemble member ("mura" configuration).
MURA_CONFIG: dict[str, Any] = {
    "stem_dropout": 0.35,
    "stage_dropout": (0.45, 0.45, 0.55),
    "se": True,
    "se_reduction": 16,
    "spatial_attention": True,
}


class SEResNet(nn.Module):
    """ResNet with stage-level SE, per-stage dropout and optional spatial attention.

    Layout::

        stem: conv3x3(in_chans -> stem_width) - BN - ReLU - Dropout(stem_dropout)
        for each stage i (width widths[i]):
            depth x ResidualBlock (first one stride 2)
            SEModule(widths[i], se_reduction)        if se
            Dropout(stage_dropout[i])
        SpatialAttention(widths[-1])                 if spatial_attention
        global average pooling - Linear(widths[-1] -> num_classes)

    The "mura" configuration (registered as ``"seresnet_mura"``, see :data:`MURA_CONFIG`)
    uses ``stem_dropout=0.35``, ``stage_dropout=(0.45, 0.45, 0.55)``, SE with reduction 16
    and spatial attention on.

    Args:
        num_classes: Number of output logits.
        in_chans: Input image channels.
        stem_width: Channels of the stem convolution.
        widths: Channels of each stage.
        depth: Residual blocks per stage.
        se: Stage-level squeeze-and-excitation after each stage.
        se_reduction: SE bottleneck ratio (stage-level and block-level).
        block_se: Also put SE inside every residual block (SE-ResNet placement).
        spatial_attention: Spatial attention map before global pooling.
        stem_dropout: Dropout probability after the stem.
        stage_dropout: Dropout after each stage: one float for all, or one per stage.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        stem_width: int = 16,
        widths: Sequence[int] = (32, 64, 128),
        depth: int = 2,
        se: bool = True,
        se_reduction: int = 16,
        block_se: bool = False,
        spatial_attention: bool = False,
        stem_dropout: float = 0.0,
        stage_dropout: float | Sequence[float] = (0.0, 0.0, 0.0),
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        drops = _per_stage(stage_dropout, len(widths))

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Dropout(stem_dropout),
        )
        stages: list[nn.Module] = []
        prev = stem_width
        for width, drop in zip(widths, drops):
            blocks: list[nn.Module] = []
            for j in range(depth):
                blocks.append(
                    ResidualBlock(
                        prev,
                        width,
                        stride=2 if j == 0 else 1,
                        se=block_se,
                        se_reduction=se_reduction,
                    )
                )
                prev = width
            if se:
                blocks.append(SEModule(width, se_reduction))
            blocks.append(nn.Dropout(drop))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.attention: nn.Module = SpatialAttention(prev) if spatial_attention else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)
        self.num_features = prev
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector ``(B, widths[-1])``."""
        x = self.attention(self.stages(self.stem(x)))
        return self.pool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _per_stage(value: float | Sequence[float], n: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"stage_dropout has {len(values)} values but there are {n} stages")
    return values


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("seresnet")
def seresnet(num_classes: int, in_chans: int = 1, **kwargs: Any) -> SEResNet:
    """SE-ResNet (stage-level SE on); ``kwargs`` are :class:`SEResNet` options."""
    return SEResNet(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("resnet")
def resnet(num_classes: int, in_chans: int = 1, **kwargs: Any) -> SEResNet:
    """Plain ResNet: :class:`SEResNet` with ``se=False, spatial_attention=False``."""
    return SEResNet(
        num_classes=num_classes, in_chans=in_chans, se=False, spatial_attention=False, **kwargs
    )


@register_model("seresnet_mura")
def seresnet_mura(num_classes: int, in_chans: int = 1, **kwargs: Any) -> SEResNet:
    """:class:`SEResNet` in the "mura" configuration; ``kwargs`` override its values."""
    return SEResNet(num_classes=num_classes, in_chans=in_chans, **{**MURA_CONFIG, **kwargs})
