"""APFed losses against hand computations in numpy; the message codec; party checkpoints."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.federated import losses
from glmjax.federated.channel import HandshakeRequest, StepReply, StepRequest, decode, encode
from glmjax.federated.checkpoints import PartyCheckpointError, load_party_checkpoint, save_party_checkpoint


def _numpy_supcon(features, labels, temperature):
    """Khosla et al.'s loss, one anchor at a time with explicit loops."""
    b, v, _ = features.shape
    flat = features.reshape(b * v, -1).astype(np.float64)
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    owner = np.repeat(np.arange(b) if labels is None else labels, v)
    total = 0.0
    for i in range(b * v):
        denom = sum(math.exp(flat[i] @ flat[a] / temperature) for a in range(b * v) if a != i)
        positives = [p for p in range(b * v) if p != i and owner[p] == owner[i]]
        total += -sum(math.log(math.exp(flat[i] @ flat[p] / temperature) / denom) for p in positives) / len(positives)
    return total / (b * v)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.07])
def test_nt_xent_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    want = _numpy_supcon(np.stack([a, b], axis=1), None, temperature)
    got = losses.nt_xent(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), temperature)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_supervised_contrastive_with_labels_and_three_views_matches_numpy():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(5, 3, 4))
    labels = np.array([0, 1, 0, 2, 1])
    want = _numpy_supcon(features, labels, 0.3)
    got = losses.supervised_contrastive(jnp.asarray(features, jnp.float32), jnp.asarray(labels), 0.3)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_nt_xent_prefers_aligned_pairs_and_has_finite_gradients():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 4)).astype(np.float32)
    aligned = losses.nt_xent(a, a + 0.01 * rng.normal(size=a.shape).astype(np.float32), 0.5)
    shuffled = losses.nt_xent(a, a[::-1].copy(), 0.5)
    assert float(aligned) < float(shuffled)
    grad = jax.grad(lambda x: losses.nt_xent(x, a[::-1].copy(), 0.5))(jnp.asarray(a))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_reconstruction_mse_and_cross_entropy_match_numpy():
    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    np.testing.assert_allclose(float(losses.reconstruction_mse(pred, target)), np.mean((pred - target) ** 2),
                               rtol=1e-6)
    logits, labels = rng.normal(size=(5, 3)), np.array([0, 2, 1, 1, 0])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)),
                               -log_softmax[np.arange(5), labels].mean(), rtol=1e-6)


def test_codec_round_trips_arrays_and_scalars_compactly():
    ids = np.array(["digits-00001", "a", "é-7"])
    sent = np.arange(12, dtype=np.float32).reshape(4, 3)
    payload = encode({"ids": ids, "sent": sent, "step": 7, "loss": 0.25, "name": "p", "flag": True})
    fields = decode(payload)
    np.testing.assert_array_equal(fields["ids"], ids)
    np.testing.assert_array_equal(fields["sent"], sent)
    assert fields["sent"].dtype == np.float32 and fields["sent"].flags.writeable
    assert (fields["step"], fields["loss"], fields["name"], fields["flag"]) == (7, 0.25, "p", True)
    big = np.zeros((256, 32), np.float32)
    assert len(StepRequest(3, np.arange(256, dtype=np.int32), big).to_bytes()) < big.nbytes + 256 * 4 + 200
    with pytest.raises(TypeError, match="object"):
        encode({"bad": np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match="expected"):
        StepReply.from_bytes(HandshakeRequest("R", 3, ids, 0).to_bytes())


def test_party_checkpoint_is_atomic_and_checks_shapes(tmp_path):
    path = str(tmp_path / "party.npz")
    tree = {"w": jnp.ones((2, 3)), "count": jnp.array(4, jnp.int32)}
    save_party_checkpoint(path, tree, {"step": 4})
    assert os.listdir(tmp_path) == ["party.npz"]
    restored, meta = load_party_checkpoint(path, tree)
    assert meta == {"step": 4}
    np.testing.assert_array_equal(restored["w"], np.ones((2, 3)))
    with pytest.raises(PartyCheckpointError, match=r"party.npz: \['w'\] is float32\[2, 3\], this party's is float32\[3, 3\]"):
        load_party_checkpoint(path, {"w": jnp.ones((3, 3)), "count": jnp.array(0, jnp.int32)})
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(PartyCheckpointError, match="unreadable"):
        load_party_checkpoint(path, tree)
