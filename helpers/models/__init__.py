"""Model registry and architectures.

Importing this package registers the built-in models: ``"cnn"``, ``"resnet"``,
``"seresnet"``, ``"seresnet_mura"``, ``"densenet121"`` and ``"nas_child"``. Build one with
``create_model(name, num_classes, in_chans=1, **kwargs)``; every model maps
``(B, in_chans, H, W)`` images to logits ``(B, num_classes)``.

Dense-output models (per-pixel maps ``(B, num_classes, H, W)``, e.g. a masking agent) live in
:mod:`helpers.models.unet` and are registered in the same registry under the names in
``DENSE_MODELS`` (``"unet_small"``, any side; ``"smp_unet"``, segmentation-models-pytorch, sides
divisible by 32); ``is_dense(name)`` tells them apart from the classifiers.
"""

from .blocks import ResidualBlock, SEModule, SpatialAttention
from .registry import (
    create_model,
    get_model_factory,
    is_model,
    list_models,
    register_model,
    unregister_model,
)

# Imported for their registration side effect.
from . import cnn, densenet, nas_child, seresnet  # noqa: E402,F401  isort: skip
from . import unet  # noqa: E402,F401  isort: skip  (dense-output models)
from .unet import DENSE_MODELS, is_dense
from .cnn import SimpleCNN
from .nas_child import NASChild
from .seresnet import MURA_CONFIG, SEResNet

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "unregister_model",
    "is_model",
    "get_model_factory",
    "SEModule",
    "SpatialAttention",
    "ResidualBlock",
    "SimpleCNN",
    "NASChild",
    "SEResNet",
    "MURA_CONFIG",
    "DENSE_MODELS",
    "is_dense",
]
