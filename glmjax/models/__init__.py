"""Decoder models (GLM-4, GLM-4-0414, Qwen2.5), configs and presets."""

from glmjax.models.config import PRESETS, ModelConfig, preset
from glmjax.models.decoder import Decoder, KVCache
from glmjax.models.params import (
    abstract_model,
    create_model,
    create_sharded_model,
    flat_params,
    sharding_report,
    state_shardings,
)

__all__ = [
    "PRESETS", "ModelConfig", "preset", "Decoder", "KVCache", "abstract_model", "create_model",
    "create_sharded_model", "flat_params", "sharding_report", "state_shardings",
]
