"""Model parameters as an orbax checkpoint: ``params/`` (orbax) + ``model_config.json``.

Restoring reads each array straight into its target sharding on the given mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from glmjax import sharding as sharding_lib
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.models.params import abstract_model, state_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_json(raw: dict[str, Any], path: str, **overrides) -> ModelConfig:
    """``ModelConfig`` from its JSON form; unknown fields are an error naming them."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown model config fields {unknown}")
    values = dict(raw)
    if "eos_token_ids" in values:
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def read_model_config(directory: str, **overrides) -> ModelConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; not a glmjax model checkpoint directory")
    with open(path) as f:
        return config_from_json(json.load(f), path, **overrides)


def save_model(model: Decoder, directory: str) -> None:
    """Writes the parameters (orbax) and the config. All processes must call this."""
    directory = os.path.abspath(directory)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(config_to_json(model.config), f, indent=2)


def load_model(
    directory: str, *, mesh: Mesh | None = None, rules: sharding_lib.AxisRules | None = None, **overrides
) -> Decoder:
    """Restores a decoder saved by ``save_model``; ``overrides`` change runtime config fields.

    Raises:
      CheckpointError: the directory has no config, or the stored arrays do not fit the config.
    """
    directory = os.path.abspath(directory)
    graphdef, state, target = restore_target(read_model_config(directory, **overrides), mesh, rules)
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR), target)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CheckpointError(f"{directory}: parameters do not match {CONFIG_FILE}: {err}") from err
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def restore_target(
    config: ModelConfig, mesh: Mesh | None, rules: sharding_lib.AxisRules | None = None
) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract state, restore target) for ``config``'s decoder: the target is the
    parameters' pure dict of ``ShapeDtypeStruct``s carrying their shardings on ``mesh`` (by
    logical axes), or the first device without a mesh, so orbax reads straight into shards."""
    graphdef, state = nnx.split(abstract_model(config))
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = state_shardings(state, mesh, rules)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(state),
        nnx.to_pure_dict(shardings),
    )
    return graphdef, state, target
