"""Knowledge-distillation losses against a truncated teacher, chunked with a custom VJP.

Notation per position: student logits ``s`` [vocab], teacher slots ``ids`` [k] (descending
teacher probability) with probabilities ``q`` [k] that sum to 1 over the kept slots (0 on unused
slots; a position whose slots are all 0 has no teacher and no KD loss), and for the "tail" side
the teacher's mass ``m`` outside the kept ids (at the same temperature).

Student side (``student_side``):

* ``"full"`` (default, as the paper): ``log p = log_softmax(s)`` over the whole vocabulary,
  read at the kept ids; the student's mass outside them is only penalised by MSE (and, for
  soft-CE/KL, through the normalisation).
* ``"renormalized"``: ``log p = log_softmax(s[kept])`` over the kept ids only.
* ``"tail"``: the kept ids plus one bucket for everything else, on both sides: the teacher is
  ``[(1 - m) q, m]``, the student ``[softmax(s)[kept], 1 - sum softmax(s)[kept]]``.

Losses (``loss_type``), per position, over the slots (and the tail bucket):

* ``"soft_ce"``: ``-sum t log p`` (negative log-likelihood of the soft labels);
* ``"kl"``: ``KL(t || p) = sum t (log t - log p)``; equals soft-CE minus the teacher's entropy,
  so both have the same gradient;
* ``"mse"``: squared L2 distance between the probability vectors (a sum, not a mean over the
  vocabulary). "full": over the whole vocabulary, the teacher being 0 outside the kept ids
  (``sum_j (q_j - p_j)^2 + sum_{v not kept} p_v^2``); "renormalized": over the kept ids;
  "tail": over the kept ids and the tail bucket.

The student's logits are not divided by the temperature and no tau^2 factor is applied (the
temperature only shapes the teacher's distribution, as in the paper's F(z) = softmax(z / tau)).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from glmjax.objectives.losses import (
    from_sequence_chunks,
    head_logits,
    head_matmul_gradients,
    sum_head_gradients,
    to_sequence_chunks,
)

LossType = Literal["kl", "soft_ce", "mse"]
StudentSide = Literal["full", "renormalized", "tail"]
LOSS_TYPES = ("kl", "soft_ce", "mse")
STUDENT_SIDES = ("full", "renormalized", "tail")


def check_truncation(*, top_p: float, top_k: int, temperature: float, vocab_size: int | None = None) -> None:
    """Raises ``ValueError`` naming the setting that cannot work."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1]")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 1")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary ({vocab_size})")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")


def truncate_with_tail(
    logits: jax.Array, *, top_p: float, top_k: int, temperature: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`truncate_teacher_logits` plus the tail mass.

    Returns:
      (ids int32 [..., top_k], probs float32 [..., top_k], tail float32 [...]): ``tail`` is the
      mass of ``softmax(logits / temperature)`` outside the kept ids (0 when every id is kept).
    """
    vocab = logits.shape[-1]
    check_truncation(top_p=top_p, top_k=top_k, temperature=temperature, vocab_size=vocab)
    x = logits.astype(jnp.float32)
    # On 2-D rows (XLA:CPU lowered a [b, c, vocab] top_k inside the train step to a full sort of
    # the vocabulary: 14 s instead of 1 s per step), values read back through the indices (it
    # turns an index-less top_k into a sort too).
    _, ids = jax.lax.top_k(x.reshape(-1, vocab), top_k)
    ids = ids.reshape(*x.shape[:-1], top_k)
    top = jnp.take_along_axis(x, ids, axis=-1)
    log_z = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    if top_p >= 1.0:
        keep = jnp.ones(top.shape, bool)
    else:
        # top-p keeps a prefix of the sorted distribution, so the top-k prefix holds it (or is
        # the cap): keep slot j while the mass of the strictly better slots is below top_p.
        mass = jnp.exp(top - log_z)
        keep = (jnp.cumsum(mass, axis=-1) - mass) < top_p
    scaled = jnp.where(keep, top / temperature, -jnp.inf)
    log_kept = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    probs = jnp.where(keep, jnp.exp(scaled - log_kept), 0.0)
    log_all = jax.nn.logsumexp(x / temperature, axis=-1, keepdims=True)
    tail = jnp.clip(-jnp.expm1(log_kept - log_all), 0.0, 1.0)[..., 0]
    tail = jnp.where(keep.sum(-1) == vocab, 0.0, tail)
    return ids.astype(jnp.int32), probs, tail


def truncate_teacher_logits(
    logits: jax.Array, *, top_p: float, top_k: int, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """Top-p-k truncation of teacher logits, renormalised with a temperature.

    On ``softmax(logits)`` (full vocabulary, temperature 1) keeps the smallest set of most
    probable ids whose mass reaches ``top_p`` (the id that crosses it included), at most
    ``top_k`` of them; ``probs = softmax(logits[kept] / temperature)`` over the kept ids. Uses
    ``jax.lax.top_k`` (no sort of the vocabulary): top-p keeps a prefix of the sorted
    distribution, so the kept set is the first ``min(m_p, top_k)`` of the top-k. ``top_p = 1``
    keeps all ``top_k`` (no rounding of the mass sum can drop one).

    Args:
      logits: [..., vocab] any float dtype.
      top_p: in (0, 1]. top_k: 1..vocab. temperature: > 0.

    Returns:
      (ids int32 [..., top_k] by descending probability (ties: lower id first), probs float32
      [..., top_k] summing to 1). Unused slots (beyond the top-p set) have probability 0 and
      keep the id top-k found there (a valid id that is not in the kept set).
    """
    ids, probs, _ = truncate_with_tail(logits, top_p=top_p, top_k=top_k, temperature=temperature)
    return ids, probs


def _xlogx_ratio(t: jax.Array, log_p: jax.Array) -> jax.Array:
    """t * (log t - log_p), 0 where t == 0 (t is a constant: no gradient through it)."""
    safe_t = jnp.where(t > 0, t, 1.0)
    return jnp.where(t > 0, t * (jnp.log(safe_t) - log_p), 0.0)


def token_losses(
    logits: jax.Array,
    targets: jax.Array,
    ids: jax.Array,
    probs: jax.Array,
    tail: jax.Array | None,
    *,
    loss_type: LossType,
    student_side: StudentSide,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """LM and KD losses of one block of positions, differentiable in ``logits``.

    Args:
      logits: fp32 [..., vocab] student logits.
      targets: int [...] next-token ids.
      ids: int [..., k] teacher ids; probs: float [..., k] teacher probabilities (renormalised
        here to sum 1; all 0: no teacher); tail: float [...] teacher mass outside the kept ids
        (required for ``student_side="tail"``, ignored otherwise).

    Returns:
      (lm [...] cross-entropy in nats, kd [...] in nats (0 without a teacher), correct [...]
      bool: the target has the largest logit, agree [...] bool: the student's argmax is the
      teacher's top id).
    """
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    lm = log_z - target_logit
    correct = target_logit >= jnp.max(logits, axis=-1)
    agree = jnp.argmax(logits, axis=-1) == ids[..., 0]

    probs = probs.astype(jnp.float32)
    total = probs.sum(-1)
    has_teacher = total > 0
    q = probs / jnp.where(has_teacher, total, 1.0)[..., None]
    kept = q > 0
    # A position without a teacher computes with slot 0 "kept" (finite everywhere) and is zeroed.
    kept = kept | (~has_teacher[..., None] & (jnp.arange(q.shape[-1]) == 0))
    s_ids = jnp.take_along_axis(logits, ids.astype(jnp.int32), axis=-1)

    if student_side == "full":
        log_p = s_ids - log_z[..., None]
        teacher, tail_t, log_p_tail, p_tail = q, None, None, None
    elif student_side == "renormalized":
        log_p = s_ids - jax.nn.logsumexp(jnp.where(kept, s_ids, -jnp.inf), axis=-1, keepdims=True)
        teacher, tail_t, log_p_tail, p_tail = q, None, None, None
    elif student_side == "tail":
        if tail is None:
            raise ValueError("student_side='tail' needs the teacher's tail mass (teacher_tail)")
        log_p = s_ids - log_z[..., None]
        in_kept = _kept_vocab_mask(logits.shape, ids, kept)
        no_tail = in_kept.sum(-1) == logits.shape[-1]
        # Double where: a position whose kept ids cover the vocabulary has an empty tail bucket.
        masked = jnp.where(no_tail[..., None], 0.0, jnp.where(in_kept, -jnp.inf, logits))
        log_p_tail = jnp.where(no_tail, 0.0, jax.nn.logsumexp(masked, axis=-1) - log_z)
        p_tail = jnp.where(no_tail, 0.0, jnp.exp(log_p_tail))
        tail_t = jnp.where(no_tail, 0.0, jnp.clip(tail.astype(jnp.float32), 0.0, 1.0))
        teacher = q * (1.0 - tail_t)[..., None]
    else:
        raise ValueError(f"student_side={student_side!r}: use one of {STUDENT_SIDES}")

    if loss_type in ("kl", "soft_ce"):
        if loss_type == "kl":
            kd = jnp.where(kept, _xlogx_ratio(teacher, log_p), 0.0).sum(-1)
        else:
            kd = -jnp.where(kept, teacher * log_p, 0.0).sum(-1)
        if tail_t is not None:
            kd = kd + (_xlogx_ratio(tail_t, log_p_tail) if loss_type == "kl" else -tail_t * log_p_tail)
    elif loss_type == "mse":
        p = jnp.where(kept, jnp.exp(log_p), 0.0)
        if student_side == "full":
            # The kept ids' squared differences + the student's squares outside them (>= 0).
            squares = jnp.exp(2.0 * (logits - log_z[..., None])).sum(-1)
            outside = jnp.maximum(squares - jnp.square(p).sum(-1), 0.0)
            kd = jnp.square(teacher - p).sum(-1) + outside
        else:
            kd = jnp.square(teacher - p).sum(-1)
            if tail_t is not None:
                kd = kd + jnp.square(tail_t - p_tail)
    else:
        raise ValueError(f"loss_type={loss_type!r}: use one of {LOSS_TYPES}")
    return lm, jnp.where(has_teacher, kd, 0.0), correct, agree


def _kept_vocab_mask(shape: tuple[int, ...], ids: jax.Array, kept: jax.Array) -> jax.Array:
    """bool [..., vocab]: the id is one of the kept slots (a scatter of the k slots)."""
    lead = ids.shape[:-1]
    flat_ids = ids.reshape(-1, ids.shape[-1]).astype(jnp.int32)
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    counts = jnp.zeros((flat_ids.shape[0], shape[-1]), jnp.int32).at[rows, flat_ids].add(
        kept.reshape(flat_ids.shape).astype(jnp.int32))
    return (counts > 0).reshape(*lead, shape[-1])


@dataclasses.dataclass(frozen=True)
class DistillTokenLosses:
    """Per-position results of :func:`chunked_distill_losses`, each [batch, seq].

    Attributes:
      lm: next-token cross-entropy (nats). kd: distillation loss (nats; 0 without a teacher).
      correct: bool, the target has the largest student logit. agree: bool, the student's argmax
      is the teacher's top id. has_teacher: bool, the position's teacher probabilities are not
      all zero.
    """

    lm: jax.Array
    kd: jax.Array
    correct: jax.Array
    agree: jax.Array
    has_teacher: jax.Array


def chunked_distill_losses(
    hidden: jax.Array,
    head_kernel: jax.Array,
    targets: jax.Array,
    teacher_ids: jax.Array,
    teacher_probs: jax.Array,
    teacher_tail: jax.Array | None = None,
    *,
    loss_type: LossType = "kl",
    student_side: StudentSide = "full",
    chunk_size: int = 512,
) -> DistillTokenLosses:
    """LM and KD losses per position from the student's hidden states, chunked over the sequence.

    Like ``chunked_cross_entropy``: each chunk's fp32 logits [batch, chunk, vocab] are computed,
    reduced to both losses and dropped; the backward pass (custom VJP) recomputes one chunk's
    logits at a time and differentiates :func:`token_losses` on it, so at most one chunk of fp32
    student logits exists at a time. No gradient flows into the teacher's arrays.

    Args:
      hidden: [batch, seq, embed] final-normed student hidden states.
      head_kernel: [embed, vocab] student LM head.
      targets: int [batch, seq].
      teacher_ids: int [batch, seq, k]; teacher_probs: float [batch, seq, k] (all 0: no teacher);
      teacher_tail: float [batch, seq] teacher mass outside the kept ids ("tail" side only).
      loss_type, student_side: see the module docstring.
      chunk_size: positions per chunk along the sequence (clipped to seq; seq is padded up).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {LOSS_TYPES}")
    if student_side not in STUDENT_SIDES:
        raise ValueError(f"student_side={student_side!r}: use one of {STUDENT_SIDES}")
    if student_side == "tail" and teacher_tail is None:
        raise ValueError("student_side='tail' needs the teacher's tail mass (teacher_tail)")
    seq = hidden.shape[1]
    if teacher_tail is None:
        teacher_tail = jnp.zeros(targets.shape, jnp.float32)
    chunk = min(chunk_size, seq)
    chunks = [to_sequence_chunks(x, chunk) for x in (
        hidden, targets.astype(jnp.int32), teacher_ids.astype(jnp.int32),
        teacher_probs.astype(jnp.float32), teacher_tail.astype(jnp.float32))]
    lm, kd, correct, agree = _chunked(*chunks[:1], head_kernel, *chunks[1:], (loss_type, student_side))
    return DistillTokenLosses(
        lm=from_sequence_chunks(lm, seq), kd=from_sequence_chunks(kd, seq),
        correct=from_sequence_chunks(correct, seq), agree=from_sequence_chunks(agree, seq),
        has_teacher=teacher_probs.sum(-1) > 0)


def _chunk_losses(h, kernel, t, ids, probs, tail, settings):
    loss_type, student_side = settings
    return token_losses(head_logits(h, kernel), t, ids, probs, tail, loss_type=loss_type,
                        student_side=student_side)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(hidden_chunks, kernel, targets, ids, probs, tail, settings):
    """Chunked arrays [n, b, c, ...] -> (lm, kd, correct, agree), each [n, b, c]."""
    return _chunked_fwd(hidden_chunks, kernel, targets, ids, probs, tail, settings)[0]


def _chunked_fwd(hidden_chunks, kernel, targets, ids, probs, tail, settings):
    outputs = jax.lax.map(lambda a: _chunk_losses(a[0], kernel, *a[1:], settings),
                          (hidden_chunks, targets, ids, probs, tail))
    return outputs, (hidden_chunks, kernel, targets, ids, probs, tail)


def _chunked_bwd(settings, residuals, cotangents):
    hidden_chunks, kernel, targets, ids, probs, tail = residuals
    g_lm, g_kd = (g.astype(jnp.float32) for g in cotangents[:2])
    loss_type, student_side = settings

    def grad(h, t, i, p, m, gl, gk):
        def losses(logits):
            lm, kd, _, _ = token_losses(logits, t, i, p, m, loss_type=loss_type, student_side=student_side)
            return lm, kd

        _, vjp = jax.vjp(losses, head_logits(h, kernel))
        (logit_grad,) = vjp((gl, gk))
        return head_matmul_gradients(h, kernel, logit_grad.astype(h.dtype))

    hidden_grad, kernel_grad = sum_head_gradients(
        grad, (hidden_chunks, targets, ids, probs, tail, g_lm, g_kd), kernel)
    return hidden_grad, kernel_grad, None, None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_teacher_truncation(
    hidden: jax.Array,
    head_kernel: jax.Array,
    *,
    top_p: float,
    top_k: int,
    temperature: float,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The truncated teacher distribution of every position, one sequence chunk at a time.

    Each chunk's fp32 teacher logits [batch, chunk, vocab] are computed from the teacher's hidden
    states and head kernel, truncated (:func:`truncate_with_tail`) and dropped; only the
    [batch, seq, top_k] slots are kept. Under ``stop_gradient``: the teacher is frozen.

    Returns:
      (ids int32 [batch, seq, top_k], probs float32 [batch, seq, top_k], tail float32 [batch, seq]).
    """
    hidden, head_kernel = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head_kernel)
    seq = hidden.shape[1]
    chunks = to_sequence_chunks(hidden, min(chunk_size, seq))
    ids, probs, tail = jax.lax.map(
        lambda h: truncate_with_tail(head_logits(h, head_kernel), top_p=top_p, top_k=top_k,
                                     temperature=temperature), chunks)
    return from_sequence_chunks(ids, seq), from_sequence_chunks(probs, seq), from_sequence_chunks(tail, seq)
