"""Step checkpoints of a training run, verified when restored, with per-process host states.

The on-disk layout that ``glmjax.training.checkpointing.Checkpointer`` writes under
``MODEL_DIR/checkpoints`` and that readers without the trainer (serving, evaluation) restore from.

Each step directory ``<directory>/<step>/`` holds:
  ``state/``   the TrainState arrays (orbax, OCDBT); every process writes its own shards.
  ``digest/``  ``digest.json``: two 32-bit checksums per array, computed on device at save time.
  ``host/``    ``process_<i>-of-<n>.json``: each process's host states (its data-iterator
               position, ...) with a CRC32 of their JSON.

Integrity. orbax 0.12.8 verifies none of the array values: the zarr3 ``crc32c`` codec it can
configure covers only the shard index (and zarr2 is the default), OCDBT checksums its b-tree
nodes but not the values, and flipped bytes in stored values restore silently (observed with
the default zstd-compressed zarr2 arrays). Hence our own digest: a jitted reduction over each
array where it lives, mixing every element's bits with its position by a bijective 32-bit hash
(murmur3's finaliser) and summing mod 2**32, for two seeds. The sums do not depend on the
order of reduction, so the digest is the same for any sharding and number of processes; a
change of any single element always changes it, more changes go unnoticed with a chance of
about 2**-64. Cost: one read of the state in device memory plus a scalar all-reduce per array,
at save (where the save already waits for the device-to-host copy) and after restore; no host
copy and no second read of the files.

Restoring the latest checkpoint verifies it: a corrupt one (unreadable or truncated files,
missing metadata or digest, checksum mismatch) is reported in one warning line and the newest
good step is restored instead; the corrupt steps newer than it are kept, renamed to
``<step>.corrupt``, so that training can write those steps again. Stored arrays of another
shape, dtype or tree than the current train state are a ``CheckpointError`` naming the first
differing leaf, not a fallback. In multi-process runs every process reaches the same decision:
local verdicts are exchanged before the (collective) digest check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.orbax_io import error_summary

STATE_ITEM = "state"
DIGEST_ITEM = "digest"
HOST_ITEM = "host"
DIGEST_FILE = "digest.json"
DIGEST_FORMAT = "glmjax-fmix32-sum/2x32"
_SEEDS = (0x9E3779B9, 0x7F4A7C15)
_T = TypeVar("_T")


class Checkpointable(Protocol):
    """Host-side state checkpointed per process (a grain ``DatasetIterator`` is one)."""

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from a snapshot of ``get_state``."""


NO_HOST_STATES: Mapping[str, Checkpointable] = MappingProxyType({})


class _Corrupt(Exception):
    """A checkpoint step that cannot be trusted (the message says why, in one line)."""


# ----------------------------------------------------------------------------- array digests


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 with good avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32[2]: per seed, the sum mod 2**32 of ``mix(bits ^ mix(position + seed))``."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize >= 4:  # 8-byte elements become two words (a trailing axis of 2)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the row-major index, computed where each shard lives
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.stack([jnp.sum(_mix(words ^ _mix(position + jnp.uint32(seed))), dtype=jnp.uint32) for seed in _SEEDS])


@functools.cache
def _digest_fn(out_sharding: NamedSharding | None) -> Callable[[dict], dict]:
    return jax.jit(lambda leaves: jax.tree.map(_leaf_digest, leaves), out_shardings=out_sharding)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """{``a/b/0``: leaf}; ``None`` subtrees have no leaves."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def array_digests(tree: Any) -> dict[str, list[int]]:
    """{leaf path: two uint32 checksums} of a tree of arrays, computed where the arrays live
    (one jitted call per set of devices).

    The same for any sharding of the arrays; in multi-process runs all processes must call it.
    """
    groups: dict[frozenset | None, dict[str, Any]] = {}
    for path, leaf in leaves_by_path(tree).items():
        sharding = getattr(leaf, "sharding", None)
        groups.setdefault(None if sharding is None else frozenset(sharding.device_set), {})[path] = leaf
    digests: dict[str, list[int]] = {}
    for leaves in groups.values():
        meshes = [leaf.sharding.mesh for leaf in leaves.values()
                  if isinstance(getattr(leaf, "sharding", None), NamedSharding)]
        out_sharding = NamedSharding(meshes[0], PartitionSpec()) if meshes else None
        for path, digest in jax.device_get(_digest_fn(out_sharding)(leaves)).items():
            digests[path] = [int(word) for word in digest]
    return digests


# ------------------------------------------------------------------------- host states (JSON)


def _host_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


def _canonical(states: Mapping[str, Any]) -> str:
    return json.dumps(states, sort_keys=True)


def encode_host_states(host_states: Mapping[str, Checkpointable]) -> str:
    """This process's host states as the file text, snapshotted now (async saves must not see
    later positions)."""
    snapshot = {}
    for key, target in host_states.items():
        try:
            snapshot[key] = json.loads(json.dumps(target.get_state()))
        except (TypeError, ValueError) as err:
            raise TypeError(f"host state {key!r}: get_state() is not JSON-serialisable ({err})") from err
    crc = zlib.crc32(_canonical(snapshot).encode())
    return json.dumps({"crc32": crc, "states": snapshot}, indent=1, sort_keys=True)


class HostStatesHandler(ocp.AsyncCheckpointHandler):
    """Writes this process's host states to ``process_<i>-of-<n>.json``; reads them verified."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / _host_file(jax.process_index(), jax.process_count())

    async def async_save(self, directory: epath.Path, args: HostStatesSave) -> list[Any]:
        path = self._path(directory)

        async def write() -> None:
            path.write_text(args.text)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="glmjax_host_states")]

    def save(self, directory: epath.Path, args: HostStatesSave) -> None:
        self._path(directory).write_text(args.text)

    def restore(self, directory: epath.Path, args: HostStatesRestore) -> dict[str, Any]:
        """All host states of this process.

        Raises:
          _Corrupt: the file is missing, unreadable or fails its CRC32.
          CheckpointError: the states were saved by another number of processes.
        """
        del args  # no options: the file holds everything
        path = self._path(directory)
        if not path.exists():
            count = jax.process_count()
            saved = sorted(p.name for p in directory.glob("process_*.json"))
            if saved and not any(name.endswith(f"-of-{count}.json") for name in saved):
                raise CheckpointError(
                    f"{directory}: host states were saved by another number of processes "
                    f"({saved[0]}); this run has {count}"
                )
            raise _Corrupt(f"{HOST_ITEM}/{path.name} is missing")
        try:
            raw = json.loads(path.read_text())
            states, crc = raw["states"], raw["crc32"]
        except (ValueError, KeyError, TypeError) as err:
            raise _Corrupt(f"{HOST_ITEM}/{path.name} is unreadable ({err})") from err
        if not isinstance(states, dict) or zlib.crc32(_canonical(states).encode()) != crc:
            raise _Corrupt(f"{HOST_ITEM}/{path.name}: CRC32 mismatch")
        return states

    def metadata(self, directory: epath.Path) -> None:
        del directory  # no metadata beyond the files

    def finalize(self, directory: epath.Path) -> None:
        del directory  # each file is complete when written

    def close(self) -> None:
        pass  # holds no resources


@ocp.args.register_with_handler(HostStatesHandler, for_save=True)
@dataclasses.dataclass
class HostStatesSave(ocp.args.CheckpointArgs):
    """This process's host states, encoded at save time."""

    text: str


@ocp.args.register_with_handler(HostStatesHandler, for_restore=True)
@dataclasses.dataclass
class HostStatesRestore(ocp.args.CheckpointArgs):
    """Reads all host states of this process."""


# ------------------------------------------------------------------------ verified restore


def _describe(shape: Sequence[int], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _check_layout(step_dir: epath.Path, stored_tree: Any, abstract: Any, partial: bool) -> None:
    """Raises ``CheckpointError`` at the first leaf whose path, shape or dtype differs."""
    stored, wanted = leaves_by_path(stored_tree), leaves_by_path(abstract)
    prefix = f"{step_dir}: checkpoint does not match the current config:"
    for path in sorted(wanted):
        target = wanted[path]
        if path not in stored:
            raise CheckpointError(f"{prefix} {path} ({_describe(target.shape, target.dtype)}) is not in the checkpoint")
        leaf = stored[path]
        if tuple(leaf.shape) != tuple(target.shape) or np.dtype(leaf.dtype) != np.dtype(target.dtype):
            raise CheckpointError(
                f"{prefix} {path} is {_describe(leaf.shape, leaf.dtype)} in the checkpoint, "
                f"{_describe(target.shape, target.dtype)} expected"
            )
    unexpected = sorted(set(stored) - set(wanted))
    if unexpected and not partial:
        leaf = stored[unexpected[0]]
        raise CheckpointError(
            f"{prefix} the checkpoint has {unexpected[0]} ({_describe(leaf.shape, leaf.dtype)}) "
            "which the current train state lacks"
        )


def _read_digests(step_dir: epath.Path, wanted: Sequence[str]) -> dict[str, list[int]]:
    path = step_dir / DIGEST_ITEM / DIGEST_FILE
    name = f"{DIGEST_ITEM}/{DIGEST_FILE}"
    if not path.exists():
        raise _Corrupt(f"{name} is missing (an interrupted save, or a checkpoint of an older glmjax)")
    try:
        raw = json.loads(path.read_text())
        digests = raw["leaves"] if raw["format"] == DIGEST_FORMAT else None
    except (ValueError, KeyError, TypeError) as err:
        raise _Corrupt(f"{name} is unreadable ({err})") from err
    if digests is None:
        raise _Corrupt(f"{name} has format {raw['format']!r}, expected {DIGEST_FORMAT!r}")
    missing = [leaf for leaf in wanted if leaf not in digests]
    if missing:
        raise _Corrupt(f"{name} has no checksum of {missing[0]}")
    return digests


def _read_host_states(step_dir: epath.Path, keys: Sequence[str]) -> dict[str, Any]:
    """This process's host states (``keys`` at least); raises ``_Corrupt`` or ``CheckpointError``."""
    if not (step_dir / HOST_ITEM).exists():
        raise CheckpointError(f"{step_dir}: no host states saved; expected {list(keys)}")
    host_states = HostStatesHandler().restore(step_dir / HOST_ITEM, HostStatesRestore())
    missing = [key for key in keys if key not in host_states]
    if missing:
        raise CheckpointError(f"{step_dir / HOST_ITEM}: no host state {missing[0]!r} (saved: {sorted(host_states)})")
    return host_states


def _read_step(
    step_dir: epath.Path, abstract: dict, host_keys: Sequence[str], partial: bool
) -> tuple[dict, dict[str, list[int]], dict[str, Any]]:
    """This process's part of a restore: (arrays, stored digests, host states), unverified.

    Raises:
      _Corrupt: unreadable or truncated files, missing metadata, digest or host states.
      CheckpointError: the stored tree, shapes or dtypes differ from ``abstract``.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
        try:
            stored_tree = handler.metadata(step_dir / STATE_ITEM).tree
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise bare Exceptions
            raise _Corrupt(f"unreadable array metadata ({error_summary(err)})") from err
        _check_layout(step_dir, stored_tree, abstract, partial)
        digests = _read_digests(step_dir, list(leaves_by_path(abstract)))
        host_states = _read_host_states(step_dir, host_keys) if host_keys else {}
        try:  # the arrays last: the expensive part
            arrays = handler.restore(step_dir / STATE_ITEM, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial))
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise bare Exceptions
            raise _Corrupt(f"unreadable array data ({error_summary(err)})") from err
    finally:
        handler.close()
    return arrays, digests, host_states


_OK, _CORRUPT, _MISMATCH = 0, 1, 2


def _verdicts(code: int) -> list[int]:
    """Every process's verdict code, in process order."""
    if jax.process_count() == 1:
        return [code]
    return [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)]


def restore_step(
    step_dir: epath.Path, abstract: dict, host_keys: Sequence[str], partial: bool
) -> tuple[dict, dict[str, Any]]:
    """(verified arrays, this process's host states) of one step; all processes must call it.

    Raises (the same on every process):
      _Corrupt: some process could not read its part, or a checksum differs.
      CheckpointError: the checkpoint does not match ``abstract`` or ``host_keys``.
    """
    error: Exception | None = None
    try:
        arrays, digests, host_states = _read_step(step_dir, abstract, host_keys, partial)
    except (_Corrupt, CheckpointError) as err:
        error = err
    codes = _verdicts(_OK if error is None else _CORRUPT if isinstance(error, _Corrupt) else _MISMATCH)
    if _MISMATCH in codes:
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"{step_dir}: process {codes.index(_MISMATCH)} found that the checkpoint "
                              "does not match the current config")
    if _CORRUPT in codes:
        if isinstance(error, _Corrupt):
            raise error
        raise _Corrupt(f"process {codes.index(_CORRUPT)} could not read its part")
    actual = array_digests(arrays)
    for path in sorted(actual):
        if actual[path] != digests[path]:
            raise _Corrupt(f"checksum mismatch in {path}")
    return arrays, host_states


def restore_newest_good(
    directory: epath.Path, steps: Sequence[int], step: int | None, attempt: Callable[[epath.Path], _T]
) -> tuple[_T, int, list[int]]:
    """``attempt`` on ``step``, or else on the steps from the newest down to the first good one.

    Returns:
      (its result, the step, the corrupt steps newer than it).

    Raises:
      CheckpointError: no checkpoints, no such step, ``step`` corrupt, or every step corrupt.
    """
    if not steps:
        raise CheckpointError(f"{directory}: no checkpoints")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{directory}: no checkpoint of step {step} (steps: {sorted(steps)})")
        try:
            return attempt(directory / str(step)), step, []
        except _Corrupt as err:
            raise CheckpointError(f"{directory / str(step)}: corrupt checkpoint: {err}") from err
    corrupt: list[int] = []
    newest_reason = ""
    for candidate in sorted(steps, reverse=True):
        step_dir = directory / str(candidate)
        try:
            result = attempt(step_dir)
        except _Corrupt as err:
            logging.warning("%s: corrupt checkpoint (%s); trying the previous step", step_dir, err)
            newest_reason = newest_reason or f"step {candidate}: {err}"
            corrupt.append(candidate)
            continue
        return result, candidate, corrupt
    raise CheckpointError(f"{directory}: no good checkpoint, all {len(steps)} are corrupt ({newest_reason})")
