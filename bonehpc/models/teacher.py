"""The teacher: a timm CNN (ResNet-50 by default), transfer-learned from ImageNet weights found offline.

Any model name that bonehpc does not register comes here. Pretrained weights are always loaded from a local
file through timm's ``pretrained_cfg_overlay=dict(file=...)``, which drops the 1000-class ImageNet head for a
fresh ``num_classes`` head (and sums the first conv over RGB when ``in_chans=1``), so timm never contacts the hub.
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch.nn as nn

from bonehpc.models.registry import ModelNotFoundError, list_models
from bonehpc.models.weights import find_weights

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "resnet50"


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
    if not timm.is_model(name):
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a bonehpc model ({', '.join(list_models())}) and not a timm model "
            "(see timm.list_models())"
        )
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
