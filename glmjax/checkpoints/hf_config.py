"""HF ``config.json`` <-> ``ModelConfig`` for GlmForCausalLM, Glm4ForCausalLM and Qwen2ForCausalLM."""

from __future__ import annotations

import json
import os
from typing import Any

from glmjax.models.config import HF_ARCHITECTURES, ModelConfig
from glmjax.models.rotary import ROPE_TYPES, RopeScaling

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


def _rope_dict(raw: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The rope parameters transformers uses and the field they came from: a non-empty
    ``rope_scaling`` (the pre-v5 key) replaces ``rope_parameters``, as transformers does."""
    source = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(source) or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: field {source!r} = {params!r} is not a JSON object")
    nested = sorted(key for key, value in params.items() if isinstance(value, dict))
    if nested:
        raise CheckpointError(f"{path}: field {source!r} has per-layer-type entries {nested}; "
                              "only one rope for all layers is supported")
    return source, params


def _rope_number(params: dict[str, Any], key: str, source: str, path: str, kind: type = float) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: field '{source}.{key}' = {value!r} is not a number")
    return kind(value)


def _rope_scaling(params: dict[str, Any], rope_type: str, raw: dict[str, Any], max_positions: int,
                  source: str, path: str) -> RopeScaling:
    """``RopeScaling`` from an HF rope dict, with transformers' defaults filled in."""
    factor = _rope_number(params, "factor", source, path)
    if "factor" not in params or (factor is None and rope_type != "yarn"):
        raise CheckpointError(f"{path}: field '{source}.factor' is required for rope type {rope_type!r}")
    kwargs: dict[str, Any] = dict(type=rope_type, factor=factor)
    if rope_type == "dynamic":
        # transformers' dynamic NTK measures lengths against max_position_embeddings.
        kwargs["original_max_position_embeddings"] = max_positions
    elif rope_type == "yarn":
        # A top-level original_max_position_embeddings takes priority in transformers.
        top = raw if raw.get("original_max_position_embeddings") is not None else params
        original = _rope_number(top, "original_max_position_embeddings",
                                source if top is params else "original_max_position_embeddings", path, int)
        original = max_positions if original is None else original
        kwargs.update(
            factor=max_positions / original if factor is None else factor,
            original_max_position_embeddings=original,
            beta_fast=_rope_number(params, "beta_fast", source, path) or 32.0,
            beta_slow=_rope_number(params, "beta_slow", source, path) or 1.0,
            mscale=_rope_number(params, "mscale", source, path),
            mscale_all_dim=_rope_number(params, "mscale_all_dim", source, path),
            attention_factor=_rope_number(params, "attention_factor", source, path),
            truncate=bool(params.get("truncate", True)),
        )
    try:
        return RopeScaling(**kwargs)
    except ValueError as err:
        raise CheckpointError(f"{path}: field {source!r}: {err}") from err


def _rope(raw: dict[str, Any], architecture: str, max_positions: int,
          path: str) -> tuple[float, float, RopeScaling | None]:
    """(rope_theta, partial_rotary_factor, scaling) read the way transformers v5 reads them."""
    source, params = _rope_dict(raw, path)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{path}: field '{source}' has rope type {rope_type!r}; supported: default, {', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    default_factor = 0.5 if architecture in ("glm", "glm4") else 1.0
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_factor))
    scaling = None
    if rope_type != "default":
        scaling = _rope_scaling(params, rope_type, raw, max_positions, source, path)
    return float(theta), float(factor), scaling


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``rope_parameters`` dict of ``config`` (transformers v5 form)."""
    params: dict[str, Any] = {
        "rope_type": "default" if config.rope_scaling is None else config.rope_scaling.type,
        "rope_theta": config.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor,
    }
    scaling = config.rope_scaling
    if scaling is None:
        return params
    params["factor"] = scaling.factor
    if scaling.type == "dynamic" and scaling.original_max_position_embeddings != config.max_position_embeddings:
        raise CheckpointError(
            f"dynamic rope scaling with original_max_position_embeddings="
            f"{scaling.original_max_position_embeddings} but max_position_embeddings="
            f"{config.max_position_embeddings}: transformers measures dynamic NTK against "
            "max_position_embeddings, so the two must be equal to export")
    if scaling.type == "yarn":
        params.update(original_max_position_embeddings=scaling.original_max_position_embeddings,
                      beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(scaling, key) is not None:
                params[key] = getattr(scaling, key)
    return params


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
    max_positions = int(field("max_position_embeddings", 8192))
    theta, factor, scaling = _rope(raw, architecture, max_positions, path)
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
        rope_scaling=scaling,
        partial_rotary_factor=factor,
        rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
        qkv_bias=bool(field("attention_bias", True)) if architecture != "qwen2" else True,
        tie_word_embeddings=bool(field("tie_word_embeddings", False)),
        max_position_embeddings=max_positions,
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
        "rope_parameters": _rope_to_hf(config),
        "pad_token_id": config.pad_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "bos_token_id": config.bos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if config.rope_scaling is not None:
        # transformers before v5 reads the scaling from ``rope_scaling`` only; v5 lets it
        # replace ``rope_parameters``, which holds the same values.
        raw["rope_scaling"] = dict(raw["rope_parameters"])
    if config.architecture == "qwen2":
        if not config.qkv_bias:
            raise CheckpointError("Qwen2ForCausalLM always has q/k/v bias; config has qkv_bias=False")
        raw["use_sliding_window"] = False
    else:
        raw["attention_bias"] = config.qkv_bias
    return raw
