"""SampleAttention under tensor / FSDP / sequence meshes of the 8 fake CPU devices.

``sharded_sample_attention`` must equal the unsharded call bit for bit in the selection
and to fp32 round-off in the output (1e-5), refuse gradients and packed inputs clearly,
and the sequence-parallel path (selection of the whole sequence, kernel for the local
query blocks only) must equal the full call for query rows that do not start on a block.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import sharding
from glmjax.models.sparse_attention import NO_GRADIENT_MESSAGE, sharded_sample_attention
from pallas_kernels.sample_attention import sample_attention
from pallas_kernels.sample_attention.synthetic import structured_qkv

TOL = 1e-5  # fp32; the shards run the same per-head programs as the unsharded call
KW = dict(alpha=0.9, window_ratio=0.1, row_ratio=0.2, block_q=16, block_k=16)


def _inputs(batch=2, seq=96, heads=4, kv_heads=2, dim=16):
    return structured_qkv(7, batch, seq, heads, kv_heads, dim, band=6.0, num_heavy=3)


def _sharded(mesh_shape, q, k, v, **kwargs):
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, sharding.named_sharding(axes, x.shape, mesh))
                   for x, axes in ((q, ("act_batch", "act_seq", "act_heads", "act_head_dim")),
                                   (k, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")),
                                   (v, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))))
        fn = jax.jit(lambda q, k, v: sharded_sample_attention(q, k, v, **KW, **kwargs))
        return fn(q, k, v), fn.lower(q, k, v).as_text()


@pytest.mark.parametrize("mesh_shape", [
    (1, 2, 2, 1),  # FSDP batch x tensor heads (KV heads split too)
    (1, 1, 4, 1),  # tensor 4 > 2 KV heads: query heads split, K/V sliced per shard
    (1, 1, 1, 2),  # sequence: gather, whole-sequence selection, local query blocks
    (2, 1, 2, 2),  # all three
])
def test_sharded_equals_unsharded(mesh_shape):
    q, k, v = _inputs()
    want, sel = sample_attention(q, k, v, causal=True, backend="xla", return_selection=True, **KW)
    assert float(sel.density.max()) < 0.9  # the selection really drops blocks
    got, hlo = _sharded(mesh_shape, q, k, v, backend="xla")
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)


def test_sequence_shards_with_unaligned_rows_and_pallas():
    """seq 100 over 2 shards: rows [50, 100) start inside block 3; Pallas (interpret) kernel."""
    q, k, v = _inputs(batch=1, seq=100)
    want = sample_attention(q, k, v, causal=True, backend="xla", **KW)
    got, _ = _sharded((1, 1, 1, 2), q, k, v, backend="pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)


def test_query_rows_subset_matches_full_call():
    """sample_attention(query_start, query_len) == rows of the full call, every backend."""
    q, k, v = _inputs(batch=1, seq=90)
    full = np.asarray(sample_attention(q, k, v, backend="reference", **KW))
    for backend in ("xla", "pallas", "reference"):
        for start, rows in ((0, 90), (0, 16), (37, 30), (75, 15), (13, 1)):
            got = sample_attention(q, k, v, backend=backend, interpret=True,
                                   query_start=jnp.int32(start), query_len=rows, **KW)
            assert got.shape == (1, rows, 4, 16)
            np.testing.assert_allclose(np.asarray(got), full[:, start:start + rows],
                                       rtol=TOL, atol=TOL, err_msg=f"{backend} {start} {rows}")
    with pytest.raises(ValueError, match="query_start needs query_len"):
        sample_attention(q, k, v, query_start=jnp.int32(5), **KW)
    with pytest.raises(ValueError, match="query_len must be in"):
        sample_attention(q, k, v, query_start=jnp.int32(0), query_len=91, **KW)


def test_no_gradient_error_is_clear():
    q, k, v = _inputs(batch=1, seq=32)
    loss = lambda q, k, v: sharded_sample_attention(q, k, v, alpha=0.95, block_q=16, block_k=16).sum()
    jax.jit(loss)(q, k, v)  # the forward pass is fine
    with pytest.raises(TypeError, match="'sample' is a prefill method: it has no gradient"):
        jax.grad(loss)(q, k, v)
    mesh = sharding.make_mesh((1, 1, 2, 1), devices=jax.devices()[:2])
    with jax.set_mesh(mesh), pytest.raises(TypeError, match=NO_GRADIENT_MESSAGE.split(":")[0]):
        jax.jit(jax.grad(loss, argnums=1)).lower(q, k, v)


def test_packed_inputs_are_refused():
    q, k, v = _inputs(batch=1, seq=32)
    segments = jnp.ones((1, 32), jnp.int32)
    with pytest.raises(ValueError, match="does not support packed inputs"):
        sharded_sample_attention(q, k, v, alpha=0.95, q_segment_ids=segments,
                                 kv_segment_ids=segments)
    with pytest.raises(ValueError, match="self-attention"):
        sharded_sample_attention(q, k[:, :16], v[:, :16], alpha=0.95)


def test_sharded_bf16_matches_unsharded():
    """bf16 inputs, tensor 4 over 2 KV heads: within 2e-2 of the unsharded call (bf16 output
    rounding; the selection itself is computed in fp32 on both sides)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs())
    want = sample_attention(q, k, v, causal=True, backend="xla", **KW)
    got, _ = _sharded((1, 1, 4, 1), q, k, v, backend="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)
