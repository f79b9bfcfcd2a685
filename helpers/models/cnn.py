"""A small, fast plain CNN baseline for MedMNIST-sized (28x28 and up) images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model

__all__ = ["SimpleCNN", "cnn"]


class SimpleCNN(nn.Module):
    """Stacked ``conv3x3-BN-maxpool2-ReLU`` stages, global average pooling, linear head.

    Max-pooling before the ReLU computes the same function as after it (both are
    monotone) on a 4x smaller tensor, so it is cheaper. Each stage halves the resolution,
    so the input side must be at least ``2 ** len(widths)`` (8 with the default widths).

    Args:
        num_classes: Number of output logits.
        in_chans: Input image channels.
        widths: Output channels of each stage.
        dropout: Dropout probability before the linear head.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        layers: list[nn.Module] = []
        prev = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(prev, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.MaxPool2d(2),
                nn.ReLU(inplace=True),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(prev, num_classes)
        self.num_features = prev
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector ``(B, widths[-1])``."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("cnn")
def cnn(
    num_classes: int,
    in_chans: int = 1,
    widths: Sequence[int] = (32, 64, 128),
    dropout: float = 0.0,
) -> SimpleCNN:
    """Small fast CNN (see :class:`SimpleCNN`)."""
    return SimpleCNN(num_classes=num_classes, in_chans=in_chans, widths=widths, dropout=dropout)
