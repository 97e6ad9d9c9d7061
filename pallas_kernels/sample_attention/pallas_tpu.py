"""Pallas TPU backend: flash-style online softmax over the listed key blocks.

Grid ``(batch, heads, num_q_blocks, list_len)``; the last axis walks one query
block's key block list. The lists and counts are scalar-prefetched into SMEM
(``PrefetchScalarGridSpec``) and drive the key/value ``index_map``, so only listed
blocks are DMA'd: padding entries repeat the last listed block, whose copy the
pipeline skips, and their compute is skipped with ``pl.when``. Runs on CPU with
``interpret=True``.

Limits: the flattened lists (``batch * heads * num_q_blocks * num_k_blocks`` int32)
live in SMEM, so very long sequences with small blocks need the caller to split
the batch/heads into several calls.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sample_attention.layout import BlockLayout
from pallas_kernels.sample_attention.selection import Selection

_LANES = 128  # m/l statistics are kept lane-replicated, the TPU-friendly shape
_MASKED = -1e30  # finite "minus infinity": exp(_MASKED - x) == 0, no NaN from inf - inf


def _kernel(blocks_ref, counts_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref,
            *, layout: BlockLayout, scale: float, heads: int, list_len: int):
  b, h, i, t = (pl.program_id(axis) for axis in range(4))
  row = (b * heads + h) * layout.num_q_blocks + i
  bq, bk = layout.block_q, layout.block_k

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(t < counts_ref[row])
  def _step():
    j = blocks_ref[row * list_len + t]
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [bq, bk]
    q_pos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    ok = k_pos < layout.seq_len
    if layout.causal:
      ok = ok & (k_pos <= q_pos)
    s = jnp.where(ok, s, _MASKED)
    m_prev = m_ref[:, :1]
    m_new = jnp.maximum(m_prev, s.max(-1, keepdims=True))
    p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
    correction = jnp.exp(m_prev - m_new)
    l_new = correction * l_ref[:, :1] + p.sum(-1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_ref[...] = correction * acc_ref[...] + pv
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)

  @pl.when(t == list_len - 1)
  def _finish():
    l = l_ref[:, :1]
    o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def pallas_sample_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    selection: Selection,
    layout: BlockLayout,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
  """Block-sparse attention over the listed blocks with a Pallas TPU kernel.

  Args:
    q: ``[batch, heads, padded_len, head_dim]``.
    k, v: ``[batch, kv_heads, padded_len, head_dim]``.
    selection: lists for ``[batch, heads, num_q_blocks]``.
    layout: block layout.
    scale: softmax scale.
    interpret: run the kernel in the Pallas interpreter (CPU testing).

  Returns:
    ``[batch, heads, padded_len, head_dim]`` in ``q.dtype``.
  """
  batch, heads, s_pad, d = q.shape
  group = heads // k.shape[1]
  bq, bk = layout.block_q, layout.block_k
  list_len = selection.kv_blocks.shape[-1]

  def q_map(b, h, i, t, blocks, counts):
    return b, h, i, 0

  def kv_map(b, h, i, t, blocks, counts):
    row = (b * heads + h) * layout.num_q_blocks + i
    return b, h // group, blocks[row * list_len + t], 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, heads, layout.num_q_blocks, list_len),
      in_specs=[
          pl.BlockSpec((None, None, bq, d), q_map),
          pl.BlockSpec((None, None, bk, d), kv_map),
          pl.BlockSpec((None, None, bk, d), kv_map),
      ],
      out_specs=pl.BlockSpec((None, None, bq, d), q_map),
      scratch_shapes=[
          pltpu.VMEM((bq, _LANES), jnp.float32),
          pltpu.VMEM((bq, _LANES), jnp.float32),
          pltpu.VMEM((bq, d), jnp.float32),
      ],
  )
  kernel = functools.partial(
      _kernel, layout=layout, scale=scale, heads=heads, list_len=list_len)
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((batch, heads, s_pad, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(selection.kv_blocks.reshape(-1), selection.counts.reshape(-1), q, k, v)
