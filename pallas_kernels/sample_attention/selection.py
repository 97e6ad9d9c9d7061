"""SampleAttention block selection: stage 1 (query-guided sampling) and stage 2 (filtering).

Stage 1 takes a strided subset of query rows, computes their exact (causal) softmax
over all keys and splits each row's probability mass into the part inside the local
token window and the part outside it, summed per key block. Stage 2 keeps the fewest
key blocks (largest scores first) such that window mass + kept mass reaches ``alpha``
times the total mass of the sampled rows. Picking whole blocks by block score keeps
at most as many blocks as selecting columns and rounding them up to blocks, with the
same guarantee: averaged over the sampled rows, the retained attention is >= alpha.

The selection is returned per (batch, head, query block) as a padded, ascending list
of key block indices plus a count: the form a kernel can scalar-prefetch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sample_attention.layout import BlockLayout

# Stage 1 never holds more than this many fp32 scores per head chunk: 16 MiB.
DEFAULT_STAGE1_CHUNK_ELEMS = 1 << 22


class Selection(NamedTuple):
  """Per (batch, head, query block) lists of key blocks to attend.

  Attributes:
    kv_blocks: ``[batch, heads, num_q_blocks, num_k_blocks]`` int32; the first
      ``counts`` entries are the kept key block indices in ascending order, the
      rest repeat the last kept index (0 if none), so a pipelined kernel does not
      fetch a new block for padding entries.
    counts: ``[batch, heads, num_q_blocks]`` int32, number of kept key blocks.
    density: ``[batch, heads]`` float32, kept fraction of the attendable (causal,
      unpadded) query-key token pairs; 1.0 means dense.
  """

  kv_blocks: jax.Array
  counts: jax.Array
  density: jax.Array


def sampled_rows(seq_len: int, row_ratio: float) -> np.ndarray:
  """Strided query positions used by stage 1, ascending, always incl. the last row.

  Returns ``max(1, ceil(row_ratio * seq_len))`` int32 positions (fewer only if
  the stride rounds two onto one), spread evenly and anchored at ``seq_len - 1``.
  """
  if not 0.0 < row_ratio <= 1.0:
    raise ValueError(f"row_ratio must be in (0, 1], got {row_ratio}")
  n = max(1, math.ceil(row_ratio * seq_len))
  rows = seq_len - 1 - (np.arange(n) * seq_len) // n
  return np.unique(rows).astype(np.int32)


def stage1_block_scores(
    q: jax.Array,
    k: jax.Array,
    layout: BlockLayout,
    rows: np.ndarray,
    scale: float,
    chunk_elems: int = DEFAULT_STAGE1_CHUNK_ELEMS,
) -> tuple[jax.Array, jax.Array]:
  """Stage 1: attention mass of the sampled rows, per key block, outside the window.

  Memory is bounded: heads are processed one at a time (``lax.map``) and the
  sampled rows in chunks of ``chunk_elems // padded_len`` rows, so at most a
  ``[row_chunk, padded_len]`` fp32 score matrix exists at once. Each row chunk
  gets an exact softmax over all its keys in one pass (no log-sum-exp recompute).

  Args:
    q: ``[batch, seq_len, heads, head_dim]`` queries (only ``rows`` are read).
    k: ``[batch, seq_len, kv_heads, head_dim]`` keys; ``heads % kv_heads == 0``.
    layout: block layout (``layout.seq_len == seq_len``).
    rows: sampled query positions, int, from :func:`sampled_rows`.
    scale: softmax scale applied to ``q @ k^T``.
    chunk_elems: max fp32 score elements held per head and step.

  Returns:
    ``(block_scores, window_mass)``: ``[batch, heads, num_k_blocks]`` and
    ``[batch, heads]`` float32. Their sum over blocks plus the window mass is
    ``len(rows)`` (each sampled row has total mass 1).
  """
  batch, _, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  s_pad = layout.padded_len
  row_chunk = max(1, min(len(rows), chunk_elems // s_pad))
  n_chunks = -(-len(rows) // row_chunk)
  # Pad the row list with copies of the last row; their weight is zero.
  rows_padded = np.concatenate(
      [rows, np.full(n_chunks * row_chunk - len(rows), rows[-1], rows.dtype)])
  row_weight = (np.arange(len(rows_padded)) < len(rows)).astype(np.float32)
  rows_padded = rows_padded.reshape(n_chunks, row_chunk)
  row_weight = row_weight.reshape(n_chunks, row_chunk)

  qs = jnp.take(q, jnp.asarray(rows_padded.reshape(-1)), axis=1)
  qs = qs.reshape(batch, n_chunks, row_chunk, heads, head_dim)
  qs = qs.transpose(0, 3, 1, 2, 4).reshape(batch * heads, n_chunks, row_chunk, head_dim)
  k_pad = jnp.pad(k, ((0, 0), (0, s_pad - layout.seq_len), (0, 0), (0, 0)))
  k_heads = k_pad.transpose(0, 2, 1, 3)  # [batch, kv_heads, s_pad, head_dim]
  kpos = jnp.arange(s_pad, dtype=jnp.int32)

  def one_head(args):
    q_head, b, kvh = args  # q_head: [n_chunks, row_chunk, head_dim]
    keys = k_heads[b, kvh].astype(jnp.float32)

    def one_chunk(carry, xs):
      blocks_acc, window_acc = carry
      q_rows, pos, weight = xs  # [row_chunk, head_dim], [row_chunk], [row_chunk]
      s = jnp.dot(q_rows.astype(jnp.float32), keys.T) * scale  # [row_chunk, s_pad]
      delta = pos[:, None] - kpos[None, :]
      valid = kpos[None, :] < layout.seq_len
      if layout.causal:
        valid = valid & (delta >= 0)
        in_window = delta < layout.window
      else:
        in_window = jnp.abs(delta) < layout.window
      s = jnp.where(valid, s, -jnp.inf)
      p = jnp.exp(s - s.max(-1, keepdims=True))
      p = p * (weight / p.sum(-1))[:, None]
      window_acc += jnp.where(in_window, p, 0.0).sum()
      outside = jnp.where(in_window, 0.0, p).sum(0)
      blocks_acc += outside.reshape(layout.num_k_blocks, layout.block_k).sum(-1)
      return (blocks_acc, window_acc), None

    init = (jnp.zeros(layout.num_k_blocks, jnp.float32), jnp.zeros((), jnp.float32))
    (blocks, window), _ = jax.lax.scan(
        one_chunk, init, (q_head, jnp.asarray(rows_padded), jnp.asarray(row_weight)))
    return blocks, window

  head_ids = jnp.arange(batch * heads, dtype=jnp.int32)
  blocks, window = jax.lax.map(
      one_head, (qs, head_ids // heads, (head_ids % heads) // group))
  return (blocks.reshape(batch, heads, layout.num_k_blocks),
          window.reshape(batch, heads))


def stage2_select_stripes(
    block_scores: jax.Array, window_mass: jax.Array, alpha: float) -> jax.Array:
  """Stage 2: fewest key blocks whose score plus the window mass reaches ``alpha``.

  Args:
    block_scores: ``[..., num_k_blocks]`` float32 mass outside the window.
    window_mass: ``[...]`` float32 mass inside the window.
    alpha: target fraction of the total mass, in ``[0, 1]``.

  Returns:
    ``[..., num_k_blocks]`` bool, the selected key blocks ("stripes").
  """
  total = window_mass + block_scores.sum(-1)
  need = alpha * total - window_mass  # mass the stripes must add
  order = jnp.argsort(-block_scores, axis=-1)
  ranked = jnp.take_along_axis(block_scores, order, axis=-1)
  before = jnp.cumsum(ranked, axis=-1) - ranked  # mass of the better-ranked blocks
  keep_ranked = before < need[..., None]
  return jnp.take_along_axis(keep_ranked, jnp.argsort(order, axis=-1), axis=-1)


def _compact(mask: jax.Array, pairs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One head: ``mask [nq, nk]`` bool -> (ascending padded lists, counts, kept token pairs)."""
  nk = mask.shape[-1]
  idx = jnp.arange(nk, dtype=jnp.int32)
  kept_first = jnp.sort(jnp.where(mask, idx, nk + idx), axis=-1)
  counts = mask.sum(-1, dtype=jnp.int32)
  last = jnp.take_along_axis(kept_first, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  fill = jnp.where(counts[..., None] > 0, last, 0)
  kv_blocks = jnp.where(idx < counts[..., None], kept_first, fill)
  kept_pairs = jnp.sum(jnp.where(mask, pairs, 0).astype(jnp.float32))
  return kv_blocks, counts, kept_pairs


def _per_head(make_mask, n_heads: int, layout: BlockLayout, batch: int, heads: int) -> Selection:
  """Selection from ``make_mask(head) -> [nq, nk]`` bool, one head at a time (``lax.map``).

  Only one head's ``[nq, nk]`` mask and sort exist at once; the lists themselves
  (``[batch, heads, nq, nk]`` int32, 8 GiB for 32 heads at 1M tokens and 128-token
  blocks) are the only full-size array.
  """
  pairs = layout.token_pairs(jnp)
  kv_blocks, counts, kept = jax.lax.map(
      lambda head: _compact(make_mask(head), pairs), jnp.arange(n_heads))
  shape = (batch, heads, layout.num_q_blocks)
  return Selection(kv_blocks.reshape(*shape, layout.num_k_blocks), counts.reshape(shape),
                   kept.reshape(batch, heads) / float(layout.total_pairs))


def selection_from_mask(mask: jax.Array, layout: BlockLayout) -> Selection:
  """Compacts a block mask into padded ascending lists, counts and density.

  Args:
    mask: ``[batch, heads, num_q_blocks, num_k_blocks]`` bool; blocks outside
      ``layout.allowed_blocks()`` should be False (they would only cost time).
    layout: block layout.
  """
  batch, heads = mask.shape[:2]
  flat = mask.reshape(batch * heads, *mask.shape[2:])
  return _per_head(lambda head: flat[head], batch * heads, layout, batch, heads)


def build_selection(stripes: jax.Array, layout: BlockLayout) -> Selection:
  """Per-query-block lists from stripes, the window and the causal structure.

  Args:
    stripes: ``[batch, heads, num_k_blocks]`` bool, selected key blocks.
    layout: block layout.

  Returns:
    The :class:`Selection` of the stripes intersected with the attendable blocks,
    plus the window blocks (which include the diagonal).
  """
  batch, heads = stripes.shape[:2]
  flat = stripes.reshape(batch * heads, layout.num_k_blocks)

  def head_mask(head):
    # The [nq, nk] block geometry is rebuilt from iotas per head (fused, never stored).
    return (flat[head][None, :] & layout.allowed_blocks(jnp)) | layout.window_blocks(jnp)

  return _per_head(head_mask, batch * heads, layout, batch, heads)


def full_selection(batch: int, heads: int, layout: BlockLayout) -> Selection:
  """The dense selection: every attendable block for every head (alpha = 1)."""
  return build_selection(
      jnp.ones((batch, heads, layout.num_k_blocks), bool), layout)


def select_blocks(
    q: jax.Array,
    k: jax.Array,
    layout: BlockLayout,
    *,
    alpha: float,
    row_ratio: float,
    scale: float,
    chunk_elems: int = DEFAULT_STAGE1_CHUNK_ELEMS,
) -> Selection:
  """Stages 1 and 2 on unpadded inputs; ``alpha >= 1`` returns the dense selection.

  Args:
    q: ``[batch, seq_len, heads, head_dim]``.
    k: ``[batch, seq_len, kv_heads, head_dim]``.
    layout: block layout for ``seq_len``.
    alpha: retained-mass target in ``[0, 1]``.
    row_ratio: fraction of query rows sampled in stage 1, in ``(0, 1]``.
    scale: softmax scale.
    chunk_elems: stage 1 memory bound, see :func:`stage1_block_scores`.
  """
  batch, _, heads, _ = q.shape
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if alpha >= 1.0:
    return full_selection(batch, heads, layout)
  rows = sampled_rows(layout.seq_len, row_ratio)
  scores, window_mass = stage1_block_scores(q, k, layout, rows, scale, chunk_elems)
  return build_selection(stage2_select_stripes(scores, window_mass, alpha), layout)
