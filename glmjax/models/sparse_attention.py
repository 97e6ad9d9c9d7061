"""SampleAttention (adaptive structured sparse attention) as the model's prefill attention.

:func:`sharded_sample_attention` runs ``pallas_kernels.sample_attention.sample_attention``
under the ambient mesh (``jax.set_mesh``) with the model's logical activation axes: q
``("act_batch", "act_seq", "act_heads", "act_head_dim")``, k/v ``("act_batch", "act_seq",
"act_kv_heads", "act_head_dim")``, mapped to mesh axes by ``glmjax.sharding.logical_to_spec``.
Each shard (``shard_map``) attends with its own batch rows and heads; the Pallas kernel is a
Mosaic custom call that XLA cannot partition, hence the explicit per-shard program.
"""
from __future__ import annotations

import functools
import math

import jax

from glmjax.models.attention_sharding import ambient_mesh, head_layout

NO_GRADIENT_MESSAGE = (
    "attention_backend='sample' is a prefill method: it has no gradient; "
    "train with 'splash'/'blockwise'/'xla'")


def _refuse_gradient(function):
    """``function(q, k, v)`` with a VJP that raises ``TypeError(NO_GRADIENT_MESSAGE)``.

    The error is raised while the backward pass is traced (``jax.grad`` / ``jax.vjp``'s
    pullback), before anything runs; the forward pass is unchanged.
    """

    @jax.custom_vjp
    def forward(q, k, v):
        return function(q, k, v)

    def fwd(q, k, v):
        return function(q, k, v), None

    def bwd(_, cotangent):
        raise TypeError(NO_GRADIENT_MESSAGE)

    forward.defvjp(fwd, bwd)
    return forward


def sharded_sample_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    alpha: float,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    window_ratio: float = 0.08,
    row_ratio: float = 0.05,
    block_q: int = 128,
    block_k: int = 128,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Causal SampleAttention prefill of unpacked sequences, per shard of the ambient mesh.

    Sharding: batch over the mesh axes of ``act_batch``, query heads over those of
    ``act_heads`` (the tensor axis). When the tensor axis splits the query heads but not the
    fewer KV heads (GLM-4-9B: 32 query heads, 2 KV heads, tensor parallelism 4 or 8), K/V
    stay replicated over it and each shard slices the KV heads of its own query heads; the
    selection is per query head, so no shard needs another's. A sequence axis (``act_seq``)
    larger than one: SampleAttention's stage 1 samples query rows across the whole sequence,
    so each shard all-gathers q/k/v over that axis, computes the selection of the whole
    sequence (the same on every sequence shard, computed redundantly) and runs the kernel
    only for the query blocks covering its own rows (``query_start``/``query_len`` of
    ``sample_attention``; the ``xla`` and ``pallas`` backends; ``triton`` computes all rows
    and slices). Without a mesh, or on one device, it is a plain call.

    No gradient: differentiating raises ``TypeError(NO_GRADIENT_MESSAGE)`` when the backward
    pass is traced (a ``custom_vjp`` whose backward refuses); train with another backend.

    Args:
      q: ``[batch, seq, heads, head_dim]``.
      k, v: ``[batch, seq, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
      alpha: retained attention-mass target of the selection, in ``[0, 1]`` (1 is dense).
      q_segment_ids, kv_segment_ids: must be None: packed sequences are refused
        (``ValueError``), since the selection and the kernels know one sequence per row.
      window_ratio, row_ratio, block_q, block_k: as in ``sample_attention``.
      backend: ``sample_attention``'s backend (``"auto"``: Pallas on TPU, XLA on CPU).
      interpret: run the Pallas kernel in interpret mode (CPU tests).

    Returns:
      ``[batch, seq, heads, head_dim]`` in ``q.dtype``, sharded like ``q``.

    Raises:
      ValueError: segment ids given, or shapes that are not self-attention of one layout.
    """
    from pallas_kernels.sample_attention import sample_attention

    if q_segment_ids is not None or kv_segment_ids is not None:
        raise ValueError(
            "attention_backend='sample' does not support packed inputs (segment ids): its block "
            "selection assumes one sequence per batch row; unpack the batch or use 'splash'")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"sample attention needs self-attention q [b, s, h, d] and k/v "
                         f"[b, s, kv_h, d] with h % kv_h == 0; got {q.shape}, {k.shape}, {v.shape}")
    seq = q.shape[1]
    attend = functools.partial(
        sample_attention, alpha=alpha, causal=True, window_ratio=window_ratio,
        row_ratio=row_ratio, block_q=block_q, block_k=block_k, backend=backend,
        interpret=interpret)

    mesh = ambient_mesh()
    if mesh is None:
        return _refuse_gradient(attend)(q, k, v)
    layout = head_layout(q.shape, k.shape, mesh, split_sequence=True)
    seq_names = layout.sequence_axes
    local_seq = seq // math.prod(mesh.shape[name] for name in seq_names)

    def local(q, k, v):
        k, v = layout.select_kv(k), layout.select_kv(v)
        if not seq_names:
            return attend(q, k, v)
        q, k, v = (jax.lax.all_gather(x, seq_names, axis=1, tiled=True) for x in (q, k, v))
        start = jax.lax.axis_index(seq_names) * local_seq
        return attend(q, k, v, query_start=start, query_len=local_seq)

    def sharded(q, k, v):
        return jax.shard_map(local, mesh=mesh, in_specs=(layout.q_spec, layout.kv_spec, layout.kv_spec),
                             out_specs=layout.q_spec, check_vma=False)(q, k, v)

    return _refuse_gradient(sharded)(q, k, v)
