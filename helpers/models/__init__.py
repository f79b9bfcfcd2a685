"""Model registry and architectures.

Importing this package registers the built-in models: ``"cnn"``, ``"resnet"``,
``"seresnet"``, ``"seresnet_mura"``, ``"densenet121"`` and ``"nas_child"``. Build one with
``create_model(name, num_classes, in_chans=1, **kwargs)``; every model maps
``(B, in_chans, H, W)`` images to logits ``(B, num_classes)``.
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
]
