"""Optimizer and learning-rate schedules (optax), configurable from gin."""

from __future__ import annotations

from typing import Literal

import gin
import jax
import jax.numpy as jnp
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


def with_moment_dtype(inner: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
    """Runs ``inner`` in ``dtype``: its state (Adam's moments) is kept in ``dtype`` and the
    gradients and parameters it sees are cast to it; its updates come back in the parameters'
    dtypes."""
    dtype = jnp.dtype(dtype)

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype), tree)

    def init(params):
        return inner.init(cast(params))

    def update(updates, state, params=None):
        dtypes = jax.tree.map(lambda u: u.dtype, updates)
        new, state = inner.update(cast(updates), state, None if params is None else cast(params))
        return jax.tree.map(lambda u, d: u.astype(d), new, dtypes), state

    return optax.GradientTransformation(init, update)


@gin.configurable
def adamw(
    schedule: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    moment_dtype: str | None = None,
    param_dtype: str = "float32",
) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping; weight decay only on matrices (kernels,
    embedding, LM head), not on norm scales or biases.

    Args:
      moment_dtype: dtype of Adam's moments ("float32", "bfloat16"); None keeps the parameters'
        dtype, which is only allowed for float32 parameters.
      param_dtype: the trained parameters' dtype (the trainer passes the model's). Pure-bf16
        training (bf16 parameters, no fp32 master copy) must say what the moments are kept in.

    Raises:
      ValueError: low-precision parameters without an explicit ``moment_dtype``.
    """
    if param_dtype != "float32" and moment_dtype is None:
        raise ValueError(
            f"parameters in {param_dtype} (pure low-precision training, no fp32 master weights) need "
            "adamw.moment_dtype set explicitly ('float32' or 'bfloat16'); for bf16 compute with fp32 "
            "master weights set the model's compute_dtype instead and keep param_dtype = 'float32'")
    adam = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    if moment_dtype is not None:
        adam = with_moment_dtype(adam, moment_dtype)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(adam)
    return optax.chain(*chain)
