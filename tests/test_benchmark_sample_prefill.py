"""The SampleAttention prefill benchmark's library function at tiny sizes (no timing asserted)."""

import pytest

from glmjax.inference.prefill_benchmark import (
    DENSE, PrefillBenchmarkSettings, continuation_agreement, run_prefill_benchmark, structured_prompt)

_TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=128,
             new_tokens=8, repeats=1, segment=64, topics=8)


def test_report_structure_and_alpha_one_agrees_with_dense():
    settings = PrefillBenchmarkSettings(lengths=(256, 512), alphas=(1.0, 0.5), **_TINY)
    report = run_prefill_benchmark(settings, log=lambda message: None)
    assert set(report["variants"]) == {DENSE, "sample_1", "sample_0.5"}
    assert report["variants"]["sample_0.5"] == {"attention_backend": "sample", "alpha": 0.5}
    assert report["model"]["num_layers"] == 2 and report["model"]["parameters"] > 0
    assert set(report["lengths"]) == {"256", "512"}
    for entry in report["lengths"].values():
        for name in (DENSE, "sample_1", "sample_0.5"):
            ttft = entry["ttft_s"][name]
            assert len(ttft["runs"]) == 1 and ttft["min"] <= ttft["median"] <= ttft["max"]
        assert set(entry["dense_over_sample"]) == {"sample_1", "sample_0.5"}
        assert len(entry["dense_tokens"]) == settings.new_tokens
        # alpha = 1 keeps every key block: SampleAttention prefill is dense prefill.
        assert entry["agreement"]["sample_1"] == {"prefix": 1.0, "overall": 1.0, "first_divergence": 8}
        assert 0.0 <= entry["agreement"]["sample_0.5"]["overall"] <= 1.0
        density = entry["first_layer_density"]
        assert density["sample_1"] == pytest.approx(1.0) and 0.0 < density["sample_0.5"] <= 1.0
    # At 512 tokens (4 key blocks of 128) alpha = 0.5 drops some of them.
    assert report["lengths"]["512"]["first_layer_density"]["sample_0.5"] < 1.0


def test_continuation_agreement():
    assert continuation_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == {
        "prefix": 0.5, "overall": 0.75, "first_divergence": 2}
    assert continuation_agreement([5], [5])["prefix"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        continuation_agreement([1, 2], [1])


def test_structured_prompt_segments_use_one_vocabulary_group():
    tokens = structured_prompt(1000, segment=100, topics=4, vocab=64, seed=3)
    assert len(tokens) == 1000 and all(0 <= t < 64 for t in tokens)
    for start in range(0, 1000, 100):
        groups = {t // 16 for t in tokens[start:start + 100]}
        assert len(groups) == 1
    assert structured_prompt(1000, 100, 4, 64, 3) == tokens


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alphas"):
        PrefillBenchmarkSettings(alphas=(1.5,))
    with pytest.raises(ValueError, match="topics"):
        PrefillBenchmarkSettings(topics=1000)
