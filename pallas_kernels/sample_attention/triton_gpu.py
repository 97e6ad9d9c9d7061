"""GPU backend: the Triton kernel of :mod:`triton_kernel` called through jax-triton.

``jax_triton`` and ``triton`` are imported on first call only (the ``gpu`` extra),
so the package imports without them.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from pallas_kernels.sample_attention.layout import BlockLayout
from pallas_kernels.sample_attention.selection import Selection


def _padded_head_dim(d: int) -> int:
  """Triton needs a power-of-two head dim >= 16 for ``tl.arange`` / ``tl.dot``."""
  return max(16, 1 << (d - 1).bit_length())


def triton_sample_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    selection: Selection,
    layout: BlockLayout,
    scale: float,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
  """Block-sparse attention over the listed blocks with a Triton GPU kernel.

  Args:
    q: ``[batch, heads, padded_len, head_dim]``.
    k, v: ``[batch, kv_heads, padded_len, head_dim]``.
    selection: lists for ``[batch, heads, num_q_blocks]``.
    layout: block layout; ``block_q``, ``block_k`` >= 16 and powers of two.
    scale: softmax scale.
    num_warps, num_stages: Triton launch parameters.

  Returns:
    ``[batch, heads, padded_len, head_dim]`` in ``q.dtype``.
  """
  import jax_triton
  from pallas_kernels.sample_attention.triton_kernel import sample_attention_kernel

  batch, heads, s_pad, d = q.shape
  kv_heads = k.shape[1]
  d_pad = _padded_head_dim(d)
  if d_pad != d:
    q, k, v = (jnp.pad(x, ((0, 0),) * 3 + ((0, d_pad - d),)) for x in (q, k, v))
  out_type = jax.ShapeDtypeStruct((batch, heads, s_pad, d_pad), q.dtype)
  # jax-triton >= 0.4 names the output spec ``out_type``; older releases ``out_shape``.
  out_kw = ("out_type" if "out_type" in inspect.signature(jax_triton.triton_call).parameters
            else "out_shape")
  out = jax_triton.triton_call(
      q, k, v,
      selection.kv_blocks.astype(jnp.int32), selection.counts.astype(jnp.int32),
      float(scale), layout.seq_len, heads, heads // kv_heads, layout.num_q_blocks,
      selection.kv_blocks.shape[-1], kv_heads, s_pad,
      kernel=sample_attention_kernel,
      grid=(layout.num_q_blocks, batch * heads),
      num_warps=num_warps,
      num_stages=num_stages,
      BLOCK_Q=layout.block_q,
      BLOCK_K=layout.block_k,
      HEAD_DIM=d_pad,
      CAUSAL=layout.causal,
      PRECISION="ieee" if q.dtype == jnp.float32 else "tf32",
      **{out_kw: out_type},
  )
  return out[..., :d]
