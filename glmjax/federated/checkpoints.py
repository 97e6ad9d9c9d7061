"""One checkpoint file per party: an ``.npz`` of a pytree's leaves plus JSON metadata, written
atomically (temporary file, fsync, ``os.replace``) so a crash leaves the previous one intact."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

_META = "__meta__"


class PartyCheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this party's modules."""


def save_party_checkpoint(path: str, tree: Any, meta: dict) -> None:
    """Writes ``tree``'s leaves (``leaf_00000``, ... in flatten order) and ``meta`` to ``path``."""
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_party_checkpoint(path: str, template: Any) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of ``template`` (same leaf count, shapes, dtypes).

    Raises:
      PartyCheckpointError: naming the file and the first leaf that does not fit.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {k: archive[k] for k in archive.files}
    except Exception as err:  # BadZipFile, OSError, ValueError
        raise PartyCheckpointError(f"{path}: unreadable checkpoint ({err})") from None
    if _META not in stored:
        raise PartyCheckpointError(f"{path}: no metadata, not a party checkpoint")
    meta = json.loads(stored.pop(_META).tobytes())
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(stored) != len(paths_leaves):
        raise PartyCheckpointError(f"{path}: {len(stored)} arrays, this party's state has {len(paths_leaves)}")
    leaves = []
    for i, (key_path, leaf) in enumerate(paths_leaves):
        value = stored[f"leaf_{i:05d}"]
        want = np.asarray(leaf)
        if value.shape != want.shape or value.dtype != want.dtype:
            raise PartyCheckpointError(f"{path}: {jax.tree_util.keystr(key_path)} is {value.dtype}{list(value.shape)}, "
                                       f"this party's is {want.dtype}{list(want.shape)}")
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


def read_party_checkpoint_meta(path: str) -> dict:
    """The metadata of a checkpoint written by ``save_party_checkpoint``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(archive[_META].tobytes())
    except Exception as err:  # BadZipFile, KeyError, OSError, ValueError
        raise PartyCheckpointError(f"{path}: unreadable checkpoint metadata ({err})") from None
