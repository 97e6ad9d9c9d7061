"""The jitted train and eval steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glmjax.objectives.base import Batch, LossOutput, Objective
from glmjax.sharding import constrain
from glmjax.training.state import TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]

_BATCH_AXES = ("act_batch", "act_seq")


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...].

    Microbatch i takes rows i, i + n, i + 2n, ...: each device's contiguous rows stay on it.
    """

    def split(x):
        rows = x.shape[0]
        if rows % num_microbatches:
            raise ValueError(f"batch of {rows} rows does not split into {num_microbatches} microbatches")
        x = x.reshape(rows // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _objective_sums(graphdef: nnx.GraphDef, objective: Objective, extra: Any):
    def sums(params: dict, batch: Batch, rng: jax.Array) -> tuple[jax.Array, LossOutput]:
        batch = {k: constrain(v, _BATCH_AXES[: v.ndim]) for k, v in batch.items()}
        out = objective.loss(nnx.merge(graphdef, params), batch, rng, extra)
        return out.total, out

    return sums


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_microbatches: int = 1,
) -> StepFn:
    """Builds ``step(state, batch) -> (state, metrics)`` (to be jitted by the caller).

    Gradients of the summed loss are accumulated over ``num_microbatches`` slices of the
    batch and divided by the summed weight, so the update equals one step on the whole batch.

    Metrics: ``loss`` (sum(total) / sum(weight)), ``grad_norm`` (before clipping),
    ``learning_rate``, ``weight``, ``loss_tokens`` and the objective's metrics (divided by weight).
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        grad_fn = jax.grad(_objective_sums(graphdef, objective, state.extra), has_aux=True)
        micro = _split_microbatches(batch, num_microbatches)

        def accumulate(carry, inputs):
            grads_sum, total, weight, metrics = carry
            index, microbatch = inputs
            grads, out = grad_fn(state.params, microbatch, jax.random.fold_in(step_rng, index))
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            metrics = jax.tree.map(jnp.add, metrics, out.metrics)
            return (grads_sum, total + out.total, weight + out.weight, metrics), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        first_out = jax.eval_shape(
            lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), step_rng)[1]
        )
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_out.metrics)
        init = (zero_grads, jnp.zeros(()), jnp.zeros(()), zero_metrics)
        (grads_sum, total, weight, metric_sums), _ = jax.lax.scan(
            accumulate, init, (jnp.arange(num_microbatches), micro)
        )
        denominator = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads_sum, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            extra=objective.update_extra(state.extra, params, state.step + 1),
        )
        metrics = {
            "loss": total / denominator,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            "weight": weight,
            "loss_tokens": batch["loss_mask"].sum() if "loss_mask" in batch else weight,
            **{k: v / denominator for k, v in metric_sums.items()},
        }
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective) -> Callable[[TrainState, Batch], dict]:
    """Builds ``eval_step(state, batch) -> sums`` with ``total``, ``weight`` and metric sums."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        sums = _objective_sums(graphdef, objective, state.extra)
        _, out = sums(state.params, batch, jax.random.key(0))
        return {"total": out.total, "weight": out.weight, **out.metrics}

    return eval_step
