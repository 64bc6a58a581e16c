"""Model registry: bonehpc models by name, any other name from timm, every model self-describing."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from bonehpc.config import IMAGENET_MEAN, IMAGENET_STD

_MODELS: dict[str, Callable[..., nn.Module]] = {}


class ModelNotFoundError(ValueError):
    """The name is neither a bonehpc model nor a timm model."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name (``@register_model def hybrid_small(...)``).

    The constructor takes ``num_classes`` and ``drop_rate`` keyword arguments and any model keyword arguments.
    """
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice ({_MODELS[name].__module__} and {fn.__module__})")
    _MODELS[name] = fn
    return fn


def is_bonehpc_model(name: str) -> bool:
    """True when `name` is registered by bonehpc (it then wins over a timm model of the same name)."""
    return name in _MODELS


def list_models(pattern: str = "", include_timm: bool = False) -> list[str]:
    """Sorted names of the bonehpc models (and, with include_timm, timm's), filtered by a glob pattern."""
    names = set(_MODELS)
    if include_timm:
        import timm

        names.update(timm.list_models())
    out = sorted(names)
    return [n for n in out if fnmatch.fnmatch(n, pattern)] if pattern else out


def create_model(
    name: str,
    num_classes: int = 2,
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name: a bonehpc-registered model, else `timm.create_model(name, ...)`.

    The returned module carries ``input_size`` (C, H, W), ``mean``, ``std`` (0..1 scale) and ``bonehpc_spec``
    (``{"name", "kwargs"}``, plain values only) so a checkpoint can rebuild the architecture with
    ``create_model(**spec)``: a ``kwargs`` keyword holding a dict is merged into the keyword arguments (its
    ``num_classes`` and ``drop_rate`` take precedence over the parameters of the same name).
    The spec leaves out ``pretrained`` and ``weights``: the state_dict of the checkpoint replaces them.

    Args:
        name: Model name (``hybrid_small``, ``resnet50``, any timm name).
        num_classes: Outputs of the classifier (2: normal / abnormal logits).
        pretrained: Start from pretrained weights, found offline only (see `bonehpc.models.weights`).
        weights: Local weight file (.pth / .safetensors) or a folder holding a Hugging Face cache; None or
            empty: the default Hugging Face cache.
        drop_rate: Dropout before the classifier.
        **kwargs: Extra constructor arguments (e.g. ``in_chans``, ``depth``).

    Raises:
        ModelNotFoundError: Unknown name.
        WeightsNotFoundError: Pretrained weights were asked for and are not on this machine.
    """
    nested = kwargs.pop("kwargs", None)
    if nested is not None:
        if not isinstance(nested, dict):
            raise TypeError(f"create_model: kwargs must be a dict (a bonehpc_spec's kwargs), got {type(nested)}")
        overlap = set(nested) & set(kwargs)
        if overlap:
            raise TypeError(f"create_model: {sorted(overlap)} given both directly and in kwargs")
        kwargs.update(nested)
    # A spec's kwargs hold num_classes and drop_rate; explicit arguments were merged above.
    num_classes = int(kwargs.pop("num_classes", num_classes))
    drop_rate = float(kwargs.pop("drop_rate", drop_rate))
    if num_classes < 1:
        raise ValueError(f"create_model: num_classes must be >= 1, got {num_classes}")

    if name in _MODELS:
        from bonehpc.models.weights import load_local_weights

        model = _MODELS[name](num_classes=num_classes, drop_rate=drop_rate, **kwargs)
        if pretrained:
            load_local_weights(model, name, weights)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        input_size = tuple(getattr(model, "input_size", (3, 224, 224)))
    else:
        from bonehpc.models.teacher import create_timm_model

        model = create_timm_model(
            name, num_classes=num_classes, pretrained=pretrained, weights=weights, drop_rate=drop_rate, **kwargs
        )
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))
        if "in_chans" in kwargs:
            input_size = (int(kwargs["in_chans"]), *input_size[1:])

    # Plain attributes (not buffers): they describe the model and stay out of its state_dict.
    spec = {"name": name, "kwargs": {"num_classes": num_classes, "drop_rate": drop_rate, **kwargs}}
    for attr, value in (
        ("input_size", input_size),
        ("mean", tuple(float(m) for m in mean)),
        ("std", tuple(float(s) for s in std)),
        ("bonehpc_spec", spec),
    ):
        if attr in model._parameters or attr in model._buffers or attr in model._modules:
            raise ValueError(f"model {name!r} has a parameter, buffer or submodule named {attr!r}; cannot describe it")
        setattr(model, attr, value)
    return model
