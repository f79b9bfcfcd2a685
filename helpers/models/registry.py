"""A small timm-style model registry.

A *factory* is any callable ``fn(num_classes: int, in_chans: int, **kwargs) -> nn.Module``.
Factories are registered under a unique name with :func:`register_model` and built with
:func:`create_model`. The registry is deliberately generic: later code (for instance the
child networks sampled by a NAS controller) registers its own factories the same way.

Example::

    @register_model("tiny")
    def tiny(num_classes: int, in_chans: int = 1, width: int = 8) -> nn.Module:
        ...

    model = create_model("tiny", num_classes=9, in_chans=3, width=16)
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``.

    Args:
        name: Registry key, passed later to :func:`create_model`.
        overwrite: Allow replacing an existing entry (otherwise a duplicate name raises
            ``ValueError``, which catches accidental name clashes).

    Returns:
        A decorator that registers the factory and returns it unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: F) -> F:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
            raise ValueError(
                f"model {name!r} is already registered; pass overwrite=True to replace it"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister_model(name: str) -> None:
    """Remove ``name`` from the registry (``KeyError`` if absent). Mostly for tests."""
    if name not in _REGISTRY:
        raise KeyError(_unknown_message(name))
    del _REGISTRY[name]


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def is_model(name: str) -> bool:
    """Whether ``name`` is registered, or ``timm/<an architecture timm knows>``."""
    if name in _REGISTRY:
        return True
    from .timm_models import is_timm_name
    return is_timm_name(name)


def get_model_factory(name: str) -> ModelFactory:
    """The factory registered under ``name`` (``KeyError`` listing valid names if absent)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(_unknown_message(name)) from None


def create_model(name: str, num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: A name from :func:`list_models`.
        num_classes: Size of the output logits.
        in_chans: Number of input image channels (1 for grey-scale MedMNIST sets).
        **kwargs: Model-specific options, forwarded to the factory. An option the factory
            does not accept raises ``TypeError`` naming it (from the factory's signature).

    Returns:
        The model; its forward maps ``(B, in_chans, H, W)`` to logits ``(B, num_classes)``.

    ``timm/<arch>`` builds any timm architecture (see :mod:`helpers.models.timm_models`), with
    pre-trained weights only from a local ``pretrained_file``.

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
    """
    if name.startswith("timm/") and name not in _REGISTRY:
        from .timm_models import create_timm_model
        return create_timm_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    factory = get_model_factory(name)
    return factory(num_classes=num_classes, in_chans=in_chans, **kwargs)


def _unknown_message(name: str) -> str:
    valid = ", ".join(list_models()) or "<none>"
    return f"unknown model {name!r}; valid models: {valid}, or timm/<name> for any timm architecture"
