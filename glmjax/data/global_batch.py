"""Assemble per-host numpy batches into global, sharded ``jax.Array`` batches."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding


def make_global_batch(
    host_batch: Mapping[str, np.ndarray],
    sharding: NamedSharding | Mapping[str, NamedSharding],
    *,
    process_count: int | None = None,
) -> dict[str, jax.Array]:
    """Turns this process's rows into global arrays laid out by ``sharding``.

    Each process holds a distinct block of ``rows`` rows (as produced by
    :func:`glmjax.data.pipeline.lm_dataset`); the global array has ``rows * process_count`` rows, in
    process order, and is built with ``jax.make_array_from_process_local_data``. The sharding must
    split the batch dimension across processes (e.g. ``P(("data", "fsdp"), None)``); other
    dimensions are taken whole from every process.

    Args:
      host_batch: ``{key: array [rows, ...]}``, every key with the same ``rows``.
      sharding: one sharding for every key, or one per key.
      process_count: number of processes; default ``jax.process_count()``.

    Returns:
      ``{key: jax.Array [rows * process_count, ...]}`` with the given shardings.
    """
    process_count = jax.process_count() if process_count is None else process_count
    out = {}
    for key, array in host_batch.items():
        array = np.asarray(array)
        key_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
        global_shape = (array.shape[0] * process_count, *array.shape[1:])
        out[key] = jax.make_array_from_process_local_data(key_sharding, array, global_shape)
    return out
