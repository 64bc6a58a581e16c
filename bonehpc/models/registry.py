"""Model registry: bonehpc models by name, any other name from timm, every model self-describing.

Any name that bonehpc does not register is a timm model (the ResNet-50 teacher by default).
Pretrained timm weights are always loaded from a local file through timm's
``pretrained_cfg_overlay=dict(file=...)``, which drops the 1000-class ImageNet head for a fresh
``num_classes`` head (and sums the first conv over RGB when ``in_chans=1``), so timm never contacts the hub.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from bonehpc.config import IMAGENET_MEAN, IMAGENET_STD
from bonehpc.models.weights import find_weights, load_local_weights

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "resnet50"
# Constructor parameters that are not model hyperparameters.
_NOT_KWARGS = frozenset({"self", "device", "dtype"})

_MODELS: dict[str, Callable[..., nn.Module]] = {}


class ModelNotFoundError(ValueError):
    """The name is neither a bonehpc model nor a timm model."""


class ModelKwargsError(ValueError):
    """Keyword arguments that the model's constructor does not take; the message names them."""


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
    ``create_model(spec["name"], **spec["kwargs"])`` (`bonehpc.checkpoint.build_model_from_checkpoint`).
    The spec leaves out ``pretrained`` and ``weights``: the state_dict of the checkpoint replaces them.

    Args:
        name: Model name (``hybrid_small``, ``resnet50``, any timm name).
        num_classes: Outputs of the classifier (2: normal / abnormal logits).
        pretrained: Start from pretrained weights, found offline only (see `bonehpc.models.weights`).
        weights: Local weight file (.pth / .safetensors) or a folder holding a Hugging Face cache; None or
            empty: the default Hugging Face cache.
        drop_rate: Dropout before the classifier.
        **kwargs: Extra constructor arguments (e.g. ``in_chans``, ``depth``): only the parameters the
            model class's constructor names (`constructor_kwargs`).

    Raises:
        ModelNotFoundError: Unknown name.
        ModelKwargsError: A keyword argument the constructor does not take (e.g. timm's ``checkpoint_path``).
        WeightsNotFoundError: Pretrained weights were asked for and are not on this machine.
    """
    num_classes, drop_rate = int(num_classes), float(drop_rate)
    if num_classes < 1:
        raise ValueError(f"create_model: num_classes must be >= 1, got {num_classes}")

    check_model_kwargs(name, kwargs)
    if name in _MODELS:
        model = _MODELS[name](num_classes=num_classes, drop_rate=drop_rate, **kwargs)
        if pretrained:
            load_local_weights(model, name, weights)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        input_size = tuple(getattr(model, "input_size", (3, 224, 224)))
    else:
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


def _timm_or_raise(name: str) -> Any:
    import timm

    if not timm.is_model(name):
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a bonehpc model ({', '.join(list_models())}) and not a timm model "
            "(see timm.list_models())"
        )
    return timm


@functools.lru_cache(maxsize=64)
def constructor_kwargs(name: str) -> frozenset[str]:
    """Keyword arguments that model `name` accepts: the parameters its class's constructor names.

    The class is found by building the default model on the meta device (no memory, no weights).

    Raises:
        ModelNotFoundError: Unknown name.
    """
    with torch.device("meta"):
        probe = _MODELS[name]() if name in _MODELS else _timm_or_raise(name).create_model(name, pretrained=False)
    params = inspect.signature(type(probe).__init__).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in kinds and p.name not in _NOT_KWARGS and p.name[0] != "_")


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ModelKwargsError when `kwargs` holds a key the constructor of model `name` does not take."""
    if not kwargs:
        return
    unknown = sorted(set(kwargs) - constructor_kwargs(name))
    if unknown:
        raise ModelKwargsError(
            f"model {name!r} takes no keyword argument(s) {', '.join(unknown)} "
            f"(its constructor takes: {', '.join(sorted(constructor_kwargs(name)))})"
        )


def create_timm_model(
    name: str,
    num_classes: int = 2,
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` with offline pretrained weights.

    Args:
        name: timm model name (``resnet50``, ``resnet18``, ``vit_tiny_r_s16_p8_224``, ...).
        num_classes: Classes of the new head.
        pretrained: Load ImageNet weights (every tensor but the head) from `weights` or the offline HF cache.
        weights: Weight file or cache folder (see `bonehpc.models.weights.find_weights`); None: default cache.
        drop_rate: Dropout before the classifier.
        **kwargs: Passed to `timm.create_model` (``in_chans``, ``drop_path_rate``, ...).

    Raises:
        ModelNotFoundError: `name` is not a timm model.
        WeightsNotFoundError: `pretrained` and no weights on this machine (raised before any model is built).
    """
    timm = _timm_or_raise(name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    path = find_weights(name, weights)
    log.info("%s: ImageNet weights from %s", name, path)
    return timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        num_classes=num_classes,
        drop_rate=drop_rate,
        **kwargs,
    )
