"""Models and servers for the serving tests, built locally (never downloaded).

* :func:`tiny_engine`: a random ``glm4-tiny`` model sized to a tokenizer.
* :func:`scripted_engine`: a model built so that its greedy output is a given token sequence: every
  layer's attention and MLP output projections are zero, so the last hidden state is the (normed)
  embedding of the current token alone, and the LM head maps each token of the script to the next
  one (orthonormal embeddings, so the successor's logit is 20 and every other one 0). A bigram
  model, so the script's tokens (and the prompt's last token before it) must all differ.
* :func:`serving`: a ``ServedModel`` behind uvicorn on 127.0.0.1 (ephemeral port).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from glmjax.inference.engine import GenerationEngine
from glmjax.inference.serving import BackgroundServer, ServedModel, create_app
from glmjax.models import create_model, preset

MODEL_NAME = "tiny-glm"


def tiny_engine(vocab_size: int, seed: int = 7) -> GenerationEngine:
    """A random 2-layer ``glm4-tiny`` decoder with ``vocab_size`` tokens, in an engine."""
    model = create_model(preset("glm4-tiny").replace(vocab_size=vocab_size), seed=seed)
    return GenerationEngine(model, max_batch_size=8, length_buckets=(16, 32, 64, 128, 256, 512, 1024))


def scripted_engine(vocab_size: int, chain: Sequence[int]) -> GenerationEngine:
    """A decoder whose greedy successor of ``chain[i]`` is ``chain[i + 1]`` (module docstring).

    Raises:
      ValueError: ``chain`` repeats a token, or is longer than the hidden size.
    """
    config = preset("glm4-tiny").replace(vocab_size=vocab_size)
    if len(set(chain)) != len(chain) or len(chain) > config.hidden_size:
        raise ValueError(f"a bigram script needs distinct tokens (at most {config.hidden_size}): {list(chain)}")
    model = create_model(config, seed=0)
    layers = model.layers
    layers.attention.o_kernel[...] = jnp.zeros_like(layers.attention.o_kernel[...])
    layers.mlp.down_kernel[...] = jnp.zeros_like(layers.mlp.down_kernel[...])
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(config.hidden_size, len(chain))))
    embedding = np.zeros((vocab_size, config.hidden_size), np.float32)
    head = np.zeros((config.hidden_size, vocab_size), np.float32)
    for position, token in enumerate(chain):
        embedding[token] = basis[:, position]
        if position + 1 < len(chain):
            # normed embedding = sqrt(hidden) * basis vector; the successor's logit is 20.
            head[:, chain[position + 1]] = basis[:, position] * 20.0 / np.sqrt(config.hidden_size)
    model.embedding[...] = jnp.asarray(embedding)
    model.final_norm.scale[...] = jnp.ones_like(model.final_norm.scale[...])
    model.lm_head[...] = jnp.asarray(head)
    return GenerationEngine(model, max_batch_size=4, length_buckets=(16, 32, 64, 128, 256, 512, 1024))


@contextlib.contextmanager
def serving(engine: GenerationEngine, tokenizer, name: str = MODEL_NAME, **options) -> Iterator[tuple[ServedModel, BackgroundServer]]:
    """``engine`` served over HTTP on 127.0.0.1 (``options``: ``ContinuousScheduler``'s)."""
    options.setdefault("max_len", 1024)
    options.setdefault("max_slots", 4)
    options.setdefault("decode_chunk", 4)
    served = ServedModel(name, engine, tokenizer, **options)
    try:
        with BackgroundServer(create_app(served)) as server:
            yield served, server
    finally:
        served.close()
