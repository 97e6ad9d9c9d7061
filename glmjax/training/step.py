"""The jitted train and eval steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glmjax.data.spec import BatchSpec
from glmjax.objectives.base import Batch, LossOutput, Mean, Objective, StepInputs, update_extra_of
from glmjax.sharding import constrain
from glmjax.training.state import TrainState

StepFn = Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, Any]]]


def split_microbatches(batch: Batch, num_microbatches: int, group_size: int = 1) -> Batch:
    """[rows, ...] -> [num_microbatches, rows / num_microbatches, ...], groups kept whole.

    Rows are taken in groups of ``group_size`` consecutive rows; microbatch i takes groups
    i, i + n, i + 2n, ... With ``rows / devices`` a multiple of ``n * group_size`` every
    device's rows stay on it.

    Raises:
      ValueError: the rows do not split into whole groups per microbatch.
    """
    unit = num_microbatches * group_size

    def split(x):
        rows = x.shape[0]
        if rows % unit:
            raise ValueError(
                f"batch of {rows} rows does not split into {num_microbatches} microbatches of whole "
                f"groups of {group_size} rows (rows must be a multiple of {unit})")
        x = x.reshape(rows // unit, num_microbatches, group_size, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(num_microbatches, rows // num_microbatches, *x.shape[3:])

    return jax.tree.map(split, batch)


def constrain_batch(batch: Batch, spec: BatchSpec, leading: tuple = ()) -> Batch:
    """Each key constrained by its own logical axes (``leading`` axes prepended)."""
    return {k: constrain(v, (*leading, *spec.features[k].axes)) for k, v in batch.items()}


def _loss_fn(graphdef: nnx.GraphDef, objective: Objective, spec: BatchSpec):
    def loss(params: dict, batch: Batch, inputs: StepInputs) -> tuple[jax.Array, LossOutput]:
        out = objective.loss(nnx.merge(graphdef, params), constrain_batch(batch, spec), inputs)
        return out.total, out

    return loss


def _constrain_like(tree: Any, shardings: Any) -> Any:
    if shardings is None:
        return tree
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def _skipped_nonfinite(opt_state: Any, max_skips: int) -> tuple[jax.Array, jax.Array]:
    """(this update was skipped, total skipped so far) for an optimizer wrapped in
    ``optax.apply_if_finite(tx, max_skips)``, which gives up skipping (applies the update) after
    ``max_skips`` non-finite updates in a row."""
    if not isinstance(opt_state, optax.ApplyIfFiniteState):
        raise TypeError("skip_nonfinite_updates needs the optimizer wrapped in optax.apply_if_finite")
    skipped = ~opt_state.last_finite & (opt_state.notfinite_count <= max_skips)
    return skipped, opt_state.total_notfinite


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    batch_spec: BatchSpec,
    *,
    num_microbatches: int = 1,
    param_shardings: Mapping | None = None,
    skip_nonfinite_updates: int | None = None,
) -> StepFn:
    """Builds ``step(state, frozen, batch) -> (state, outputs)`` (jitted by the caller).

    Gradients of the summed loss are accumulated over ``num_microbatches`` slices of the batch
    (groups of ``batch_spec.group_size`` rows kept whole) and divided by the summed weight, so
    the update equals one step on the whole batch. The accumulator is constrained to the
    parameters' shardings (``param_shardings``). With ``skip_nonfinite_updates`` = N, ``tx`` must
    be ``optax.apply_if_finite(..., N)``; the outputs then say which updates it skipped.

    Outputs:
      means: name -> ``Mean``: ``loss`` (sum(total) / sum(weight)), ``grad_norm`` (global norm
        before clipping), ``learning_rate``, ``loss_tokens`` (loss-mask tokens per step, when the
        batch has a ``loss_mask``) and the objective's metrics.
      nonfinite: bool scalar, the loss or the gradient norm is NaN/inf.
      skipped: bool scalar, the update was not applied (``optax.apply_if_finite``).
      skipped_total: int32 scalar, updates skipped so far in the run.
    """
    loss_fn = _loss_fn(graphdef, objective, batch_spec)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        micro = constrain_batch(split_microbatches(batch, num_microbatches, batch_spec.group_size),
                                batch_spec, leading=(None,))

        def inputs_for(index):
            return StepInputs(jax.random.fold_in(step_rng, index), state.step, frozen, state.extra)

        def accumulate(carry, scanned):
            grads_sum, total, weight, metrics = carry
            index, microbatch = scanned
            grads, out = grad_fn(state.params, microbatch, inputs_for(index))
            grads_sum = _constrain_like(jax.tree.map(jnp.add, grads_sum, grads), param_shardings)
            metrics = jax.tree.map(jnp.add, metrics, out.metrics)
            return (grads_sum, total + out.total, weight + out.weight, metrics), None

        zero_grads = _constrain_like(
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), param_shardings)
        first_out = jax.eval_shape(
            lambda: loss_fn(state.params, jax.tree.map(lambda x: x[0], micro), inputs_for(0))[1])
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_out.metrics)
        init = (zero_grads, jnp.zeros(()), jnp.zeros(()), zero_metrics)
        (grads_sum, total, weight, metric_sums), _ = jax.lax.scan(
            accumulate, init, (jnp.arange(num_microbatches), micro))
        denominator = jnp.maximum(weight, 1e-9)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads_sum, state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
            extra=update_extra_of(objective, state.extra, params, state.step + 1),
        )
        one = jnp.ones((), jnp.float32)
        means = {
            "loss": Mean(total, weight),
            "grad_norm": Mean(grad_norm, one),
            "learning_rate": Mean(jnp.asarray(schedule(state.step), jnp.float32), one),
            **metric_sums,
        }
        if "loss_mask" in batch:
            means["loss_tokens"] = Mean(batch["loss_mask"].sum().astype(jnp.float32), one)
        skipped = _skipped_nonfinite(opt_state, skip_nonfinite_updates) if skip_nonfinite_updates else None
        outputs = {
            "means": means,
            "nonfinite": ~(jnp.isfinite(total / denominator) & jnp.isfinite(grad_norm)),
            "skipped": skipped[0] if skipped else jnp.zeros((), bool),
            "skipped_total": skipped[1] if skipped else jnp.zeros((), jnp.int32),
        }
        return new_state, outputs

    return step


def make_eval_step(
    graphdef: nnx.GraphDef, objective: Objective, batch_spec: BatchSpec
) -> Callable[[TrainState, Any, Batch], dict[str, Mean]]:
    """Builds ``eval_step(state, frozen, batch) -> {"loss": Mean, **metrics}`` (sums for one batch)."""
    loss_fn = _loss_fn(graphdef, objective, batch_spec)

    def eval_step(state: TrainState, frozen: Any, batch: Batch) -> dict[str, Mean]:
        _, out = loss_fn(state.params, batch, StepInputs(jax.random.key(0), state.step, frozen, state.extra))
        return {"loss": Mean(out.total, out.weight), **out.metrics}

    return eval_step
