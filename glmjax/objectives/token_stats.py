"""Per-token log-probabilities and entropies of the policy, chunked over the sequence.

RL needs, for every response token, ``log pi(y_t | .)`` (the policy-gradient term, the PPO
ratio, the KL to the anchor) and the entropy of ``pi(. | .)`` (the entropy bonus), both with
gradients and both from fp32 logits. Computing them from ``[rows, seq, vocab]`` logits would
hold a full fp32 logits tensor (and its gradient) at once; here the sequence is cut into chunks,
each chunk's logits are computed, reduced and dropped, and the backward pass (a custom VJP)
recomputes one chunk's logits at a time from the saved log-partition function and entropy.

With ``z = (h @ W) / T`` (T the sampling temperature), ``p = softmax(z)``:

* ``logp_t = z_t - logZ``; ``d logp_t / dz = onehot(t) - p``;
* ``H = logZ - sum_j p_j z_j``; ``dH / dz_j = -p_j (log p_j + H)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glmjax.objectives.losses import (
    from_sequence_chunks,
    head_logits,
    head_matmul_gradients,
    sum_head_gradients,
    to_sequence_chunks,
)


def token_logps_and_entropy(
    hidden: jax.Array,
    head_kernel: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target token and the entropy of each next-token distribution.

    Args:
      hidden: [batch, seq, embed] final-normed hidden states.
      head_kernel: [embed, vocab] LM head.
      targets: int [batch, seq] target token ids.
      temperature: the logits are divided by it (the policy that sampled at temperature T;
        the engine's ``logprob_mode="scaled"`` reports the same log-probs). Must be > 0.
      chunk_size: tokens per chunk along the sequence (clipped to seq; seq is padded up).

    Returns:
      (logps fp32 [batch, seq] in nats, entropy fp32 [batch, seq] in nats), both differentiable
      with respect to ``hidden`` and ``head_kernel``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    seq = hidden.shape[1]
    chunk = min(chunk_size, seq)
    logps, entropy = _chunked_stats(to_sequence_chunks(hidden, chunk), head_kernel,
                                    to_sequence_chunks(targets.astype(jnp.int32), chunk),
                                    float(temperature))
    return from_sequence_chunks(logps, seq), from_sequence_chunks(entropy, seq)


def _chunk_stats(h: jax.Array, kernel: jax.Array, t: jax.Array, temperature: float):
    """(logps, entropy, log_z) of one chunk, each fp32 [b, c]."""
    z = head_logits(h, kernel) / temperature
    max_z = jnp.max(z, axis=-1)
    log_z = max_z + jnp.log(jnp.sum(jnp.exp(z - max_z[..., None]), axis=-1))
    probs = jnp.exp(z - log_z[..., None])
    entropy = log_z - jnp.sum(probs * z, axis=-1)
    logps = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0] - log_z
    return logps, entropy, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_stats(hidden_chunks: jax.Array, kernel: jax.Array, target_chunks: jax.Array,
                   temperature: float) -> tuple[jax.Array, jax.Array]:
    """hidden_chunks [n, b, c, e], targets [n, b, c] -> (logps, entropy), each [n, b, c]."""
    return _chunked_stats_fwd(hidden_chunks, kernel, target_chunks, temperature)[0]


def _chunked_stats_fwd(hidden_chunks, kernel, target_chunks, temperature):
    logps, entropy, log_z = jax.lax.map(
        lambda a: _chunk_stats(a[0], kernel, a[1], temperature), (hidden_chunks, target_chunks))
    return (logps, entropy), (hidden_chunks, kernel, target_chunks, log_z, entropy)


def _chunk_grad(h, kernel, t, log_z, entropy, g_logp, g_entropy, temperature):
    z = head_logits(h, kernel) / temperature
    log_probs = z - log_z[..., None]
    probs = jnp.exp(log_probs)
    is_target = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == t[..., None]
    z_grad = (g_logp[..., None] * (is_target - probs)
              - g_entropy[..., None] * probs * (log_probs + entropy[..., None]))
    return head_matmul_gradients(h, kernel, (z_grad / temperature).astype(h.dtype))


def _chunked_stats_bwd(temperature, residuals, cotangents):
    hidden_chunks, kernel, target_chunks, log_z, entropy = residuals
    g_logp, g_entropy = (c.astype(jnp.float32) for c in cotangents)

    def grad(h, t, lz, ent, gl, ge):
        return _chunk_grad(h, kernel, t, lz, ent, gl, ge, temperature)

    hidden_grad, kernel_grad = sum_head_gradients(
        grad, (hidden_chunks, target_chunks, log_z, entropy, g_logp, g_entropy), kernel)
    return hidden_grad, kernel_grad, None


_chunked_stats.defvjp(_chunked_stats_fwd, _chunked_stats_bwd)
