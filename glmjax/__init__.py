"""glmjax: the GLM-4 research stack in JAX + Flax NNX."""

from glmjax.checkpoints import CheckpointError, from_pretrained, save_pretrained
from glmjax.models import PRESETS, Decoder, ModelConfig, create_model

__all__ = ["CheckpointError", "Decoder", "ModelConfig", "PRESETS", "create_model", "from_pretrained",
           "save_pretrained"]
