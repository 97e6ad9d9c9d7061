"""Rotary position embedding (RoPE), full or partial, interleaved or half-split, with the
context-extension scalings of HF checkpoints: linear (position interpolation), dynamic NTK
and YaRN.

The frequencies follow the definitions in transformers (``modeling_rope_utils``), in the
same fp32 arithmetic, so that converted checkpoints give the same logits:

* linear: every inverse frequency divided by ``factor``.
* dynamic (NTK-aware, recomputed per input): with ``L = max(max_position + 1, L0)``, where
  ``L0`` is the trained length, the base becomes
  ``theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2))`` (``d`` = rotary dims); up
  to ``L0`` it is the plain base.
* yarn: dims that rotate fewer than ``beta_slow`` times over ``L0`` are interpolated
  (divided by ``factor``), those rotating more than ``beta_fast`` times keep their
  frequency, a linear ramp blends the dims between; cos and sin are multiplied by the
  attention factor (``0.1 * ln(factor) + 1`` unless given), which scales every q.k logit by
  its square.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import gin
import jax
import jax.numpy as jnp

RopeType = Literal["linear", "dynamic", "yarn"]
ROPE_TYPES: tuple[str, ...] = ("linear", "dynamic", "yarn")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE context-extension scaling (``ModelConfig.rope_scaling``; None = plain RoPE).

    Attributes:
      type: "linear", "dynamic" or "yarn".
      factor: context extension factor (> 0; 1 leaves linear and dynamic unchanged).
      original_max_position_embeddings: ``L0``, the length (tokens) the model was trained at;
        dynamic and yarn only. None = the model's ``max_position_embeddings``
        (``ModelConfig`` fills it in, as transformers does when the field is absent).
      beta_fast, beta_slow: yarn ramp bounds, in rotations over ``L0`` (transformers'
        defaults 32 and 1).
      mscale, mscale_all_dim: yarn (DeepSeek form): when both are non-zero and
        ``attention_factor`` is None, the attention factor is
        ``m(factor, mscale) / m(factor, mscale_all_dim)`` with ``m(s, k) = 0.1 k ln s + 1``.
      attention_factor: yarn: multiplier of cos and sin; None = derived from ``factor``.
      truncate: yarn: round the ramp bounds outwards to whole dims (transformers' default).
    """

    type: RopeType
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.type={self.type!r} is not one of {', '.join(ROPE_TYPES)}")
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor!r} must be > 0")
        original = self.original_max_position_embeddings
        if self.type == "linear" and original is not None:
            raise ValueError("rope_scaling.original_max_position_embeddings is not used by linear scaling")
        if original is not None and original <= 0:
            raise ValueError(f"rope_scaling.original_max_position_embeddings={original} must be > 0")
        if self.type != "yarn":
            yarn_only = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                         "attention_factor": None, "truncate": True}
            changed = [name for name, default in yarn_only.items() if getattr(self, name) != default]
            if changed:
                raise ValueError(f"rope_scaling field(s) {', '.join(changed)} apply to yarn only, "
                                 f"not {self.type!r}")

    @property
    def attention_scaling(self) -> float:
        """The multiplier of cos and sin: yarn's attention factor, 1.0 for the other types."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)


def _yarn_mscale(scale: float, coefficient: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0


def _plain_inv_freq(rotary_dim: int, base: float | jax.Array) -> jax.Array:
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)


def _yarn_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """Blend of interpolated and original frequencies; the ramp bounds in float64 on the
    host, the frequencies in fp32 (as transformers computes them)."""
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # The dim index whose wavelength fits ``rotations`` times into ``original`` tokens.
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # weight of the original (extrapolated) frequency
    pos_freqs = jnp.asarray(theta, jnp.float32) ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (jnp.float32(scaling.factor) * pos_freqs)
    return interpolated * (1.0 - keep) + extrapolated * keep


def rope_inv_freq(
    rotary_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    seq_len: int | jax.Array | None = None,
) -> tuple[jax.Array, float]:
    """Inverse frequencies and the cos/sin multiplier.

    Args:
      rotary_dim: number of rotating dims (even).
      theta: rotary base.
      scaling: None for plain RoPE.
      seq_len: dynamic only: the effective length in tokens (int or traced int scalar);
        None = the trained length (plain frequencies).

    Returns:
      (inv_freq fp32 [rotary_dim // 2] in radians per position, attention scaling).
    """
    if scaling is None or scaling.type == "linear":
        inv_freq = _plain_inv_freq(rotary_dim, theta)
        return (inv_freq if scaling is None else inv_freq / jnp.float32(scaling.factor)), 1.0
    original = scaling.original_max_position_embeddings
    if original is None:
        raise ValueError(f"rope_scaling type {scaling.type!r} needs original_max_position_embeddings")
    if scaling.type == "yarn":
        return _yarn_inv_freq(rotary_dim, theta, scaling), scaling.attention_scaling
    if rotary_dim <= 2:
        raise ValueError(f"dynamic rope scaling needs more than 2 rotary dims, got {rotary_dim}")
    length = jnp.maximum(jnp.asarray(original if seq_len is None else seq_len), original)
    stretch = jnp.float32(scaling.factor) * length.astype(jnp.float32) / original - (scaling.factor - 1)
    base = jnp.float32(theta) * stretch ** (rotary_dim / (rotary_dim - 2))
    return _plain_inv_freq(rotary_dim, base), 1.0


def rotary_angles(
    positions: jax.Array,
    rotary_dim: int,
    theta: float,
    scaling: RopeScaling | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, times the scaling's attention factor.

    Dynamic scaling takes its effective length from the input: ``max(positions) + 1`` over
    the whole batch (positions where ``valid`` is False are left out), computed inside the
    traced function, so one compiled program serves every length. As in transformers, the
    frequencies of a row therefore depend on the longest row it is batched with. With a KV
    cache each call rotates its new tokens with the frequencies of its own maximum position
    while the cached keys keep the rotation they were written with, which is what
    transformers' generation does as the sequence grows; unlike transformers, nothing is
    remembered between calls (transformers keeps the frequencies of the longest length seen
    until an input shorter than the trained length resets them).

    Args:
      positions: int [batch, seq] token positions.
      rotary_dim: number of rotating dims (even); there are ``rotary_dim // 2`` frequencies.
      theta: rotary base.
      scaling: None for plain RoPE.
      valid: optional bool [batch, seq]; False marks padding (dynamic scaling only reads it).

    Returns:
      (cos, sin), each fp32 [batch, seq, rotary_dim // 2].
    """
    seq_len = None
    if scaling is not None and scaling.type == "dynamic":
        counted = positions if valid is None else jnp.where(valid, positions, 0)
        seq_len = jnp.max(counted) + 1
    inv_freq, attention_scaling = rope_inv_freq(rotary_dim, theta, scaling, seq_len)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos, sin


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
