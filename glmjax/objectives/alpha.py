"""Schedules of the distillation weight alpha in ``(1 - alpha) * LM + alpha * KD``.

Each schedule maps the optimiser step (``StepInputs.step``: updates taken before this one, the
same count optax's learning-rate schedules read) to a float32 scalar in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import gin
import jax
import jax.numpy as jnp
import optax

from glmjax.training.optimizer import learning_rate_schedule


class AlphaSchedule(Protocol):
    def __call__(self, step: jax.Array) -> jax.Array:
        """int32 scalar step -> float32 scalar alpha."""


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: alpha must lie in [0, 1]")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ConstantAlpha:
    """alpha = ``value`` at every step."""

    value: float = 0.9

    def __post_init__(self) -> None:
        _check_unit("ConstantAlpha.value", self.value)

    def __call__(self, step: jax.Array) -> jax.Array:
        del step
        return jnp.asarray(self.value, jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LinearAlpha:
    """alpha moves linearly from ``start`` (step 0) to ``end`` (step ``total_steps``), then stays.

    The paper's "Linear Dec" is start 1 -> end 0; "Linear Inc" the reverse.
    """

    total_steps: int
    start: float = 1.0
    end: float = 0.0

    def __post_init__(self) -> None:
        _check_unit("LinearAlpha.start", self.start)
        _check_unit("LinearAlpha.end", self.end)
        if self.total_steps < 1:
            raise ValueError(f"LinearAlpha.total_steps={self.total_steps!r}: must be >= 1")

    def __call__(self, step: jax.Array) -> jax.Array:
        schedule = optax.linear_schedule(self.start, self.end, self.total_steps)
        return jnp.asarray(schedule(step), jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WSDAlpha:
    """WSD-alpha: alpha follows the warmup / stable / decay phases of a WSD learning rate.

    alpha(step) = ``learning_rate_schedule(total_steps, kind="wsd", peak=peak)(step)``: the
    trainer's own schedule function (``glmjax.training.optimizer``), so the phase boundaries are
    computed by the same code from the same gin bindings (``learning_rate_schedule.warmup_steps``,
    ``.decay_fraction``, ``.final_fraction``): a linear rise from 0 over the warmup, ``peak``
    through the stable phase, a linear decay to ``final_fraction * peak`` over the last
    ``decay_fraction`` of the steps. Bind ``total_steps`` to the run's ``%TRAIN_STEPS``.

    Attributes:
      total_steps: optimiser steps of the run (``train.train_steps``).
      peak: alpha in the stable phase (0.9 in PD*).
      warmup_steps, decay_fraction, final_fraction: None takes the learning-rate schedule's
        bindings (the same boundaries as the LR); a value overrides them for alpha only.
    """

    total_steps: int
    peak: float = 0.9
    warmup_steps: int | None = None
    decay_fraction: float | None = None
    final_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_unit("WSDAlpha.peak", self.peak)
        if self.total_steps < 1:
            raise ValueError(f"WSDAlpha.total_steps={self.total_steps!r}: must be >= 1")

    def schedule(self) -> optax.Schedule:
        overrides = {name: getattr(self, name) for name in ("warmup_steps", "decay_fraction", "final_fraction")
                     if getattr(self, name) is not None}
        return learning_rate_schedule(self.total_steps, kind="wsd", peak=self.peak, **overrides)

    def __call__(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(self.schedule()(step), jnp.float32)
