"""Pallas TPU backend: flash-style online softmax over each query block's listed key blocks.

Grid ``(batch, heads, query blocks)``, one step per query block. The block lists and counts
stay in HBM (``pl.ANY``): each step copies its own list row (``num_k_blocks`` int32, rounded
up to 128) and the aligned run of 128 counts holding its count into SMEM scratch, so SMEM
holds one row (32 KiB at 1M tokens with 128-token blocks) whatever the batch, heads or
sequence length; only the first query block's index is scalar-prefetched. K/V stay in HBM
too; the step walks its list with a ``fori_loop`` of exactly ``count`` trips and
double-buffers the listed K/V blocks into VMEM with manual DMAs (block ``t + 1`` is fetched
while block ``t`` is computed). Work and DMA traffic are thus proportional to the selected
blocks: unselected blocks cost neither a grid step nor a copy, and no listed block is ever
dropped (the loop runs to ``count``; there is no cap on the list length). The query blocks
may be a contiguous run of the sequence's (``q_block_start``): the sequence-parallel
wrapper attends only its own query rows. Runs on CPU with ``interpret=True``.
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
# Mosaic DMAs move whole 512-byte runs: 128 int32, the granule of the count and list fetches.
_DMA_INTS = 128


def smem_bytes_per_call(list_len: int) -> int:
  """SMEM bytes one call uses: one list row and one run of counts (int32, padded to 128
  each) plus the scalar-prefetched first query block index."""
  return 4 * (-(-list_len // _DMA_INTS) * _DMA_INTS + _DMA_INTS + 1)


def _kernel(start_ref, blocks_hbm, counts_hbm, q_ref, k_hbm, v_hbm, o_ref, list_ref, count_ref,
            k_buf, v_buf, sems, m_ref, l_ref, acc_ref, *, layout: BlockLayout, scale: float,
            group: int):
  b, h, local_i = (pl.program_id(axis) for axis in range(3))
  bq, bk = layout.block_q, layout.block_k
  # Fetch the aligned run of 128 counts that holds this query block's.
  first = pl.multiple_of((local_i // _DMA_INTS) * _DMA_INTS, _DMA_INTS)
  pltpu.sync_copy(counts_hbm.at[b, h, pl.ds(first, _DMA_INTS)], count_ref)
  pltpu.sync_copy(blocks_hbm.at[b, h, local_i], list_ref)
  count = count_ref[local_i - first]
  i = start_ref[0] + local_i  # the query block's index in the sequence

  def copies(t, slot):
    start = pl.multiple_of(list_ref[t] * bk, bk)
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
    j = list_ref[t]
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

  # Pads are no-ops (no copy) when num_k_blocks and the query blocks are multiples of 128,
  # as at long contexts (e.g. 32K tokens and up with 128-token blocks).
  padded_list = -(-list_len // _DMA_INTS) * _DMA_INTS
  kv_blocks = jnp.pad(selection.kv_blocks.astype(jnp.int32),
                      ((0, 0), (0, 0), (0, 0), (0, padded_list - list_len)))
  counts = jnp.pad(selection.counts.astype(jnp.int32),
                   ((0, 0), (0, 0), (0, -n_blocks % _DMA_INTS)))

  def q_map(b, h, i, start):
    return b, h, i, 0

  kernel = functools.partial(_kernel, layout=layout, scale=scale, group=group)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, heads, n_blocks),
          in_specs=[
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
          ],
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[
          pltpu.SMEM((padded_list,), jnp.int32),
          pltpu.SMEM((_DMA_INTS,), jnp.int32),
          pltpu.VMEM((2, bk, d), k.dtype),
          pltpu.VMEM((2, bk, d), v.dtype),
          pltpu.SemaphoreType.DMA((2, 2)),
          pltpu.VMEM((bq, _LANES), jnp.float32),
          pltpu.VMEM((bq, _LANES), jnp.float32),
          pltpu.VMEM((bq, d), jnp.float32),
          ]),
      out_shape=jax.ShapeDtypeStruct((batch, heads, q_len, d), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=interpret,
  )(jnp.reshape(jnp.asarray(q_block_start, jnp.int32), (1,)),
    kv_blocks, counts, q, k, v)
