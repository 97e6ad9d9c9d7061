"""Triton kernel for SampleAttention (imports ``triton`` at module level).

Import this module only where Triton is installed; :mod:`triton_gpu` imports it
lazily. The kernel is framework-agnostic: it is launched from JAX through
jax-triton on GPU, and from PyTorch CPU tensors under ``TRITON_INTERPRET=1`` in the
CPU test.

Layout (contiguous, padded): q/o ``[batch, heads, padded_len, head_dim]``, k/v
``[batch, kv_heads, padded_len, head_dim]``, blocks ``[batch, heads, num_q_blocks,
list_len]`` int32, counts ``[batch, heads, num_q_blocks]`` int32. ``head_dim`` must
be a power of two, >= 16 (the wrapper pads it).
"""
import triton
import triton.language as tl


@triton.jit
def sample_attention_kernel(
    q_ptr, k_ptr, v_ptr, blocks_ptr, counts_ptr, scale, seq_len,
    heads, group, num_q_blocks, list_len, kv_heads, padded_len, o_ptr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
  """One program per (query block, batch * head): online softmax over its list.

  Query blocks are visited last-first: causal lists grow with the block index, so
  the longest programs start first and the tail of the launch is short.
  """
  i = num_q_blocks - 1 - tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // heads
  kvh = (bh % heads) // group
  row = bh * num_q_blocks + i
  count = tl.load(counts_ptr + row)

  q_pos = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
  dims = tl.arange(0, HEAD_DIM)
  q_base = bh.to(tl.int64) * padded_len * HEAD_DIM
  kv_base = (b * kv_heads + kvh).to(tl.int64) * padded_len * HEAD_DIM
  q = tl.load(q_ptr + q_base + q_pos[:, None] * HEAD_DIM + dims[None, :])

  m = tl.full((BLOCK_Q,), -1e30, tl.float32)
  l = tl.zeros((BLOCK_Q,), tl.float32)
  acc = tl.zeros((BLOCK_Q, HEAD_DIM), tl.float32)
  for t in range(0, count):
    j = tl.load(blocks_ptr + row.to(tl.int64) * list_len + t)
    k_pos = j * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets = kv_base + k_pos[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_ptr + offsets)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_Q, BLOCK_K]
    ok = k_pos[None, :] < seq_len
    if CAUSAL:
      ok = ok & (k_pos[None, :] <= q_pos[:, None])
    s = tl.where(ok, s, -1e30)
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
    correction = tl.exp(m - m_new)
    l = l * correction + tl.sum(p, 1)
    v = tl.load(v_ptr + offsets)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    m = m_new
  out = acc / tl.where(l > 0, l, 1.0)[:, None]
  tl.store(o_ptr + q_base + q_pos[:, None] * HEAD_DIM + dims[None, :],
           out.to(o_ptr.dtype.element_ty))
