"""Generation engine: greedy parity with transformers, sampling filters, finish reasons, buckets,
sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import glmjax
from glmjax import sharding
from glmjax.models import abstract_model, create_model, preset
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import (
    SamplingConfig, first_argmax, nucleus_mask, process_logits, select_tokens, token_logprobs)
from hf_models import ARCHITECTURES, make_hf_model

VOCAB = 251
EOS = 1
MAX_NEW = 8
# Prompts of different lengths; token ids avoid pad (0) and eos (1).
PROMPTS = [list(np.random.default_rng(n).integers(2, VOCAB, size=n)) for n in (5, 11, 3, 8)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def models(request, tmp_path_factory):
    """(transformers model, glmjax engine) with the same random weights."""
    hf_model = make_hf_model(request.param, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    engine = GenerationEngine(glmjax.from_pretrained(str(path)), max_batch_size=4, length_buckets=(16,))
    return hf_model, engine


def _hf_greedy(hf_model, prompts: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """Left-padded batched greedy ``generate``; returns completions cut after eos, and logits."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                pad_token_id=0, eos_token_id=EOS, output_logits=True,
                                return_dict_in_generate=True)
    completions = []
    for row in out.sequences[:, width:].tolist():
        completions.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return completions, torch.stack(out.logits, dim=1).numpy()


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_matches_transformers(models, batch):
    hf_model, engine = models
    prompts = PROMPTS[:batch]
    expected, hf_logits = _hf_greedy(hf_model, prompts)
    results = engine.generate(prompts, max_new_tokens=MAX_NEW, stop_token_ids=[EOS])
    for row, (result, want) in enumerate(zip(results, expected)):
        assert result.tokens == want, f"row {row}"
        assert result.finish_reason == ("stop" if want[-1] == EOS else "length")
        # Greedy log-probs are the raw log-softmax of the model's logits.
        reference = jax.nn.log_softmax(jnp.asarray(hf_logits[row, : len(want)]), axis=-1)
        np.testing.assert_allclose(result.logprobs, np.asarray(reference)[np.arange(len(want)), want],
                                   atol=1e-4)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("glm-engine")
    make_hf_model("glm", seed=5).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def glm_engine(glm_dir):
    return GenerationEngine(glmjax.from_pretrained(glm_dir), max_batch_size=4, length_buckets=(16,))


def test_finish_reasons_and_no_recompilation(glm_engine):
    greedy = glm_engine.generate(PROMPTS, max_new_tokens=MAX_NEW)
    traces = glm_engine.trace_count
    assert all(r.finish_reason == "length" and len(r.tokens) == MAX_NEW for r in greedy)
    # Stop at the third greedy token of row 0; per-row stop lists; a shorter budget.
    stop = greedy[0].tokens[2]
    stopped = glm_engine.generate(PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[[stop], [], [], []])
    assert stopped[0].tokens == greedy[0].tokens[: greedy[0].tokens.index(stop) + 1]
    assert stopped[0].finish_reason == "stop"
    assert [r.tokens for r in stopped[1:]] == [r.tokens for r in greedy[1:]]
    short = glm_engine.generate(PROMPTS[::-1], max_new_tokens=3, seed=7)
    assert [r.tokens for r in short] == [r.tokens[:3] for r in greedy[::-1]]
    assert all(r.finish_reason == "length" for r in short)
    # Same buckets (batch 4, prompt 16, budget 16, 4 stop slots, greedy): nothing recompiled.
    assert glm_engine.trace_count == traces and glm_engine.num_programs == 1


def test_engine_sampling_seeded_and_low_temperature_is_greedy(glm_engine):
    greedy = glm_engine.generate(PROMPTS, max_new_tokens=MAX_NEW)
    hot = SamplingConfig(temperature=1.5)
    first = glm_engine.generate(PROMPTS, hot, max_new_tokens=MAX_NEW, seed=1)
    assert [r.tokens for r in glm_engine.generate(PROMPTS, hot, max_new_tokens=MAX_NEW, seed=1)] == \
        [r.tokens for r in first]
    other = glm_engine.generate(PROMPTS, hot, max_new_tokens=MAX_NEW, seed=2)
    assert [r.tokens for r in other] != [r.tokens for r in first]
    # A row's draws follow its own seed (seed=1 means seeds 1, 2, 3, 4), wherever it sits.
    reordered = glm_engine.generate(PROMPTS[::-1], hot, max_new_tokens=MAX_NEW, seed=[4, 3, 2, 1])
    assert [r.tokens for r in reordered] == [r.tokens for r in first[::-1]]
    traces = glm_engine.trace_count
    cold = glm_engine.generate(PROMPTS, SamplingConfig(temperature=1e-5), max_new_tokens=MAX_NEW, seed=3)
    assert [r.tokens for r in cold] == [r.tokens for r in greedy]
    assert glm_engine.trace_count == traces  # temperature is data, not shape
    # Processed log-probs of a near-deterministic draw are ~0.
    assert max(abs(x) for r in cold for x in r.logprobs) < 1e-3


def test_engine_rejects_bad_prompts(glm_engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        glm_engine.generate([[3], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0: token ids \[251\]"):
        glm_engine.generate([[3, VOCAB]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        glm_engine.generate([[3]], max_new_tokens=17)
    with pytest.raises(ValueError, match="prompt 0: 17 tokens"):
        glm_engine.generate([[3] * 17], max_new_tokens=4)


def test_sharded_engine_equals_unsharded(glm_dir, glm_engine):
    mesh = sharding.make_mesh((2, 1, 2, 1), devices=jax.devices()[:4])
    model = glmjax.from_pretrained(glm_dir)
    sharded = GenerationEngine(model, mesh=mesh, max_batch_size=4, length_buckets=(16,))
    spec = sharded.state["layers"][0]["mlp"]["down_kernel"].sharding.spec  # per-layer layout
    assert "tensor" in str(spec)
    # Same sampling bucket as the seeded test above: the unsharded reference is already compiled.
    sampling = SamplingConfig(temperature=0.8, top_p=1.0)
    ours = sharded.generate(PROMPTS, sampling, max_new_tokens=MAX_NEW, seed=4)
    reference = glm_engine.generate(PROMPTS, sampling, max_new_tokens=MAX_NEW, seed=4)
    assert [r.tokens for r in ours] == [r.tokens for r in reference]
    np.testing.assert_allclose([r.logprobs for r in ours], [r.logprobs for r in reference], atol=1e-4)


# -- sampling functions on synthetic logits ---------------------------------------------------------


def _draws(logits, sampling: SamplingConfig, n: int = 400) -> np.ndarray:
    greedy, top_k, use_top_p = sampling.static_key()
    fn = jax.jit(jax.vmap(
        lambda keys: select_tokens(logits, keys, sampling.dynamic_values(), greedy=greedy, top_k=top_k,
                                   use_top_p=use_top_p, logprob_mode="processed")[0]))
    keys = jax.random.split(jax.random.key(0), (n, logits.shape[0]))
    return np.asarray(fn(keys))  # [n, batch]


LOGITS = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.3, 0.4]]))


@pytest.mark.parametrize("sampling,allowed", [
    (SamplingConfig(temperature=1.0, top_k=2), [{0, 1}, {3, 4}]),
    (SamplingConfig(temperature=1.0, top_p=0.6), [{0, 1}, {3, 4}]),       # 0.4 < 0.6 <= 0.7
    (SamplingConfig(temperature=1.0, top_p=0.8), [{0, 1, 2}, {2, 3, 4}]),
    (SamplingConfig(temperature=1.0, min_p=0.5), [{0, 1}, {3, 4}]),       # p >= 0.2
    (SamplingConfig(temperature=1.0, top_k=4, top_p=0.75, min_p=0.3), [{0, 1, 2}, {2, 3, 4}]),
    (SamplingConfig(temperature=2.0), [set(range(5))] * 2),
])
def test_filters_never_pick_excluded_tokens(sampling, allowed):
    draws = _draws(LOGITS, sampling)
    for row in range(2):
        assert set(draws[:, row].tolist()) == allowed[row]


def test_processed_distribution_and_logprob_modes():
    values = SamplingConfig(temperature=0.5, top_p=0.8).dynamic_values()
    processed = process_logits(LOGITS, values, top_k=0, use_top_p=True)
    probs = np.asarray(jax.nn.softmax(processed, axis=-1))
    # Temperature 0.5 squares the probabilities: 0.56, 0.32, 0.08, ...; top-p 0.8 keeps two.
    kept = np.array([0.4, 0.3]) ** 2
    np.testing.assert_allclose(probs[0, :2], kept / kept.sum(), rtol=1e-5)
    assert np.all(probs[0, 2:] == 0)
    keys = jax.random.split(jax.random.key(1), 2)
    tokens, processed_lp = select_tokens(LOGITS, keys, values, greedy=False, top_k=0, use_top_p=True,
                                         logprob_mode="processed")
    same, raw_lp = select_tokens(LOGITS, keys, values, greedy=False, top_k=0, use_top_p=True,
                                 logprob_mode="raw")
    assert np.array_equal(tokens, same)
    rows = np.arange(2)
    np.testing.assert_allclose(processed_lp, np.log(probs[rows, tokens]), rtol=1e-5)
    np.testing.assert_allclose(raw_lp, np.asarray(jax.nn.log_softmax(LOGITS))[rows, tokens], rtol=1e-5)


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingConfig(min_p=1.0)
    assert SamplingConfig().greedy
    assert SamplingConfig(temperature=0.0, top_k=5).static_key() == (True, 0, False)


def test_first_argmax_token_logprobs_and_draws_match_jax():
    logits = jax.random.normal(jax.random.key(2), (16, 1000)) * 3
    logits = logits.at[3, 7].set(50.0).at[3, 2].set(50.0)  # a tie: the first index wins
    np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, axis=-1))
    assert int(first_argmax(logits)[3]) == 2
    tokens = jnp.arange(16, dtype=jnp.int32) * 37
    np.testing.assert_allclose(
        token_logprobs(logits, tokens),
        np.asarray(jax.nn.log_softmax(logits))[np.arange(16), np.asarray(tokens)], rtol=1e-6)
    # Sampling draws are those of jax.random.categorical with the same per-row keys.
    keys = jax.random.split(jax.random.key(3), 16)
    values = SamplingConfig(temperature=1.0).dynamic_values()
    drawn, _ = select_tokens(logits, keys, values, greedy=False, top_k=0, use_top_p=False,
                             logprob_mode="raw")
    np.testing.assert_array_equal(drawn, jax.vmap(jax.random.categorical)(keys, logits))


def test_nucleus_mask_equals_the_sorted_cumulative_definition():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((64, 300)).astype(np.float32) * rng.uniform(0.5, 6, (64, 1))
    logits[:8, :20] = np.round(logits[:8, :20])  # ties
    logits[8:12, 100:] = -np.inf  # tokens already removed
    for top_p in (0.05, 0.5, 0.9, 0.999):
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
        ordered = -np.sort(-probs, axis=-1)
        before = np.cumsum(ordered, axis=-1) - ordered
        count = np.maximum((before < top_p).sum(-1), 1)
        expected = probs >= ordered[np.arange(64), count - 1][:, None]
        np.testing.assert_array_equal(nucleus_mask(jnp.asarray(logits), jnp.float32(top_p)), expected,
                                      err_msg=f"top_p={top_p}")


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0, top_k=8),
                                      SamplingConfig(temperature=1.0, top_p=0.9),
                                      SamplingConfig(temperature=1.0, top_k=8, top_p=0.9)])
def test_filters_never_sort_the_vocabulary(sampling):
    # A full sort of [batch, vocab] is ~30-80x slower per decode step on CPU than top_k / bisection.
    greedy, top_k, use_top_p = sampling.static_key()
    compiled = jax.jit(lambda logits, keys, values: select_tokens(
        logits, keys, values, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
        logprob_mode="processed")).lower(
            jnp.zeros((4, 4096)), jax.random.split(jax.random.key(0), 4),
            sampling.dynamic_values()).compile().as_text()
    assert " sort(" not in compiled


def test_abstract_engine_compiles_sharded_but_cannot_generate():
    config = preset("glm4-tiny")
    mesh = sharding.make_mesh((1, 1, 4, 1), devices=jax.devices()[:4])
    engine = GenerationEngine(abstract_model(config), mesh=mesh, max_batch_size=8)
    assert engine.abstract
    compiled = engine.compile(batch=5, prompt_len=20, max_new_tokens=9)
    tokens, logprobs, counts = compiled.out_info
    assert tokens.shape == (8, 16) and counts.shape == (8,)  # batch and budget buckets
    assert compiled.memory_analysis().argument_size_in_bytes > 0
    with pytest.raises(ValueError, match="abstract model"):
        engine.generate([[1, 2, 3]], max_new_tokens=2)


def test_update_model_swaps_parameters_without_recompiling():
    config = preset("glm4-tiny")
    first, second = create_model(config, seed=1), create_model(config, seed=2)
    mesh = sharding.make_mesh((1, 1, 2, 1), devices=jax.devices()[:2])
    engine = GenerationEngine(first, mesh=mesh, max_batch_size=2, length_buckets=(16,))
    prompts = [[5, 6, 7], [9, 10]]
    before = engine.generate(prompts, max_new_tokens=8)
    traces = engine.trace_count
    engine.update_model(second)
    updated = engine.generate(prompts, max_new_tokens=8)
    assert engine.trace_count == traces
    assert [r.tokens for r in updated] != [r.tokens for r in before]
    fresh = GenerationEngine(second, mesh=mesh, max_batch_size=2, length_buckets=(16,))
    assert [r.tokens for r in updated] == [r.tokens for r in fresh.generate(prompts, max_new_tokens=8)]
    with pytest.raises(ValueError, match="config"):
        engine.update_model(create_model(config.replace(num_layers=3)))


def test_stacked_layers_engine_shares_buffers_and_generates_the_same():
    config = preset("glm4-0414-tiny")
    model = create_model(config, seed=3)
    mesh = sharding.make_mesh((2, 1, 2, 1), devices=jax.devices()[:4])
    stacked = GenerationEngine(model, max_batch_size=4, length_buckets=(16, 32), stacked_layers=True)
    assert stacked.state["layers"]["mlp"]["down_kernel"][...] is model.layers.mlp.down_kernel[...]
    per_layer = GenerationEngine(model, mesh=mesh, max_batch_size=4, length_buckets=(16, 32))
    stacked_sharded = GenerationEngine(model, mesh=mesh, max_batch_size=4, length_buckets=(16, 32),
                                       stacked_layers=True)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    sampling = SamplingConfig(temperature=0.9, top_p=0.9)
    expected = per_layer.generate(prompts, sampling, max_new_tokens=12, seed=5)
    for engine in (stacked, stacked_sharded):
        results = engine.generate(prompts, sampling, max_new_tokens=12, seed=5)
        assert [r.tokens for r in results] == [r.tokens for r in expected]
        np.testing.assert_allclose([r.logprobs for r in results], [r.logprobs for r in expected],
                                   atol=1e-4)


def test_cpu_engine_pads_2kib_weight_strides_and_generates_the_same():
    config = preset("glm4-tiny").replace(hidden_size=512, intermediate_size=256)
    first, second = create_model(config, seed=1), create_model(config, seed=2)
    engine = GenerationEngine(first, max_batch_size=2, length_buckets=(16,))
    assert engine.state["layers"][0]["mlp"]["down_kernel"][...].shape == (288, 576)  # pad_features
    prompts = [[5, 6, 7], [9, 10]]
    sampling = SamplingConfig(temperature=0.8)
    for model in (first, second):
        engine.update_model(model)
        stacked = GenerationEngine(model, max_batch_size=2, length_buckets=(16,), stacked_layers=True)
        want = stacked.generate(prompts, sampling, max_new_tokens=10, seed=4)
        got = engine.generate(prompts, sampling, max_new_tokens=10, seed=4)
        assert [r.tokens for r in got] == [r.tokens for r in want]
        np.testing.assert_allclose([r.logprobs for r in got], [r.logprobs for r in want], atol=1e-5)
