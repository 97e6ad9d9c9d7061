"""Attention backends behind one switch.

All take q [batch, seq_q, heads, head_dim] and k, v [batch, seq_kv, kv_heads, head_dim]
(grouped-query attention without repeating K/V) and return [batch, seq_q, heads, head_dim].

Masking: query i of row b may attend to key j when ``j <= q_offsets[b] + i`` (causal; the
offset is the number of cached tokens before the queries, 0 for a full sequence) and
``q_segment_ids[b, i] == kv_segment_ids[b, j] != 0`` (packed documents never see each other;
segment 0 marks padding and empty cache slots).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from glmjax import sharding
from glmjax.hardware import current_platform
from glmjax.models import context_parallel, splash
from glmjax.models.attention_sharding import ambient_mesh, axis_names, head_layout
from glmjax.models.blockwise import blockwise_attention
from glmjax.models.sparse_attention import sharded_sample_attention

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
    mesh = ambient_mesh()
    if mesh is None:
        return _write_local(cache, new, starts, layer)
    spec = cache_spec(cache.shape, mesh)
    batch_axes, head_axes, seq_axes = spec[-4], spec[-3], axis_names(spec[-2])
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
    mesh = ambient_mesh()
    spec = None if mesh is None else cache_spec(k.shape, mesh)
    if spec is None or spec[2] is None:
        return cached_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                q_offsets=q_offsets)
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    seq_axes = axis_names(spec[2])
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


def chunk_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offsets: jax.Array,
) -> jax.Array:
    """A chunk of queries against a heads-major KV cache that already holds them (one chunk of
    a chunked prefill), with the flash kernel: key blocks past the rows' causal bound (the
    empty rest of the cache) are never read, and no [chunk, max_len] scores are built.

    When the cache sequence is sharded (``cache_spec``: KV heads fewer than tensor shards, or a
    sequence axis) the chunk goes to ``decode_attention``'s split-K path instead, whose scores
    are [chunk, max_len / shards] per device.

    Args and returns: as ``cached_attention``.
    """
    mesh = ambient_mesh()
    if mesh is not None and cache_spec(k.shape, mesh)[2] is not None:
        return decode_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                q_offsets=q_offsets)
    return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset=q_offsets,
                               kv_heads_major=True)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, XLA elsewhere).

    Args:
      mask: bool [batch, 1, seq_q, seq_kv], or None for plain causal attention.
    """
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


BACKENDS = ("xla", "blockwise", "fused", "splash", "sample")


def _gpu_flash(q, k, v, q_seg, kv_seg):
    """The Pallas GPU flash kernel over whole sequences, per shard under a multi-device mesh."""
    from pallas_kernels.flash_attention import flash_attention

    def local(q, k, v, q_seg, kv_seg):
        return flash_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    mesh = ambient_mesh()
    if mesh is None:
        return local(q, k, v, q_seg, kv_seg)
    layout = head_layout(q.shape, k.shape, mesh, split_sequence=False)
    return jax.shard_map(
        lambda q, k, v, qs, ks: local(q, layout.select_kv(k), layout.select_kv(v), qs, ks),
        mesh=mesh,
        in_specs=(layout.q_spec, layout.kv_spec, layout.kv_spec, layout.segment_spec, layout.segment_spec),
        out_specs=layout.q_spec, check_vma=False,
    )(q, k, v, q_seg, kv_seg)


def _context_parallel_kernel(backend: str, platform: str, chunk: int) -> str:
    """The per-shard kernel of context parallelism for ``backend`` on ``platform``."""
    if backend == "splash" and chunk % 128 == 0:
        return "splash"
    if backend == "fused" and platform == "gpu":
        return "flash_gpu"
    return "blockwise"


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

    Self-attention (``q_offsets`` None: training, prefill):
      - "xla": dense, partitioned by XLA (with a sequence axis each device holds
        [seq / n, seq] scores).
      - "blockwise": the flash kernel in XLA loops (``glmjax.models.blockwise``).
      - "splash": TPU splash (Mosaic on TPU meshes, the Pallas interpreter elsewhere); sequence
        lengths that are not multiples of 128 (short prompts in generation buckets) take "xla".
      - "fused": cuDNN flash attention (``jax.nn.dot_product_attention``) for unpacked inputs;
        packed inputs (segment ids) on GPU take the Pallas GPU flash kernel with segment ids
        (never a dense mask); elsewhere "fused" is XLA's dense implementation.
      - "sample": SampleAttention (``sparse_attention.sharded_sample_attention``), a prefill
        method: packed inputs are refused, and so is differentiating it.
    With the sequence split over the mesh (context parallelism), "blockwise", "splash" and
    "fused" run ``context_parallel.context_parallel_attention`` with the platform's per-shard
    kernel: splash (chunks of multiples of 128 tokens), the Pallas GPU kernel for "fused" on
    GPU, blockwise otherwise.

    Incremental decoding (``q_offsets`` given) is dense in XLA (see ``decode_attention`` for
    the sharded cache).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {', '.join(BACKENDS)}")
    batch, seq_q = q.shape[:2]
    seq_kv = k.shape[1]
    packed = q_segment_ids is not None or kv_segment_ids is not None
    self_attention = q_offsets is None and seq_q == seq_kv
    if self_attention and backend == "sample":
        return sharded_sample_attention(q, k, v, alpha=sample_alpha, q_segment_ids=q_segment_ids,
                                        kv_segment_ids=kv_segment_ids)
    platform = current_platform()
    q_seg = jnp.broadcast_to(1 if q_segment_ids is None else q_segment_ids, (batch, seq_q)).astype(jnp.int32)
    kv_seg = jnp.broadcast_to(1 if kv_segment_ids is None else kv_segment_ids, (batch, seq_kv)).astype(jnp.int32)
    if self_attention and backend in ("blockwise", "splash", "fused"):
        mesh = ambient_mesh()
        layout = context_parallel.sequence_layout(q, k, mesh)
        if layout is not None:
            shards = math.prod(mesh.shape[name] for name in layout.sequence_axes)
            kernel = _context_parallel_kernel(backend, platform, seq_q // shards)
            return context_parallel.context_parallel_attention(
                q, k, v, q_seg, kv_seg, layout=layout, mesh=mesh, kernel=kernel,
                interpret=platform != {"splash": "tpu", "flash_gpu": "gpu"}.get(kernel, platform))
    if self_attention and backend == "fused":
        if not packed:
            return fused_attention(q, k, v, None)
        if platform == "gpu":
            return _gpu_flash(q, k, v, q_seg, kv_seg)
    if self_attention and backend == "blockwise":
        return blockwise_attention(q, k, v, q_seg, kv_seg)
    if self_attention and backend == "splash" and seq_q % 128 == 0:
        return splash.splash_attention(q, k, v, q_seg, kv_seg, interpret=platform != "tpu")
    mask = attention_mask(q_seg, kv_seg, q_offsets)
    if self_attention and backend == "fused":
        return fused_attention(q, k, v, mask)
    return xla_attention(q, k, v, mask)
