"""Orbax checkpoints of the train state together with the data-iterator state."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from glmjax import sharding as sharding_lib
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.orbax_io import read_model_config, restore_target
from glmjax.models.decoder import Decoder
from glmjax.training.state import TrainState

class _IteratorSnapshot:
    """The data-iterator state frozen at save time (async saves must not see later batches)."""

    def __init__(self, state: dict):
        self._encoded = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._encoded


class Checkpointer:
    """Keeps the last ``keep`` checkpoints under ``directory``; saves are asynchronous."""

    def __init__(self, directory: str, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iterator: Any, *, step: int) -> None:
        args = {"state": ocp.args.StandardSave(dataclasses.asdict(state))}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_state: TrainState, data_iterator: Any, step: int | None = None) -> TrainState:
        """Restores into ``abstract_state``'s shapes and shardings (ShapeDtypeStructs), and the
        data iterator in place.

        Raises:
          CheckpointError: the stored arrays do not match the abstract state.
        """
        step = self.manager.latest_step() if step is None else step
        args = {"state": ocp.args.StandardRestore(dataclasses.asdict(abstract_state))}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{self.manager.directory}/{step}: checkpoint does not match the current config: {err}"
            ) from err
        return TrainState(**restored["state"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_trained_model(
    model_dir: str,
    step: int | None = None,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.AxisRules | None = None,
    **overrides,
) -> Decoder:
    """The model of a training run: ``model_dir/model_config.json`` and the parameters of
    checkpoint ``step`` (default: the latest) read straight into their shards; optimizer and
    data-iterator state are not read.

    Args:
      model_dir: the run's MODEL_DIR (``launch.train``).
      step: checkpoint step; None for the latest.
      mesh, rules: where to place the parameters (default: the first device).
      overrides: runtime config fields (e.g. ``attention_backend``, ``compute_dtype``).

    Raises:
      CheckpointError: no model config, no such checkpoint, or parameters that do not fit.
    """
    config = read_model_config(model_dir, **overrides)
    directory = os.path.abspath(os.path.join(model_dir, "checkpoints"))
    manager = ocp.CheckpointManager(directory)
    try:
        available = manager.all_steps()
        if not available:
            raise CheckpointError(f"{directory}: no checkpoints (is {model_dir} a launch.train MODEL_DIR?)")
        step = max(available) if step is None else step
        if step not in available:
            raise CheckpointError(f"{directory}: no checkpoint of step {step} (steps: {sorted(available)})")
        graphdef, state, target = restore_target(config, mesh, rules)
        item = {"params": target}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{directory}/{step}: parameters do not match {model_dir}/"
                                  f"model_config.json: {err}") from err
    finally:
        manager.close()
    nnx.replace_by_pure_dict(state, restored["state"]["params"])
    return nnx.merge(graphdef, state)
