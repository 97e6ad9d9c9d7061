"""HF ``config.json`` <-> ``ModelConfig`` for GlmForCausalLM, Glm4ForCausalLM and Qwen2ForCausalLM."""

from __future__ import annotations

import json
import os
from typing import Any

from glmjax.models.config import HF_ARCHITECTURES, ModelConfig

_MODEL_TYPES = {"glm": "glm", "glm4": "glm4", "qwen2": "qwen2"}
_HF_CLASS = {arch: cls for cls, arch in HF_ARCHITECTURES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory, config field or tensor that cannot be used, with where and why."""


def read_hf_config(directory: str) -> dict[str, Any]:
    """Parses ``directory/config.json``; errors name the file."""
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no config.json in the checkpoint directory {directory}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def _architecture(raw: dict[str, Any], path: str) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    if names:
        raise CheckpointError(
            f"{path}: field 'architectures' = {names} is not supported; "
            f"supported: {', '.join(sorted(HF_ARCHITECTURES))}"
        )
    model_type = raw.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise CheckpointError(
        f"{path}: unsupported model_type {model_type!r} and no 'architectures' field; "
        f"supported: {', '.join(sorted(HF_ARCHITECTURES))}"
    )


def _rope(raw: dict[str, Any], architecture: str, path: str) -> tuple[float, float]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    default_factor = 0.5 if architecture in ("glm", "glm4") else 1.0
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_factor))
    return float(theta), float(factor)


def config_from_hf(raw: dict[str, Any], path: str = "config.json", **overrides) -> ModelConfig:
    """Builds a ``ModelConfig`` from a parsed HF config; ``overrides`` set runtime fields
    (dtypes, attention backend, remat)."""
    architecture = _architecture(raw, path)

    def field(name: str, default: Any = ...) -> Any:
        if name in raw and raw[name] is not None:
            return raw[name]
        if default is ...:
            raise CheckpointError(f"{path}: missing required field {name!r}")
        return default

    if field("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: field 'hidden_act' = {raw['hidden_act']!r}; only 'silu' is supported")
    if architecture == "qwen2" and raw.get("use_sliding_window"):
        raise CheckpointError(f"{path}: field 'use_sliding_window' = true is not supported")
    theta, factor = _rope(raw, architecture, path)
    heads = int(field("num_attention_heads"))
    hidden = int(field("hidden_size"))
    eos = field("eos_token_id", ())
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    kwargs = dict(
        architecture=architecture,
        vocab_size=int(field("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(field("intermediate_size")),
        num_layers=int(field("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(field("num_key_value_heads", heads)),
        head_dim=int(field("head_dim", hidden // heads)),
        rope_theta=theta,
        partial_rotary_factor=factor,
        rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
        qkv_bias=bool(field("attention_bias", True)) if architecture != "qwen2" else True,
        tie_word_embeddings=bool(field("tie_word_embeddings", False)),
        max_position_embeddings=int(field("max_position_embeddings", 8192)),
        pad_token_id=field("pad_token_id", None),
        eos_token_ids=eos,
        bos_token_id=field("bos_token_id", None),
    )
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict that transformers reads back into the same architecture."""
    raw: dict[str, Any] = {
        "architectures": [_HF_CLASS[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor,
        },
        "pad_token_id": config.pad_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "bos_token_id": config.bos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if config.architecture == "qwen2":
        if not config.qkv_bias:
            raise CheckpointError("Qwen2ForCausalLM always has q/k/v bias; config has qkv_bias=False")
        raw["use_sliding_window"] = False
    else:
        raw["attention_bias"] = config.qkv_bias
    return raw
