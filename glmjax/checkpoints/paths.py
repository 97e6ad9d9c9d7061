"""Checkpoint locations (local paths or URLs such as ``gs://``) and replacing a checkpoint safely.

A checkpoint is written completely into a staging directory inside its output directory
first; only then are the old checkpoint's files removed and the new ones moved in, the file
that makes the directory loadable (its config) last. A crash midway therefore leaves the old
checkpoint, a directory without a config (loading fails loudly), or the new checkpoint, never
a mix of the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax
from etils import epath
from jax.experimental import multihost_utils

from glmjax.checkpoints.hf_config import CheckpointError

STAGING_DIR = ".glmjax-staging"


def as_path(directory: str | os.PathLike) -> epath.Path:
    """``directory`` as an ``epath.Path``: URLs (``gs://bucket/...``) are kept as they are,
    local paths are made absolute (orbax needs absolute paths)."""
    path = epath.Path(directory)
    return path if "://" in os.fspath(directory) else path.absolute()


def barrier(name: str) -> None:
    """Waits for all processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def refuse_existing(directory: epath.Path, overwrite: bool) -> None:
    """Checks that writing a checkpoint into ``directory`` replaces nothing, unless ``overwrite``.

    Raises:
      CheckpointError: ``directory`` is a file, or a non-empty directory and not ``overwrite``.
    """
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: output exists and is not a directory")
    if overwrite:
        return
    entries = sorted(path.name for path in directory.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise CheckpointError(
            f"{directory}: output directory is not empty ({shown}); pass --overwrite "
            "(overwrite=True) to replace the checkpoint in it"
        )


def fresh_staging_dir(directory: epath.Path) -> epath.Path:
    """An empty ``directory/.glmjax-staging`` (one left by a crashed write is removed)."""
    staging = directory / STAGING_DIR
    if staging.exists():
        staging.rmtree()
    staging.mkdir(parents=True)
    return staging


def commit_staged(directory: epath.Path, staging: epath.Path, entry: str, stale: Iterable[str]) -> None:
    """Replaces the checkpoint in ``directory`` by the one written completely into ``staging``.

    Order: the old ``entry`` file goes first (the directory stops loading), then the ``stale``
    files and directories of the old checkpoint, then the new files move in, ``entry`` last.
    Other files in ``directory`` (a tokenizer, notes) are kept.
    """
    for name in [entry, *stale]:
        path = directory / name
        if path.is_dir():
            path.rmtree()
        elif path.exists():
            path.unlink()
    for path in staging.iterdir():
        if path.name != entry:
            path.rename(directory / path.name)
    (staging / entry).rename(directory / entry)
    staging.rmtree()
