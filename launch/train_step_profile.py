"""Where a train step's time goes: timings of sub-programs of the step.

Each part is its own jitted program on the step's shapes, forward and backward over all
layers where that applies: attention (``attend`` on q/k/v), the layer matmuls (the q/k/v/o
and MLP projections without anything in between), the LM head with the chunked
cross-entropy, and the optimizer update. ``other`` is the step minus those parts (norms,
rotary, SwiGLU, residuals, embedding, gradient accumulation, layout copies). ``forward`` and
``forward_backward`` are the whole loss without the optimizer, for reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from glmjax import flops
from glmjax.models import attention as attention_lib
from glmjax.models.config import ModelConfig
from glmjax.objectives import LMObjective, StepInputs, chunked_cross_entropy
from glmjax.training.state import TrainState


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` runs after a compiling one (the least disturbed on a shared CPU)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


def _attention_program(config: ModelConfig, batch: int, seq: int) -> Callable[[], jax.Array]:
    """Forward + backward of ``attend`` for every layer; q [layers, batch, seq, heads, head_dim]."""
    keys = jax.random.split(jax.random.key(0), 4)
    shape_q = (config.num_layers, batch, seq, config.num_heads, config.head_dim)
    shape_kv = (config.num_layers, batch, seq, config.num_kv_heads, config.head_dim)
    q, cot = _normal(keys[0], shape_q), _normal(keys[1], shape_q)
    k, v = _normal(keys[2], shape_kv), _normal(keys[3], shape_kv)

    def one_layer(q, k, v, cot):
        out, vjp = jax.vjp(
            lambda q, k, v: attention_lib.attend(
                q, k, v, q_segment_ids=None, kv_segment_ids=None, q_offsets=None,
                backend=config.attention_backend),
            q, k, v)
        return vjp(cot)

    @jax.jit
    def run(q, k, v, cot):
        return jax.lax.map(lambda args: one_layer(*args), (q, k, v, cot))

    return lambda: run(q, k, v, cot)


def _matmul_program(config: ModelConfig, batch: int, seq: int) -> Callable[[], Any]:
    """Forward + backward (input and weight gradients) of every layer's projections.

    Each layer computes ``x @ w`` for the fused q/k/v, output, gate/up and down projections
    and pulls a cotangent back through them; inputs and cotangents are random and differ per
    layer, so XLA can neither simplify nor hoist any of the dots.
    """
    e, m = config.hidden_size, config.intermediate_size
    n, kv, h, layers = config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers
    rows = batch * seq
    shapes = {"qkv": (e, (n + 2 * kv) * h), "o": (n * h, e), "gate_up": (e, 2 * m), "down": (m, e)}
    keys = iter(jax.random.split(jax.random.key(1), 3 * len(shapes)))
    weights = {name: 0.02 * _normal(next(keys), (layers, *shape)) for name, shape in shapes.items()}
    inputs = {name: _normal(next(keys), (layers, rows, shape[0])) for name, shape in shapes.items()}
    cotangents = {name: _normal(next(keys), (layers, rows, shape[1])) for name, shape in shapes.items()}

    def projections(w, x):
        return {name: x[name] @ w[name] for name in w}

    def layer(args):
        w, x, cotangent = args
        out, vjp = jax.vjp(projections, w, x)
        return out, vjp(cotangent)

    @jax.jit
    def run(weights, inputs, cotangents):
        return jax.lax.map(layer, (weights, inputs, cotangents))

    return lambda: run(weights, inputs, cotangents)


def _head_program(config: ModelConfig, objective: LMObjective, batch: int, seq: int) -> Callable[[], Any]:
    """Forward + backward of the LM head and the chunked cross-entropy."""
    keys = jax.random.split(jax.random.key(2), 3)
    hidden = _normal(keys[0], (batch, seq, config.hidden_size))
    kernel = 0.02 * _normal(keys[1], (config.hidden_size, config.vocab_size))
    targets = jax.random.randint(keys[2], (batch, seq), 0, config.vocab_size)

    def loss(hidden, kernel, targets):
        token_loss, _ = chunked_cross_entropy(hidden, kernel, targets, chunk_size=objective.chunk_size)
        return token_loss.sum()

    run = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: run(hidden, kernel, targets)


def profile(
    config: ModelConfig,
    graphdef: nnx.GraphDef,
    objective: LMObjective,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jax.Array],
    mesh: Mesh,
    *,
    step_seconds: float,
    repeats: int = 5,
) -> dict[str, Any]:
    """Seconds of each part (fastest of ``repeats``), its share of ``step_seconds`` and, for
    the matmul-heavy parts, model FLOP/s.

    XLA runs independent operations of the step concurrently, so the parts can add up to a
    little more than the step (``other`` then comes out slightly negative).

    Args:
      state, batch: the benchmarked step's state and batch (one device).
      step_seconds: the benchmark's fastest step.
    """
    rows, seq = batch["inputs"].shape
    tokens = rows * seq

    def loss(params):
        inputs = StepInputs(jax.random.key(0), jnp.zeros((), jnp.int32))
        return objective.loss(nnx.merge(graphdef, params), batch, inputs).total

    forward = jax.jit(loss)
    forward_backward = jax.jit(jax.grad(loss))
    grads = jax.tree.map(jnp.ones_like, state.params)
    update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    with jax.set_mesh(mesh):
        seconds = {
            "forward": _best_seconds(lambda: forward(state.params), repeats),
            "forward_backward": _best_seconds(lambda: forward_backward(state.params), repeats),
            "attention": _best_seconds(_attention_program(config, rows, seq), repeats),
            "layer_matmuls": _best_seconds(_matmul_program(config, rows, seq), repeats),
            "lm_head_cross_entropy": _best_seconds(_head_program(config, objective, rows, seq), repeats),
            "optimizer": _best_seconds(lambda: update(grads, state.opt_state, state.params), repeats),
        }
    parts = ("attention", "layer_matmuls", "lm_head_cross_entropy", "optimizer")
    seconds["other"] = step_seconds - sum(seconds[p] for p in parts)
    model_flops = {
        "attention": 3 * flops.attention_flops_per_token(config, seq) * tokens,
        "layer_matmuls": 6 * config.num_layers * flops.layer_matmul_params(config) * tokens,
        "lm_head_cross_entropy": 6 * config.vocab_size * config.hidden_size * tokens,
    }
    return {
        "step_s": step_seconds,
        "seconds": seconds,
        "fraction_of_step": {k: v / step_seconds for k, v in seconds.items()},
        "model_flop_per_s": {k: f / seconds[k] for k, f in model_flops.items()},
    }
