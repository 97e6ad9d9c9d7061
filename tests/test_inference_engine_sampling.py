"""Sampling for RL: K samples per prompt from one prefill, stop strings (cut rule, host checks
between decode calls), the temperature-scaled log-prob mode, and an evaluator that keeps its
engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.data.synthetic import write_arithmetic_jsonl
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer
from glmjax.evals.synthetic_task import ArithmeticExactMatch
from glmjax.inference.engine import GenerationEngine, stop_string_cut
from glmjax.inference.sampling import SamplingConfig, select_tokens
from glmjax.models import create_model, preset

CONFIG = preset("glm4-tiny")
PROMPTS = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13, 14, 15, 16, 17], [20]]
HOT = SamplingConfig(temperature=1.2)


def _piece(token: int) -> str:
    """A made-up detokenization: ids map to 1-3 letter pieces, some ending in a newline."""
    return "abcdefghij"[token % 10] * (1 + token % 3) + ("\n" if token % 7 == 0 else "")


def _detokenize(tokens: list[int]) -> str:
    return "".join(_piece(t) for t in tokens)


@pytest.fixture(scope="module")
def model():
    return create_model(CONFIG, seed=4)


@pytest.fixture(scope="module")
def engine(model):
    return GenerationEngine(model, max_batch_size=8, length_buckets=(16, 32))


# -- K samples ------------------------------------------------------------------------------------


def test_k_samples_draw_what_repeated_prompts_draw(engine):
    k = 3
    samples = engine.generate(PROMPTS, HOT, max_new_tokens=12, seed=11, num_samples=k)
    assert len(samples) == len(PROMPTS) * k
    # Result i * k + j is sample j of prompt i with seed 11 + i * k + j: the same draws as the
    # prompt repeated k times (each copy with its own prefill).
    repeated = engine.generate([p for p in PROMPTS for _ in range(k)], HOT, max_new_tokens=12, seed=11)
    assert [r.tokens for r in samples] == [r.tokens for r in repeated]
    np.testing.assert_allclose([r.logprobs for r in samples], [r.logprobs for r in repeated], atol=1e-5)
    assert len({tuple(r.tokens) for r in samples[:k]}) > 1  # the samples of a prompt differ
    # Explicit seeds: one per result.
    again = engine.generate(PROMPTS[:1], HOT, max_new_tokens=12, seed=[11, 12, 13], num_samples=k)
    assert [r.tokens for r in again] == [r.tokens for r in samples[:k]]
    with pytest.raises(ValueError, match="2 seeds for 3 results"):
        engine.generate(PROMPTS[:1], HOT, max_new_tokens=4, seed=[1, 2], num_samples=k)


def test_64_samples_of_one_prompt_use_one_prefill_row(engine):
    k = 64
    results = engine.generate(PROMPTS[:2], HOT, max_new_tokens=6, seed=0, num_samples=k)
    assert len(results) == 2 * k and len({tuple(r.tokens) for r in results[:k]}) > k // 2
    # max_batch_size 8 // 64 -> one prompt per program: the prefill runs on 1 row, decode on 64.
    compiled = engine.compile(batch=1, prompt_len=5, max_new_tokens=6, sampling=HOT, num_samples=k)
    tokens, _, counts = compiled.out_info
    assert tokens.shape == (64, 16) and counts.shape == (64,)
    ids = compiled.args_info[0][1]  # [prompt rows, prompt length]
    assert ids.shape == (1, 16)
    # Sample 5 of prompt 1 is result 64 + 5, seed 69: the same as drawing it alone.
    alone = engine.generate(PROMPTS[1:2], HOT, max_new_tokens=6, seed=[69])
    assert alone[0].tokens == results[k + 5].tokens


# -- stop strings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,stops,kept", [
    ([3, 13, 25], ["zz"], None),        # "d" "dd" "ff": no stop string
    ([1, 2, 5], ["ccc"], 1),            # "bb" "ccc" "fff": the stop string starts at a boundary
    ([1, 5, 2], ["ffc"], 1),            # "bb" "fff" "ccc": "fff" straddles its start and goes
    ([7, 2], ["\nc"], 0),               # "hh\n" "ccc": the first token straddles, nothing kept
    ([1, 2, 4], ["cc"], 1),             # "bb" "ccc" "ee"
    ([1, 2, 4], ["cc", "bc"], 0),       # ... the earliest start wins ("bc" at 1)
])
def test_stop_string_cut_rule(tokens, stops, kept):
    assert stop_string_cut(tokens, stops, _detokenize) == kept
    if kept is not None:
        text = _detokenize(tokens[:kept])
        full = _detokenize(tokens)
        start = min(full.find(s) for s in stops if s in full)
        assert full[:start].startswith(text) and not any(s in text for s in stops)


def test_stop_string_cut_with_a_byte_level_tokenizer(tokenizer):
    ids = tokenizer.encode("The sum is 42.\n\nNext question: 7 + 8")
    cut = stop_string_cut(ids, ["\n\n"], tokenizer.decode)
    text = tokenizer.decode(ids[:cut])
    assert text == "The sum is 42."[: len(text)] and text.startswith("The sum is")
    assert "\n" not in text


def test_stop_strings_cut_tokens_logprobs_and_text_at_one_place(engine):
    full = engine.generate(PROMPTS, HOT, max_new_tokens=24, seed=3, detokenize=_detokenize)
    assert all(r.text == _detokenize(r.tokens) for r in full)
    # A stop string that starts inside the text of a token (index >= 2, 2+ characters).
    middle = next(i for i, t in enumerate(full[0].tokens) if i >= 2 and len(_piece(t)) >= 2)
    before = len(_detokenize(full[0].tokens[:middle]))
    stop = full[0].text[before + 1: before + 4]
    assert len(stop) == 3
    expected_cut = stop_string_cut(full[0].tokens, [stop], _detokenize)
    assert expected_cut is not None and expected_cut <= middle
    for every in (1, 4, 16):
        stopped = engine.generate(PROMPTS, HOT, max_new_tokens=24, seed=3, detokenize=_detokenize,
                                  stop_strings=[[stop], [], [], []], stop_check_every=every)
        row = stopped[0]
        assert row.finish_reason == "stop" and row.tokens == full[0].tokens[:expected_cut]
        np.testing.assert_allclose(row.logprobs, full[0].logprobs[:expected_cut], atol=1e-5)
        assert row.text == _detokenize(row.tokens) and stop not in row.text
        assert full[0].text[:full[0].text.find(stop)].startswith(row.text)
        # Rows without stop strings are untouched.
        for other, reference in zip(stopped[1:], full[1:]):
            assert (other.tokens, other.finish_reason, other.text) == (
                reference.tokens, reference.finish_reason, reference.text)


def test_stop_strings_with_samples_stop_tokens_and_no_match(engine):
    plain = engine.generate(PROMPTS[:2], HOT, max_new_tokens=16, seed=8, num_samples=2,
                            stop_token_ids=[1, 2, 3])
    unmatched = engine.generate(PROMPTS[:2], HOT, max_new_tokens=16, seed=8, num_samples=2,
                                stop_token_ids=[1, 2, 3], stop_strings=["never there"],
                                detokenize=_detokenize, stop_check_every=5)
    for a, b in zip(plain, unmatched):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # A per-prompt stop string taken from each sample's own text stops every sample.
    stops = [[_detokenize(plain[0].tokens)[2:4]], ["j\n", "i\n", "h\n"]]
    stopped = engine.generate(PROMPTS[:2], HOT, max_new_tokens=16, seed=8, num_samples=2,
                              stop_token_ids=[1, 2, 3], stop_strings=stops, detokenize=_detokenize)
    for index, (result, reference) in enumerate(zip(stopped, plain)):
        cut = stop_string_cut(reference.tokens, stops[index // 2], _detokenize)
        if cut is None:
            assert result.tokens == reference.tokens
        else:
            assert result.finish_reason == "stop" and result.tokens == reference.tokens[:cut]
    assert stopped[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="detokenize"):
        engine.generate(PROMPTS[:1], max_new_tokens=4, stop_strings=["a"])
    with pytest.raises(ValueError, match="empty string"):
        engine.generate(PROMPTS[:1], max_new_tokens=4, stop_strings=[""], detokenize=_detokenize)


# -- log-prob modes -------------------------------------------------------------------------------


def test_scaled_logprobs_are_the_temperature_scaled_log_softmax_before_filtering(engine, model):
    sampling = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)
    prompts = PROMPTS[:2]
    processed = engine.generate(prompts, sampling, max_new_tokens=8, seed=2)
    scaled = engine.generate(prompts, sampling, max_new_tokens=8, seed=2, logprob_mode="scaled")
    assert [r.tokens for r in scaled] == [r.tokens for r in processed]  # the mode never changes draws
    for prompt, result, filtered in zip(prompts, scaled, processed):
        ids = jnp.asarray([prompt + result.tokens])
        log_probs = jax.nn.log_softmax(model(ids)[0].astype(jnp.float32) / 0.7, axis=-1)
        positions = len(prompt) - 1 + np.arange(len(result.tokens))
        np.testing.assert_allclose(result.logprobs, np.asarray(log_probs)[positions, result.tokens],
                                   atol=1e-4)
        # Filtering renormalises over fewer tokens: processed >= scaled.
        assert np.all(np.asarray(filtered.logprobs) >= np.asarray(result.logprobs) - 1e-5)
    with pytest.raises(ValueError, match="logprob_mode"):
        engine.generate(prompts, max_new_tokens=2, logprob_mode="unscaled")


def test_select_tokens_scaled_mode_on_synthetic_logits():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    values = SamplingConfig(temperature=2.0, top_k=1).dynamic_values()
    keys = jax.random.split(jax.random.key(0), 2)
    tokens, scaled = select_tokens(logits, keys, values, greedy=False, top_k=1, use_top_p=False,
                                   logprob_mode="scaled")
    np.testing.assert_array_equal(tokens, [0, 2])
    expected = np.asarray(jax.nn.log_softmax(logits / 2.0))[[0, 1], [0, 2]]
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


# -- evaluators reuse one engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_default_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_arithmetic_evaluator_builds_one_engine_and_follows_the_model(tokenizer, tmp_path):
    paths = write_arithmetic_jsonl(tmp_path, num_train=1, num_eval=3)
    config = CONFIG.replace(vocab_size=len(tokenizer))
    first, second = create_model(config, seed=1), create_model(config, seed=2)
    evaluator = ArithmeticExactMatch(path=str(paths["eval"]), tokenizer=tokenizer, max_new_tokens=6,
                                     batch_size=4)
    metrics = evaluator(first, 0)
    assert metrics["problems"] == 3.0 and 0.0 <= metrics["exact_match"] <= 1.0
    engine, traces = evaluator.engine, evaluator.engine.trace_count
    evaluator(second, 10)
    assert evaluator.engine is engine and engine.trace_count == traces  # no new engine, no recompile
    prompts = [[5, 6, 7]]
    fresh = GenerationEngine(second, max_batch_size=4, length_buckets=(64, 128, 256, 512))
    assert engine.generate(prompts, max_new_tokens=6)[0].tokens == \
        fresh.generate(prompts, max_new_tokens=6)[0].tokens


def test_arithmetic_evaluator_scores_samples_against_their_own_problems(tokenizer, tmp_path, monkeypatch):
    paths = write_arithmetic_jsonl(tmp_path, num_train=1, num_eval=3)
    config = CONFIG.replace(vocab_size=len(tokenizer))
    evaluator = ArithmeticExactMatch(path=str(paths["eval"]), tokenizer=tokenizer, max_new_tokens=6,
                                     batch_size=8, num_samples=2, temperature=1.0, seed=3)
    seen = []
    import glmjax.evals.synthetic_task as task

    def recording(outputs, answers):
        seen.append(list(answers))
        return 0.25

    monkeypatch.setattr(task, "exact_match_accuracy", recording)
    metrics = evaluator(create_model(config, seed=1), 0)
    answers = [p.answer for p in evaluator._prompts]
    # Greedy: one output per problem; sampled: two per problem, each scored against its own answer.
    assert seen == [answers, [a for a in answers for _ in range(2)]]
    assert metrics["exact_match"] == metrics["sampled_exact_match"] == 0.25
