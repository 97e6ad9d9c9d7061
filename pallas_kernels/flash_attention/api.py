"""Public entry point: :func:`flash_attention` (checks, padding, custom VJP, platform check)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import kernels
from pallas_kernels.flash_attention.block_ranges import block_segment_bounds, visible_block_ranges
from pallas_kernels.platform import current_platform

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN_BLOCK = 16  # Triton's tl.dot needs every dimension >= 16
# ``jax_default_matmul_precision`` values that ask for full fp32 products.
_FULL_FP32 = ("highest", "float32", "F32_F32_F32")


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _block(requested: int, length: int) -> int:
  """The block actually used: ``requested``, shrunk for short sequences (power of two >= 16)."""
  return min(requested, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _check(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
           kv_segment_ids: jax.Array, offset: jax.Array, block_q: int, block_k: int) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention: q, k, v must be [batch, seq, heads, head_dim]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} differ in shape")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} differ in batch or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"flash_attention: q heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
  if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
    raise ValueError(f"flash_attention: q, k, v need one dtype among float32, bfloat16, float16; "
                     f"got {q.dtype}, {k.dtype}, {v.dtype}")
  for name, ids, expected in (("q_segment_ids", q_segment_ids, q.shape[:2]),
                              ("kv_segment_ids", kv_segment_ids, k.shape[:2])):
    if ids.shape != expected or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"flash_attention: {name} must be integer {list(expected)}; got "
                       f"{ids.dtype} {list(ids.shape)}")
  if offset.shape not in ((), (q.shape[0],)) or not jnp.issubdtype(offset.dtype, jnp.integer):
    raise ValueError(f"flash_attention: q_offset must be an int or an integer array of shape [] or "
                     f"[{q.shape[0]}]; got {offset.dtype} {list(offset.shape)}")
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if not _is_power_of_two(block) or block < _MIN_BLOCK:
      raise ValueError(f"flash_attention: {name} must be a power of two >= {_MIN_BLOCK}; got {block}")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    causal: bool = True,
    sm_scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
  """Fused attention with segment ids and a causal offset (Pallas, Triton lowering on GPU).

  Query i of row b attends to key j when ``q_segment_ids[b, i] == kv_segment_ids[b, j] != 0``
  and, if ``causal``, ``j <= q_offset + i``. The kernels never build a ``[seq_q, seq_kv]`` mask
  or score matrix: they stream key blocks with an fp32 online softmax over the intersection of
  the causal range (stopping at the diagonal, computed from the offset at run time) and the
  blocks that hold the query block's packed documents (see :mod:`block_ranges`).
  Differentiable (``jax.custom_vjp`` with Pallas dq and dk/dv kernels; the forward saves only
  its output and the fp32 log-sum-exp per query).

  Args:
    q: ``[batch, seq_q, heads, head_dim]``.
    k, v: ``[batch, seq_kv, kv_heads, head_dim]``, ``heads % kv_heads == 0``; query head h reads
      KV head ``h // (heads // kv_heads)`` (grouped-query attention, K/V not repeated). q, k, v
      share one dtype: float32, bfloat16 or float16.
    q_segment_ids: int ``[batch, seq_q]``; kv_segment_ids: int ``[batch, seq_kv]``. Segment 0
      is padding: no query attends to such a key, and a query of segment 0 outputs 0.
    q_offset: position of query 0 among the keys: a Python int or an integer array of shape
      ``[]`` or ``[batch]``, traced values allowed (context parallelism: a device holding query
      chunk n of length c passes ``n * c`` with all keys; chunked prefill: the cached length).
    causal: apply the causal rule; False attends to every key of the same segment.
    sm_scale: logit scale; ``1 / sqrt(head_dim)`` when None.
    block_q, block_k: tile sizes, powers of two >= 16 (shrunk to the padded length for short
      sequences). Sequences are padded internally to multiples of them (padding keys get
      segment 0), head_dim to a power of two >= 16.
    num_warps: Triton warps per program; 4 for head_dim <= 64, else 8, when None.
    num_stages: Triton software-pipelining stages.
    interpret: run the kernels in the Pallas interpreter (CPU tests). Without it the platform
      (the ambient mesh's, else the default backend) must be a GPU.

  Precision: fp32 inputs are multiplied in TF32 on GPU (as XLA does by default) unless
  ``jax_default_matmul_precision`` is "highest"/"float32"/"F32_F32_F32", which gives IEEE fp32;
  softmax statistics and accumulators are fp32 in every case.

  Returns:
    ``[batch, seq_q, heads, head_dim]`` in q's dtype; rows that see no key are 0.

  Raises:
    ValueError: bad shapes, dtypes or block sizes, or a non-GPU platform without ``interpret``.
  """
  offset = jnp.asarray(q_offset)
  _check(q, k, v, q_segment_ids, kv_segment_ids, offset, block_q, block_k)
  if not interpret and current_platform() != "gpu":
    raise ValueError(
        f"flash_attention: the Triton kernels compile for GPU only, but this program is built for "
        f"{current_platform()!r}; pass interpret=True to run them in the Pallas interpreter")
  batch, seq_q, heads, head_dim = q.shape
  seq_kv = k.shape[1]
  bq, bk = _block(block_q, seq_q), _block(block_k, seq_kv)
  dim = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
  cfg = kernels.KernelConfig(
      sm_scale=1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale),
      causal=bool(causal), block_q=bq, block_k=bk,
      num_warps=(4 if dim <= 64 else 8) if num_warps is None else num_warps,
      num_stages=num_stages, interpret=interpret,
      precision=(jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
                 and jax.config.jax_default_matmul_precision in _FULL_FP32 else None))
  seq_q_pad, seq_kv_pad = pl.cdiv(seq_q, bq) * bq, pl.cdiv(seq_kv, bk) * bk
  q = _pad_axis(_pad_axis(q, 1, seq_q_pad), 3, dim)
  k = _pad_axis(_pad_axis(k, 1, seq_kv_pad), 3, dim)
  v = _pad_axis(_pad_axis(v, 1, seq_kv_pad), 3, dim)
  q_seg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, seq_q_pad)
  kv_seg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, seq_kv_pad)
  offsets = jnp.broadcast_to(offset.astype(jnp.int32), (batch,))
  q_bounds, kv_bounds = block_segment_bounds(q_seg, bq), block_segment_bounds(kv_seg, bk)
  key_ranges = visible_block_ranges(q_bounds, kv_bounds)
  query_ranges = visible_block_ranges(kv_bounds, q_bounds)
  out = _flash(q, k, v, q_seg, kv_seg, offsets, key_ranges, query_ranges, cfg)
  return out[:, :seq_q, :, :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
           offsets: jax.Array, key_ranges: jax.Array, query_ranges: jax.Array,
           cfg: kernels.KernelConfig) -> jax.Array:
  """Padded core (layouts of :mod:`kernels`): the attention output only."""
  return kernels.forward(q, k, v, q_seg, kv_seg, offsets, key_ranges, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, offsets, key_ranges, query_ranges, cfg):
  out, lse = kernels.forward(q, k, v, q_seg, kv_seg, offsets, key_ranges, cfg)
  return out, (q, k, v, q_seg, kv_seg, offsets, key_ranges, query_ranges, out, lse)


def _flash_bwd(cfg, residuals, out_grad):
  q, k, v, q_seg, kv_seg, offsets, key_ranges, query_ranges, out, lse = residuals
  # Softmax backward: dS = P * (dP - delta) with delta_i = sum_j P_ij dP_ij = <dO_i, O_i>.
  # (An elementwise product, not an einsum: GPU matmuls may round fp32 to TF32.)
  delta = jnp.sum(out_grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.transpose(0, 2, 1)  # [batch, heads, seq_q]
  dq = kernels.query_grad(q, k, v, q_seg, kv_seg, offsets, key_ranges, out_grad, lse, delta, cfg)
  dk, dv = kernels.key_value_grads(q, k, v, q_seg, kv_seg, offsets, query_ranges, out_grad, lse,
                                   delta, cfg)
  return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
