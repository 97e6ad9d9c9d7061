"""APFed losses: task cross-entropy, reconstruction MSE, NT-Xent / supervised contrastive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy (nats) of (B, C) logits against (B,) int labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def reconstruction_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over all elements of (pred - target)^2; both (B, D)."""
    return jnp.mean(jnp.square(pred - target))


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def supervised_contrastive(features: jax.Array, labels: jax.Array | None = None,
                           temperature: float = 1.0) -> jax.Array:
    """Supervised contrastive loss (Khosla et al. 2020), SimCLR's NT-Xent when ``labels`` is None.

    Args:
      features: (B, V, d) V views of B samples; L2-normalised here.
      labels: (B,) class ids: samples of one class are positives of each other; None: only the
        other views of the same sample are positives.
      temperature: softmax temperature tau of the cosine similarities.

    Returns:
      Scalar: the mean over the B*V anchors of
      -1/|P(i)| sum_{p in P(i)} log( exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau) ).
    """
    b, v, _ = features.shape
    flat = _normalize(features.reshape(b * v, -1))
    logits = flat @ flat.T / temperature
    self_mask = jnp.eye(b * v, dtype=bool)
    sample = jnp.repeat(jnp.arange(b), v) if labels is None else jnp.repeat(labels, v)
    positive = (sample[:, None] == sample[None, :]) & ~self_mask
    log_prob = logits - jax.nn.logsumexp(jnp.where(self_mask, -jnp.inf, logits), axis=1, keepdims=True)
    mean_pos = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.sum(positive, axis=1)
    return -jnp.mean(mean_pos)


def nt_xent(a: jax.Array, b: jax.Array, temperature: float = 1.0) -> jax.Array:
    """NT-Xent between two views (B, d): positives are rows with the same index in ``a`` and ``b``."""
    return supervised_contrastive(jnp.stack([a, b], axis=1), None, temperature)
