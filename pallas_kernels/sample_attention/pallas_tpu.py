"""Pallas TPU backend: flash-style online softmax over each query block's listed key blocks.

Grid ``(batch, heads, query blocks)``, one step per query block. The step's list row
(``2 + list_len`` int32: the count, the query block's index in the sequence, then the key
block indices) is a blocked SMEM input, pipelined like any other block, so SMEM holds two
rows (``2 * 4 * (2 + list_len)`` bytes: 64 KiB at 1M tokens with 128-token blocks) whatever
the batch, heads or sequence length;
nothing is scalar-prefetched. K/V stay in HBM (``pl.ANY``); the step walks its list with a
``fori_loop`` of exactly ``count`` trips and double-buffers the listed K/V blocks into
VMEM with manual DMAs (block ``t + 1`` is fetched while block ``t`` is computed). Work and
DMA traffic are thus proportional to the selected blocks: unselected blocks cost neither a
grid step nor a copy, and no selected block is ever dropped (the loop runs to ``count``).
The query blocks may be a contiguous run of the sequence's (``q_block_start``): the
sequence-parallel wrapper attends only its own query rows.
Runs on CPU with ``interpret=True``.
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


def smem_bytes_per_call(list_len: int) -> int:
  """SMEM bytes the kernel's list rows take: two pipelined rows of ``2 + list_len`` int32."""
  return 2 * 4 * (2 + list_len)


def _kernel(row_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, m_ref, l_ref, acc_ref,
            *, layout: BlockLayout, scale: float, group: int):
  b, h = pl.program_id(0), pl.program_id(1)
  bq, bk = layout.block_q, layout.block_k
  count, i = row_ref[0, 0], row_ref[0, 1]  # i: the query block's index in the sequence

  def copies(t, slot):
    start = pl.multiple_of(row_ref[0, 2 + t] * bk, bk)
    return (pltpu.make_async_copy(k_hbm.at[b, h // group, pl.ds(start, bk)], k_buf.at[slot],
                                  sems.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[b, h // group, pl.ds(start, bk)], v_buf.at[slot],
                                  sems.at[1, slot]))

  m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(count > 0)
  def _first_fetch():
    for copy in copies(0, 0):
      copy.start()

  def step(t, carry):
    slot = t % 2

    @pl.when(t + 1 < count)
    def _prefetch_next():
      for copy in copies(t + 1, 1 - slot):
        copy.start()

    for copy in copies(t, slot):
      copy.wait()
    j = row_ref[0, 2 + t]
    s = jax.lax.dot_general(q_ref[...], k_buf[slot], (((1,), (1,)), ((), ())),
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
    pv = jax.lax.dot_general(p.astype(v_buf.dtype), v_buf[slot], (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    acc_ref[...] = correction * acc_ref[...] + pv
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)
    return carry

  jax.lax.fori_loop(0, count, step, 0)
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
    q_block_start: int | jax.Array = 0,
) -> jax.Array:
  """Block-sparse attention over the listed blocks with a Pallas TPU kernel.

  Args:
    q: ``[batch, heads, n * block_q, head_dim]``: query blocks ``q_block_start ..
      q_block_start + n - 1`` of the padded sequence (all of it by default).
    k, v: ``[batch, kv_heads, padded_len, head_dim]``.
    selection: lists for ``[batch, heads, n]`` (those query blocks); every one of the
      first ``counts`` entries of a list is attended.
    layout: block layout of the whole sequence.
    scale: softmax scale.
    interpret: run the kernel in the Pallas interpreter (CPU testing).
    q_block_start: index of ``q``'s first query block in the sequence (int32, may be traced).

  Returns:
    ``[batch, heads, n * block_q, head_dim]`` in ``q.dtype``; rows without any listed
    key are zero.
  """
  batch, heads, q_len, d = q.shape
  group = heads // k.shape[1]
  bq, bk = layout.block_q, layout.block_k
  n_blocks = q_len // bq
  list_len = selection.kv_blocks.shape[-1]
  if selection.counts.shape != (batch, heads, n_blocks) or q_len % bq:
    raise ValueError(f"selection counts {selection.counts.shape} do not match q {q.shape} "
                     f"in blocks of {bq}")
  q_index = jnp.broadcast_to(
      jnp.asarray(q_block_start, jnp.int32) + jnp.arange(n_blocks, dtype=jnp.int32),
      (batch, heads, n_blocks))
  rows = jnp.concatenate([selection.counts[..., None].astype(jnp.int32), q_index[..., None],
                          selection.kv_blocks.astype(jnp.int32)], axis=-1)
  # [rows, 1, 2 + list_len]: a block's last two dims equal the array's, as Mosaic requires.
  rows = rows.reshape(batch * heads * n_blocks, 1, 2 + list_len)

  def row_map(b, h, i):
    return (b * heads + h) * n_blocks + i, 0, 0

  def q_map(b, h, i):
    return b, h, i, 0

  kernel = functools.partial(_kernel, layout=layout, scale=scale, group=group)
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, n_blocks),
      in_specs=[
          pl.BlockSpec((None, 1, 2 + list_len), row_map, memory_space=pltpu.SMEM),
          pl.BlockSpec((None, None, bq, d), q_map),
          pl.BlockSpec(memory_space=pl.ANY),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((None, None, bq, d), q_map),
      out_shape=jax.ShapeDtypeStruct((batch, heads, q_len, d), q.dtype),
      scratch_shapes=[
          pltpu.VMEM((2, bk, d), k.dtype),
          pltpu.VMEM((2, bk, d), v.dtype),
          pltpu.SemaphoreType.DMA((2, 2)),
          pltpu.VMEM((bq, _LANES), jnp.float32),
          pltpu.VMEM((bq, _LANES), jnp.float32),
          pltpu.VMEM((bq, d), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
  )(rows, q, k, v)
