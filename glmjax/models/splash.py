"""TPU splash attention (Pallas): causal with segment ids; GQA as one MQA kernel per KV head.

Runs as a Mosaic TPU kernel when the ambient mesh's devices are TPUs (also for an ahead-of-time
compile for a TPU topology on a CPU host), in the Pallas interpreter otherwise.
"""

from __future__ import annotations

import math

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import NamedSharding, PartitionSpec

from glmjax.models.attention_sharding import ambient_mesh, head_layout

BLOCK = 512
"""Largest splash block (tokens); sequences must be multiples of 128."""


def splash_kernel(seq_q: int, seq_kv: int, groups: int, interpret: bool, q_seq_shards: int = 1):
    """Causal splash MQA kernel for ``groups`` query heads per KV head, built in the caller's trace.

    Its mask tables (numpy, cached by splash per mask) become constants of the traced program:
    nothing runs eagerly, so it also builds under a compile-only mesh (a TPU topology on a CPU
    host, where no array can be placed). With ``q_seq_shards`` > 1 the tables are cut into that
    many query chunks; ``shard_spec`` gives the ``shard_map`` spec that hands each shard its own.
    """
    block = min(BLOCK, seq_q // q_seq_shards, seq_kv)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_q, seq_kv))] * groups)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=q_seq_shards,
                                  interpret=interpret)


def kernel_shard_spec(kernel, mesh: jax.sharding.AbstractMesh, sequence_axes: tuple[str, ...]):
    """The ``shard_map`` in-spec of ``kernel`` giving each sequence shard its query chunk's tables."""
    return kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, sequence_axes)))


def attend_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array,
                 kv_seg: jax.Array) -> jax.Array:
    """One shard: q [b, t, n, h], k/v [b, s, kh, h] with n // kh == the kernel's groups.

    Which positions the queries hold is in the kernel's tables: all of [0, s) for a whole
    sequence, the shard's chunk for a kernel made with ``q_seq_shards`` > 1 and handed its
    tables through ``kernel_shard_spec``.
    """
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


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Causal splash attention over whole sequences (no context parallelism: see
    ``glmjax.models.context_parallel`` for a split sequence).

    Sequence lengths must be multiples of 128. Under a multi-device mesh the kernel runs per
    shard (``shard_map``): batch over the batch axes and heads over the tensor axis (see
    ``attention_sharding.HeadLayout`` for fewer KV heads than tensor shards).
    """
    groups = q.shape[2] // k.shape[2]
    mesh = ambient_mesh()
    if mesh is None:
        kernel = splash_kernel(q.shape[1], k.shape[1], groups, interpret)
        return attend_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids)
    layout = head_layout(q.shape, k.shape, mesh, split_sequence=False)
    # Kernels are built outside shard_map: their mask tables enter it as replicated constants.
    kernel = splash_kernel(q.shape[1], k.shape[1], layout.local_groups, interpret)

    def local(q, k, v, q_seg, kv_seg):
        return attend_shard(kernel, q, layout.select_kv(k), layout.select_kv(v), q_seg, kv_seg)

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(layout.q_spec, layout.kv_spec, layout.kv_spec, layout.segment_spec, layout.segment_spec),
        out_specs=layout.q_spec, check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids)
