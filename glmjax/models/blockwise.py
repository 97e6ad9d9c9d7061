"""Flash attention in XLA loops: causal, packed, grouped-query, with a query offset.

The portable flash kernel (the "blockwise" backend on CPU, the per-shard kernel of context
parallelism and of chunked prefill). Queries are cut into blocks of ``block_q`` and walked by a
``scan``; for each query block a ``fori_loop`` walks key blocks of ``block_k`` from the first
up to the last one the causal rule lets any of its queries see (a bound computed at run time
from the query offset, so a device holding a late chunk of the sequence does more blocks and
one holding an early chunk fewer, and nobody computes blocks above the diagonal). The loops
keep the program the same size at any sequence length: compile time does not grow with it.

Masking (as ``glmjax.models.attention``): query i of a row may attend to key j when
``j <= q_offset + i`` and ``q_segment_ids[i] == kv_segment_ids[j] != 0``.

Memory: one [batch, kv_heads, groups, block_q, block_k] fp32 tile of logits at a time; the
backward pass keeps only the output and the per-query log-sum-exp and recomputes the tiles.

XLA's cost analysis counts a loop body once: the FLOPs it reports for this kernel are those
of one tile, not of the attention (``glmjax.flops`` gives the absolute count).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for masked logits (no inf - inf anywhere).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

DEFAULT_BLOCK = 512


def _block(requested: int, length: int) -> int:
    """The block size used for ``length`` tokens: ``requested``, or ``length`` when shorter."""
    if requested < 1:
        raise ValueError(f"block sizes must be positive, got {requested}")
    return min(requested, length)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    q_offset: jax.Array | int = 0,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    kv_heads_major: bool = False,
) -> jax.Array:
    """Causal flash attention over key blocks at or below the diagonal.

    Args:
      q: [batch, seq_q, heads, head_dim], query i of row b at position ``q_offset[b] + i``.
      k, v: [batch, seq_kv, kv_heads, head_dim], key j at position j (``heads % kv_heads == 0``;
        K/V are not repeated over the query groups); [batch, kv_heads, seq_kv, head_dim] with
        ``kv_heads_major`` (a KV cache's layout).
      q_segment_ids: int [batch, seq_q]; kv_segment_ids: int [batch, seq_kv] (0 = padding or an
        empty slot: nobody attends to it).
      q_offset: int32 scalar or [batch] (may be traced): keys before each row's first query,
        e.g. the chunk start of a context-parallel shard or the cached length in chunked
        prefill. Key blocks are walked up to the largest row's causal bound.
      block_q, block_k: tokens per query / key block (shorter inputs use their own length;
        queries are padded to a multiple of ``block_q``; keys are read in place, the last
        block overlapping the one before it with those keys masked).
      kv_heads_major: k and v come heads-major (no transposed copy of a cache is made).

    Returns:
      [batch, seq_q, heads, head_dim] in q's dtype. Queries that see no key (padding) get 0.
    """
    batch, seq_q, heads, head_dim = q.shape
    if kv_heads_major:
        kv_heads, seq_kv = k.shape[1], k.shape[2]
    else:
        seq_kv, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    block_q, block_k = _block(block_q, seq_q), _block(block_k, seq_kv)
    groups = heads // kv_heads
    scaled = (q * (1.0 / math.sqrt(head_dim))).astype(q.dtype)
    qh = scaled.reshape(batch, seq_q, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    qh = _pad_to(qh, 3, block_q)
    if not kv_heads_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    q_seg = _pad_to(q_segment_ids.astype(jnp.int32), 1, block_q)
    kv_seg = kv_segment_ids.astype(jnp.int32)
    offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
    out = _flash(qh, k, v, q_seg, kv_seg, offset, block_q, block_k)
    out = out[:, :, :, :seq_q]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq_q, heads, head_dim).astype(q.dtype)


def _key_blocks_needed(offset: jax.Array, q_block: jax.Array, block_q: int, block_k: int, num_k: int):
    """Key blocks [0, n) that queries of block ``q_block`` of any row may see (causal bound for
    the largest of the rows' offsets [b]), n in [0, num_k]."""
    last_position = jnp.max(offset) + (q_block + 1) * block_q - 1
    return jnp.clip(last_position // block_k + 1, 0, num_k)


def _key_block_start(j: jax.Array, block_k: int, seq_kv: int) -> jax.Array:
    """First key of block j. The last block of a length that is not a multiple of ``block_k``
    starts early enough to end at ``seq_kv`` (its keys before ``j * block_k`` are masked), so
    keys are never padded: a KV cache is read in place, not copied."""
    return jnp.minimum(j * block_k, seq_kv - block_k)


def _tile(q_block, k, q_seg, kv_seg, offset, i, j, block_q, block_k):
    """Masked fp32 logits [b, kh, g, bq, bk] of query block i against key block j and the mask."""
    start = _key_block_start(j, block_k, k.shape[2])
    k_block = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=2)
    kv_seg_block = jax.lax.dynamic_slice_in_dim(kv_seg, start, block_k, axis=1)
    logits = jnp.einsum("bkgth,bksh->bkgts", q_block, k_block, preferred_element_type=jnp.float32)
    q_positions = offset[:, None] + i * block_q + jnp.arange(block_q)[None]  # [b, bq]
    k_positions = start + jnp.arange(block_k)
    mask = ((k_positions[None, None, :] <= q_positions[:, :, None])
            & (k_positions >= j * block_k)[None, None, :]
            & (q_seg[:, :, None] == kv_seg_block[:, None, :]) & (kv_seg_block != 0)[:, None, :])
    mask = mask[:, None, None]
    return jnp.where(mask, logits, _MASK_VALUE), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, q_seg, kv_seg, offset, block_q, block_k):
    """Heads-major core: q [b, kh, g, T, h] (pre-scaled), k/v [b, kh, S, h] -> [b, kh, g, T, h];
    T a multiple of ``block_q``, S at least ``block_k``."""
    return _flash_fwd(q, k, v, q_seg, kv_seg, offset, block_q, block_k)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, offset, block_q, block_k):
    num_q, num_k = q.shape[3] // block_q, -(-k.shape[2] // block_k)
    head_dim = v.shape[-1]

    def query_block(_, i):
        q_block = jax.lax.dynamic_slice_in_dim(q, i * block_q, block_q, axis=3)
        q_seg_block = jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)

        def key_block(j, carry):
            max_logit, total, acc = carry
            logits, mask = _tile(q_block, k, q_seg_block, kv_seg, offset, i, j, block_q, block_k)
            new_max = jnp.maximum(max_logit, logits.max(axis=-1))
            probs = jnp.where(mask, jnp.exp(logits - new_max[..., None]), 0.0)
            correction = jnp.exp(max_logit - new_max)
            v_block = jax.lax.dynamic_slice_in_dim(v, _key_block_start(j, block_k, v.shape[2]), block_k, axis=2)
            update = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v_block,
                                preferred_element_type=jnp.float32)
            return new_max, correction * total + probs.sum(-1), correction[..., None] * acc + update

        stats_shape = q_block.shape[:-1]
        init = (jnp.full(stats_shape, _MASK_VALUE, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros((*stats_shape, head_dim), jnp.float32))
        hi = _key_blocks_needed(offset, i, block_q, block_k, num_k)
        max_logit, total, acc = jax.lax.fori_loop(0, hi, key_block, init)
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        # +inf for queries that saw nothing: exp(logit - lse) is then 0 in the backward pass.
        log_sum_exp = jnp.where(seen, max_logit + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)
        return None, (out.astype(q.dtype), log_sum_exp)

    _, (outs, log_sum_exps) = jax.lax.scan(query_block, None, jnp.arange(num_q))
    out = _merge_blocks(outs)
    log_sum_exp = _merge_blocks(log_sum_exps)
    return out, (q, k, v, q_seg, kv_seg, offset, out, log_sum_exp)


def _merge_blocks(blocks: jax.Array) -> jax.Array:
    """[num_blocks, b, kh, g, block, ...] -> [b, kh, g, num_blocks * block, ...]."""
    moved = jnp.moveaxis(blocks, 0, 3)
    return moved.reshape(*moved.shape[:3], -1, *moved.shape[5:])


def _flash_bwd(block_q, block_k, residuals, out_grad):
    q, k, v, q_seg, kv_seg, offset, out, log_sum_exp = residuals
    num_q, num_k = q.shape[3] // block_q, -(-k.shape[2] // block_k)
    # softmax backward: d logits = p * (d p - sum_s p d p), and sum_s p d p = <d out, out>.
    delta = jnp.sum(out_grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def query_block(carry, i):
        k_grad, v_grad = carry
        take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * block_q,
                                 slice_size=block_q, axis=3)
        q_block, grad_block = take(q), take(out_grad)
        lse_block, delta_block = take(log_sum_exp), take(delta)
        q_seg_block = jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)

        def key_block(j, carry):
            q_grad, k_grad, v_grad = carry
            logits, mask = _tile(q_block, k, q_seg_block, kv_seg, offset, i, j, block_q, block_k)
            probs = jnp.where(mask, jnp.exp(logits - lse_block[..., None]), 0.0)
            start = _key_block_start(j, block_k, k.shape[2])
            v_block = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=2)
            k_block = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=2)
            v_update = jnp.einsum("bkgts,bkgth->bksh", probs.astype(v.dtype), grad_block,
                                  preferred_element_type=jnp.float32)
            probs_grad = jnp.einsum("bkgth,bksh->bkgts", grad_block, v_block,
                                    preferred_element_type=jnp.float32)
            logits_grad = (probs * (probs_grad - delta_block[..., None])).astype(q.dtype)
            q_grad = q_grad + jnp.einsum("bkgts,bksh->bkgth", logits_grad, k_block,
                                         preferred_element_type=jnp.float32)
            k_update = jnp.einsum("bkgts,bkgth->bksh", logits_grad, q_block,
                                  preferred_element_type=jnp.float32)
            k_grad = _add_block(k_grad, k_update, start)  # masked keys add 0
            v_grad = _add_block(v_grad, v_update, start)
            return q_grad, k_grad, v_grad

        hi = _key_blocks_needed(offset, i, block_q, block_k, num_k)
        init = (jnp.zeros(q_block.shape, jnp.float32), k_grad, v_grad)
        q_grad, k_grad, v_grad = jax.lax.fori_loop(0, hi, key_block, init)
        return (k_grad, v_grad), q_grad.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (k_grad, v_grad), q_grads = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(num_q))
    return (_merge_blocks(q_grads), k_grad.astype(k.dtype), v_grad.astype(v.dtype), None, None, None)


def _add_block(total: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """``total[:, :, start:start + len] += update`` along axis 2."""
    current = jax.lax.dynamic_slice_in_dim(total, start, update.shape[2], axis=2)
    return jax.lax.dynamic_update_slice_in_dim(total, current + update, start, axis=2)


_flash.defvjp(_flash_fwd, _flash_bwd)
