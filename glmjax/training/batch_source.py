"""Where a step's batch comes from: a grain dataset, or a source that needs the current policy.

A data factory returns either a grain dataset of host batches (iterated; its iterator state is
checkpointed) or a ``BatchSource``: the loop hook for batches made from the current parameters
between steps (RL rollouts). The trainer calls ``next_batch`` with the policy before every step;
the source's own state (prompt iterator, RNG, buffers) is checkpointed with the train state.

Donation: the policy handed to ``next_batch`` shares the train state's buffers, which the step
right after donates. It is valid only during the call: a source must not keep it (or an engine
that reads it) for later use; rebind each call (``GenerationEngine.update_model(policy)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from jax.sharding import Mesh

from glmjax.data.spec import BatchSpec, batch_spec_of
from glmjax.models.decoder import Decoder

HostBatch = Mapping[str, "np.ndarray | jax.Array"]


@runtime_checkable
class BatchSource(Protocol):
    """Makes each step's batch from the current policy.

    Attributes:
      batch_spec: the keys it yields.
    """

    batch_spec: BatchSpec

    def next_batch(self, policy: Decoder, step: int, mesh: Mesh) -> HostBatch:
        """This process's rows of the batch for optimiser step ``step + 1`` (numpy arrays of
        ``[rows, ...]``), or global ``jax.Array``s already laid out on ``mesh``."""

    def abstract_batch(self) -> Mapping[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of this process's rows (for ahead-of-time compiles)."""

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state to checkpoint."""

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a checkpointed state."""

    # Optional: ``pop_metrics() -> {name: float}``, means since the last call, logged with the
    # step's metrics at every log step (RL rollouts: seconds, tokens/s, filtered groups).


class DatasetStream:
    """A grain dataset of host batches seen as a stream: the first batch is read up front
    (its shapes build the shardings) and handed out by the first ``next``."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.batch_spec = batch_spec_of(dataset)
        self.iterator: Iterator = iter(dataset)
        self.first: HostBatch | None = next(self.iterator)

    def restart(self) -> None:
        """A fresh iterator (to restore a checkpointed position into); drops the read-ahead."""
        self.iterator = iter(self.dataset)
        self.first = None

    def next(self) -> HostBatch:
        if self.first is not None:
            batch, self.first = self.first, None
            return batch
        return next(self.iterator)
