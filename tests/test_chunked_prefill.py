"""Chunked prefill: a long prompt prefilled in chunks that attend over the cache with the flash
kernel gives the same cache and the same greedy continuation as one forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.inference.engine import GenerationEngine, SamplingConfig
from glmjax.models import attention as attention_lib
from glmjax.models import create_model, preset


def test_chunk_attention_matches_cached_attention():
    """A chunk of queries at per-row offsets against a heads-major cache, with empty slots."""
    keys = jax.random.split(jax.random.key(0), 3)
    batch, length, heads, kv_heads, head_dim, t = 3, 96, 4, 2, 16, 24
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_heads, length, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_heads, length, head_dim))
    offsets = jnp.array([0, 17, 72], jnp.int32)
    filled = np.arange(length)[None] < np.asarray(offsets + t)[:, None]
    kv_segments = jnp.asarray(filled.astype(np.int32))
    q_segments = jnp.ones((batch, t), jnp.int32).at[0, 20:].set(0)  # row 0's tail is padding
    args = dict(q_segment_ids=q_segments, kv_segment_ids=kv_segments, q_offsets=offsets)
    want = attention_lib.cached_attention(q, k, v, **args)
    got = jax.jit(lambda q, k, v: attention_lib.chunk_attention(q, k, v, **args))(q, k, v)
    visible = np.asarray(q_segments != 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(got) * visible, np.asarray(want) * visible, atol=2e-5)


@pytest.mark.parametrize("stacked", [False, True])
def test_chunked_prefill_generates_like_one_forward(stacked):
    config = preset("glm4-tiny").replace(vocab_size=256, max_position_embeddings=256)
    model = create_model(config, seed=3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(2, 256, size=n)) for n in (5, 40, 70, 100)]
    greedy = SamplingConfig(temperature=0.0)

    def run(chunk):
        engine = GenerationEngine(model, max_batch_size=4, length_buckets=(128,), prefill_chunk=chunk,
                                  stacked_layers=stacked)
        out = engine.generate(prompts, max_new_tokens=12, sampling=greedy)
        return [row.tokens for row in out]

    assert run(16) == run(None)  # 128-token bucket: 8 chunks of 16; row 0 fits in the first


def test_chunked_prefill_bounds_activation_memory_for_long_prompts():
    """The compiled program for a 16K prompt: chunks of 1K hold 1K tokens' activations."""
    from glmjax.models import abstract_model

    config = preset("glm4-tiny").replace(hidden_size=256, intermediate_size=1024, num_heads=8, num_kv_heads=2,
                                         max_position_embeddings=32768, attention_backend="blockwise")

    def temp_bytes(chunk):
        engine = GenerationEngine(abstract_model(config), max_batch_size=1, prefill_chunk=chunk)
        return engine.compile(1, 16384, 16, SamplingConfig(temperature=0.0)).memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(None), temp_bytes(1024)
    print(f"16K-token prefill temporaries: one forward {whole} B, 1K chunks {chunked} B")
    assert chunked < whole / 3
