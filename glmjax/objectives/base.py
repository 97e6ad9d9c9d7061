"""The interface between the trainer and what it optimises.

An objective computes loss sums for one microbatch inside the jitted, differentiated step. It may
declare the batch keys it reads (``batch_spec``) and own state of two kinds:

* frozen (a distillation teacher, a DPO reference): built at the start of every run, fresh or
  resumed, from its own source or from the run's initial parameters; never checkpointed, never
  donated, never updated;
* evolving (an anchor that follows the policy): built once from the initial parameters at step 0,
  updated after every optimiser step inside the jitted step, and checkpointed with the train state.

Metrics are ``Mean`` pairs (sum, count), each with its own denominator: the trainer sums both
over microbatches, devices and logging steps and reports sum / count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from glmjax.data.spec import BatchSpec
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder

Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mean:
    """A mean kept as (sum, count) so microbatches, devices and steps combine exactly.

    Attributes:
      total: scalar sum of the values.
      count: scalar number of values (tokens, sequences, pairs, ...).
    """

    total: jax.Array
    count: jax.Array

    @classmethod
    def of(cls, values: jax.Array, mask: jax.Array | None = None) -> "Mean":
        """The mean of ``values`` where ``mask`` is nonzero (all of them when None)."""
        values = values.astype(jnp.float32)
        if mask is None:
            return cls(values.sum(), jnp.asarray(values.size, jnp.float32))
        mask = mask.astype(jnp.float32)
        return cls((values * mask).sum(), mask.sum())

    def __add__(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.count + other.count)

    def value(self) -> jax.Array:
        """sum / count (0 when nothing was counted)."""
        return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1e-30), 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossOutput:
    """What an objective returns for one (micro)batch.

    The trainer sums ``total`` and ``weight`` over microbatches (and devices) and optimises
    ``sum(total) / sum(weight)``.

    Attributes:
      total: scalar, the loss summed over the unit the objective averages over (tokens,
        sequences, pairs).
      weight: scalar, the number of those units (e.g. loss-mask tokens).
      metrics: name -> Mean (each metric has its own count).
    """

    total: jax.Array
    weight: jax.Array
    metrics: dict[str, Mean]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """What ``Objective.loss`` gets besides the model and the batch.

    Attributes:
      rng: PRNG key for this microbatch.
      step: int32 scalar, optimiser steps taken before this update (for schedules in the loss,
        e.g. distillation's WSD-alpha).
      frozen: the objective's frozen state (None when it has none).
      extra: the objective's evolving state (None when it has none).
    """

    rng: jax.Array
    step: jax.Array
    frozen: Any = None
    extra: Any = None


@dataclasses.dataclass(frozen=True)
class StateContext:
    """What an objective may build its state from.

    Attributes:
      mesh: the training mesh; place state on it (same logical-axis rules as the parameters).
      model_config: the trained model's config.
      initial_params: returns the run's initial parameters (nested dict, sharded like the train
        state): the loaded HF/orbax weights or the seeded random init. On a resumed run they are
        rebuilt from the same source, so a DPO reference equals the policy's starting point. With
        ``abstract`` they are ``ShapeDtypeStruct``s carrying shardings.
      param_shardings: nested dict of ``NamedSharding`` of the parameters.
      abstract: building for an ahead-of-time compile: return ``ShapeDtypeStruct``s with
        shardings and allocate nothing.
    """

    mesh: Mesh
    model_config: ModelConfig
    initial_params: Callable[[], dict]
    param_shardings: dict
    abstract: bool = False


class Objective(Protocol):
    """A loss the trainer optimises.

    Optional methods (the trainer treats a missing one as "none"): ``batch_spec() -> BatchSpec``
    (keys the loss reads beyond the data factory's), ``frozen_state(context) -> pytree``,
    ``extra_state(context) -> pytree`` and ``update_extra(extra, params, step) -> pytree``.
    ``frozen_state`` is called at the start of every run; ``extra_state`` only at step 0 (a
    resumed run restores the evolving state from its checkpoint).
    """

    def loss(self, model: Decoder, batch: Batch, inputs: StepInputs) -> LossOutput:
        """Loss sums for one microbatch; runs inside the jitted, differentiated step."""


def batch_spec_of_objective(objective: Objective) -> BatchSpec | None:
    method = getattr(objective, "batch_spec", None)
    return method() if method is not None else None


def frozen_state_of(objective: Objective, context: StateContext) -> Any:
    method = getattr(objective, "frozen_state", None)
    return method(context) if method is not None else None


def extra_state_of(objective: Objective, context: StateContext) -> Any:
    method = getattr(objective, "extra_state", None)
    return method(context) if method is not None else None


def update_extra_of(objective: Objective, extra: Any, params: dict, step: jax.Array) -> Any:
    method = getattr(objective, "update_extra", None)
    return method(extra, params, step) if method is not None else extra
