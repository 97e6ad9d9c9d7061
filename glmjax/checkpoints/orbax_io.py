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
from glmjax.checkpoints import paths
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.models.params import abstract_model, state_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def error_summary(err: BaseException) -> str:
    """The first line of the innermost cause of ``err`` (tensorstore's own words), shortened:
    orbax wraps tensorstore errors in multi-line dumps of the array spec."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0][:300]


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


def read_model_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
    """The ``ModelConfig`` in ``directory/model_config.json`` (local path or URL)."""
    path = paths.as_path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a glmjax model checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    return config_from_json(raw, str(path), **overrides)


def save_model(model: Decoder, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes the parameters (orbax ``params/``) and ``model_config.json``. All processes must
    call this.

    Args:
      directory: local path or URL (``gs://...``).
      overwrite: replace the checkpoint of a non-empty ``directory``: the new one is written
        completely first, then the old ``params/`` and config are replaced (other files stay).

    Raises:
      CheckpointError: ``directory`` is not empty and not ``overwrite`` (checked before any work).
    """
    directory = paths.as_path(directory)
    paths.refuse_existing(directory, overwrite)
    primary = jax.process_index() == 0
    staging = directory / paths.STAGING_DIR
    if primary:
        paths.fresh_staging_dir(directory)
    paths.barrier("glmjax_save_model_staging")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if primary:
        (staging / CONFIG_FILE).write_text(json.dumps(config_to_json(model.config), indent=2))
        paths.commit_staged(directory, staging, CONFIG_FILE, [PARAMS_DIR])
    paths.barrier("glmjax_save_model_commit")


def load_model(
    directory: str | os.PathLike, *, mesh: Mesh | None = None, rules: sharding_lib.AxisRules | None = None,
    **overrides,
) -> Decoder:
    """Restores a decoder saved by ``save_model``; ``overrides`` change runtime config fields.

    Raises:
      CheckpointError: the directory has no config, or the stored arrays do not fit the config.
    """
    directory = paths.as_path(directory)
    graphdef, state, target = restore_target(read_model_config(directory, **overrides), mesh, rules)
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(directory / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CheckpointError(f"{directory}: parameters do not match {CONFIG_FILE}: {error_summary(err)}") from err
    except Exception as err:  # noqa: BLE001 - tensorstore read errors arrive as bare Exceptions
        raise CheckpointError(f"{directory / PARAMS_DIR}: unreadable parameters ({error_summary(err)})") from err
    finally:
        checkpointer.close()
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
