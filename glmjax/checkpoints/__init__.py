"""Checkpoint interop: HF safetensors directories and orbax."""

from glmjax.checkpoints.hf import from_pretrained, save_pretrained
from glmjax.checkpoints.hf_config import CheckpointError, config_from_hf, config_to_hf

__all__ = ["CheckpointError", "config_from_hf", "config_to_hf", "from_pretrained", "save_pretrained"]
