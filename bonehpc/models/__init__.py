"""Models: the registry (bonehpc hybrids + every timm model, weights found offline), model info."""

from bonehpc.models import hybrid  # registers hybrid_tiny / hybrid_small / hybrid_base
from bonehpc.models.hybrid import HybridNet
from bonehpc.models.info import model_info
from bonehpc.models.registry import (
    DEFAULT_TEACHER,
    ModelKwargsError,
    ModelNotFoundError,
    constructor_kwargs,
    create_model,
    create_timm_model,
    is_bonehpc_model,
    list_models,
    register_model,
)
from bonehpc.models.weights import WeightsNotFoundError, fetch_weights, find_weights

__all__ = [
    "DEFAULT_TEACHER",
    "HybridNet",
    "ModelKwargsError",
    "ModelNotFoundError",
    "WeightsNotFoundError",
    "constructor_kwargs",
    "create_model",
    "create_timm_model",
    "fetch_weights",
    "find_weights",
    "is_bonehpc_model",
    "list_models",
    "model_info",
    "register_model",
]
