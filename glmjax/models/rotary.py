"""Rotary position embedding (RoPE), full or partial, interleaved or half-split."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles.

    Args:
      positions: int [batch, seq] token positions.
      rotary_dim: number of rotating dims (even); there are ``rotary_dim // 2`` frequencies.
      theta: rotary base.

    Returns:
      (cos, sin), each fp32 [batch, seq, rotary_dim // 2].
    """
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool
) -> jax.Array:
    """Rotates the first ``2 * cos.shape[-1]`` dims of every head of ``x``.

    Args:
      x: [batch, seq, heads, head_dim].
      cos, sin: fp32 [batch, seq, rotary_dim // 2].
      interleaved: pairs are adjacent dims (2i, 2i+1) (GLM) rather than (i, i + rotary_dim/2) (Qwen, Llama).

    Returns:
      Array like ``x``; the dims past ``rotary_dim`` pass through unchanged. Computed in fp32.
    """
    half = cos.shape[-1]
    rotary_dim = 2 * half
    x_rot = x[..., :rotary_dim].astype(jnp.float32)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    if interleaved:
        pairs = x_rot.reshape(*x_rot.shape[:-1], half, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        rotated = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-1)
        rotated = rotated.reshape(x_rot.shape)
    else:
        first, second = x_rot[..., :half], x_rot[..., half:]
        rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    rotated = rotated.astype(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)
