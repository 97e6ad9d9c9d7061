"""dpo_loss: every loss type against the float64 reference table (torchtune's vectors), against an
independent numpy implementation on random inputs, ln 2 at policy == reference, the Tunix golden
values, finite values on the stress inputs, and the sigmoid loss's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.objectives.dpo import LOSS_TYPES, dpo_loss

# torchtune's hand-derived vectors (dpo-losses.md): h_c = [0, .1, -.9], h_r = [0, -9.9, -20.9].
PC = np.array([-0.5, -10.0, -1.0])
PR = np.array([-0.1, -30.0, -21.0])
RC = np.array([-0.5, -10.1, -0.1])
RR = np.array([-0.1, -20.1, -0.1])
BETA = 0.1

# (loss_type, label_smoothing) -> per-example values of the reference table.
TABLE = {
    ("sigmoid", 0.0): [0.693147, 0.313262, 0.126928],
    ("sigmoid", 0.1): [0.693147, 0.413262, 0.326928],
    ("hinge", 0.0): [1.0, 0.0, 0.0],
    ("ipo", 0.0): [25.0, 25.0, 225.0],
    ("exo_pair", 1e-3): [2.761231, 1.276310, 0.458972],
    ("nca_pair", 0.0): [1.386294, 1.195220, 1.122047],
    ("robust", 0.1): [0.693147, 0.188262, -0.123072],
    ("bco_pair", 0.0): [1.386294, 1.004121, 0.855775],
    ("sppo_hard", 0.0): [50.0, 48.02, 287.62],
    ("apo_zero", 0.0): [1.0, 0.768412, 0.632557],
    ("apo_down", 0.0): [1.0, 0.771441, 0.596718],
    ("discopop", 0.0): [0.846574, 0.367879, 0.135335],
}
SMOOTHING = {"sigmoid": 0.1, "robust": 0.1, "exo_pair": 1e-3}


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return np.exp(_logsig(x))


def numpy_loss(pc, pr, rc, rr, beta, loss_type, eps):
    """The formulas of dpo-losses.md, written out in float64 numpy."""
    h_c, h_r = pc - rc, pr - rr
    d = h_c - h_r
    z = beta * d
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - z)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return _sig(z) * (_logsig(z) - np.log(1 - eps)) + _sig(-z) * (_logsig(-z) - np.log(eps))
    if loss_type == "nca_pair":
        return -_logsig(beta * h_c) - 0.5 * _logsig(-beta * h_c) - 0.5 * _logsig(-beta * h_r)
    if loss_type == "sppo_hard":
        return (h_c - 1 / (2 * beta)) ** 2 + (h_r + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - _sig(beta * h_c)) + _sig(beta * h_r)
    if loss_type == "apo_down":
        return _sig(beta * h_c) + (1 - _sig(z))
    if loss_type == "discopop":
        m = _sig(z / 0.05)
        return (1 - m) * -_logsig(z) + m * np.exp(-z)
    if loss_type == "bco_pair":
        return -_logsig(beta * h_c) - _logsig(-beta * h_r)
    raise AssertionError(loss_type)


def _x64(fn):
    with jax.enable_x64(True):
        return np.asarray(fn())


def test_the_table_covers_every_loss_type():
    assert {t for t, _ in TABLE} == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type, eps", list(TABLE))
def test_reference_table_float64(loss_type, eps):
    got = _x64(lambda: dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=eps))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, TABLE[(loss_type, eps)], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, numpy_loss(PC, PR, RC, RR, BETA, loss_type, eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type, eps", list(TABLE))
def test_reference_table_float32(loss_type, eps):
    arrays = [jnp.asarray(a, jnp.float32) for a in (PC, PR, RC, RR)]
    got = np.asarray(dpo_loss(*arrays, beta=BETA, loss_type=loss_type, label_smoothing=eps))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, TABLE[(loss_type, eps)], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_random_inputs_match_numpy(loss_type, beta):
    rng = np.random.default_rng(hash((loss_type, beta)) % 2**32)
    pc, pr, rc, rr = (rng.normal(-40.0, 15.0, 64) for _ in range(4))
    eps = SMOOTHING.get(loss_type, 0.0) * 2
    got = _x64(lambda: dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps))
    np.testing.assert_allclose(got, numpy_loss(pc, pr, rc, rr, beta, loss_type, eps), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_policy_equal_to_reference_gives_ln2_for_the_sigmoid_family(eps):
    logps = jnp.asarray([-3.0, -120.5, -0.25, -7.0])
    for loss_type in ("sigmoid", "robust"):
        if loss_type == "robust" and eps >= 0.5:
            continue
        got = dpo_loss(logps, logps - 2.0, logps, logps - 2.0, beta=0.15, loss_type=loss_type,
                       label_smoothing=eps)
        np.testing.assert_allclose(np.asarray(got), np.log(2.0), rtol=1e-6)


def test_tunix_golden_values():
    np.random.seed(0)
    p = np.random.normal(0, 5, (8, 4))
    r = np.random.normal(0, 5, (8, 4)).sum(-1)
    lp = p.sum(-1)
    args = (lp[:4], lp[4:], r[:4], r[4:])
    plain = float(jnp.mean(dpo_loss(*map(jnp.asarray, args), beta=0.1)))
    cdpo = float(jnp.mean(dpo_loss(*map(jnp.asarray, args), beta=0.1, label_smoothing=0.3)))
    np.testing.assert_allclose(plain, 0.7530593502919607, atol=1e-5)
    np.testing.assert_allclose(cdpo, 0.9254464725571975, atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_stress_inputs_give_finite_losses_and_gradients(loss_type):
    # Old TRL's stress vectors, and a variant with a hugely negative margin.
    cases = [([410.0, 0.1], [810.5, 0.2], [-610.0, -0.1], [110.6, 0.5]),
             ([-900.0, 0.0], [900.0, 0.0], [0.0, 0.0], [0.0, -1e4])]
    eps = SMOOTHING.get(loss_type, 0.0)
    for case in cases:
        arrays = [jnp.asarray(a, jnp.float32) for a in case]

        def total(pc):
            return dpo_loss(pc, *arrays[1:], beta=0.1, loss_type=loss_type, label_smoothing=eps).sum()

        assert np.isfinite(np.asarray(dpo_loss(*arrays, beta=0.1, loss_type=loss_type,
                                               label_smoothing=eps))).all()
        assert np.isfinite(np.asarray(jax.grad(total)(arrays[0]))).all()


def test_sigmoid_gradient_in_delta():
    beta = 0.2
    delta = jnp.linspace(-30.0, 30.0, 13)
    zeros = jnp.zeros_like(delta)
    # d(loss)/d(chosen logp) = d(loss)/d(delta)
    grad = jax.grad(lambda pc: dpo_loss(pc, zeros, zeros, zeros, beta=beta).sum())(delta)
    expected = -beta * jax.nn.sigmoid(-beta * delta)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6, atol=1e-9)
    # and the other three inputs enter through delta with signs -1, -1, +1
    for index, sign in ((1, -1.0), (2, -1.0), (3, 1.0)):
        def loss_of(x, index=index):
            args = [delta, zeros, zeros, zeros]
            args[index] = x
            return dpo_loss(*args, beta=beta).sum()
        np.testing.assert_allclose(np.asarray(jax.grad(loss_of)(zeros)),
                                   np.asarray(sign * -beta * jax.nn.sigmoid(-beta * delta)), rtol=1e-6, atol=1e-9)


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'.*sigmoid, hinge, ipo"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")


@pytest.mark.parametrize("loss_type, eps, message", [
    ("exo_pair", 0.0, "exo_pair' needs label_smoothing in \\(0, 1\\)"),
    ("robust", 0.5, "robust' needs label_smoothing in \\[0, 0.5\\)"),
    ("hinge", 0.1, "does not use label_smoothing"),
])
def test_settings_a_loss_cannot_use_are_refused(loss_type, eps, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type, label_smoothing=eps)


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
