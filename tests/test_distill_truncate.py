"""``truncate_teacher_logits``: top-p-k truncation with temperature, against a numpy float64
reference that sorts the whole distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.objectives.distill import truncate_teacher_logits
from glmjax.objectives.distill_losses import chunked_teacher_truncation, truncate_with_tail


def _reference(logits: np.ndarray, top_p: float, top_k: int, temperature: float):
    """(kept ids by descending probability, their probabilities, tail mass at temperature) of
    one position, by sorting the full distribution."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.lexsort((np.arange(x.size), -x))  # descending, ties by lower id
    cumulative = np.cumsum(p[order])
    count = int(np.searchsorted(cumulative, top_p) + 1) if top_p < 1 else x.size
    kept = order[:min(count, top_k)]
    scaled = np.exp((x[kept] - x[kept].max()) / temperature)
    everything = np.exp((x - x.max()) / temperature)
    return kept, scaled / scaled.sum(), 1.0 - scaled.sum() / everything.sum()


@pytest.mark.parametrize("top_p,top_k,temperature,scale", [
    (0.95, 50, 1.0, 1.0), (0.95, 50, 2.0, 4.0), (0.5, 100, 0.5, 3.0), (0.8, 5, 1.0, 0.3),
    (1.0, 20, 1.0, 2.0), (0.95, 1, 2.0, 2.0), (0.3, 64, 10.0, 8.0)])
def test_matches_sorted_reference(top_p, top_k, temperature, scale):
    vocab = 300
    logits = np.asarray(jax.random.normal(jax.random.key(top_k), (6, 7, vocab))) * scale
    # One very sharp row (top-p keeps a single id) and one flat row (top-k caps).
    logits[0, 0, 17] += 40.0
    logits[0, 1] = 0.001 * logits[0, 1]
    ids, probs, tail = truncate_with_tail(jnp.asarray(logits), top_p=top_p, top_k=top_k, temperature=temperature)
    ids, probs, tail = np.asarray(ids), np.asarray(probs), np.asarray(tail)
    assert ids.shape == probs.shape == (6, 7, top_k) and ids.dtype == np.int32 and probs.dtype == np.float32
    counts = []
    for index in np.ndindex(6, 7):
        kept, ref_probs, ref_tail = _reference(logits[index], top_p, top_k, temperature)
        n = len(kept)
        counts.append(n)
        np.testing.assert_array_equal(ids[index][:n], kept)
        np.testing.assert_allclose(probs[index][:n], ref_probs, rtol=2e-5, atol=1e-7)
        np.testing.assert_array_equal(probs[index][n:], 0.0)
        assert np.all((ids[index] >= 0) & (ids[index] < vocab))
        assert len(set(ids[index].tolist())) == top_k  # unused slots hold other, valid ids
        np.testing.assert_allclose(tail[index], ref_tail, atol=2e-6)
    if top_p < 1 and top_k > 1:
        assert counts[0] == 1 < max(counts)  # top-p bit on the sharp row
    if top_k < vocab:
        assert counts[1] == top_k  # top-k capped the flat row
    # The public function returns the same ids and probabilities.
    pub_ids, pub_probs = truncate_teacher_logits(jnp.asarray(logits), top_p=top_p, top_k=top_k,
                                                 temperature=temperature)
    np.testing.assert_array_equal(pub_ids, ids)
    np.testing.assert_array_equal(pub_probs, probs)


def test_hand_computed_small_vocabulary():
    # p = softmax(log([0.5, 0.3, 0.15, 0.05])): top-p 0.8 keeps 0.5 + 0.3 (reaches 0.8: the
    # crossing id included), top-k 3 does not bite; tau 2 -> sqrt(p) renormalised.
    logits = jnp.log(jnp.asarray([0.15, 0.5, 0.05, 0.3]))
    ids, probs = truncate_teacher_logits(logits, top_p=0.79, top_k=3, temperature=2.0)
    np.testing.assert_array_equal(ids, [1, 3, 0])
    a, b = np.sqrt(0.5), np.sqrt(0.3)
    np.testing.assert_allclose(probs, [a / (a + b), b / (a + b), 0.0], rtol=1e-6)
    # top-p 0.81 crosses at the third id.
    ids, probs = truncate_teacher_logits(logits, top_p=0.81, top_k=3, temperature=1.0)
    np.testing.assert_allclose(probs, np.array([0.5, 0.3, 0.15]) / 0.95, rtol=1e-6)


def test_top_p_one_keeps_all_of_top_k():
    # Mass sums round below 1 in fp32; top_p = 1 must still keep every one of the top_k ids.
    logits = jax.random.normal(jax.random.key(0), (4, 1000)) * 0.01
    _, probs = truncate_teacher_logits(logits, top_p=1.0, top_k=1000, temperature=1.0)
    assert np.all(np.asarray(probs) > 0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    _, _, tail = truncate_with_tail(logits, top_p=1.0, top_k=1000, temperature=1.0)
    np.testing.assert_array_equal(tail, 0.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=0.0, top_k=5, temperature=1.0), "top_p"),
    (dict(top_p=1.5, top_k=5, temperature=1.0), "top_p"),
    (dict(top_p=0.9, top_k=0, temperature=1.0), "top_k"),
    (dict(top_p=0.9, top_k=40, temperature=1.0), "exceeds the vocabulary"),
    (dict(top_p=0.9, top_k=5, temperature=0.0), "temperature"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        truncate_teacher_logits(jnp.zeros((2, 32)), **kwargs)


def test_large_vocabulary_is_not_sorted():
    # GLM-4's vocabulary: top_k + the prefix within it, no sort of [rows, 151552].
    compiled = jax.jit(lambda x: truncate_teacher_logits(x, top_p=0.95, top_k=50, temperature=2.0)).lower(
        jax.ShapeDtypeStruct((8, 151552), jnp.float32)).compile().as_text()
    assert " sort(" not in compiled


def test_chunked_teacher_truncation_matches_direct():
    keys = jax.random.split(jax.random.key(3), 2)
    hidden = jax.random.normal(keys[0], (2, 13, 16))
    kernel = jax.random.normal(keys[1], (16, 64)) * 0.5
    ids, probs, tail = chunked_teacher_truncation(hidden, kernel, top_p=0.9, top_k=8, temperature=2.0, chunk_size=4)
    ref = truncate_with_tail(jnp.einsum("bse,ev->bsv", hidden, kernel), top_p=0.9, top_k=8, temperature=2.0)
    np.testing.assert_array_equal(ids, ref[0])
    np.testing.assert_allclose(probs, ref[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tail, ref[2], atol=1e-6)
