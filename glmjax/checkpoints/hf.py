"""``from_pretrained`` / ``save_pretrained``: HF safetensors directories <-> glmjax decoders.

Loading streams: each parameter is assembled layer by layer, straight into the host buffers of
the shards that the local devices hold, then placed; at most one HF tensor plus one
parameter's local shards are on the host at a time.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from glmjax import sharding as sharding_lib
from glmjax.checkpoints import paths
from glmjax.checkpoints.hf_config import CheckpointError, config_from_hf, config_to_hf, read_hf_config
from glmjax.checkpoints.hf_layout import TensorMapping, tensor_layout
from glmjax.checkpoints.safetensors_io import SafetensorsReader, checkpoint_files, write_sharded
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.models.params import abstract_model, flat_params, logical_axes

CONFIG_FILE = "config.json"
_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype: Any, field: str) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError as err:
        raise CheckpointError(f"{field}={dtype!r} is not a dtype") from err
    if name not in _SUPPORTED_DTYPES:
        raise CheckpointError(f"{field}={name}: parameters must be one of {', '.join(_SUPPORTED_DTYPES)}")
    return name


def _checked_cast(array: np.ndarray, dtype: np.dtype, name: str, file: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise CheckpointError(f"{file}: tensor {name!r} has non-float dtype {array.dtype}")
    with np.errstate(over="ignore"):
        out = array.astype(dtype)
    if dtype != array.dtype and not np.all(np.isfinite(out)):
        if np.all(np.isfinite(array.astype(np.float32))):
            raise CheckpointError(
                f"{file}: tensor {name!r} has values outside the range of {np.dtype(dtype).name} "
                f"(max |x| = {float(np.max(np.abs(array.astype(np.float32)))):.4g})"
            )
    return out


def _read_layer(reader: SafetensorsReader, mapping: TensorMapping, layer: int | None, dtype: np.dtype):
    arrays = []
    for name, shape in zip(mapping.names_for_layer(layer), mapping.hf_shapes):
        actual, _ = reader.shape_and_dtype(name)
        if actual != shape:
            raise CheckpointError(
                f"{reader.file_of(name)}: tensor {name!r} has shape {list(actual)}, "
                f"expected {list(shape)} for this config"
            )
        arrays.append(reader.get(name))
    first = mapping.names_for_layer(layer)[0]
    return _checked_cast(mapping.to_ours(arrays), dtype, first, reader.file_of(first))


def _load_parameter(
    reader: SafetensorsReader,
    mapping: TensorMapping,
    shape: tuple[int, ...],
    dtype: np.dtype,
    target: NamedSharding | SingleDeviceSharding,
) -> jax.Array:
    """Builds one global parameter array, reading each HF tensor once."""
    device_indices = target.addressable_devices_indices_map(shape)
    buffers: dict[tuple, np.ndarray] = {}
    keys = {}
    for device, index in device_indices.items():
        key = tuple((s.start, s.stop) for s in index)
        keys[device] = key
        if key not in buffers:
            shard_shape = tuple(len(range(*s.indices(dim))) for s, dim in zip(index, shape))
            buffers[key] = np.empty(shard_shape, dtype)
    index_of = {key: tuple(slice(a, b) for a, b in key) for key in buffers}
    layers = range(shape[0]) if mapping.stacked else [None]
    for layer in layers:
        value = _read_layer(reader, mapping, layer, dtype)
        for key, buffer in buffers.items():
            index = index_of[key]
            if layer is None:
                buffer[...] = value[index]
                continue
            start, stop, _ = index[0].indices(shape[0])
            if start <= layer < stop:
                buffer[layer - start] = value[index[1:]]
    arrays = [jax.device_put(buffers[keys[d]], d) for d in device_indices]
    return jax.make_array_from_single_device_arrays(shape, target, arrays)


def from_pretrained(
    path: str,
    dtype: Any = jnp.float32,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.AxisRules | None = None,
    **config_overrides,
) -> Decoder:
    """Loads an HF checkpoint directory (``config.json`` + safetensors) as a glmjax decoder.

    Args:
      path: local directory of a GlmForCausalLM, Glm4ForCausalLM or Qwen2ForCausalLM checkpoint.
      dtype: parameter and compute dtype (float32, bfloat16, float16), or "auto" for the
        checkpoint's ``torch_dtype``.
      mesh: shard parameters over this mesh by their logical axes (default: first device).
      rules: logical axis rules (default: the active rules).
      config_overrides: runtime ``ModelConfig`` fields, e.g. ``attention_backend="fused"``.

    Returns:
      The decoder; ``model(input_ids)`` gives logits [batch, seq, vocab].

    Raises:
      CheckpointError: naming the file, field or tensor that is missing, misshaped or unusable.
    """
    raw = read_hf_config(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    dtype_name = _dtype_name(dtype, "dtype")
    overrides = {"param_dtype": dtype_name, "compute_dtype": dtype_name, **config_overrides}
    config = config_from_hf(raw, config_path, **overrides)
    reader = SafetensorsReader(path)

    model = abstract_model(config)
    params = flat_params(model)
    mappings = tensor_layout(config)
    used = set()
    for mapping in mappings:
        variable = params[mapping.param]
        layers = range(config.num_layers) if mapping.stacked else [None]
        for layer in layers:
            used.update(mapping.names_for_layer(layer))
        for name in mapping.names_for_layer(0 if mapping.stacked else None):
            reader.file_of(name)  # fail early on a missing tensor
        if mesh is None:
            target = SingleDeviceSharding(jax.devices()[0])
        else:
            target = sharding_lib.named_sharding(logical_axes(variable), variable.shape, mesh, rules)
        variable.set_value(
            _load_parameter(reader, mapping, tuple(variable.shape), np.dtype(jnp.dtype(dtype_name)), target)
        )
    ignored = [n for n in reader.names() if n not in used and not n.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        ignored = [n for n in ignored if n != "lm_head.weight"]
    if ignored:
        logging.warning("%s: %d checkpoint tensors not used: %s", path, len(ignored), ", ".join(ignored[:10]))
    return model


def _host_array(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_pretrained(
    model: Decoder, path: str, *, dtype: Any | None = None, max_shard_bytes: int = 5 << 30,
    overwrite: bool = False,
) -> None:
    """Writes ``config.json`` and safetensors that ``transformers.AutoModelForCausalLM`` loads.

    Args:
      dtype: storage dtype (default: the parameters' dtype).
      max_shard_bytes: split the weights into several files past this size.
      overwrite: replace the checkpoint of a non-empty ``path``: the new one is written
        completely first, then the old config, index and shards are removed (other files stay).

    In multi-process runs every process must call this; only process 0 writes.

    Raises:
      CheckpointError: ``path`` is not empty and not ``overwrite`` (checked before any work).
    """
    directory = paths.as_path(path)
    paths.refuse_existing(directory, overwrite)
    config: ModelConfig = model.config
    params = flat_params(model)
    dtype_name = _dtype_name(dtype if dtype is not None else config.param_dtype, "dtype")
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    writer = jax.process_index() == 0

    def tensors():
        for mapping in tensor_layout(config):
            value = params[mapping.param][...]
            layers = range(config.num_layers) if mapping.stacked else [None]
            for layer in layers:
                host = _host_array(value[layer] if layer is not None else value).astype(np_dtype)
                for name, tensor in zip(mapping.names_for_layer(layer), mapping.to_hf(host)):
                    yield name, tensor

    if not writer:
        for _ in tensors():  # participate in collectives
            pass
        return
    staging = paths.fresh_staging_dir(directory)
    write_sharded(tensors(), str(staging), max_shard_bytes)
    (staging / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype_name), indent=2))
    paths.commit_staged(directory, staging, CONFIG_FILE, checkpoint_files(str(directory)))
