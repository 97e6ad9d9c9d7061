"""XLA backend: gathers only the listed key/value blocks (the fast path on CPU).

Work is split into (batch, kv head) x (query head in group, group of query blocks)
items processed sequentially with ``lax.map``. Each item runs a ``while_loop`` whose
trip count is the longest block list in its group of query blocks; step ``t`` gathers
the ``t``-th listed key/value block of every query block in the group and does an
online-softmax (flash-style) update. Compute is thus proportional to the selected
blocks (plus the list-length imbalance inside a group), not to ``seq_len ** 2``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sample_attention.layout import BlockLayout
from pallas_kernels.sample_attention.selection import Selection

# Query rows handled per loop step; larger means fewer, bigger matmuls but more
# padding work when the lists in a group differ in length.
DEFAULT_GROUP_ROWS = 512


def _attend_group(q: jax.Array, blocks: jax.Array, counts: jax.Array, q_block_ids: jax.Array,
                  k_blocks: jax.Array, v_blocks: jax.Array, layout: BlockLayout,
                  scale: float) -> jax.Array:
  """Online softmax of ``g`` query blocks over their listed key blocks.

  Args:
    q: ``[g, block_q, head_dim]`` queries.
    blocks: ``[g, L]`` int32 key block lists; ``counts``: ``[g]`` int32.
    q_block_ids: ``[g]`` int32 query block indices (for the causal mask).
    k_blocks, v_blocks: ``[num_k_blocks, block_k, head_dim]`` of one kv head.

  Returns:
    ``[g, block_q, head_dim]`` float32.
  """
  g, bq, d = q.shape
  bk = layout.block_k
  q = q.astype(jnp.float32) * scale
  q_pos = q_block_ids[:, None] * bq + jnp.arange(bq)  # [g, bq]

  def body(state):
    t, m, l, acc = state
    j = jax.lax.dynamic_index_in_dim(blocks, t, axis=1, keepdims=False)  # [g]
    kt = k_blocks[j].astype(jnp.float32)  # [g, bk, d]
    vt = v_blocks[j].astype(jnp.float32)
    s = jnp.einsum("gqd,gkd->gqk", q, kt)
    k_pos = (j[:, None] * bk + jnp.arange(bk))[:, None, :]  # [g, 1, bk]
    ok = (t < counts)[:, None, None] & (k_pos < layout.seq_len)
    if layout.causal:
      ok = ok & (k_pos <= q_pos[:, :, None])
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    l = l * correction + p.sum(-1)
    acc = acc * correction[..., None] + jnp.einsum("gqk,gkd->gqd", p, vt)
    return t + 1, m_new, l, acc

  trips = counts.max()
  init = (jnp.int32(0), jnp.full((g, bq), -jnp.inf, jnp.float32),
          jnp.zeros((g, bq), jnp.float32), jnp.zeros((g, bq, d), jnp.float32))
  _, _, l, acc = jax.lax.while_loop(lambda s: s[0] < trips, body, init)
  return acc / jnp.where(l > 0, l, 1.0)[..., None]


def xla_sample_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    selection: Selection,
    layout: BlockLayout,
    scale: float,
    group_rows: int = DEFAULT_GROUP_ROWS,
    q_block_start: int | jax.Array = 0,
) -> jax.Array:
  """Block-sparse attention over the listed blocks, gathering only those blocks.

  Args:
    q: ``[batch, heads, n * block_q, head_dim]``: query blocks ``q_block_start ..
      q_block_start + n - 1`` of the padded sequence (all of it by default).
    k, v: ``[batch, kv_heads, padded_len, head_dim]``.
    selection: lists for ``[batch, heads, n]`` (those query blocks).
    layout: block layout of the whole sequence.
    scale: softmax scale.
    group_rows: query rows per loop step (rounded down to whole query blocks).
    q_block_start: index of ``q``'s first query block in the sequence (may be traced).

  Returns:
    ``[batch, heads, n * block_q, head_dim]`` in ``q.dtype``; rows without any
    listed key (padding) are zero.
  """
  batch, heads, s_pad, d = q.shape
  kv_heads = k.shape[1]
  group = heads // kv_heads
  nk, bq = layout.num_k_blocks, layout.block_q
  nq = s_pad // bq
  g = max(1, min(nq, group_rows // bq))
  n_groups = -(-nq // g)
  extra = n_groups * g - nq
  list_len = selection.kv_blocks.shape[-1]

  # Pad the query block axis to a multiple of g with empty lists.
  qb = q.reshape(batch, kv_heads, group, nq, bq, d)
  qb = jnp.pad(qb, ((0, 0),) * 3 + ((0, extra), (0, 0), (0, 0)))
  lists = selection.kv_blocks.reshape(batch, kv_heads, group, nq, list_len)
  lists = jnp.pad(lists, ((0, 0),) * 3 + ((0, extra), (0, 0)))
  counts = selection.counts.reshape(batch, kv_heads, group, nq)
  counts = jnp.pad(counts, ((0, 0),) * 3 + ((0, extra),))
  items = group * n_groups
  qb = qb.reshape(batch * kv_heads, items, g, bq, d)
  lists = lists.reshape(batch * kv_heads, items, g, list_len)
  counts = counts.reshape(batch * kv_heads, items, g)
  q_ids = jnp.tile(jnp.arange(n_groups * g, dtype=jnp.int32).reshape(n_groups, g), (group, 1))
  q_ids = q_ids + jnp.asarray(q_block_start, jnp.int32)
  kb = k.reshape(batch * kv_heads, nk, layout.block_k, d)
  vb = v.reshape(batch * kv_heads, nk, layout.block_k, d)

  def per_kv_head(args):
    q_h, lists_h, counts_h, k_h, v_h = args
    return jax.lax.map(
        lambda it: _attend_group(*it, k_h, v_h, layout, scale),
        (q_h, lists_h, counts_h, q_ids))

  out = jax.lax.map(per_kv_head, (qb, lists, counts, kb, vb))
  out = out.reshape(batch, kv_heads, group, n_groups * g * bq, d)[:, :, :, :s_pad]
  return out.reshape(batch, heads, s_pad, d).astype(q.dtype)
