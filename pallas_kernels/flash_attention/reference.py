"""Dense jnp reference of causal attention with segment ids (for tests).

Materialises the fp32 ``[batch, heads, seq_q, seq_kv]`` scores: meant for checking the
kernels at small sizes, not for speed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def allowed_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    causal: bool = True,
) -> jax.Array:
  """Bool ``[batch, seq_q, seq_kv]``: True where query i may attend to key j.

  Query i of row b sees key j when ``q_segment_ids[b, i] == kv_segment_ids[b, j] != 0`` and,
  if ``causal``, ``j <= q_offset[b] + i``.

  Args:
    q_segment_ids: int ``[batch, seq_q]``; kv_segment_ids: int ``[batch, seq_kv]`` (0 = padding).
    q_offset: int, or int array ``[]`` or ``[batch]``: position of query 0 among the keys.
    causal: apply the causal rule.
  """
  seq_q, seq_kv = q_segment_ids.shape[1], kv_segment_ids.shape[1]
  allowed = ((q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
             & (kv_segment_ids != 0)[:, None, :])
  if causal:
    offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q_segment_ids.shape[0],))
    q_pos = offset[:, None, None] + jnp.arange(seq_q)[None, :, None]
    allowed = allowed & (jnp.arange(seq_kv)[None, None, :] <= q_pos)
  return allowed


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    causal: bool = True,
    sm_scale: float | None = None,
) -> jax.Array:
  """Softmax attention in fp32 with the mask of :func:`allowed_mask`.

  Args:
    q: ``[batch, seq_q, heads, head_dim]``; k, v: ``[batch, seq_kv, kv_heads, head_dim]`` with
      ``heads % kv_heads == 0`` (query head h reads KV head ``h // (heads // kv_heads)``).
    q_segment_ids, kv_segment_ids, q_offset, causal: see :func:`allowed_mask`.
    sm_scale: logit scale; ``1 / sqrt(head_dim)`` when None.

  Returns:
    ``[batch, seq_q, heads, head_dim]`` in q's dtype; rows that see no key are 0.
  """
  batch, seq_q, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  grouped = q.astype(jnp.float32).reshape(batch, seq_q, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", grouped, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  allowed = allowed_mask(q_segment_ids, kv_segment_ids, q_offset, causal)[:, None, None]
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  # Any per-row shift gives the same softmax: keep it out of the gradient.
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  weights = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)
