r"""Time to first token with SampleAttention prefill vs dense (blockwise) prefill, on one engine.

  python -m launch.benchmark_sample_prefill --output=/tmp/sample_prefill.json

Builds one small random decoder (default: 2 layers, hidden 256, 8 heads / 2 KV heads, head_dim
32, vocabulary 256, fp32) with sharpened attention, one ``GenerationEngine`` per variant from
the same weights (dense: ``attention_backend="blockwise"``; SampleAttention at each
``--alphas``), and per ``--lengths`` prompt length times ``generate(max_new_tokens=1)``
(interleaved, ``--repeats`` times, after a compiling call) and compares each variant's greedy
continuation of ``--new_tokens`` tokens with the dense one. Prints one JSON object (progress
goes to stderr); see ``glmjax.inference.prefill_benchmark`` for the model, the prompts and
what the agreement means.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from glmjax.inference.prefill_benchmark import PrefillBenchmarkSettings, run_prefill_benchmark

_DEFAULTS = PrefillBenchmarkSettings()
_LENGTHS = flags.DEFINE_list("lengths", [str(n) for n in _DEFAULTS.lengths], "Prompt lengths (tokens).")
_ALPHAS = flags.DEFINE_list("alphas", [f"{a:g}" for a in _DEFAULTS.alphas], "SampleAttention alphas.")
_REPEATS = flags.DEFINE_integer("repeats", _DEFAULTS.repeats, "Timed runs per variant and length.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", _DEFAULTS.new_tokens, "Greedy tokens for the agreement check.")
_LAYERS = flags.DEFINE_integer("layers", _DEFAULTS.layers, "Decoder layers.")
_HIDDEN = flags.DEFINE_integer("hidden", _DEFAULTS.hidden, "Hidden size.")
_HEADS = flags.DEFINE_integer("heads", _DEFAULTS.heads, "Attention heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", _DEFAULTS.kv_heads, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", _DEFAULTS.head_dim, "Head dimension.")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", _DEFAULTS.intermediate, "MLP size.")
_VOCAB = flags.DEFINE_integer("vocab", _DEFAULTS.vocab, "Vocabulary size.")
_QK_GAIN = flags.DEFINE_float("qk_gain", _DEFAULTS.qk_gain, "Factor on the q and k projection weights.")
_QUERY_BIAS = flags.DEFINE_float("query_bias", _DEFAULTS.query_bias, "Std of the random query bias.")
_SEGMENT = flags.DEFINE_integer("segment", _DEFAULTS.segment, "Prompt segment length (tokens).")
_TOPICS = flags.DEFINE_integer("topics", _DEFAULTS.topics, "Vocabulary groups of the prompt segments.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of the weights and prompts.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON report here (also printed).")


def _settings() -> PrefillBenchmarkSettings:
    """The settings from the flags; ValueError naming the flag on bad values."""
    def numbers(flag, kind):
        try:
            return tuple(kind(x) for x in flag.value)
        except ValueError:
            raise ValueError(f"--{flag.name}: expected a comma-separated list of {kind.__name__}, "
                             f"got {','.join(flag.value)!r}") from None

    return PrefillBenchmarkSettings(
        lengths=numbers(_LENGTHS, int), alphas=numbers(_ALPHAS, float), repeats=_REPEATS.value,
        new_tokens=_NEW_TOKENS.value, layers=_LAYERS.value, hidden=_HIDDEN.value, heads=_HEADS.value,
        kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value, intermediate=_INTERMEDIATE.value,
        vocab=_VOCAB.value, qk_gain=_QK_GAIN.value, query_bias=_QUERY_BIAS.value,
        segment=_SEGMENT.value, topics=_TOPICS.value, seed=_SEED.value)


def main(argv: list[str]) -> None:
    del argv
    try:
        settings = _settings()
    except ValueError as err:  # bad flag values: one line, non-zero exit
        print(f"benchmark_sample_prefill: {err}", file=sys.stderr)
        sys.exit(2)
    report = run_prefill_benchmark(settings)
    text = json.dumps(report, indent=2)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
