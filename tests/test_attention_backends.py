"""The "blockwise" attention backend against the dense "xla" reference: outputs and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import sharding
from glmjax.models import attention as attention_lib
from glmjax.models import create_model, preset


def _qkv(seed: int, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim))
    cotangent = jax.random.normal(keys[3], q.shape)
    return q, k, v, cotangent


def _packed_segments(batch: int, seq: int, seed: int) -> np.ndarray:
    """Rows of 1-3 documents with random boundaries and right padding (segment 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
        row = np.zeros(seq, np.int32)
        row[: cuts[0]] = 1
        row[cuts[0]: cuts[1]] = 2
        row[cuts[1]: cuts[2]] = 3
        rows.append(row)
    return np.stack(rows)


def _attend(backend, q, k, v, segment_ids, block_size=None):
    if block_size is not None:
        seg = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        return attention_lib.blockwise_attention(q, k, v, seg, seg, block_q=block_size, block_k=block_size)
    return attention_lib.attend(
        q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_offsets=None, backend=backend
    )


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("seq,block_size", [(256, 64), (200, 64), (96, 128)])
@pytest.mark.parametrize("packed", [False, True])
def test_blockwise_matches_xla(heads, kv_heads, seq, block_size, packed):
    q, k, v, cotangent = _qkv(seq + heads, 2, seq, heads, kv_heads, 16)
    segment_ids = jnp.asarray(_packed_segments(2, seq, seq)) if packed else None
    # Padding queries see no key; their outputs are unspecified, so they get no cotangent.
    visible = jnp.ones(q.shape[:2], bool) if segment_ids is None else segment_ids != 0
    cotangent = cotangent * visible[:, :, None, None]

    def run(backend, block):
        def loss(q, k, v):
            out = _attend(backend, q, k, v, segment_ids, block)
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    ref_out, ref_grads = run("xla", None)
    out, grads = run("blockwise", block_size)
    mask = np.asarray(visible)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(out) * mask, np.asarray(ref_out) * mask, atol=2e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=5e-5, err_msg=f"d{name}")


def test_attend_dispatches_blockwise_and_falls_back_for_cached_queries():
    q, k, v, _ = _qkv(0, 2, 64, 4, 2, 16)
    dense = _attend("xla", q, k, v, None)
    np.testing.assert_allclose(_attend("blockwise", q, k, v, None), dense, atol=2e-5)
    # Decoding queries against a longer cache take the dense path.
    offsets = jnp.array([60, 50], jnp.int32)
    seg = jnp.ones((2, 64), jnp.int32)
    cached = dict(q_segment_ids=seg[:, :4], kv_segment_ids=seg, q_offsets=offsets)
    np.testing.assert_array_equal(
        attention_lib.attend(q[:, :4], k, v, backend="blockwise", **cached),
        attention_lib.attend(q[:, :4], k, v, backend="xla", **cached),
    )


def test_blockwise_model_logits_match_xla():
    config = preset("glm4-tiny").replace(num_layers=2)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 512, size=(2, 160)))
    segment_ids = jnp.asarray(np.repeat([[1, 2]], 80, axis=1))
    for segments in (None, segment_ids):
        reference = create_model(config, seed=4)(ids, segment_ids=segments)
        blockwise = create_model(config.replace(attention_backend="blockwise"), seed=4)(
            ids, segment_ids=segments
        )
        np.testing.assert_allclose(blockwise, reference, atol=1e-4)


def test_cached_attention_matches_dense_attention_on_a_heads_major_cache():
    q, k, v, _ = _qkv(5, 2, 32, 8, 2, 16)
    offsets = jnp.array([20, 9], jnp.int32)
    kv_segments = jnp.asarray((np.arange(32)[None] < np.array([[23], [12]])).astype(np.int32))
    q_segments = jnp.ones((2, 3), jnp.int32)
    expected = attention_lib.xla_attention(
        q[:, :3], k, v, attention_lib.attention_mask(q_segments, kv_segments, offsets))
    out = attention_lib.cached_attention(
        q[:, :3], jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
        q_segment_ids=q_segments, kv_segment_ids=kv_segments, q_offsets=offsets)
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("mesh_shape,heads,kv_heads", [
    ((1, 1, 8, 1), 16, 2),  # query heads split 8 ways, 2 KV heads replicated: 2 heads per shard
    ((2, 1, 4, 1), 8, 2),   # batch x tensor; 2 query heads per shard share one KV head
    ((1, 1, 8, 1), 8, 4),   # one query head per shard
    ((2, 1, 2, 1), 4, 2),   # KV heads split too
])
def test_sharded_splash_keeps_query_heads_local(mesh_shape, heads, kv_heads):
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    q, k, v, _ = _qkv(6, 2, 128, heads, kv_heads, 32)
    seg = jnp.asarray(np.repeat([[1, 2]], 64, axis=1).repeat(2, axis=0))
    expected = attention_lib.xla_attention(q, k, v, attention_lib.attention_mask(seg, seg, None))
    with jax.set_mesh(mesh):
        run = jax.jit(lambda q, k, v, seg: attention_lib.attend(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offsets=None, backend="splash"))
        place = lambda x, axes: jax.device_put(x, sharding.named_sharding(axes, x.shape, mesh))
        kv_axes = ("act_batch", None, "act_kv_heads", None)
        args = (place(q, ("act_batch", None, "act_heads", None)), place(k, kv_axes),
                place(v, kv_axes), place(seg, ("act_batch", None)))
        out = run(*args)
        hlo = run.lower(*args).compile().as_text()
    np.testing.assert_allclose(out, expected, atol=2e-5)
    assert "all-gather" not in hlo  # no shard gathers the other shards' query heads
    # Gradients: a replicated K/V gets the sum of every shard's contribution.
    cotangent = jax.random.normal(jax.random.key(7), q.shape)

    def loss(backend, q, k, v):
        out = attention_lib.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offsets=None,
                                   backend=backend)
        return jnp.sum(out * cotangent)

    expected_grads = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(functools.partial(loss, "splash"), argnums=(0, 1, 2)))(*args[:3])
    for name, grad, reference in zip("qkv", grads, expected_grads):
        np.testing.assert_allclose(grad, reference, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("mesh_shape,kv_heads,expected_spec", [
    ((1, 1, 4, 1), 2, (None, None, "tensor", None)),             # KV heads < tensor: sequence split
    ((2, 1, 2, 1), 2, ("data", "tensor", None, None)),           # KV heads split, sequence whole
    ((1, 1, 2, 2), 2, (None, "tensor", "sequence", None)),       # context parallel decode
    ((1, 2, 2, 2), 1, ("fsdp", None, ("sequence", "tensor"), None)),
])
def test_sharded_cache_write_and_decode_attention_match_one_device(mesh_shape, kv_heads, expected_spec):
    """Per-shard cache writes and split-K decode attention equal the unsharded reference, for
    queries whose rows have filled 0..all of the cache (so some sequence shards are empty)."""
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    batch, length, heads, head_dim, t = 4, 32, 8, 16, 2
    q, k, v, _ = _qkv(8, batch, length, heads, kv_heads, head_dim)
    cache_k, cache_v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, kv_heads, len, h]
    new_k, new_v = k[:, :t] * 2, v[:, :t] - 1
    starts = jnp.array([0, 7, 16, 29], jnp.int32)  # row 3 writes past the end: dropped
    filled = (np.arange(length)[None] < np.asarray(starts + t)[:, None]).astype(np.int32)
    kv_segments = jnp.asarray(filled)
    q_segments = jnp.ones((batch, t), jnp.int32)

    def step(cache_k, cache_v, new_k, new_v, q):
        cache_k = attention_lib.write_cache(cache_k, new_k, starts)
        cache_v = attention_lib.write_cache(cache_v, new_v, starts)
        out = attention_lib.decode_attention(q, cache_k, cache_v, q_segment_ids=q_segments,
                                             kv_segment_ids=kv_segments, q_offsets=starts)
        return cache_k, cache_v, out

    expected = jax.jit(step)(cache_k, cache_v, new_k, new_v, q[:, :t])
    reference = attention_lib.cached_attention(q[:, :t], expected[0], expected[1], q_segment_ids=q_segments,
                                               kv_segment_ids=kv_segments, q_offsets=starts)
    np.testing.assert_allclose(expected[2], reference, atol=1e-6)
    with jax.set_mesh(mesh):
        spec = attention_lib.cache_spec(cache_k.shape, mesh)
        assert tuple(spec) == expected_spec
        place = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        run = jax.jit(step)
        args = (place(cache_k), place(cache_v), new_k, new_v, q[:, :t])
        out = run(*args)
        hlo = run.lower(*args).compile().as_text()
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert out[0].sharding.spec == spec
    # Only queries ([b, t, heads, h]) are ever gathered, never the cache.
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line]
    assert all(f"[{batch},{length}" not in line and f",{length},{head_dim}]" not in line for line in gathered)
