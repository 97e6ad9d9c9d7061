"""Pallas kernels (Triton lowering on GPU) of flash attention with segment ids.

Three ``pallas_call``s: the forward pass (output and log-sum-exp), the query gradient, and the
key/value gradients. Every program keeps one tile in registers and streams the other operand
in blocks with an fp32 online softmax, so no ``[seq_q, seq_kv]`` array exists anywhere.

Layouts (already padded by :mod:`pallas_kernels.flash_attention.api`):
  q, o, do, dq: ``[batch, seq_q, heads, head_dim]``
  k, v, dk, dv: ``[batch, seq_kv, kv_heads, head_dim]``; query head h reads KV head
    ``h // groups`` with ``groups = heads // kv_heads`` (K/V are never repeated)
  q_segment_ids ``[batch, seq_q]``, kv_segment_ids ``[batch, seq_kv]``: int32, 0 = padding
  offsets ``[batch]`` int32: position of query 0 among the keys (causal rule
    ``key <= offset + query``)
  key_ranges ``[batch, seq_q // block_q, 2]``, query_ranges ``[batch, seq_kv // block_k, 2]``
    int32: ``[start, end)`` of the blocks of the other side that may share a segment (see
    :mod:`pallas_kernels.flash_attention.block_ranges`)
  lse, delta: ``[batch, heads, seq_q]`` float32
``seq_q`` is a multiple of ``block_q``, ``seq_kv`` of ``block_k``; ``head_dim`` and both block
sizes are powers of two >= 16 (Triton's ``tl.dot`` and power-of-two tensor shapes).

Skipping: each loop runs over the intersection of the causal range (the diagonal, computed
from the offset at run time) and the segment range (the blocks of the same packed documents),
so tiles above the diagonal or across documents are never loaded. Tiles inside both ranges are
computed in full and masked elementwise.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite "minus infinity" for masked logits: the running max of a row with no visible key yet
# stays finite, so ``exp(m_old - m_new)`` never sees ``inf - inf``.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static settings shared by the three kernels.

  Attributes:
    sm_scale: logit scale (``1 / sqrt(head_dim)`` of the unpadded head dim, usually).
    causal: apply ``key <= offset + query``.
    block_q, block_k: tile sizes along queries and keys (powers of two >= 16).
    num_warps, num_stages: Triton launch settings.
    interpret: run in the Pallas interpreter (any platform) instead of compiling for GPU.
    precision: of every matrix product; ``lax.Precision.HIGHEST`` makes fp32 products IEEE
      fp32 on GPU, None leaves Triton's default (TF32 for fp32 inputs; bf16/fp16 inputs are
      multiplied as they are, accumulating in fp32 either way).
  """
  sm_scale: float
  causal: bool
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  interpret: bool
  precision: lax.Precision | None = None


def _allowed(q_seg: jax.Array, kv_seg: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
             causal: bool) -> jax.Array:
  """Bool tile ``[len(q_seg), len(kv_seg)]``: same nonzero segment and, if causal, k <= q."""
  allowed = (q_seg[:, None] == kv_seg[None, :]) & (kv_seg != 0)[None, :]
  if causal:
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
  return allowed


def _key_blocks_end(offset: jax.Array, q_start: jax.Array, cfg: KernelConfig,
                    num_k_blocks: int) -> jax.Array | int:
  """Number of key blocks the query block at ``q_start`` can see (all of them if not causal)."""
  if not cfg.causal:
    return num_k_blocks
  visible = jnp.maximum(offset + q_start + cfg.block_q, 0)  # keys [0, visible) pass the rule
  return jnp.minimum(lax.div(visible + cfg.block_k - 1, cfg.block_k), num_k_blocks)


def _query_blocks_start(offset: jax.Array, k_start: jax.Array, cfg: KernelConfig,
                        num_q_blocks: int) -> jax.Array | int:
  """First query block that can see the key block at ``k_start`` (0 if not causal)."""
  if not cfg.causal:
    return 0
  first_query = jnp.maximum(k_start - offset, 0)
  return jnp.minimum(lax.div(first_query, cfg.block_q), num_q_blocks)


def _dot(cfg: KernelConfig, a: jax.Array, b: jax.Array, trans_a: bool = False,
         trans_b: bool = False) -> jax.Array:
  """fp32 matrix product of 2-D tiles at the configured precision."""
  return pl.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=cfg.precision)


def _iota(size: int) -> jax.Array:
  return lax.broadcasted_iota(jnp.int32, (size,), 0)


def _forward_kernel(offset_ref, range_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref,
                    lse_ref, *, cfg: KernelConfig, num_q_blocks: int, num_k_blocks: int):
  """One (query block, batch row, head): online softmax over the visible key blocks.

  Refs: q/o ``[block_q, d]``, k/v ``[seq_kv, d]``, q_seg ``[block_q]``, kv_seg ``[seq_kv]``,
  lse ``[block_q]``, offset ``[1]``, range ``[2]``.
  """
  q_start = (num_q_blocks - 1 - pl.program_id(0)) * cfg.block_q  # longest rows first
  offset = offset_ref[0]
  q_pos = offset + q_start + _iota(cfg.block_q)
  q = q_ref[...]
  q_seg = q_seg_ref[...]

  def step(j, carry):
    acc, row_max, row_sum = carry
    keys = pl.ds(j * cfg.block_k, cfg.block_k)
    allowed = _allowed(q_seg, kv_seg_ref[keys], q_pos, j * cfg.block_k + _iota(cfg.block_k),
                       cfg.causal)
    logits = _dot(cfg, q, k_ref[keys, :], trans_b=True) * cfg.sm_scale  # [bq, bk] fp32
    logits = jnp.where(allowed, logits, _MASKED)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    probs = jnp.where(allowed, jnp.exp(logits - new_max[:, None]), 0.0)
    rescale = jnp.exp(row_max - new_max)
    v = v_ref[keys, :]
    acc = acc * rescale[:, None] + _dot(cfg, probs.astype(v.dtype), v)
    return acc, new_max, row_sum * rescale + jnp.sum(probs, axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((cfg.block_q,), _MASKED, jnp.float32),
          jnp.zeros((cfg.block_q,), jnp.float32))
  end = jnp.minimum(range_ref[1], _key_blocks_end(offset, q_start, cfg, num_k_blocks))
  acc, row_max, row_sum = lax.fori_loop(range_ref[0], end, step, init)
  seen = row_sum > 0
  o_ref[...] = (acc / jnp.where(seen, row_sum, 1.0)[:, None]).astype(o_ref.dtype)
  # Rows with no visible key store +inf: their recomputed probabilities exp(s - lse) are 0.
  lse_ref[...] = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), jnp.inf)


def _dq_kernel(offset_ref, range_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, cfg: KernelConfig, num_q_blocks: int, num_k_blocks: int):
  """One (query block, batch row, head): dq = scale * sum_j dS_j K_j over visible key blocks.

  Refs as in the forward kernel, plus do/dq ``[block_q, d]`` and lse/delta ``[block_q]``.
  """
  q_start = (num_q_blocks - 1 - pl.program_id(0)) * cfg.block_q
  offset = offset_ref[0]
  q_pos = offset + q_start + _iota(cfg.block_q)
  q, do = q_ref[...], do_ref[...]
  q_seg, lse, delta = q_seg_ref[...], lse_ref[...], delta_ref[...]

  def step(j, dq):
    keys = pl.ds(j * cfg.block_k, cfg.block_k)
    allowed = _allowed(q_seg, kv_seg_ref[keys], q_pos, j * cfg.block_k + _iota(cfg.block_k),
                       cfg.causal)
    k, v = k_ref[keys, :], v_ref[keys, :]
    logits = _dot(cfg, q, k, trans_b=True) * cfg.sm_scale
    probs = jnp.where(allowed, jnp.exp(logits - lse[:, None]), 0.0)
    probs_grad = _dot(cfg, do, v, trans_b=True)
    logits_grad = probs * (probs_grad - delta[:, None])
    return dq + _dot(cfg, logits_grad.astype(k.dtype), k)

  end = jnp.minimum(range_ref[1], _key_blocks_end(offset, q_start, cfg, num_k_blocks))
  dq = lax.fori_loop(range_ref[0], end, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(offset_ref, range_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: KernelConfig, groups: int,
                 num_q_blocks: int):
  """One (key block, batch row, KV head): dk, dv summed over the visible query blocks of all
  ``groups`` query heads that read this KV head.

  Refs: q/do ``[seq_q, groups, d]``, k/v/dk/dv ``[block_k, d]``, q_seg ``[seq_q]``, kv_seg
  ``[block_k]``, lse/delta ``[groups, seq_q]``, offset ``[1]``, range ``[2]``.
  """
  k_start = pl.program_id(0) * cfg.block_k
  offset = offset_ref[0]
  k_pos = k_start + _iota(cfg.block_k)
  k, v, kv_seg = k_ref[...], v_ref[...], kv_seg_ref[...]

  def query_block(i, carry):
    rows = pl.ds(i * cfg.block_q, cfg.block_q)
    allowed = _allowed(q_seg_ref[rows], kv_seg, offset + i * cfg.block_q + _iota(cfg.block_q),
                       k_pos, cfg.causal)

    def head(g, carry):
      dk, dv = carry
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      lse, delta = lse_ref[g, rows], delta_ref[g, rows]
      logits = _dot(cfg, q, k, trans_b=True) * cfg.sm_scale
      probs = jnp.where(allowed, jnp.exp(logits - lse[:, None]), 0.0)
      dv = dv + _dot(cfg, probs.astype(do.dtype), do, trans_a=True)
      probs_grad = _dot(cfg, do, v, trans_b=True)
      logits_grad = probs * (probs_grad - delta[:, None])
      dk = dk + _dot(cfg, logits_grad.astype(q.dtype), q, trans_a=True)
      return dk, dv

    return lax.fori_loop(0, groups, head, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  start = jnp.maximum(range_ref[0], _query_blocks_start(offset, k_start, cfg, num_q_blocks))
  dk, dv = lax.fori_loop(start, range_ref[1], query_block, (zeros, zeros))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(cfg: KernelConfig) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
            kv_segment_ids: jax.Array, offsets: jax.Array, key_ranges: jax.Array,
            cfg: KernelConfig) -> tuple[jax.Array, jax.Array]:
  """Output ``[batch, seq_q, heads, d]`` (q's dtype) and log-sum-exp ``[batch, heads, seq_q]``
  (fp32, natural log, +inf for rows with no visible key). Layouts: see the module docstring."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  nq, nk = seq_q // cfg.block_q, seq_kv // cfg.block_k
  q_tile = pl.BlockSpec((None, cfg.block_q, None, head_dim), lambda i, b, h: (b, nq - 1 - i, h, 0))
  kv_all = pl.BlockSpec((None, seq_kv, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
  kernel = functools.partial(_forward_kernel, cfg=cfg, num_q_blocks=nq, num_k_blocks=nk)
  return pl.pallas_call(
      kernel,
      grid=(nq, batch, heads),
      in_specs=[
          pl.BlockSpec((1,), lambda i, b, h: (b,)),
          pl.BlockSpec((None, None, 2), lambda i, b, h: (b, nq - 1 - i, 0)),
          q_tile, kv_all, kv_all,
          pl.BlockSpec((None, cfg.block_q), lambda i, b, h: (b, nq - 1 - i)),
          pl.BlockSpec((None, seq_kv), lambda i, b, h: (b, 0)),
      ],
      out_specs=[q_tile, pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, nq - 1 - i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="flash_attention_forward",
  )(offsets, key_ranges, q, k, v, q_segment_ids, kv_segment_ids)


def query_grad(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
               kv_segment_ids: jax.Array, offsets: jax.Array, key_ranges: jax.Array,
               out_grad: jax.Array,
               lse: jax.Array, delta: jax.Array, cfg: KernelConfig) -> jax.Array:
  """dq ``[batch, seq_q, heads, d]`` in q's dtype; ``delta = sum(out * out_grad, -1)`` as
  ``[batch, heads, seq_q]`` fp32."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  nq, nk = seq_q // cfg.block_q, seq_kv // cfg.block_k
  q_tile = pl.BlockSpec((None, cfg.block_q, None, head_dim), lambda i, b, h: (b, nq - 1 - i, h, 0))
  kv_all = pl.BlockSpec((None, seq_kv, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0))
  row_tile = pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, nq - 1 - i))
  kernel = functools.partial(_dq_kernel, cfg=cfg, num_q_blocks=nq, num_k_blocks=nk)
  return pl.pallas_call(
      kernel,
      grid=(nq, batch, heads),
      in_specs=[
          pl.BlockSpec((1,), lambda i, b, h: (b,)),
          pl.BlockSpec((None, None, 2), lambda i, b, h: (b, nq - 1 - i, 0)),
          q_tile, kv_all, kv_all,
          pl.BlockSpec((None, cfg.block_q), lambda i, b, h: (b, nq - 1 - i)),
          pl.BlockSpec((None, seq_kv), lambda i, b, h: (b, 0)),
          q_tile, row_tile, row_tile,
      ],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(offsets, key_ranges, q, k, v, q_segment_ids, kv_segment_ids, out_grad, lse, delta)


def key_value_grads(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, offsets: jax.Array, query_ranges: jax.Array,
                    out_grad: jax.Array,
                    lse: jax.Array, delta: jax.Array,
                    cfg: KernelConfig) -> tuple[jax.Array, jax.Array]:
  """dk, dv ``[batch, seq_kv, kv_heads, d]`` in k's and v's dtypes, each KV head's gradient
  summed over its ``heads // kv_heads`` query heads inside one program (no atomics)."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  nq, nk = seq_q // cfg.block_q, seq_kv // cfg.block_k
  q_group = pl.BlockSpec((None, seq_q, groups, head_dim), lambda j, b, h: (b, 0, h, 0))
  kv_tile = pl.BlockSpec((None, cfg.block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  row_group = pl.BlockSpec((None, groups, seq_q), lambda j, b, h: (b, h, 0))
  kernel = functools.partial(_dkdv_kernel, cfg=cfg, groups=groups, num_q_blocks=nq)
  return pl.pallas_call(
      kernel,
      grid=(nk, batch, kv_heads),
      in_specs=[
          pl.BlockSpec((1,), lambda j, b, h: (b,)),
          pl.BlockSpec((None, None, 2), lambda j, b, h: (b, j, 0)),
          q_group, kv_tile, kv_tile,
          pl.BlockSpec((None, seq_q), lambda j, b, h: (b, 0)),
          pl.BlockSpec((None, cfg.block_k), lambda j, b, h: (b, j)),
          q_group, row_group, row_group,
      ],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )(offsets, query_ranges, q, k, v, q_segment_ids, kv_segment_ids, out_grad, lse, delta)
