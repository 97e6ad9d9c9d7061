"""Which blocks of one side can share a segment with each block of the other side.

For packed batches (documents laid out one after another) this bounds every query block's key
loop to the blocks of its own documents, and every key block's query loop likewise, in
O(blocks * log(blocks)) work per row: no ``[seq_q, seq_kv]`` or ``[num_q_blocks,
num_k_blocks]`` array is built. The bounds are sound for any segment ids (segments need not be
contiguous or sorted); they are tight when the ids do not decrease along the sequence
(padding zeros anywhere are ignored).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_INT_MAX = np.iinfo(np.int32).max
_INT_MIN = np.iinfo(np.int32).min


def block_segment_bounds(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Smallest and largest nonzero id of each block: two int32 ``[batch, length // block]``.

  A block with no nonzero id gets ``(INT32_MAX, INT32_MIN)`` (an empty interval).

  Args:
    segment_ids: int32 ``[batch, length]``, ``length`` a multiple of ``block``.
  """
  batch, length = segment_ids.shape
  blocks = segment_ids.reshape(batch, length // block, block)
  nonzero = blocks != 0
  lowest = jnp.min(jnp.where(nonzero, blocks, _INT_MAX), axis=-1)
  highest = jnp.max(jnp.where(nonzero, blocks, _INT_MIN), axis=-1)
  return lowest, highest


def visible_block_ranges(rows: tuple[jax.Array, jax.Array],
                         columns: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Int32 ``[batch, num_rows, 2]``: for each row block, ``[start, end)`` of column blocks
  outside of which no column block can share a nonzero segment id with it.

  A column block j is skipped only when its id interval is disjoint from the row block's:
  every j < start has ``highest[j'] < row lowest`` for all j' <= j (running max), and every
  j >= end has ``lowest[j'] > row highest`` for all j' >= j (running min from the right).
  ``start >= end`` means nothing is visible (e.g. a block of padding).

  Args:
    rows, columns: ``(lowest, highest)`` pairs from :func:`block_segment_bounds`.
  """
  row_low, row_high = rows
  column_low, column_high = columns
  running_high = jax.lax.cummax(column_high, axis=1)  # non-decreasing
  running_low = jax.lax.cummin(column_low, axis=1, reverse=True)  # non-decreasing
  start = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(running_high, row_low)
  end = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right"))(running_low, row_high)
  return jnp.stack([start, end], axis=-1).astype(jnp.int32)
