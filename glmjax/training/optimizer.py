"""Optimizer and learning-rate schedules (optax), configurable from gin."""

from __future__ import annotations

from typing import Literal

import gin
import jax
import optax


@gin.configurable
def learning_rate_schedule(
    total_steps: int,
    kind: Literal["cosine", "wsd", "constant"] = "cosine",
    peak: float = 3e-4,
    warmup_steps: int = 100,
    final_fraction: float = 0.1,
    decay_fraction: float = 0.1,
) -> optax.Schedule:
    """Warmup then cosine, warmup-stable-decay (WSD), or constant.

    Args:
      total_steps: optimiser steps of the run.
      kind: "cosine": linear warmup to ``peak`` then cosine down to ``final_fraction * peak``
        at ``total_steps``; "wsd": linear warmup, constant ``peak``, then a linear decay to
        ``final_fraction * peak`` over the last ``decay_fraction`` of the steps;
        "constant": linear warmup then ``peak``.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    final = peak * final_fraction
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), end_value=final
        )
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    if kind == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [warmup_steps])
    if kind == "wsd":
        decay_steps = max(int(round(total_steps * decay_fraction)), 1)
        stable_end = max(total_steps - decay_steps, warmup_steps)
        return optax.join_schedules(
            [warmup, optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay_steps)],
            [warmup_steps, stable_end],
        )
    raise ValueError(f"learning_rate_schedule.kind={kind!r}: use cosine, wsd or constant")


def weight_decay_mask(params: dict) -> dict:
    """True for parameters that weight decay applies to (by name: kernels, embedding, lm_head)."""

    def decays(path, _) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("kernel") or name in ("embedding", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


@gin.configurable
def adamw(
    schedule: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping; weight decay only on matrices (kernels,
    embedding, LM head), not on norm scales or biases."""
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask))
    return optax.chain(*chain)
