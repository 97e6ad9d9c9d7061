"""Synthetic attention inputs with the structure SampleAttention exploits.

Used by the tests and the benchmark; generated with NumPy (fast, no compilation).
Attention of :func:`structured_qkv` inputs has (1) a local band: q/k carry
RoPE-like features ``cos/sin(w * pos)`` whose dot product peaks at distance 0,
(2) a few heavy key columns ("sinks"): those keys carry a direction that every
query also carries, and (3) Gaussian noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def structured_qkv(
    seed: int,
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    band: float = 64.0,
    band_peak: float = 10.0,
    num_heavy: int = 4,
    heavy_gain: float = 10.0,
    noise: float = 1.0,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Queries/keys/values with a local band, heavy key columns and noise.

  Args:
    seed: NumPy random seed.
    batch, seq, heads, kv_heads, head_dim: shapes; ``head_dim >= 8``.
    band: width scale of the local band in tokens (shortest wavelength).
    band_peak: logit boost of the band at distance 0 (nats); it decays over
      roughly ``band / 4`` tokens.
    num_heavy: heavy key columns per kv head (position 0 is always one).
    heavy_gain: logit boost of a heavy column (nats), for every query.
    noise: standard deviation of the Gaussian features of q and k.
    dtype: output dtype.

  Returns:
    ``q [batch, seq, heads, head_dim]``, ``k, v [batch, seq, kv_heads, head_dim]``;
    meant for the default scale ``head_dim ** -0.5``.
  """
  rng = np.random.default_rng(seed)
  n_freq = head_dim // 4
  n_rest = head_dim - 2 * n_freq - 1
  root = head_dim ** 0.25  # q.k is divided by sqrt(head_dim): split it between q and k
  group = heads // kv_heads
  # Wavelengths between band and 4 * band tokens, random per kv head.
  wavelength = band * (1.0 + 3.0 * rng.random((kv_heads, n_freq), np.float32))
  angle = np.arange(seq, dtype=np.float32)[:, None, None] * (2.0 * np.pi / wavelength)
  rope = np.concatenate([np.cos(angle), np.sin(angle)], -1) * (
      (band_peak / n_freq) ** 0.5 * root)  # [s, kvh, 2f]
  sink_gain = heavy_gain ** 0.5 * root

  is_heavy = np.zeros((batch, seq, kv_heads), bool)
  is_heavy[:, 0] = True
  for b, h in np.ndindex(batch, kv_heads):
    is_heavy[b, rng.integers(1, seq, num_heavy - 1), h] = True

  k_feats = [np.broadcast_to(rope, (batch, seq, kv_heads, 2 * n_freq)),
             np.where(is_heavy, np.float32(sink_gain), np.float32(0.0))[..., None],
             noise * rng.standard_normal((batch, seq, kv_heads, n_rest), np.float32)]
  q_feats = [np.broadcast_to(np.repeat(rope, group, axis=1), (batch, seq, heads, 2 * n_freq)),
             np.full((batch, seq, heads, 1), sink_gain, np.float32),
             noise * rng.standard_normal((batch, seq, heads, n_rest), np.float32)]
  q = np.concatenate(q_feats, -1)
  k = np.concatenate(k_feats, -1)
  v = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def random_qkv(seed: int, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int,
               dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain standard-normal q ``[b, s, h, d]``, k/v ``[b, s, kvh, d]`` (NumPy seed)."""
  rng = np.random.default_rng(seed)
  shapes = ((batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim),
            (batch, seq, kv_heads, head_dim))
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)
