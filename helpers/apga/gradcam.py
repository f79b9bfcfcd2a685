"""Grad-CAM maps of a classifier with captum's ``LayerGradCam`` (Selvaraju et al., 2017).

captum was chosen over the ``grad-cam`` package to keep one well-kept attribution library in the
environment. The map of an image is the ReLU of the gradient-weighted layer activations for the
target class, up-sampled to the image size and divided by its maximum, so it lies in [0, 1]
(an all-zero map stays 0). The reference keeps the pixels where this map exceeds 0.5.
"""
from __future__ import annotations

import torch
from torch import nn


def last_conv_layer(model: nn.Module) -> str:
    """The name of ``model``'s last ``Conv2d`` (the default Grad-CAM layer)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass the Grad-CAM layer's name explicitly")
    return names[-1]


def gradcam_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM maps ``(B, 1, H, W)`` in [0, 1] of ``model`` (put in eval mode, weights untouched)
    for class ``target`` (B,) of each image. ``layer`` names a module (default: the last conv)."""
    from captum.attr import LayerAttribution, LayerGradCam

    modules = dict(model.named_modules())
    name = layer or last_conv_layer(model)
    if name not in modules:
        raise ValueError(f"Grad-CAM layer '{name}' is not a module of {type(model).__name__}; "
                         f"conv layers: {[n for n, m in modules.items() if isinstance(m, nn.Conv2d)]}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            attr = LayerGradCam(model, modules[name]).attribute(x.detach().float(), target=target.long().tolist(),
                                                                relu_attributions=True)
        cam = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    cam = cam.sum(1, keepdim=True).clamp(min=0)
    peak = cam.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return cam / peak
