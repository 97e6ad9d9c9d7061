"""Attention backends behind one switch.

All take q [batch, seq_q, heads, head_dim] and k, v [batch, seq_kv, kv_heads, head_dim]
(grouped-query attention without repeating K/V) and return [batch, seq_q, heads, head_dim].

Masking: query i of row b may attend to key j when ``j <= q_offsets[b] + i`` (causal; the
offset is the number of cached tokens before the queries, 0 for a full sequence) and
``q_segment_ids[b, i] == kv_segment_ids[b, j] != 0`` (packed documents never see each other;
segment 0 marks padding and empty cache slots).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from glmjax import sharding
from glmjax.hardware import current_platform

# Finite "minus infinity": fully masked rows (padding queries) stay finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention_mask(
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offsets: jax.Array | None
) -> jax.Array:
    """Boolean mask [batch, 1, seq_q, seq_kv]; True where attention is allowed."""
    seq_q, seq_kv = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_index = jnp.arange(seq_q)[None, :, None]
    if q_offsets is not None:
        q_index = q_index + q_offsets[:, None, None]
    causal = jnp.arange(seq_kv)[None, None, :] <= q_index
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    valid = (kv_segment_ids != 0)[:, None, :]
    return (causal & same_segment & valid)[:, None]


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """Dense reference: grouped einsum, fp32 logits and softmax.

    Args:
      mask: bool [batch, 1, seq_q, seq_kv].
    """
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, seq_q, kv_heads, groups, head_dim)
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32
    ) * (1.0 / math.sqrt(head_dim))
    logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)


CACHE_AXES: sharding.LogicalAxes = ("cache_batch", "cache_kv_heads", "cache_seq", "cache_head_dim")
"""Logical axes of one layer's heads-major KV cache [batch, kv_heads, max_len, head_dim]; a
stacked cache adds a leading ``layers`` axis (see the ``cache_*`` rules in ``glmjax.sharding``)."""


def cache_spec(shape: tuple[int, ...], mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh) -> PartitionSpec:
    """``PartitionSpec`` of a KV cache of ``shape`` ([batch, kv_heads, max_len, head_dim], or with
    a leading layers axis) on ``mesh`` under the active rules.

    By default KV heads go over the tensor axis when they divide it; otherwise the cache
    sequence takes the tensor axis (GLM-4-9B: 2 KV heads, tensor parallelism 8 -> each shard
    holds 1/8 of every row's positions).
    """
    axes = CACHE_AXES if len(shape) == 4 else ("layers", *CACHE_AXES)
    return sharding.logical_to_spec(axes, shape, mesh)


def _axis_names(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _ambient_mesh() -> jax.sharding.AbstractMesh | None:
    """The ambient (``jax.set_mesh``) mesh, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.axis_sizes) == 1 else mesh


def _write_local(cache: jax.Array, new: jax.Array, starts: jax.Array, layer: jax.Array | None) -> jax.Array:
    """Scatters new [batch, t, kv_heads, head_dim] into cache [batch, kv_heads, len, head_dim]
    (``layer`` None) or into slot ``layer`` of [layers, batch, kv_heads, len, head_dim], token i
    of row b at position ``starts[b] + i``; positions outside [0, len) are dropped."""
    batch, t = new.shape[:2]
    length = cache.shape[-2]
    rows = jnp.arange(batch)[:, None]
    columns = starts[:, None] + jnp.arange(t)[None]
    # Negative indices would wrap around: send them past the end, where "drop" discards them.
    columns = jnp.where(columns < 0, length, columns)
    index = (rows, slice(None), columns) if layer is None else (layer, rows, slice(None), columns)
    return cache.at[index].set(new.astype(cache.dtype), mode="drop")


def write_cache(cache: jax.Array, new: jax.Array, starts: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """Writes new keys or values into a heads-major cache at per-row offsets.

    Only the new entries are written (the cache is a loop carry, updated in place). Under a
    multi-device mesh the write runs per shard (``shard_map``, cache laid out by
    ``cache_spec``): each shard writes the positions it holds, with no gather of the cache.

    Args:
      cache: [batch, kv_heads, max_len, head_dim], or [layers, batch, kv_heads, max_len,
        head_dim] with ``layer`` the slot (int32 scalar) to write.
      new: [batch, t, kv_heads, head_dim]; token i of row b goes to position ``starts[b] + i``.
      starts: int32 [batch]. Positions past ``max_len`` are dropped (never wrapped or clamped).

    Returns:
      The updated cache (same shape, dtype and layout).
    """
    mesh = _ambient_mesh()
    if mesh is None:
        return _write_local(cache, new, starts, layer)
    spec = cache_spec(cache.shape, mesh)
    batch_axes, head_axes, seq_axes = spec[-4], spec[-3], _axis_names(spec[-2])
    stacked = layer is not None

    def local(cache, new, starts, layer):
        first = jax.lax.axis_index(seq_axes) * cache.shape[-2] if seq_axes else 0
        return _write_local(cache, new, starts - first, layer if stacked else None)

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(spec, PartitionSpec(batch_axes, None, head_axes, None), PartitionSpec(batch_axes),
                  PartitionSpec()),
        out_specs=spec, check_vma=False,
    )(cache, new, starts, layer if stacked else jnp.int32(0))


def _cache_logits(
    q: jax.Array, k: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
    q_offsets: jax.Array, kv_start: jax.Array | int,
) -> jax.Array:
    """Masked fp32 logits [b, kv_heads, groups, t, s] of grouped queries q [b, t, kv_heads, groups,
    h] against cache keys k [b, kv_heads, s, h] that hold positions ``kv_start + arange(s)``."""
    logits = jnp.einsum(
        "btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32
    ) * (1.0 / math.sqrt(q.shape[-1]))
    q_positions = q_offsets[:, None, None] + jnp.arange(q.shape[1])[None, :, None]
    kv_positions = kv_start + jnp.arange(k.shape[2])[None, None, :]
    mask = ((kv_positions <= q_positions)
            & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
            & (kv_segment_ids != 0)[:, None, :])
    return jnp.where(mask[:, None, None], logits, _MASK_VALUE)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offsets: jax.Array,
) -> jax.Array:
    """New queries against a heads-major KV cache (incremental decoding), dense in XLA.

    The cache layout is the one the two einsums read directly, so no step transposes it.

    Args:
      q: [batch, seq_q, heads, head_dim], at positions ``q_offsets + arange(seq_q)``.
      k, v: [batch, kv_heads, max_len, head_dim], already holding the queries' own keys/values.
      q_segment_ids: int [batch, seq_q]; kv_segment_ids: int [batch, max_len] (0 = empty slot).
      q_offsets: int [batch]; cached tokens before the first query.

    Returns:
      [batch, seq_q, heads, head_dim] in q's dtype.
    """
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, seq_q, kv_heads, heads // kv_heads, head_dim)
    logits = _cache_logits(grouped, k, q_segment_ids, kv_segment_ids, q_offsets, 0)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq_q, heads, head_dim).astype(q.dtype)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offsets: jax.Array,
) -> jax.Array:
    """``cached_attention`` for a cache laid out by ``cache_spec`` under the ambient mesh.

    When the cache sequence is sharded (KV heads fewer than tensor shards, or a sequence axis),
    every shard attends over the positions it holds with all query heads of its rows, and the
    shards' partial softmaxes are combined exactly (split-K: max, then sums of the rescaled
    numerators and denominators over the sequence axes). Queries [batch, seq_q, heads,
    head_dim] are gathered over the tensor axis for this (they are small); the output comes
    back the same on every sequence shard. Otherwise (one device, or a cache split only by
    batch and KV heads) it is ``cached_attention``, partitioned by XLA.

    Args and returns: as ``cached_attention``.
    """
    mesh = _ambient_mesh()
    spec = None if mesh is None else cache_spec(k.shape, mesh)
    if spec is None or spec[2] is None:
        return cached_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                q_offsets=q_offsets)
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    seq_axes = _axis_names(spec[2])
    grouped = q.reshape(batch, seq_q, kv_heads, heads // kv_heads, head_dim)

    def local(q, k, v, q_seg, kv_seg, q_offsets):
        kv_start = jax.lax.axis_index(seq_axes) * k.shape[2]
        logits = _cache_logits(q, k, q_seg, kv_seg, q_offsets, kv_start)
        top = jax.lax.pmax(jnp.max(logits, axis=-1, keepdims=True), seq_axes)
        unnormalised = jnp.exp(logits - top)
        total = jax.lax.psum(jnp.sum(unnormalised, axis=-1), seq_axes)  # [b, k, g, t]
        out = jnp.einsum("bkgts,bksh->btkgh", unnormalised.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
        return jax.lax.psum(out, seq_axes) / total.transpose(0, 3, 1, 2)[..., None]

    q_spec = PartitionSpec(spec[0], None, spec[1], None, None)
    out = jax.shard_map(
        local, mesh=mesh,
        in_specs=(q_spec, spec, spec, PartitionSpec(spec[0], None), PartitionSpec(spec[0], spec[2]),
                  PartitionSpec(spec[0])),
        out_specs=q_spec, check_vma=False,
    )(grouped, k, v, q_segment_ids, kv_segment_ids, q_offsets)
    return out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    block_size: int = 64,
) -> jax.Array:
    """Causal self-attention that skips the key blocks above the diagonal.

    Queries are cut into blocks of ``block_size`` (a static loop); block ``[start, end)`` only
    computes logits against keys ``[0, end)``, so about half of the dense work is skipped.
    Each block is a dense grouped einsum in a heads-major layout with an fp32 softmax and a
    mask built from iota and segment-id comparisons. A custom VJP saves only the output and
    the log-sum-exp per query and recomputes each block's probabilities in the backward pass.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (seq_q == seq_kv,
        no cache offset).
      q_segment_ids, kv_segment_ids: int [batch, seq].
      block_size: queries per block.

    Returns:
      [batch, seq, heads, head_dim]. Equal to ``xla_attention`` except on rows that see no
      key at all (padding queries, segment 0), whose value is unspecified in both.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = (q * (1.0 / math.sqrt(head_dim))).astype(q.dtype)
    q = q.reshape(batch, seq, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _blockwise(q, k, v, q_segment_ids, kv_segment_ids, block_size)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim).astype(q.dtype)


def _block_logits(
    q: jax.Array, k: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array, start: int, end: int
) -> jax.Array:
    """Masked fp32 logits [b, k, g, end - start, end] of queries [start, end) against keys [0, end).

    Args:
      q: [b, k, g, seq, h] (pre-scaled); k: [b, k, seq, h]; segment ids: int [b, seq].
    """
    logits = jnp.einsum(
        "bkgth,bksh->bkgts", q[:, :, :, start:end], k[:, :, :end], preferred_element_type=jnp.float32
    )
    causal = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    kv_segments = kv_segment_ids[:, None, :end]
    mask = causal & (q_segment_ids[:, start:end, None] == kv_segments) & (kv_segments != 0)
    return jnp.where(mask[:, None, None], logits, _MASK_VALUE)


def _blocks(seq: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, seq)) for start in range(0, seq, block_size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
    block_size: int,
) -> jax.Array:
    """Heads-major core: q [b, k, g, t, h] (pre-scaled), k/v [b, k, s, h] -> [b, k, g, t, h]."""
    return _blockwise_fwd(q, k, v, q_segment_ids, kv_segment_ids, block_size)[0]


def _blockwise_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
    block_size: int,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    outputs, log_sum_exps = [], []
    for start, end in _blocks(q.shape[3], block_size):
        logits = _block_logits(q, k, q_segment_ids, kv_segment_ids, start, end)
        max_logit = jnp.max(logits, axis=-1, keepdims=True)
        unnormalised = jnp.exp(logits - max_logit)
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
        out = jnp.einsum(
            "bkgts,bksh->bkgth", unnormalised.astype(v.dtype), v[:, :, :end],
            preferred_element_type=jnp.float32,
        )
        outputs.append((out / total).astype(q.dtype))
        log_sum_exps.append((max_logit + jnp.log(total))[..., 0])
    out = jnp.concatenate(outputs, axis=3)
    log_sum_exp = jnp.concatenate(log_sum_exps, axis=3)
    return out, (q, k, v, q_segment_ids, kv_segment_ids, out, log_sum_exp)


def _blockwise_bwd(block_size: int, residuals: tuple[jax.Array, ...], out_grad: jax.Array) -> tuple:
    q, k, v, q_segment_ids, kv_segment_ids, out, log_sum_exp = residuals
    # softmax backward: d logits = p * (d p - sum_s p * d p), and sum_s p * d p = <d out, out>.
    delta = jnp.sum(out_grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    q_grads, k_grad, v_grad = {}, None, None
    # Last block first: it spans every key, so it initialises the key and value gradients.
    for start, end in reversed(_blocks(q.shape[3], block_size)):
        logits = _block_logits(q, k, q_segment_ids, kv_segment_ids, start, end)
        probs = jnp.exp(logits - log_sum_exp[:, :, :, start:end, None])
        block_out_grad = out_grad[:, :, :, start:end]
        # Key and value gradients come out as [b, k, h, s] (no transposed copy of [t, s] blocks).
        block_v_grad = jnp.einsum(
            "bkgth,bkgts->bkhs", block_out_grad, probs.astype(v.dtype), preferred_element_type=jnp.float32
        ).swapaxes(2, 3)
        probs_grad = jnp.einsum(
            "bkgth,bksh->bkgts", block_out_grad, v[:, :, :end], preferred_element_type=jnp.float32
        )
        logits_grad = (probs * (probs_grad - delta[:, :, :, start:end, None])).astype(q.dtype)
        q_grads[start] = jnp.einsum(
            "bkgts,bksh->bkgth", logits_grad, k[:, :, :end], preferred_element_type=jnp.float32
        )
        block_k_grad = jnp.einsum(
            "bkgth,bkgts->bkhs", q[:, :, :, start:end], logits_grad, preferred_element_type=jnp.float32
        ).swapaxes(2, 3)
        if k_grad is None:
            k_grad, v_grad = block_k_grad, block_v_grad
        else:
            k_grad = k_grad.at[:, :, :end].add(block_k_grad)
            v_grad = v_grad.at[:, :, :end].add(block_v_grad)
    q_grad = jnp.concatenate([q_grads[start] for start in sorted(q_grads)], axis=3)
    return q_grad.astype(q.dtype), k_grad.astype(k.dtype), v_grad.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, XLA elsewhere).

    Args:
      mask: bool [batch, 1, seq_q, seq_kv], or None for plain causal attention.
    """
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _splash_kernel(seq_q: int, seq_kv: int, groups: int, interpret: bool):
    """Causal splash MQA kernel for ``groups`` query heads per KV head, built in the caller's trace.

    Its mask tables (numpy, cached by splash per mask) become constants of the traced program:
    nothing runs eagerly, so it also builds under a compile-only mesh (a TPU topology on a CPU
    host, where no array can be placed).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as splash_mask,
    )

    block = min(512, seq_q, seq_kv)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_q, seq_kv))] * groups)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    interpret: bool = False,
) -> jax.Array:
    """TPU splash attention (Pallas), causal with segment ids; GQA as one MQA kernel per KV head.

    Sequence lengths must be multiples of 128. Under a multi-device mesh the kernel runs per
    shard (``shard_map``): batch over the batch axes and heads over the tensor axis. When the
    tensor axis splits the query heads but not the fewer KV heads (GLM-4-9B: 32 query heads,
    2 KV heads, tensor parallelism 8), K/V stay replicated and each shard attends with the KV
    heads of its own query heads, so no shard computes another shard's heads.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads

    def attend_shard(kernel, q, k, v, q_seg, kv_seg):
        """One shard: q [b, t, n, h], k/v [b, s, kh, h] with n // kh == the kernel's groups."""
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

        b, t, n, h = q.shape
        kh = k.shape[2]
        qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4) * (1.0 / math.sqrt(h))
        kt = k.transpose(0, 2, 1, 3)
        vt = v.transpose(0, 2, 1, 3)

        def one_row(qr, kr, vr, qs, ks):
            segments = splash.SegmentIds(q=qs, kv=ks)
            return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=segments))(qr, kr, vr)

        out = jax.vmap(one_row)(qg.astype(q.dtype), kt, vt, q_seg, kv_seg)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)

    # Kernels are built outside shard_map: their mask tables enter it as replicated constants.
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return attend_shard(_splash_kernel(seq_q, seq_kv, groups, interpret),
                            q, k, v, q_segment_ids, kv_segment_ids)
    kv_spec = sharding.logical_to_spec(("act_batch", None, "act_kv_heads", None), k.shape, mesh)
    q_spec = sharding.logical_to_spec(("act_batch", None, "act_heads", None), q.shape, mesh)
    seg_spec = PartitionSpec(kv_spec[0], None)
    head_axes = q_spec[2]
    names = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes or ())
    local_heads = heads // math.prod(mesh.shape[name] for name in names)
    split_queries_only = (head_axes is not None and kv_spec[2] is None and q_spec[0] == kv_spec[0]
                          and not (groups % local_heads and local_heads % groups))
    if not split_queries_only:  # heads split like the KV heads, or not at all
        function = functools.partial(attend_shard, _splash_kernel(seq_q, seq_kv, groups, interpret))
        q_spec = kv_spec
    else:
        local_kv_heads = max(1, local_heads // groups)
        kernel = _splash_kernel(seq_q, seq_kv, local_heads // local_kv_heads, interpret)

        def function(q, k, v, q_seg, kv_seg):
            first_kv_head = jax.lax.axis_index(names) * local_heads // groups
            k = jax.lax.dynamic_slice_in_dim(k, first_kv_head, local_kv_heads, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, first_kv_head, local_kv_heads, axis=2)
            return attend_shard(kernel, q, k, v, q_seg, kv_seg)

    return jax.shard_map(
        function,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids)


def sample_attention(q: jax.Array, k: jax.Array, v: jax.Array, alpha: float) -> jax.Array:
    """SampleAttention (adaptive structured sparse attention) for causal prefill."""
    from pallas_kernels.sample_attention import sample_attention as sparse_attention

    return sparse_attention(q, k, v, alpha=alpha, causal=True)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_offsets: jax.Array | None,
    backend: str,
    sample_alpha: float = 0.95,
) -> jax.Array:
    """Dispatches to a backend.

    Incremental decoding (``q_offsets`` given) always uses the dense XLA path; "sample" is a
    prefill method and needs unpacked sequences (no segment ids), else it falls back to "xla";
    "blockwise" needs self-attention (seq_q == seq_kv), else it falls back to "xla"; "splash"
    needs sequence lengths that are multiples of 128 (its block size), else it falls back to
    "xla" (short prompts in generation buckets). Splash runs as a Mosaic TPU kernel when the
    ambient mesh's devices are TPUs (also for an ahead-of-time compile for a TPU topology on a
    CPU host), in the Pallas interpreter otherwise.
    """
    batch, seq_q = q.shape[:2]
    seq_kv = k.shape[1]
    packed = q_segment_ids is not None or kv_segment_ids is not None
    if q_offsets is None and backend == "sample" and not packed:
        return sample_attention(q, k, v, sample_alpha)
    if q_offsets is None and backend == "fused" and not packed:
        return fused_attention(q, k, v, None)
    q_seg = jnp.broadcast_to(1 if q_segment_ids is None else q_segment_ids, (batch, seq_q)).astype(jnp.int32)
    kv_seg = jnp.broadcast_to(1 if kv_segment_ids is None else kv_segment_ids, (batch, seq_kv)).astype(jnp.int32)
    if q_offsets is None and backend == "blockwise" and seq_q == seq_kv:
        return blockwise_attention(q, k, v, q_seg, kv_seg)
    if q_offsets is None and backend == "splash" and seq_q % 128 == 0 and seq_kv % 128 == 0:
        return splash_attention(q, k, v, q_seg, kv_seg, interpret=current_platform() != "tpu")
    mask = attention_mask(q_seg, kv_seg, q_offsets)
    if backend == "fused" and q_offsets is None:
        return fused_attention(q, k, v, mask)
    if backend not in ("xla", "blockwise", "fused", "splash", "sample"):
        raise ValueError(
            f"unknown attention backend {backend!r}; use xla, blockwise, fused, splash or sample"
        )
    return xla_attention(q, k, v, mask)
