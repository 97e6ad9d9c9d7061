"""Packed flash attention kernels (Pallas, Triton lowering) vs the dense jnp reference.

The kernels run in the Pallas interpreter on CPU (``interpret=True``): outputs and gradients
of q, k and v. Tolerances: fp32 within 1e-5 (absolute and relative); bf16 inputs against the
fp32 reference on the same (bf16-rounded) values within 2e-2 of the largest reference entry
(bf16 has an 8-bit mantissa: 2^-8 = 4e-3 per rounding, and P and dS are rounded once more
before their matrix products). A final test lowers the kernels for CUDA on this CPU host and
reads the emitted Triton IR.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import allowed_mask, flash_attention, reference_attention
from pallas_kernels.flash_attention.block_ranges import block_segment_bounds, visible_block_ranges

FP32_TOL = 1e-5
BF16_TOL = 2e-2


def _inputs(seed, batch, seq_q, seq_kv, heads, kv_heads, head_dim, dtype=jnp.float32):
  """Random q, k, v and an output cotangent."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq_q, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq_kv, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq_kv, kv_heads, head_dim), dtype)
  out_grad = jax.random.normal(keys[3], (batch, seq_q, heads, head_dim), dtype)
  return q, k, v, out_grad


def _segments(*rows):
  """int32 [len(rows), sum of lengths]: each row a list of (segment id, length) runs."""
  return jnp.array([sum(([sid] * n for sid, n in row), []) for row in rows], jnp.int32)


def _value_and_grads(attention, q, k, v, out_grad, **kwargs):
  """(out, dq, dk, dv) of ``attention(q, k, v, **kwargs)`` under the cotangent ``out_grad``,
  in one jitted program (the interpreter's kernels compile faster together than one by one)."""

  def run(q, k, v, out_grad):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kwargs), q, k, v)
    return (out, *vjp(out_grad))

  return jax.jit(run)(q, k, v, out_grad)


def _assert_fp32_close(got, want):
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, rtol=FP32_TOL, atol=FP32_TOL, err_msg=name)


def test_block_ranges_are_sound_and_tight_for_packed_documents():
  """Ranges never exclude a block pair that shares a nonzero id (random ids, any order), and
  for documents laid out in order they are exactly the blocks of the block's own documents."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 4, (3, 96)), jnp.int32)
  ids = ids.at[1, 32:64].set(0)  # a block of padding
  q_bounds, kv_bounds = block_segment_bounds(ids, 16), block_segment_bounds(ids, 32)
  for rows, columns, row_block, column_block in ((q_bounds, kv_bounds, 16, 32),
                                                 (kv_bounds, q_bounds, 32, 16)):
    ranges = np.asarray(visible_block_ranges(rows, columns))
    ids_np = np.asarray(ids)
    for b in range(3):
      for i in range(ranges.shape[1]):
        row_ids = set(ids_np[b, i * row_block:(i + 1) * row_block]) - {0}
        for j in range(96 // column_block):
          shared = row_ids & set(ids_np[b, j * column_block:(j + 1) * column_block])
          assert not shared or ranges[b, i, 0] <= j < ranges[b, i, 1], (b, i, j)
  packed = _segments([(1, 32), (2, 40), (3, 24), (0, 32)])  # blocks of 32
  bounds = block_segment_bounds(packed, 32)
  np.testing.assert_array_equal(visible_block_ranges(bounds, bounds)[0],
                                [[0, 1], [1, 3], [1, 3], [4, 0]])


def test_packed_gqa_fp32_matches_dense():
  """4 query heads on 2 KV heads, three packed documents and tail padding in row 0; in row 1
  two segments interleaved (ids 7, 9, 7, 9: not contiguous, so the segment ranges are loose
  and the elementwise mask does the work); several query and key blocks."""
  q, k, v, out_grad = _inputs(0, 2, 128, 128, 4, 2, 32)
  segments = _segments([(1, 40), (2, 30), (3, 38), (0, 20)], [(7, 32), (9, 32), (7, 32), (9, 32)])
  kwargs = dict(q_segment_ids=segments, kv_segment_ids=segments)
  got = _value_and_grads(flash_attention, q, k, v, out_grad, block_q=32, block_k=32,
                         interpret=True, **kwargs)
  want = _value_and_grads(reference_attention, q, k, v, out_grad, **kwargs)
  _assert_fp32_close(got, want)
  # Padding queries output 0 and get no gradient.
  np.testing.assert_array_equal(got[0][0, -20:], 0.0)
  np.testing.assert_array_equal(got[1][0, -20:], 0.0)


def test_packed_gqa_bf16_matches_dense():
  q, k, v, out_grad = _inputs(1, 2, 128, 128, 4, 2, 64, jnp.bfloat16)
  segments = _segments([(1, 100), (0, 28)], [(1, 30), (2, 98)])
  kwargs = dict(q_segment_ids=segments, kv_segment_ids=segments)
  got = _value_and_grads(flash_attention, q, k, v, out_grad, block_q=64, block_k=32,
                         interpret=True, **kwargs)
  upcast = [x.astype(jnp.float32) for x in (q, k, v, out_grad)]
  want = _value_and_grads(reference_attention, *upcast, **kwargs)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == jnp.bfloat16, name
    error = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
    assert error <= BF16_TOL * float(jnp.max(jnp.abs(b))), (name, error)


def test_query_chunks_with_traced_offset_match_full_attention():
  """Context parallelism: each of 3 chunks of 64 queries attends to all 192 keys with
  ``q_offset = chunk * 64`` (a traced scalar: one compile for every chunk). The chunks'
  outputs tile the full attention, and the gradients of one chunk match the dense ones."""
  seq, chunk = 192, 64
  q, k, v, out_grad = _inputs(2, 1, seq, seq, 4, 2, 32)
  segments = _segments([(1, 50), (2, 100), (3, 42)])

  @jax.jit
  def chunk_value_and_grads(q_chunk, q_seg_chunk, grad_chunk, offset):
    return _value_and_grads(flash_attention, q_chunk, k, v, grad_chunk, q_segment_ids=q_seg_chunk,
                            kv_segment_ids=segments, q_offset=offset, block_q=32, block_k=32,
                            interpret=True)

  full = _value_and_grads(reference_attention, q, k, v, out_grad, q_segment_ids=segments,
                          kv_segment_ids=segments)[0]
  for n in range(seq // chunk):
    rows = slice(n * chunk, (n + 1) * chunk)
    got = chunk_value_and_grads(q[:, rows], segments[:, rows], out_grad[:, rows], jnp.int32(n * chunk))
    np.testing.assert_allclose(got[0], full[:, rows], rtol=FP32_TOL, atol=FP32_TOL, err_msg=f"chunk {n}")
    if n == 1:
      want = _value_and_grads(reference_attention, q[:, rows], k, v, out_grad[:, rows],
                              q_segment_ids=segments[:, rows], kv_segment_ids=segments,
                              q_offset=n * chunk)
      _assert_fp32_close(got, want)


def test_lengths_not_multiples_of_blocks_and_per_row_offsets():
  """Chunked prefill: 50 new queries after 27 and 10 cached tokens (a per-row offset) over 77
  keys, head_dim 24; sequences and head_dim are padded inside."""
  q, k, v, out_grad = _inputs(3, 2, 50, 77, 4, 2, 24)
  q_seg = _segments([(1, 50)], [(1, 30), (2, 20)])
  kv_seg = _segments([(1, 77)], [(1, 40), (2, 30), (0, 7)])
  kwargs = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=jnp.array([27, 10], jnp.int32))
  got = _value_and_grads(flash_attention, q, k, v, out_grad, block_q=32, block_k=32,
                         interpret=True, **kwargs)
  want = _value_and_grads(reference_attention, q, k, v, out_grad, **kwargs)
  assert got[0].shape == q.shape and got[2].shape == k.shape
  _assert_fp32_close(got, want)


def test_rows_that_see_no_key_are_zero_and_not_causal():
  """Queries of a segment absent from the keys, and a whole row of padding keys, output 0 with
  finite zero gradients; ``causal=False`` attends to later keys of the same segment."""
  q, k, v, out_grad = _inputs(4, 2, 64, 64, 2, 2, 32)
  q_seg = _segments([(1, 32), (5, 32)], [(1, 64)])
  kv_seg = _segments([(1, 64)], [(0, 64)])
  kwargs = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=False)
  got = _value_and_grads(flash_attention, q, k, v, out_grad, block_q=16, block_k=32,
                         interpret=True, **kwargs)
  want = _value_and_grads(reference_attention, q, k, v, out_grad, **kwargs)
  _assert_fp32_close(got, want)
  assert not np.any(allowed_mask(q_seg, kv_seg, causal=False)[0, 32:])
  np.testing.assert_array_equal(got[0][0, 32:], 0.0)
  np.testing.assert_array_equal(got[0][1], 0.0)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  # Non-causal: query 0 of row 0 sees all 32 keys of segment 1, not only key 0.
  assert float(jnp.max(jnp.abs(got[0][0, 0] - v[0, 0, 0]))) > 1e-2


def test_bad_inputs_raise_clear_errors():
  q, k, v, _ = _inputs(5, 1, 32, 32, 4, 2, 32)
  seg = jnp.ones((1, 32), jnp.int32)
  kwargs = dict(q_segment_ids=seg, kv_segment_ids=seg)
  with pytest.raises(ValueError, match="pass interpret=True"):
    flash_attention(q, k, v, **kwargs)  # CPU host, interpret=False
  with pytest.raises(ValueError, match="block_q must be a power of two >= 16; got 48"):
    flash_attention(q, k, v, block_q=48, interpret=True, **kwargs)
  with pytest.raises(ValueError, match="kv_segment_ids must be integer"):
    flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg[:, :16], interpret=True)
  with pytest.raises(ValueError, match="not a multiple of kv heads"):
    flash_attention(q[:, :, :3], k, v, interpret=True, **kwargs)
  with pytest.raises(ValueError, match="q_offset must be"):
    flash_attention(q, k, v, q_offset=jnp.zeros((3,), jnp.int32), interpret=True, **kwargs)
  with pytest.raises(ValueError, match="one dtype"):
    flash_attention(q, k.astype(jnp.bfloat16), v, interpret=True, **kwargs)


def _triton_modules(lowered):
  """(kernel name, num_warps, Triton IR text) of every Pallas Triton custom call in a lowering."""
  from jax._src.lib.mlir import ir
  from jax._src.pallas.triton import lowering as triton_lowering

  found = []

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for op in block.operations:
          if op.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
            config = op.attributes["mhlo.backend_config"]
            with triton_lowering._new_ir_context():
              module = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
            found.append((ir.StringAttr(config["name"]).value,
                          ir.IntegerAttr(config["num_warps"]).value, module))
          walk(op.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  return found


@pytest.mark.parametrize("dtype,seq,heads,kv_heads,head_dim,causal,offset_shape,warps", [
    (jnp.bfloat16, 256, 4, 2, 64, True, (), 4),
    # 3 query heads per KV head, 192 keys (3 blocks of 64), head_dim 128, per-row offsets.
    (jnp.float32, 192, 6, 2, 128, False, (2,), 8),
])
def test_lowers_to_triton_for_cuda_without_a_gpu(dtype, seq, heads, kv_heads, head_dim, causal,
                                                 offset_shape, warps):
  """Forward and both backward kernels lower through Pallas' Triton path for CUDA (the jaxlib
  0.10.2 lowering emits Triton IR in a custom call; PTX is compiled by XLA on a GPU host, which
  this test cannot do). No [seq, seq] array appears in the surrounding program; fp32 products
  are IEEE fp32 under ``jax_default_matmul_precision="highest"``."""
  batch = 2
  mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"))

  def loss(q, k, v, segments, offset):
    out = flash_attention(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, q_offset=offset,
                          causal=causal)
    return jnp.sum(out.astype(jnp.float32))

  shape = jax.ShapeDtypeStruct
  args = (shape((batch, seq, heads, head_dim), dtype),
          shape((batch, seq, kv_heads, head_dim), dtype),
          shape((batch, seq, kv_heads, head_dim), dtype),
          shape((batch, seq), jnp.int32), shape(offset_shape, jnp.int32))
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",))
  assert f"{seq}x{seq}" not in lowered.as_text()
  modules = {name: (num_warps, text) for name, num_warps, text in _triton_modules(lowered)}
  assert sorted(modules) == ["flash_attention_dkdv", "flash_attention_dq", "flash_attention_forward"]
  # Matrix products per tile: QK^T and PV; QK^T, dO V^T and dS K; plus P^T dO and dS^T Q.
  dots = {"flash_attention_forward": 2, "flash_attention_dq": 3, "flash_attention_dkdv": 4}
  for name, (num_warps, text) in modules.items():
    assert num_warps == warps, name
    assert text.count("tt.dot ") == dots[name], name
    assert "scf.for" in text, name  # the key (query) loop
    if dtype == jnp.float32:  # conftest sets jax_default_matmul_precision="highest"
      assert "inputPrecision" not in text, name  # IEEE is the attribute's default: not printed
