"""Reusable building blocks: squeeze-and-excitation, spatial attention, residual block.

References:
    - He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016
      (arXiv:1512.03385).
    - Hu, Shen, Sun. "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv:1709.01507).
    - Woo, Park, Lee, Kweon. "CBAM: Convolutional Block Attention Module", ECCV 2018
      (arXiv:1807.06521), for the idea of a per-pixel (spatial) attention map.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SEModule", "SpatialAttention", "ResidualBlock"]


class SEModule(nn.Module):
    """Squeeze-and-excitation channel attention (Hu et al., CVPR 2018).

    Global average pooling squeezes each channel to one number; a bottleneck of two 1x1
    convolutions (``channels -> hidden -> channels``, ReLU between) followed by a sigmoid
    gives a per-channel gate in (0, 1) that rescales the input. Same layout as timm's
    ``SEModule`` (without its optional BN).

    Args:
        channels: Number of input (and output) channels.
        reduction: Bottleneck ratio ``r``; ``hidden = max(min_hidden, channels // r)``.
        min_hidden: Lower bound on the bottleneck width, so narrow layers keep capacity.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or min_hidden < 1:
            raise ValueError("channels, reduction and min_hidden must be positive")
        hidden = max(min_hidden, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.gate_act = nn.Sigmoid()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel gate of shape ``(B, C, 1, 1)``, values in (0, 1)."""
        return self.gate_act(self.fc2(self.act(self.fc1(self.pool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialAttention(nn.Module):
    """Per-pixel attention map multiplied into the features.

    Two 1x1 convolutions ``channels -> hidden -> 1`` with a ReLU between and a sigmoid at
    the end produce a ``(B, 1, H, W)`` map in (0, 1) that reweights every spatial location
    (the spatial-gating idea of CBAM, Woo et al. ECCV 2018, computed with a small 1x1-conv
    MLP as in the MURA ensemble member this project reproduces).

    Args:
        channels: Number of input (and output) channels.
        hidden: Width of the hidden 1x1 conv; defaults to ``max(1, channels // 2)``.
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = max(1, channels // 2) if hidden is None else hidden
        if channels < 1 or hidden < 1:
            raise ValueError("channels and hidden must be positive")
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1)
        self.gate_act = nn.Sigmoid()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial attention map of shape ``(B, 1, H, W)``, values in (0, 1)."""
        return self.gate_act(self.conv2(self.act(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class ResidualBlock(nn.Module):
    """Basic two-convolution residual block (He et al., CVPR 2016), optionally with SE.

    ``conv3x3(stride)-BN-ReLU-conv3x3-BN`` on the residual branch, an optional
    :class:`SEModule` applied to that branch before the addition (the SE-ResNet placement
    of Hu et al. 2018), an identity shortcut or a ``1x1 conv(stride)+BN`` projection when
    the shape changes, then a final ReLU.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the first convolution (and of the projection shortcut).
        se: Apply squeeze-and-excitation to the residual branch.
        se_reduction: SE bottleneck ratio.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        se: bool = False,
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se: nn.Module = SEModule(out_ch, se_reduction) if se else nn.Identity()
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.act2(out + self.shortcut(x))
