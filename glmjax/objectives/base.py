"""The interface between the trainer and what it optimises."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
from jax.sharding import Mesh

from glmjax.models.decoder import Decoder

Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossOutput:
    """What an objective returns for one (micro)batch.

    The trainer sums ``total`` and ``weight`` over microbatches (and devices) and optimises
    ``sum(total) / sum(weight)``; every entry of ``metrics`` is a sum over the microbatch that
    the trainer divides by the same ``sum(weight)`` before logging.

    Attributes:
      total: scalar, the loss summed over whatever unit the objective averages over
        (tokens, sequences, pairs).
      weight: scalar, the number of those units (for example loss-mask tokens).
      metrics: name -> scalar sum.
    """

    total: jax.Array
    weight: jax.Array
    metrics: dict[str, jax.Array]


class Objective(Protocol):
    """A loss the trainer optimises, possibly owning extra frozen state.

    ``extra_state`` is built once before training (a reference model, a teacher, ...) and is
    passed back unchanged to every ``loss`` call; ``update_extra`` lets the objective refresh
    it from the trained parameters after a step (an anchor that follows the policy).
    """

    def extra_state(self, mesh: Mesh, params: Any) -> Any:
        """Frozen state, already placed on ``mesh`` (None when there is none)."""

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array, extra: Any) -> LossOutput:
        """Loss sums for one microbatch; runs inside the jitted, differentiated step."""

    def update_extra(self, extra: Any, params: Any, step: jax.Array) -> Any:
        """New frozen state after an optimiser step (inside the jitted step)."""
