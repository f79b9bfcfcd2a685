"""Dense-output models: ``(B, in_chans, H, W)`` images to per-pixel logits ``(B, num_classes, H, W)``.

The registry's other models are classifiers (logits ``(B, num_classes)``); the models here are
registered in the same registry, under the names in :data:`DENSE_MODELS`, and built the same way
(``create_model(name, num_classes=1, in_chans=1, ...)``). ``num_classes`` is the number of output
maps (1 for a per-pixel keep/erase probability). Use :func:`is_dense` to tell them apart.

* ``unet_small``: a small U-Net of our own for any side (28 px MedMNIST included): two 2x
  down-samplings, skip connections, up-sampling back to the input's exact size (odd sides work).
* ``smp_unet``: segmentation-models-pytorch's ``Unet`` (default encoder VGG11, the reference's
  TernausNet UNet11 encoder), randomly initialised (``encoder_weights=None``: no weights are
  downloaded). Its encoders down-sample ``2 ** encoder_depth`` times, so the input side must be
  divisible by ``2 ** encoder_depth`` (32 with the default depth 5: 64 px and up); another side is
  refused with a clear error.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .registry import register_model

__all__ = ["DENSE_MODELS", "is_dense", "SmallUNet", "SMPUNet", "unet_small", "smp_unet"]

#: Registry names of the dense-output models.
DENSE_MODELS = ("unet_small", "smp_unet")


def is_dense(name: str) -> bool:
    """Whether registry model ``name`` outputs per-pixel maps (not class logits)."""
    return name in DENSE_MODELS


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """A U-Net with ``len(widths) - 1`` down-samplings; output has the input's height and width.

    Args:
        num_classes: Output maps (1 for a per-pixel logit).
        in_chans: Input channels.
        widths: Channels per level, finest first (default ``(16, 32, 64)``: 28 -> 14 -> 7 px).
        out_bias: Initial bias of the output logits (e.g. ``-2`` starts at p = sigmoid(-2) = 0.12).
    """

    def __init__(self, num_classes: int = 1, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
                 out_bias: float = 0.0):
        super().__init__()
        if len(widths) < 2:
            raise ValueError("widths must name at least two levels (one down-sampling)")
        self.down = nn.ModuleList()
        prev = in_chans
        for w in widths:
            self.down.append(_block(prev, w))
            prev = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.out = nn.Conv2d(widths[0], num_classes, 1)
        nn.init.constant_(self.out.bias, out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.out(x)


class SMPUNet(nn.Module):
    """segmentation-models-pytorch's ``Unet`` with a check of the input side (see the module docstring)."""

    def __init__(self, num_classes: int = 1, in_chans: int = 1, encoder: str = "vgg11", encoder_depth: int = 5,
                 decoder_channels: Sequence[int] | None = None, out_bias: float = 0.0):
        super().__init__()
        import segmentation_models_pytorch as smp

        decoder_channels = tuple(decoder_channels or (256, 128, 64, 32, 16)[-encoder_depth:])
        self.net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_chans, classes=num_classes,
                            encoder_depth=encoder_depth, decoder_channels=decoder_channels)
        self.divisor = 2 ** encoder_depth
        nn.init.constant_(self.net.segmentation_head[0].bias, out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.divisor or w % self.divisor:
            raise ValueError(f"smp_unet: input {h}x{w} px, but its encoder needs sides divisible by {self.divisor}. "
                             f"Fix: use images of 64 px (or another multiple of {self.divisor}), or the agent "
                             f"'unet_small', which takes any side (28 px included).")
        return self.net(x)


@register_model("unet_small")
def unet_small(num_classes: int = 1, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
               out_bias: float = 0.0) -> SmallUNet:
    """Small U-Net of our own, any input side (see :class:`SmallUNet`); dense output."""
    return SmallUNet(num_classes, in_chans, widths, out_bias)


@register_model("smp_unet")
def smp_unet(num_classes: int = 1, in_chans: int = 1, encoder: str = "vgg11", encoder_depth: int = 5,
             decoder_channels: Sequence[int] | None = None, out_bias: float = 0.0) -> SMPUNet:
    """segmentation-models-pytorch ``Unet`` (default VGG11 encoder, random init); sides divisible by 32."""
    return SMPUNet(num_classes, in_chans, encoder, encoder_depth, decoder_channels, out_bias)
