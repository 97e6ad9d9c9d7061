"""Time to first token of SampleAttention prefill against dense prefill, and greedy agreement.

The engine prefills a prompt with the model's ``attention_backend`` and always decodes densely
over the KV cache, so a model with ``attention_backend="sample"`` is "SampleAttention prefill,
dense decode". :func:`run_prefill_benchmark` builds one small random decoder whose prefill cost
is dominated by attention, makes one ``GenerationEngine`` per variant from the same weights
(dense = the "blockwise" flash kernel, exact; SampleAttention at each alpha), and per prompt
length:

* times ``generate(max_new_tokens=1)`` (prefill + one decode step: the time to first token),
  variants interleaved within every repeat, after one untimed call that compiles the program;
* generates ``new_tokens`` greedy tokens after the same prompt with every variant and compares
  them with the dense continuation (:func:`continuation_agreement`).

Random weights (init std 0.02) give near-uniform attention, where dropping key blocks changes
little and says nothing about real models. ``qk_gain`` multiplies the query and key projections
so that logits scale by ``qk_gain ** 2`` and attention concentrates on keys whose content (and
rotary phase) matches the query; the prompt (:func:`structured_prompt`) is made of "topical"
segments, each drawing from one group of the vocabulary, so a key token occurs only in its
group's segments. ``query_bias`` adds a query direction shared by every query, so that all rows favour
the same key tokens, which the topical prompt confines to a few segments: shared key-block
stripes, the structure SampleAttention selects (per head, for all query blocks). This is a
stand-in for the retrieval-like structure of trained models, not a substitute.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax.inference.engine import GenerationEngine
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder, unstack_layers
from glmjax.models.params import create_model
from glmjax.models.rotary import apply_rotary, rotary_angles
from pallas_kernels.sample_attention import sample_attention_selection

DENSE = "dense"
"""Name of the dense baseline variant (``attention_backend="blockwise"``)."""


@dataclasses.dataclass(frozen=True)
class PrefillBenchmarkSettings:
    """What :func:`run_prefill_benchmark` measures.

    Attributes:
      lengths: prompt lengths in tokens (each is also an engine length bucket: no padding).
      alphas: SampleAttention retained-mass targets, one variant each (1.0 keeps every block).
      repeats: timed ``max_new_tokens=1`` calls per variant and length (interleaved).
      new_tokens: greedy tokens generated for the agreement check.
      layers, hidden, heads, kv_heads, head_dim, intermediate, vocab: model shape
        (architecture "glm", fp32, q/k/v biases zero at init).
      qk_gain: factor on the query and key projection weights (logits scale by its square).
      query_bias: std of the query projection bias (zero at init), one random vector per layer
        and head: every query of a head then shares a preference for the keys along that direction, the random-weights
        stand-in for the heavy-hitter key columns (sinks, separators) of trained models.
      segment, topics: structure of the prompt (:func:`structured_prompt`).
      seed: seed of the weights and prompts.
    """

    lengths: tuple[int, ...] = (8192, 16384, 32768)
    alphas: tuple[float, ...] = (0.95, 0.8)
    repeats: int = 3
    new_tokens: int = 32
    layers: int = 2
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 512
    vocab: int = 256
    qk_gain: float = 4.0
    query_bias: float = 8.0
    segment: int = 512
    topics: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise ValueError(f"lengths must be prompt lengths >= 2 tokens, got {self.lengths}")
        if len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"lengths must be distinct, got {self.lengths}")
        if not self.alphas or any(not 0.0 < a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be in (0, 1], got {self.alphas}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas must be distinct, got {self.alphas}")
        if self.repeats < 1 or self.new_tokens < 1:
            raise ValueError(f"repeats and new_tokens must be >= 1, got {self.repeats}, {self.new_tokens}")
        if self.segment < 1 or not 1 <= self.topics <= self.vocab:
            raise ValueError(f"segment must be >= 1 and topics in [1, vocab], got {self.segment}, "
                             f"{self.topics}")
        if self.qk_gain <= 0 or self.query_bias < 0:
            raise ValueError(f"qk_gain must be positive and query_bias >= 0, got {self.qk_gain}, "
                             f"{self.query_bias}")

    def model_config(self) -> ModelConfig:
        """The benchmark decoder's config (dense backend)."""
        return ModelConfig(
            architecture="glm", vocab_size=self.vocab, hidden_size=self.hidden,
            intermediate_size=self.intermediate, num_layers=self.layers, num_heads=self.heads,
            num_kv_heads=self.kv_heads, head_dim=self.head_dim,
            max_position_embeddings=max(self.lengths) + self.new_tokens,
            attention_backend="blockwise", pad_token_id=None, eos_token_ids=(),
        )


def variant_name(alpha: float) -> str:
    """Name of the SampleAttention variant at ``alpha`` in the report (e.g. ``sample_0.95``)."""
    return f"sample_{alpha:g}"


def benchmark_model(settings: PrefillBenchmarkSettings) -> Decoder:
    """The random dense decoder with query and key projections scaled by ``qk_gain`` and a
    random query bias of std ``query_bias``."""
    model = create_model(settings.model_config(), seed=settings.seed)
    # A fresh decoder is stacked: one layer module holds every layer's weights.
    attention = model.layers.attention
    attention.q_kernel[...] = attention.q_kernel[...] * settings.qk_gain
    attention.k_kernel[...] = attention.k_kernel[...] * settings.qk_gain
    bias = attention.q_bias[...]
    attention.q_bias[...] = settings.query_bias * jax.random.normal(
        jax.random.key(settings.seed + 1), bias.shape, bias.dtype)
    return model


def with_backend(model: Decoder, backend: str, alpha: float) -> Decoder:
    """A decoder with ``model``'s weights (copied) and another attention backend and alpha."""
    config = model.config.replace(attention_backend=backend, sample_attention_alpha=alpha)
    _, state = nnx.split(model)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


def first_layer_density(model: Decoder, prompt: Sequence[int], alpha: float) -> float:
    """Fraction of the causal query-key pairs SampleAttention keeps in ``model``'s first layer
    for ``prompt`` at ``alpha`` (mean over heads; the same selection the "sample" backend makes
    there, whose queries and keys depend only on the embeddings). Later layers' selections
    depend on each variant's own earlier outputs and are not measured."""
    config = model.config
    layer = unstack_layers(model).layers[0]
    ids = jnp.asarray([prompt], jnp.int32)
    hidden = layer.input_norm(model.embed(ids))
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    cos, sin = rotary_angles(positions, config.rotary_dim, config.rope_theta, config.rope_scaling)
    attention = layer.attention

    def project(name: str) -> jax.Array:
        out = jnp.einsum("bte,enh->btnh", hidden, getattr(attention, f"{name}_kernel")[...])
        if config.qkv_bias:
            out = out + getattr(attention, f"{name}_bias")[...]
        return apply_rotary(out, cos, sin, interleaved=config.rope_interleaved)

    selection = sample_attention_selection(project("q"), project("k"), alpha=alpha, causal=True)
    return float(jnp.mean(selection.density))


def structured_prompt(length: int, segment: int, topics: int, vocab: int, seed: int) -> list[int]:
    """A prompt of ``length`` tokens made of "topical" segments.

    The vocabulary [0, vocab) is split into ``topics`` disjoint groups of consecutive ids; the
    prompt is consecutive segments of ``segment`` tokens, each drawing its tokens uniformly from
    one group (each segment's group drawn uniformly). A query whose projections favour a few key
    tokens then finds them only in the segments of those tokens' groups: distant stripes of
    blocks, not the same keys everywhere (which a repeated motif would give).
    """
    if not 1 <= topics <= vocab:
        raise ValueError(f"topics must be in [1, vocab={vocab}], got {topics}")
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, vocab, topics + 1).astype(np.int64)
    segments = -(-length // segment)
    groups = rng.integers(0, topics, size=segments)
    low, high = np.repeat(bounds[groups], segment)[:length], np.repeat(bounds[groups + 1], segment)[:length]
    return (low + (rng.random(length) * (high - low)).astype(np.int64)).tolist()


def continuation_agreement(reference: Sequence[int], other: Sequence[int]) -> dict[str, float | int]:
    """How far ``other`` follows ``reference`` (two greedy continuations of one prompt).

    Returns:
      ``prefix``: identical tokens before the first divergence, as a fraction of
      ``len(reference)``; ``overall``: fraction of positions with identical tokens;
      ``first_divergence``: index of the first differing token (``len(reference)`` if none).
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(f"continuations must be non-empty and equally long, got {len(reference)} "
                         f"and {len(other)} tokens")
    same = [a == b for a, b in zip(reference, other)]
    first = same.index(False) if False in same else len(same)
    return {"prefix": first / len(same), "overall": sum(same) / len(same), "first_divergence": first}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _timed(fn: Callable[[], object]) -> dict[str, float]:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - start, "load_before": load}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_prefill_benchmark(
    settings: PrefillBenchmarkSettings, log: Callable[[str], None] = _stderr,
) -> dict:
    """Runs the benchmark; returns the JSON-ready report.

    Report: ``settings``, ``model`` (config fields, parameter count), ``variants`` (name ->
    backend and alpha), ``lengths`` (str(length) -> ``ttft_s`` per variant (median/min/max and
    the raw runs with the load average before each), ``dense_over_sample`` per SampleAttention
    variant (ratio of median TTFTs), ``agreement`` per SampleAttention variant
    (:func:`continuation_agreement` against dense), ``first_layer_density`` per SampleAttention
    variant (:func:`first_layer_density`), ``dense_tokens``), and ``machine`` (cores,
    devices, load averages at start and end).
    """
    base = benchmark_model(settings)
    variants = {DENSE: ("blockwise", 1.0)}
    variants.update({variant_name(a): ("sample", a) for a in settings.alphas})
    buckets = tuple(sorted({settings.new_tokens, *settings.lengths}))
    engines = {name: GenerationEngine(with_backend(base, backend, alpha), max_batch_size=1,
                                      length_buckets=buckets)
               for name, (backend, alpha) in variants.items()}
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    report: dict = {
        "settings": dataclasses.asdict(settings),
        "model": {**dataclasses.asdict(settings.model_config()), "parameters": int(parameters),
                  "qk_gain": settings.qk_gain},
        "variants": {name: {"attention_backend": b, "alpha": a} for name, (b, a) in variants.items()},
        "machine": {"cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
                    "jax": jax.__version__, "load_at_start": list(os.getloadavg())},
        "lengths": {},
    }
    for length in settings.lengths:
        prompt = [structured_prompt(length, settings.segment, settings.topics, settings.vocab,
                                    settings.seed + length)]
        # The untimed first call compiles the program (max_new_tokens 1 and new_tokens share the
        # budget bucket) and gives the greedy continuation for the agreement check.
        continuations = {}
        for name, engine in engines.items():
            log(f"[prefill bench] length {length}: compile + {settings.new_tokens} tokens, {name}")
            continuations[name] = engine.generate(prompt, max_new_tokens=settings.new_tokens)[0].tokens
        traces = {name: engine.trace_count for name, engine in engines.items()}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
        for repeat in range(settings.repeats):
            for name, engine in engines.items():
                runs[name].append(_timed(lambda: engine.generate(prompt, max_new_tokens=1)))
                log(f"[prefill bench] length {length} repeat {repeat}: {name} "
                    f"ttft {runs[name][-1]['seconds']:.3f} s")
        recompiled = [name for name, engine in engines.items() if engine.trace_count != traces[name]]
        if recompiled:
            raise RuntimeError(f"timed calls of {recompiled} compiled a new program: the warm-up "
                               "call does not share their budget bucket")
        ttft = {name: {**summary([r["seconds"] for r in rows]), "runs": rows} for name, rows in runs.items()}
        samples = [name for name in engines if name != DENSE]
        report["lengths"][str(length)] = {
            "ttft_s": ttft,
            "dense_over_sample": {name: ttft[DENSE]["median"] / ttft[name]["median"] for name in samples},
            "agreement": {name: continuation_agreement(continuations[DENSE], continuations[name])
                          for name in samples},
            "first_layer_density": {variant_name(a): first_layer_density(base, prompt[0], a)
                                    for a in settings.alphas},
            "dense_tokens": continuations[DENSE],
        }
    report["machine"]["load_at_end"] = list(os.getloadavg())
    return report
