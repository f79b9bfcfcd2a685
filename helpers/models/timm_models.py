"""The field's model library through the registry: ``create_model("timm/<name>", ...)``.

Any architecture timm knows (``timm/resnet10t``, ``timm/resnet18``, ``timm/densenet121``, ...) is
built with ``num_classes`` and ``in_chans`` from the registry call. Pre-trained weights come only
from a local file (``pretrained_file=``): nothing is downloaded. timm then adapts the stem to
``in_chans`` and leaves a classifier of another size newly initialised. The small custom models
(``cnn``, ``seresnet``, ...) stay for 28 px inputs, whose stems they size.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is ``timm/<an architecture timm knows>``."""
    if not name.startswith(PREFIX):
        return False
    import timm

    return timm.is_model(name[len(PREFIX):])


def create_timm_model(name: str, num_classes: int, in_chans: int = 1,
                      pretrained_file: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build ``timm/<arch>``; ``pretrained_file`` is a local state dict (loaded with ``weights_only=True``)."""
    import timm

    arch = name[len(PREFIX):]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:8]
        raise KeyError(f"unknown timm model {arch!r}" + (f"; similar: {', '.join(close)}" if close else "")
                       + ". Fix: pick a name from timm.list_models().")
    if pretrained_file is None:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    path = Path(pretrained_file)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {path} not found. There is no download at run time: put the "
                                f"weights of {arch} (a state dict, .pth or .safetensors) there first.")
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                             num_classes=num_classes, in_chans=in_chans, **kwargs)
