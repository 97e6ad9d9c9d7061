"""SampleAttention as the model's prefill attention backend."""

import jax.numpy as jnp
import numpy as np

from glmjax.models import create_model, preset


def _logits(backend: str, alpha: float, ids: jnp.ndarray) -> np.ndarray:
    config = preset("glm4-tiny").replace(attention_backend=backend, sample_attention_alpha=alpha)
    return np.asarray(create_model(config, seed=41)(ids))


def test_sample_backend_alpha_one_equals_dense_and_095_stays_close(capsys):
    ids = jnp.asarray(np.random.default_rng(42).integers(0, 512, size=(1, 520)))
    dense = _logits("xla", 1.0, ids)
    np.testing.assert_allclose(_logits("sample", 1.0, ids), dense, atol=2e-5)
    sparse = _logits("sample", 0.95, ids)
    error = np.abs(sparse[:, -1] - dense[:, -1]).max() / np.abs(dense[:, -1]).max()
    with capsys.disabled():
        print(f"\nsample attention alpha=0.95, seq 520: last-position relative logit error {error:.2e}")
    assert error < 0.05
