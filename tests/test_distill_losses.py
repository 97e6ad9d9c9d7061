"""Distillation losses: hand-computed values, a dense float64 numpy reference for every loss type
and student side, the chunked custom VJP against dense autodiff, soft-CE/KL gradient equality,
self-distillation and full-distribution KD."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.objectives.distill_losses import (
    LOSS_TYPES,
    STUDENT_SIDES,
    chunked_distill_losses,
    token_losses,
    truncate_with_tail,
)

COMBOS = list(itertools.product(LOSS_TYPES, STUDENT_SIDES))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_kd(logits, ids, probs, tail, loss_type, side):
    """One position in float64 from whole distributions: the teacher as a vector over the
    vocabulary (or over kept ids + a tail bucket), the student likewise."""
    logits = logits.astype(np.float64)
    kept = probs > 0
    if not kept.any():
        return 0.0
    q = probs[kept] / probs[kept].sum()
    kept_ids = ids[kept]
    if side == "full":
        teacher = np.zeros(logits.size)
        teacher[kept_ids] = q
        student = _softmax(logits)
    elif side == "renormalized":
        teacher, student = q, _softmax(logits[kept_ids])
    else:
        p = _softmax(logits)
        teacher = np.append(q * (1 - tail), tail)
        student = np.append(p[kept_ids], 1 - p[kept_ids].sum())
    if loss_type == "mse":
        return float(np.sum((teacher - student) ** 2))
    support = teacher > 0
    ce = -np.sum(teacher[support] * np.log(student[support]))
    if loss_type == "soft_ce":
        return float(ce)
    return float(np.sum(teacher[support] * np.log(teacher[support] / student[support])))


def test_hand_computed_values():
    # Student p = [0.4, 0.3, 0.2, 0.1]; teacher keeps ids 0 and 2 with [0.6, 0.4]; tail mass 0.2.
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    ids, probs, tail, targets = jnp.asarray([[0, 2]]), jnp.asarray([[0.6, 0.4]]), jnp.asarray([0.2]), jnp.asarray([1])
    ln = np.log
    expected = {
        ("soft_ce", "full"): -(0.6 * ln(0.4) + 0.4 * ln(0.2)),
        ("kl", "full"): 0.6 * ln(0.6 / 0.4) + 0.4 * ln(0.4 / 0.2),
        ("mse", "full"): (0.6 - 0.4) ** 2 + 0.3 ** 2 + (0.4 - 0.2) ** 2 + 0.1 ** 2,
        # renormalised student over ids {0, 2}: [2/3, 1/3]
        ("soft_ce", "renormalized"): -(0.6 * ln(2 / 3) + 0.4 * ln(1 / 3)),
        ("kl", "renormalized"): 0.6 * ln(0.6 / (2 / 3)) + 0.4 * ln(0.4 / (1 / 3)),
        ("mse", "renormalized"): (0.6 - 2 / 3) ** 2 + (0.4 - 1 / 3) ** 2,
        # tail: teacher [0.48, 0.32, 0.2], student [0.4, 0.2, 0.4]
        ("soft_ce", "tail"): -(0.48 * ln(0.4) + 0.32 * ln(0.2) + 0.2 * ln(0.4)),
        ("kl", "tail"): 0.48 * ln(0.48 / 0.4) + 0.32 * ln(0.32 / 0.2) + 0.2 * ln(0.2 / 0.4),
        ("mse", "tail"): 0.08 ** 2 + 0.12 ** 2 + 0.2 ** 2,
    }
    for (loss_type, side), value in expected.items():
        lm, kd, correct, agree = token_losses(logits, targets, ids, probs, tail, loss_type=loss_type, student_side=side)
        np.testing.assert_allclose(kd, [value], rtol=1e-5, err_msg=f"{loss_type} {side}")
        np.testing.assert_allclose(lm, [-ln(0.3)], rtol=1e-6)
        assert not bool(correct[0]) and bool(agree[0])


def _random_case(seed, batch=3, seq=11, embed=12, vocab=40, k=6):
    keys = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(keys[0], (batch, seq, embed))
    kernel = jax.random.normal(keys[1], (embed, vocab)) * 0.7
    teacher_logits = jax.random.normal(keys[2], (batch, seq, vocab)) * 2.0
    ids, probs, tail = truncate_with_tail(teacher_logits, top_p=0.9, top_k=k, temperature=1.5)
    probs = np.asarray(probs).copy()
    probs[0, 2] = 0.0  # positions without a teacher
    probs[1, 5] = 0.0
    targets = jax.random.randint(keys[3], (batch, seq), 0, vocab)
    weights = jax.random.uniform(keys[4], (batch, seq))
    return hidden, kernel, targets, ids, jnp.asarray(probs), tail, weights


@pytest.mark.parametrize("loss_type,side", COMBOS)
def test_values_match_numpy_reference(loss_type, side):
    hidden, kernel, targets, ids, probs, tail, _ = _random_case(1)
    out = chunked_distill_losses(hidden, kernel, targets, ids, probs, tail, loss_type=loss_type,
                                 student_side=side, chunk_size=4)
    logits = np.einsum("bse,ev->bsv", np.asarray(hidden, np.float64), np.asarray(kernel, np.float64))
    ids, probs, tail = np.asarray(ids), np.asarray(probs), np.asarray(tail)
    expected = np.zeros(ids.shape[:2])
    for index in np.ndindex(*ids.shape[:2]):
        expected[index] = _numpy_kd(logits[index], ids[index], probs[index], tail[index], loss_type, side)
    np.testing.assert_allclose(out.kd, expected, rtol=2e-5, atol=2e-6)
    assert not out.has_teacher[0, 2] and not out.has_teacher[1, 5] and out.has_teacher.sum() == ids[..., 0].size - 2
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lm = log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.lm, lm, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.agree, logits.argmax(-1) == ids[..., 0])


def _dense_kd(logits, ids, probs, tail, loss_type, side):
    """A dense jnp reference over [..., vocab] (autodiff gives its gradient)."""
    vocab = logits.shape[-1]
    has = probs.sum(-1) > 0
    q = probs / jnp.where(has, probs.sum(-1), 1.0)[..., None]
    teacher = (jax.nn.one_hot(ids, vocab) * q[..., None]).sum(-2)  # dense [..., vocab]
    kept = (jax.nn.one_hot(ids, vocab) * (q > 0)[..., None]).sum(-2) > 0
    kept = jnp.where(has[..., None], kept, True)
    safe = jnp.where(teacher > 0, teacher, 1.0)
    if side == "renormalized":
        log_p = logits - jax.nn.logsumexp(jnp.where(kept, logits, -jnp.inf), axis=-1, keepdims=True)
        log_p = jnp.where(kept, log_p, 0.0)
        p = jnp.where(kept, jnp.exp(log_p), 0.0)
        bucket_t, bucket_log_p, bucket_p = None, None, None
    else:
        log_p = jax.nn.log_softmax(logits, axis=-1)
        p = jnp.exp(log_p)
        bucket_t, bucket_log_p, bucket_p = None, None, None
        if side == "tail":
            teacher = teacher * (1 - tail)[..., None]
            safe = jnp.where(teacher > 0, teacher, 1.0)
            bucket_p = jnp.where(kept, 0.0, p).sum(-1)
            bucket_t, bucket_log_p = tail, jnp.log(bucket_p)
            p = jnp.where(kept, p, 0.0)
    if loss_type == "mse":
        kd = jnp.square(teacher - p).sum(-1)
        if bucket_t is not None:
            kd = kd + jnp.square(bucket_t - bucket_p)
    else:
        terms = jnp.where(teacher > 0, teacher * ((jnp.log(safe) if loss_type == "kl" else 0.0) - log_p), 0.0)
        kd = terms.sum(-1)
        if bucket_t is not None:
            kd = kd + bucket_t * ((jnp.log(bucket_t) if loss_type == "kl" else 0.0) - bucket_log_p)
    return jnp.where(has, kd, 0.0)


@pytest.mark.parametrize("loss_type,side,chunk_size", [(*combo, 4) for combo in COMBOS] + [("kl", "tail", 64)])
def test_chunked_gradients_match_dense_autodiff(loss_type, side, chunk_size):
    hidden, kernel, targets, ids, probs, tail, weights = _random_case(2)

    def chunked(h, w):
        out = chunked_distill_losses(h, w, targets, ids, probs, tail, loss_type=loss_type, student_side=side,
                                     chunk_size=chunk_size)
        return (out.kd * weights).sum() + 0.3 * (out.lm * weights).sum()

    def dense(h, w):
        logits = jnp.einsum("bse,ev->bsv", h, w)
        lm = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return (_dense_kd(logits, ids, probs, tail, loss_type, side) * weights).sum() + 0.3 * (lm * weights).sum()

    value, grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, kernel)
    ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", STUDENT_SIDES)
def test_soft_ce_and_kl_have_the_same_gradient(side):
    hidden, kernel, targets, ids, probs, tail, weights = _random_case(3)

    def loss(loss_type):
        def total(h, w):
            out = chunked_distill_losses(h, w, targets, ids, probs, tail, loss_type=loss_type, student_side=side,
                                         chunk_size=5)
            return (out.kd * weights).sum()
        return jax.value_and_grad(total, argnums=(0, 1))(hidden, kernel)

    (kl, kl_grads), (ce, ce_grads) = loss("kl"), loss("soft_ce")
    assert float(ce) > float(kl) + 1.0  # they differ by the teacher's entropy...
    for a, b in zip(kl_grads, ce_grads):  # ...which does not depend on the student
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _full_kept(logits):
    vocab = logits.shape[-1]
    return truncate_with_tail(logits, top_p=1.0, top_k=vocab, temperature=1.0)


@pytest.mark.parametrize("side", STUDENT_SIDES)
def test_self_distillation_is_zero_kl_and_entropy_soft_ce(side):
    hidden, kernel, targets, *_ = _random_case(4)
    logits = jnp.einsum("bse,ev->bsv", hidden, kernel)
    ids, probs, tail = _full_kept(logits)

    def kd(loss_type, h=hidden):
        return chunked_distill_losses(h, kernel, targets, ids, probs, tail, loss_type=loss_type, student_side=side,
                                      chunk_size=4).kd

    np.testing.assert_allclose(kd("kl"), 0.0, atol=2e-5)
    np.testing.assert_allclose(kd("mse"), 0.0, atol=1e-7)
    p = jax.nn.softmax(logits.astype(jnp.float64) if jax.config.jax_enable_x64 else logits, axis=-1)
    entropy = -(p * jnp.log(p)).sum(-1)
    np.testing.assert_allclose(kd("soft_ce"), entropy, rtol=1e-5)
    grad = jax.grad(lambda h: kd("kl", h).sum())(hidden)  # at its minimum
    np.testing.assert_allclose(grad, 0.0, atol=2e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_untruncated_teacher_reproduces_full_distribution_kd(loss_type):
    hidden, kernel, targets, *_ = _random_case(5)
    teacher_logits = jax.random.normal(jax.random.key(9), (3, 11, 40)) * 3.0
    ids, probs, tail = _full_kept(teacher_logits)
    out = chunked_distill_losses(hidden, kernel, targets, ids, probs, tail, loss_type=loss_type, chunk_size=3)
    t = jax.nn.softmax(teacher_logits, -1)
    log_s = jax.nn.log_softmax(jnp.einsum("bse,ev->bsv", hidden, kernel), -1)
    full = {"kl": (t * (jnp.log(t) - log_s)).sum(-1), "soft_ce": -(t * log_s).sum(-1),
            "mse": jnp.square(t - jnp.exp(log_s)).sum(-1)}[loss_type]
    np.testing.assert_allclose(out.kd, full, rtol=1e-4, atol=1e-6)


def test_positions_without_teacher_get_no_kd_gradient():
    hidden, kernel, targets, ids, probs, tail, _ = _random_case(6)
    probs = jnp.zeros_like(probs).at[:, 3].set(probs[:, 3])  # only position 3 has a teacher
    for side in STUDENT_SIDES:
        grad = jax.grad(lambda h: chunked_distill_losses(h, kernel, targets, ids, probs, tail, loss_type="mse",
                                                         student_side=side, chunk_size=4).kd.sum())(hidden)
        assert np.all(np.asarray(grad)[:, np.arange(11) != 3] == 0.0)
        assert np.any(np.asarray(grad)[:, 3] != 0.0)


def test_tail_side_needs_the_tail_mass_and_settings_are_checked():
    hidden, kernel, targets, ids, probs, _, _ = _random_case(7)
    with pytest.raises(ValueError, match="teacher_tail"):
        chunked_distill_losses(hidden, kernel, targets, ids, probs, None, student_side="tail")
    with pytest.raises(ValueError, match="loss_type"):
        chunked_distill_losses(hidden, kernel, targets, ids, probs, loss_type="js")
    with pytest.raises(ValueError, match="student_side"):
        chunked_distill_losses(hidden, kernel, targets, ids, probs, student_side="both")


def test_bf16_compute_gives_finite_gradients():
    hidden, kernel, targets, ids, probs, tail, _ = _random_case(8)
    grads = jax.grad(lambda h, w: chunked_distill_losses(h, w, targets, ids, probs, tail, loss_type="kl",
                                                         student_side="tail", chunk_size=4).kd.sum(),
                     argnums=(0, 1))(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
