"""DenseNet-121 (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017,
arXiv:1608.06993) from torchvision, adapted to any channel count and small images.

ImageNet weights can only come from a LOCAL file (there is no network access at run
time): download torchvision's ``densenet121`` checkpoint beforehand and pass its path as
``weights``. Both the current key names and the old ``denselayerN.norm.1``-style names of
the original checkpoints are accepted.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.models import DenseNet, densenet121 as tv_densenet121

from .registry import register_model

__all__ = ["densenet121", "adapt_input_conv", "load_densenet_state_dict"]

# Old torchvision checkpoints name DenseLayer children "norm.1", "conv.2", ... ; current
# modules are "norm1", "conv2". Pattern of torchvision.models.densenet._load_state_dict,
# extended to BN's num_batches_tracked (absent from the original checkpoints).
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Adapt an RGB first-layer kernel ``(O, 3, kh, kw)`` to ``in_chans`` inputs, as timm does.

    - ``in_chans == 1``: the three RGB filters are **summed**, so a grey image replicated to
      RGB and the 1-channel input give the same response.
    - ``in_chans == 3``: unchanged.
    - otherwise: the RGB filters are tiled to ``in_chans`` channels and scaled by
      ``3 / in_chans`` (keeps the activation scale).
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-d conv weight, got shape {tuple(weight.shape)}")
    channels = weight.shape[1]
    if channels == in_chans:
        return weight.clone()
    if channels != 3:
        raise ValueError(f"can only adapt a 3-channel kernel, got {channels} channels")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_chans / 3)
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (3.0 / in_chans)


def load_densenet_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a torchvision DenseNet state dict from ``path``, renaming old-style keys.

    Accepts a bare state dict or one wrapped under ``"state_dict"``/``"model"``, and strips
    a ``"module."`` prefix (``DataParallel`` checkpoints).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"DenseNet weights file not found: {str(path)!r}. There is no internet access at "
            "run time, so the ImageNet checkpoint (torchvision densenet121) must be "
            "downloaded beforehand and its local path passed as `weights`."
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} does not contain a state dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        match = _OLD_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        state[key] = value
    return state


def _load_pretrained(model: DenseNet, path: str | os.PathLike[str], in_chans: int) -> None:
    """Load backbone weights from ``path``; the classifier (and a resized stem) stay new."""
    state = {
        k: v for k, v in load_densenet_state_dict(path).items() if not k.startswith("classifier.")
    }
    conv0 = model.features.conv0
    pretrained_conv0 = state.pop("features.conv0.weight", None)
    expected_missing = {"classifier.weight", "classifier.bias", "features.conv0.weight"}
    if pretrained_conv0 is not None and pretrained_conv0.shape[2:] == conv0.weight.shape[2:]:
        with torch.no_grad():
            conv0.weight.copy_(adapt_input_conv(in_chans, pretrained_conv0))
    # Otherwise (small_input stem is 3x3, checkpoint is 7x7) conv0 keeps its fresh init.
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - expected_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights in {str(path)!r} do not match densenet121: "
            f"{len(missing)} missing keys {_head(missing)}, "
            f"{len(result.unexpected_keys)} unexpected keys {_head(result.unexpected_keys)}"
        )


def _head(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")


@register_model("densenet121")
def densenet121(
    num_classes: int,
    in_chans: int = 1,
    small_input: bool = False,
    weights: str | os.PathLike[str] | None = None,
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
) -> DenseNet:
    """torchvision DenseNet-121 with ``in_chans`` inputs and a new ``num_classes`` head.

    Args:
        num_classes: Number of output logits (the classifier is always newly initialised).
        in_chans: Input image channels; the stem convolution is replaced accordingly.
        small_input: Replace the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool,
            /4 downsampling) by a 3x3 stride-1 conv and no pool. The default stem plus the
            three transitions downsample by 32, so it needs inputs of roughly 64px or more;
            **28-64px inputs (MedMNIST) should pass ``small_input=True``**. The model cannot
            choose this itself since it does not see the input size at construction.
        weights: Local path to an ImageNet ``densenet121`` state dict (``None``: random
            init). With ``in_chans == 1`` the stem kernel is the **sum** of the pretrained
            RGB kernels (see :func:`adapt_input_conv`). With ``small_input=True`` the 3x3
            stem keeps a fresh init; everything else is loaded.
        drop_rate: Dropout rate after each dense layer (torchvision's ``drop_rate``).
        memory_efficient: torchvision's checkpointed dense layers (less memory, slower).

    Raises:
        FileNotFoundError: ``weights`` is given but does not exist.
    """
    model = tv_densenet121(weights=None, drop_rate=drop_rate, memory_efficient=memory_efficient)
    features = model.features
    init_features = features.conv0.out_channels
    if small_input:
        features.conv0 = nn.Conv2d(in_chans, init_features, 3, stride=1, padding=1, bias=False)
        features.pool0 = nn.Identity()
    else:
        features.conv0 = nn.Conv2d(in_chans, init_features, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(features.conv0.weight)
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    nn.init.zeros_(model.classifier.bias)
    if weights is not None:
        _load_pretrained(model, weights, in_chans)
    return model
