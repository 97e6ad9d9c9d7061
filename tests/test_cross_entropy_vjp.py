"""``chunked_cross_entropy`` (custom VJP) against a direct full-logits reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.objectives import chunked_cross_entropy


def _reference(hidden, kernel, targets, z_loss):
    logits = jnp.einsum("bte,ev->btv", hidden, kernel)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit + z_loss * jnp.square(log_z), jnp.argmax(logits, axis=-1) == targets


@pytest.mark.parametrize("chunk_size", [8, 12, 64])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_loss_correct_and_gradients_match_reference(chunk_size, z_loss):
    keys = jax.random.split(jax.random.key(chunk_size), 4)
    batch, seq, embed, vocab = 3, 20, 16, 37
    hidden = jax.random.normal(keys[0], (batch, seq, embed))
    kernel = jax.random.normal(keys[1], (embed, vocab))
    targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
    # Every other token's target is its argmax, so that ``correct`` is exercised both ways.
    argmax = jnp.argmax(jnp.einsum("bte,ev->btv", hidden, kernel), axis=-1)
    targets = jnp.where(jnp.arange(seq) % 2 == 0, argmax, targets)
    weights = jax.random.uniform(keys[3], (batch, seq))

    def weighted(fn):
        def total(hidden, kernel):
            loss, correct = fn(hidden, kernel)
            return jnp.sum(loss * weights), (loss, correct)

        return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(hidden, kernel)

    (_, (loss, correct)), grads = weighted(
        lambda h, w: chunked_cross_entropy(h, w, targets, chunk_size=chunk_size, z_loss=z_loss)
    )
    (_, (ref_loss, ref_correct)), ref_grads = weighted(lambda h, w: _reference(h, w, targets, z_loss))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, ref_correct)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)
