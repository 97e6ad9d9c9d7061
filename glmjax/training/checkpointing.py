"""The train state's checkpoints: asynchronous orbax saves of the state's own arrays with a digest
and per-process host states, and verified restores that fall back to the newest good step
(layout and integrity rules: ``glmjax.checkpoints.step_checkpoints``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from glmjax.checkpoints import paths
from glmjax.checkpoints.step_checkpoints import (
    DIGEST_FILE,
    DIGEST_ITEM,
    HOST_ITEM,
    STATE_ITEM,
    Checkpointable,
    DIGEST_FORMAT,
    encode_host_states,
    HostStatesHandler,
    HostStatesSave,
    NO_HOST_STATES,
    restore_newest_good,
    restore_step,
    array_digests,
)
from glmjax.training.state import TrainState


def _state_fields(state: TrainState) -> dict[str, Any]:
    """The state's own fields, not copies (``dataclasses.asdict`` would copy every array)."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


class Checkpointer:
    """Keeps the last ``keep`` train-state checkpoints under ``directory``; saves are asynchronous.

    Args:
      directory: local path or URL (``gs://bucket/run/checkpoints``); URLs are used as they are.
      keep: number of checkpoints kept.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = paths.as_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DIGEST_ITEM: ocp.JsonCheckpointHandler(DIGEST_FILE),
                HOST_ITEM: HostStatesHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest saved step (verified only by ``restore``), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first (corrupt ones set aside by ``restore`` are not steps)."""
        return sorted(self._manager.all_steps())

    def save(
        self, state: TrainState, *, step: int, host_states: Mapping[str, Checkpointable] = NO_HOST_STATES
    ) -> None:
        """Starts saving ``state`` as ``step`` and returns; all processes must call it.

        The arrays are the state's own (no device copy); their digest is computed now and each
        process's ``host_states`` are snapshotted now, so later steps do not leak in.
        """
        arrays = _state_fields(state)
        digest = {"format": DIGEST_FORMAT, "leaves": array_digests(arrays)}
        args = {STATE_ITEM: ocp.args.StandardSave(arrays), DIGEST_ITEM: ocp.args.JsonSave(digest)}
        if host_states:
            args[HOST_ITEM] = HostStatesSave(encode_host_states(host_states))
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(
        self,
        abstract_state: TrainState,
        *,
        host_states: Mapping[str, Checkpointable] = NO_HOST_STATES,
        step: int | None = None,
    ) -> tuple[TrainState, int]:
        """Restores into ``abstract_state``'s shapes and shardings (a TrainState of
        ``ShapeDtypeStruct``s) and sets each of ``host_states`` to this process's saved state.

        Args:
          step: the step to restore; None for the newest good one (see the module docstring).

        Returns:
          (the verified state, its step).

        Raises:
          CheckpointError: no checkpoints, ``step`` missing or corrupt, every checkpoint corrupt,
            or a checkpoint that does not match ``abstract_state`` / ``host_states``.
        """
        self._manager.wait_until_finished()
        abstract = _state_fields(abstract_state)
        keys = sorted(host_states)
        (arrays, saved), restored_step, corrupt = restore_newest_good(
            self.directory, self.all_steps(), step,
            lambda step_dir: restore_step(step_dir, abstract, keys, partial=False),
        )
        if corrupt:
            self._set_aside(corrupt)
        for key, target in host_states.items():
            target.set_state(saved[key])
        return TrainState(**arrays), restored_step

    def _set_aside(self, steps: Sequence[int]) -> None:
        """Renames corrupt step directories to ``<step>.corrupt`` (kept, but no longer steps)."""
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{step}.corrupt"
                suffix = 1
                while target.exists():
                    target, suffix = self.directory / f"{step}.corrupt-{suffix}", suffix + 1
                (self.directory / str(step)).rename(target)
                logging.info("%s: corrupt checkpoint kept as %s", self.directory / str(step), target.name)
        paths.barrier("glmjax_checkpoint_set_aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the pending save is on storage."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the pending save, then releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()
