"""Models: the registry (bonehpc hybrids + every timm model), the offline-weights teacher, model info."""

from bonehpc.models import hybrid  # registers hybrid_tiny / hybrid_small / hybrid_base
from bonehpc.models.hybrid import HybridNet
from bonehpc.models.info import model_info
from bonehpc.models.registry import ModelNotFoundError, create_model, is_bonehpc_model, list_models, register_model
from bonehpc.models.teacher import DEFAULT_TEACHER, create_timm_model
from bonehpc.models.weights import WeightsNotFoundError, fetch_weights, find_weights

__all__ = [
    "DEFAULT_TEACHER",
    "HybridNet",
    "ModelNotFoundError",
    "WeightsNotFoundError",
    "create_model",
    "create_timm_model",
    "fetch_weights",
    "find_weights",
    "is_bonehpc_model",
    "list_models",
    "model_info",
    "register_model",
]
