"""Context parallelism: attention with the sequence split over the mesh's sequence axes.

Each device keeps its own chunk of queries and receives every key and value (an all-gather of
K/V over the sequence axes, as MaxText does); it then runs the flash kernel of its platform on
its chunk: queries at positions ``[r * t, (r + 1) * t)`` for sequence shard r against all keys,
causal, with segment ids. No device builds a score matrix and no attention is computed twice
across the sequence axes. The backward pass runs through the same ``shard_map``: the transpose
of the all-gather sums every shard's key/value gradients back onto the shard that owns them.

Work is not balanced: with contiguous chunks the shard holding the last chunk attends to the
whole sequence and the first to its own chunk only (the last of n shards does (2n - 1) / n^2 of
the causal work, 23% at n = 8 against 12.5% with a load-balanced order).

Per-shard kernels: ``"blockwise"`` (XLA loops, any platform), ``"splash"`` (TPU; the kernel's
mask tables are cut per query chunk), ``"flash_gpu"`` (the Pallas GPU kernel with a query
offset).
"""

from __future__ import annotations

import math

import jax

from glmjax.models import splash
from glmjax.models.attention_sharding import HeadLayout, head_layout
from glmjax.models.blockwise import blockwise_attention

KERNELS = ("blockwise", "splash", "flash_gpu")


def sequence_layout(q: jax.Array, k: jax.Array, mesh: jax.sharding.AbstractMesh | None) -> HeadLayout | None:
    """The layout with the sequence split, or None when no mesh axis splits it (or q and k
    differ in length, i.e. queries against a cache)."""
    if mesh is None or q.shape[1] != k.shape[1]:
        return None
    layout = head_layout(q.shape, k.shape, mesh, split_sequence=True)
    return layout if layout.sequence_axes else None


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    layout: HeadLayout,
    mesh: jax.sharding.AbstractMesh,
    kernel: str,
    interpret: bool = False,
) -> jax.Array:
    """Causal self-attention with the sequence split over ``layout.sequence_axes``.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (global shapes,
        laid out by ``layout``).
      q_segment_ids, kv_segment_ids: int [batch, seq] (0 = padding).
      layout: from ``sequence_layout``.
      kernel: one of ``KERNELS``.
      interpret: run a Pallas kernel in its interpreter (tests on CPU).

    Returns:
      [batch, seq, heads, head_dim], laid out like q.
    """
    if kernel not in KERNELS:
        raise ValueError(f"context parallelism has no kernel {kernel!r}; use one of {KERNELS}")
    axes = layout.sequence_axes
    shards = math.prod(mesh.shape[name] for name in axes)
    seq = q.shape[1]
    if seq % shards:
        raise ValueError(f"sequence length {seq} is not a multiple of the {shards} sequence shards")
    chunk = seq // shards
    extra_args, extra_specs = (), ()
    if kernel == "splash":
        if chunk % 128:
            raise ValueError(f"splash needs chunks of a multiple of 128 tokens; each of the {shards} "
                             f"sequence shards holds {chunk}")
        tables = splash.splash_kernel(seq, seq, layout.local_groups, interpret, q_seq_shards=shards)
        extra_args, extra_specs = (tables,), (splash.kernel_shard_spec(tables, mesh, axes),)

    def local(q, k, v, q_seg, kv_seg, *tables):
        gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # noqa: E731
        k_all, v_all = gather(layout.select_kv(k)), gather(layout.select_kv(v))
        kv_seg_all = gather(kv_seg)
        if kernel == "splash":
            return splash.attend_shard(tables[0], q, k_all, v_all, q_seg, kv_seg_all)
        offset = jax.lax.axis_index(axes) * chunk
        if kernel == "blockwise":
            return blockwise_attention(q, k_all, v_all, q_seg, kv_seg_all, q_offset=offset)
        from pallas_kernels.flash_attention import flash_attention

        return flash_attention(q, k_all, v_all, q_segment_ids=q_seg, kv_segment_ids=kv_seg_all,
                               q_offset=offset, interpret=interpret)

    specs = (layout.q_spec, layout.kv_spec, layout.kv_spec, layout.segment_spec, layout.segment_spec)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(*specs, *extra_specs), out_specs=layout.q_spec, check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids, *extra_args)
