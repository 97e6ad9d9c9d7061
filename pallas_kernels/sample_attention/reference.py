"""Dense masked reference: softmax attention restricted to a block selection.

Materialises the ``[seq, seq]`` scores of one head at a time; meant for tests and
for moderate benchmark sizes, not for speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sample_attention.layout import BlockLayout
from pallas_kernels.sample_attention.selection import Selection


def block_mask(selection: Selection, num_k_blocks: int) -> jax.Array:
  """Dense block mask ``[batch, heads, num_q_blocks, num_k_blocks]`` bool from lists."""
  entries = jnp.arange(selection.kv_blocks.shape[-1])
  listed = entries < selection.counts[..., None]  # [b, h, nq, L]
  hits = jax.nn.one_hot(selection.kv_blocks, num_k_blocks, dtype=jnp.int32)
  return (hits * listed[..., None]).sum(-2) > 0


def token_mask(blocks: jax.Array, layout: BlockLayout) -> jax.Array:
  """Token mask ``[..., seq_len, seq_len]`` bool from a block mask ``[..., nq, nk]``.

  Keeps listed blocks intersected with the causal mask (if causal), unpadded tokens only.
  """
  tokens = jnp.repeat(jnp.repeat(blocks, layout.block_q, axis=-2), layout.block_k, axis=-1)
  tokens = tokens[..., :layout.seq_len, :layout.seq_len]
  if layout.causal:
    tokens = tokens & jnp.tril(jnp.ones((layout.seq_len, layout.seq_len), bool))
  return tokens


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    selection: Selection,
    layout: BlockLayout,
    scale: float,
) -> jax.Array:
  """Attention over the selected blocks, computed densely in fp32.

  Args:
    q: ``[batch, seq_len, heads, head_dim]``.
    k, v: ``[batch, seq_len, kv_heads, head_dim]``; query head ``h`` uses kv head
      ``h // (heads // kv_heads)``.
    selection: block lists in ``layout``'s padded block coordinates.
    layout: block layout for ``seq_len``.
    scale: softmax scale.

  Returns:
    ``[batch, seq_len, heads, head_dim]`` in ``q.dtype``; rows with no attendable
    key are zero.
  """
  heads, kv_heads = q.shape[2], k.shape[2]
  group = heads // kv_heads
  blocks = block_mask(selection, layout.num_k_blocks)

  def one_head(h):
    qh = q[:, :, h].astype(jnp.float32)
    kh = k[:, :, h // group].astype(jnp.float32)
    vh = v[:, :, h // group].astype(jnp.float32)
    s = jnp.einsum("bqd,bkd->bqk", qh, kh) * scale
    m = token_mask(blocks[:, h], layout)
    s = jnp.where(m, s, -jnp.inf)
    row_max = jnp.where(m.any(-1, keepdims=True), s.max(-1, keepdims=True), 0.0)
    p = jnp.where(m, jnp.exp(s - row_max), 0.0)
    denom = jnp.maximum(p.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return jnp.einsum("bqk,bkd->bqd", p / denom, vh)

  out = jax.lax.map(one_head, jnp.arange(heads))  # [heads, batch, seq, dim]
  return out.transpose(1, 2, 0, 3).astype(q.dtype)
