"""Pure loss functions."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from glmjax.sharding import constrain, logical_to_spec

_KERNEL_AXES = ("embed", "vocab")


def chunked_cross_entropy(
    hidden: jax.Array,
    head_kernel: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 512,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token cross-entropy without materialising all logits in fp32.

    The sequence is cut into chunks; each chunk's logits are computed, reduced and dropped.
    The backward pass (a custom VJP) recomputes one chunk's logits at a time from the saved
    log-partition function and forms the logit gradient ``softmax - one_hot`` directly, so
    at most [batch, chunk_size, vocab] fp32 logits exist at a time.

    Args:
      hidden: [batch, seq, embed] final-normed hidden states.
      head_kernel: [embed, vocab] LM head.
      targets: int [batch, seq] target token ids.
      chunk_size: tokens per chunk along the sequence (clipped to seq; seq is padded up).
      z_loss: coefficient of the log(Z)^2 auxiliary loss (0 disables it).

    Returns:
      (loss [batch, seq] fp32 in nats including z-loss, correct [batch, seq] bool: the target
      has the largest logit, i.e. argmax == target up to exact ties).
    """
    seq = hidden.shape[1]
    chunk = min(chunk_size, seq)
    hidden_chunks = to_sequence_chunks(hidden, chunk)
    target_chunks = to_sequence_chunks(targets.astype(jnp.int32), chunk)
    losses, correct = _chunked_loss(hidden_chunks, head_kernel, target_chunks, z_loss)
    return from_sequence_chunks(losses, seq), from_sequence_chunks(correct, seq)


def _sequence_shards(batch: int, seq: int) -> int:
    """How many ways the ambient mesh splits a [batch, seq] activation's sequence (1 without a
    mesh or a sequence axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    entry = logical_to_spec(("act_batch", "act_seq"), (batch, seq), mesh)[1]
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[name] for name in names)


def to_sequence_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[batch, seq, ...] -> [num_chunks, batch, chunk, ...], the sequence zero-padded up to a
    multiple of ``chunk``.

    With the sequence split over n sequence shards (context parallelism), chunk k holds
    ``chunk // n`` tokens of every shard's own part (each shard's part cut like a sequence of
    its own), so a loop over chunks keeps every device on its own tokens; the layout then needs
    ``seq / n`` to be a multiple of ``chunk // n``, else one chunk takes each shard's whole part.
    """
    batch, seq = x.shape[:2]
    shards = _sequence_shards(batch, seq)
    if shards > 1:
        local = seq // shards
        per_shard = max(1, chunk // shards)
        per_shard = per_shard if local % per_shard == 0 else local
        x = x.reshape(batch, shards, local // per_shard, per_shard, *x.shape[2:])
        x = jnp.moveaxis(x, 2, 0).reshape(local // per_shard, batch, shards * per_shard, *x.shape[4:])
        return constrain(x, (None, "act_batch", "act_seq") + (None,) * (x.ndim - 3))
    pad = (-seq) % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(batch, (seq + pad) // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def from_sequence_chunks(x: jax.Array, seq: int) -> jax.Array:
    """[num_chunks, batch, chunk, ...] -> [batch, seq, ...] (the padding dropped); the inverse
    of ``to_sequence_chunks`` for the same ``seq`` under the same mesh."""
    num_chunks, batch, chunk = x.shape[:3]
    shards = _sequence_shards(batch, seq)
    if shards > 1 and num_chunks * chunk == seq:
        x = x.reshape(num_chunks, batch, shards, chunk // shards, *x.shape[3:])
        x = jnp.moveaxis(x, 0, 2).reshape(batch, seq, *x.shape[5:])
        return constrain(x, ("act_batch", "act_seq") + (None,) * (x.ndim - 2))
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :seq]


def head_logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """[b, c, e] x [e, v] -> fp32 [b, c, v]."""
    return jnp.einsum("bce,ev->bcv", h, kernel, preferred_element_type=jnp.float32)


def _is_target(logits: jax.Array, t: jax.Array) -> jax.Array:
    """bool [b, c, v]: the vocabulary entry is the target (an iota compare XLA fuses)."""
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t[..., None]


def _chunk_forward(
    h: jax.Array, kernel: jax.Array, t: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, correct, log_z) of one chunk, each [b, c]."""
    logits = head_logits(h, kernel)
    max_logit = jnp.max(logits, axis=-1)
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    loss = log_z - target_logit + z_loss * jnp.square(log_z)
    return loss, target_logit >= max_logit, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_loss(
    hidden_chunks: jax.Array, kernel: jax.Array, target_chunks: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array]:
    """hidden_chunks [n, b, c, e], targets [n, b, c] -> (loss, correct), each [n, b, c]."""
    return _chunked_loss_fwd(hidden_chunks, kernel, target_chunks, z_loss)[0]


def _chunked_loss_fwd(
    hidden_chunks: jax.Array, kernel: jax.Array, target_chunks: jax.Array, z_loss: float
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    loss, correct, log_z = jax.lax.map(
        lambda a: _chunk_forward(a[0], kernel, a[1], z_loss), (hidden_chunks, target_chunks)
    )
    return (loss, correct), (hidden_chunks, kernel, target_chunks, log_z)


def _chunk_grad(
    h: jax.Array, kernel: jax.Array, t: jax.Array, log_z: jax.Array, g: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array]:
    """(kernel gradient fp32 [e, v], hidden gradient [b, c, e]) of one chunk for cotangent g [b, c]."""
    logits = head_logits(h, kernel)
    # d(loss)/d(logits) = softmax * (1 + 2 z log_z) - one_hot(target)
    probs = jnp.exp(logits - log_z[..., None]) * (1.0 + 2.0 * z_loss * log_z)[..., None]
    logit_grad = (g[..., None] * (probs - _is_target(logits, t))).astype(h.dtype)
    return head_matmul_gradients(h, kernel, logit_grad)


def head_matmul_gradients(
    h: jax.Array, kernel: jax.Array, logit_grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(kernel gradient fp32 [e, v], hidden gradient [b, c, e] in ``h.dtype``) of ``h @ kernel``
    for the logit gradient [b, c, v] (in ``h.dtype``)."""
    h_grad = jnp.einsum("bcv,ev->bce", logit_grad, kernel, preferred_element_type=jnp.float32)
    # Sharded like the kernel: each device reduces its rows' contribution into its own shard
    # (reduce-scatter) instead of all-reducing a full fp32 [embed, vocab] buffer.
    kernel_grad = constrain(
        jnp.einsum("bce,bcv->ev", h, logit_grad, preferred_element_type=jnp.float32), _KERNEL_AXES)
    return kernel_grad, h_grad.astype(h.dtype)


def _chunked_loss_bwd(
    z_loss: float, residuals: tuple[jax.Array, ...], cotangents: tuple[jax.Array, jax.Array]
) -> tuple:
    hidden_chunks, kernel, target_chunks, log_z = residuals
    chunks = (hidden_chunks, target_chunks, log_z, cotangents[0].astype(jnp.float32))

    def grad(h, t, lz, g):
        return _chunk_grad(h, kernel, t, lz, g, z_loss)

    hidden_grad, kernel_grad = sum_head_gradients(grad, chunks, kernel)
    return hidden_grad, kernel_grad, None


def sum_head_gradients(
    chunk_grad: Callable[..., tuple[jax.Array, jax.Array]], chunks: tuple, kernel: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Runs ``chunk_grad`` over the leading (chunk) axis of every array in ``chunks``.

    ``chunk_grad(*one_chunk) -> (kernel gradient fp32 [embed, vocab], hidden gradient
    [b, c, embed])``. Returns (hidden gradients stacked [num_chunks, b, c, embed], the kernel
    gradient summed over chunks in ``kernel.dtype``).
    """
    # The first chunk starts the kernel-gradient sum (no zero-filled [embed, vocab] buffer). The
    # fp32 sum is constrained like the kernel, so it is never a replicated [embed, vocab] buffer.
    kernel_grad, first_hidden_grad = chunk_grad(*(x[0] for x in chunks))

    def accumulate(total, inputs):
        chunk_kernel_grad, hidden_grad = chunk_grad(*inputs)
        return constrain(total + chunk_kernel_grad, _KERNEL_AXES), hidden_grad

    kernel_grad, hidden_grads = jax.lax.scan(accumulate, kernel_grad, tuple(x[1:] for x in chunks))
    hidden_grad = jnp.concatenate([first_hidden_grad[None], hidden_grads], axis=0)
    return hidden_grad, kernel_grad.astype(kernel.dtype)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
