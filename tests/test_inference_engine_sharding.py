"""The KV cache under tensor parallelism: with fewer KV heads than tensor shards the cache
sequence is sharded instead of the cache being replicated; bytes per device fall and the
outputs stay those of one device."""

import jax
import numpy as np
import pytest

from glmjax import sharding
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models import KVCache, create_model, preset

CONFIG = preset("glm4-tiny")  # 4 query heads, 2 KV heads
PROMPTS = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
BUCKETS = (16, 32, 64, 128, 256)
# The layout before: cache sequence never sharded, so 2 KV heads on 4 shards are replicated.
REPLICATED_CACHE_RULES = tuple((name, None if name == "cache_seq" else target)
                               for name, target in sharding.DEFAULT_RULES)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, 1, 4, 1), devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def model():
    return create_model(CONFIG, seed=6)


def _cache_bytes_per_device(mesh, rules, batch: int, length: int) -> int:
    """Bytes of the K/V arrays of an empty per-layer cache on the most loaded device."""
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        compiled = jax.jit(lambda: KVCache.create(CONFIG, batch, length, stacked=False)).lower().compile()
    cache_shardings, cache_info = compiled.output_shardings, compiled.out_info
    total = 0
    for array, placement in zip(cache_info.k + cache_info.v, cache_shardings.k + cache_shardings.v):
        total += int(np.prod(placement.shard_shape(array.shape))) * array.dtype.itemsize
    return total


def test_cache_bytes_per_device_fall_with_2_kv_heads_on_4_tensor_shards(mesh, model, capsys):
    before = _cache_bytes_per_device(mesh, REPLICATED_CACHE_RULES, batch=8, length=512)
    after = _cache_bytes_per_device(mesh, sharding.DEFAULT_RULES, batch=8, length=512)
    whole = 2 * CONFIG.num_layers * 8 * CONFIG.num_kv_heads * 512 * CONFIG.head_dim * 4
    assert before == whole and after == whole // 4
    # The compiled generation program (cache of 8 rows x (256 + 256) positions) needs less.
    temp = {}
    for name, rules in (("before", REPLICATED_CACHE_RULES), ("after", None)):
        engine = GenerationEngine(model, mesh=mesh, rules=rules, max_batch_size=8, length_buckets=BUCKETS)
        temp[name] = engine.compile(8, 200, 256).memory_analysis().temp_size_in_bytes
    assert temp["after"] < temp["before"] - (before - after) // 2
    with capsys.disabled():
        print(f"\nKV cache per device on (1, 1, 4, 1), 2 KV heads, 8 x 512 positions: {before} -> {after} "
              f"bytes; generation program temporaries {temp['before']} -> {temp['after']} bytes")


@pytest.mark.parametrize("stacked", [False, True])
def test_sequence_sharded_cache_generates_what_one_device_does(mesh, model, stacked):
    reference = GenerationEngine(model, max_batch_size=4, length_buckets=(16, 32), stacked_layers=stacked)
    sharded = GenerationEngine(model, mesh=mesh, max_batch_size=4, length_buckets=(16, 32),
                               stacked_layers=stacked)
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    want = reference.generate(PROMPTS, sampling, max_new_tokens=24, seed=2)
    got = sharded.generate(PROMPTS, sampling, max_new_tokens=24, seed=2)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    np.testing.assert_allclose([r.logprobs for r in got], [r.logprobs for r in want], atol=1e-5)


def test_sequence_sharded_cache_with_samples_and_stop_strings(mesh, model):
    """The host-checked path (a donated, sharded decode state between calls) and the K-sample
    row copy of a sharded cache."""
    def detokenize(tokens):
        return " ".join(str(t % 10) for t in tokens)

    reference = GenerationEngine(model, max_batch_size=4, length_buckets=(16, 32))
    sharded = GenerationEngine(model, mesh=mesh, max_batch_size=4, length_buckets=(16, 32))
    sampling = SamplingConfig(temperature=1.0)
    kwargs = dict(max_new_tokens=20, seed=9, num_samples=2, stop_strings=["3 4", "7 7"],
                  detokenize=detokenize, stop_check_every=6)
    want = reference.generate(PROMPTS, sampling, **kwargs)
    got = sharded.generate(PROMPTS, sampling, **kwargs)
    assert [(r.tokens, r.finish_reason, r.text) for r in got] == [
        (r.tokens, r.finish_reason, r.text) for r in want]
    assert any(r.finish_reason == "stop" for r in got)
