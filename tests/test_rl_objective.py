"""RL objective pieces against hand-computed values: RLOO / GRPO / Dr.GRPO advantages, the
group-centred KL reward, KL estimators, the clipped surrogate, aggregation, the entropy of a
known distribution, the chunked log-prob/entropy VJP against autodiff of dense logits, the EMA
anchor against its closed form, and the objective's gradient against plain REINFORCE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glmjax.models import create_model
from glmjax.objectives.anchor import blend_toward
from glmjax.objectives.base import StepInputs
from glmjax.objectives.rl import (
    RLObjective,
    aggregate,
    clipped_surrogate,
    drgrpo_advantages,
    grpo_advantages,
    kl_centered_rewards,
    kl_per_token,
    rloo_advantages,
)
from glmjax.objectives.token_stats import token_logps_and_entropy
from training_helpers import CONFIG

REWARDS = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 1.0, 1.0]])


def test_rloo_by_hand():
    # Group 0: r=1, others 0,0,1 -> 1 - 1/3; r=0, others 1,0,1 -> 0 - 2/3.
    got = np.asarray(rloo_advantages(jnp.asarray(REWARDS)))
    np.testing.assert_allclose(got[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(got[1], [1 / 3, 1 / 3, 1 / 3, -1.0], rtol=1e-6)
    np.testing.assert_allclose(got[2], [-1 - 2 / 3, 0 - 1 / 3, 1 - 0, 1 - 0], rtol=1e-6, atol=1e-7)
    # Equal rewards give zero advantage; K / (K - 1) * (r - mean) is the same thing.
    np.testing.assert_allclose(rloo_advantages(jnp.ones((2, 5))), 0.0)
    mean = REWARDS.mean(-1, keepdims=True)
    np.testing.assert_allclose(got, 4 / 3 * (REWARDS - mean), rtol=1e-6, atol=1e-7)


def test_grpo_and_drgrpo_by_hand():
    # Group 0: mean 0.5, sample std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025.
    got = np.asarray(grpo_advantages(jnp.asarray(REWARDS)))
    np.testing.assert_allclose(got[0], [0.8660254, -0.8660254, -0.8660254, 0.8660254], rtol=1e-5)
    # Group 1: mean 0.75, sample std 0.5 -> 0.5, 0.5, 0.5, -1.5.
    np.testing.assert_allclose(got[1], [0.5, 0.5, 0.5, -1.5], rtol=1e-5)
    np.testing.assert_allclose(drgrpo_advantages(jnp.asarray(REWARDS))[1], [0.25, 0.25, 0.25, -0.75], rtol=1e-6)
    np.testing.assert_allclose(grpo_advantages(jnp.zeros((1, 4))), 0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(jnp.ones((3, 1)))


def test_kl_centered_reward_and_estimators():
    kl = np.array([[0.5, 1.5, 1.0, 1.0]])
    rewards = np.array([[1.0, 1.0, 0.0, 0.0]])
    # mean KL 1.0; r - 0.2 * (KL - 1) = 1.1, 0.9, 0.0, 0.0
    np.testing.assert_allclose(kl_centered_rewards(jnp.asarray(rewards), jnp.asarray(kl), 0.2),
                               [[1.1, 0.9, 0.0, 0.0]], rtol=1e-6)
    logp, ref = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])
    x = logp - ref  # 0.5, -1.0
    np.testing.assert_allclose(kl_per_token(logp, ref, "k1"), x, rtol=1e-6)
    np.testing.assert_allclose(kl_per_token(logp, ref, "k2"), [0.125, 0.5], rtol=1e-6)
    np.testing.assert_allclose(kl_per_token(logp, ref, "k3"), [np.exp(-0.5) - 1 + 0.5, np.e - 1 - 1], rtol=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, ref, "k4")


def test_clipped_surrogate_by_hand():
    logps = jnp.log(jnp.array([[1.5, 1.5, 0.5, 1.0]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, -1.0, 2.0]])
    loss, clipped = clipped_surrogate(logps, old, adv, 0.2, 0.28)
    # 1.5*1 clipped to 1.28; -min(-1.5, -1.28) = 1.5; -min(-0.5, -0.8) = 0.8 clipped; ratio 1 -> -2.
    np.testing.assert_allclose(loss, [[-1.28, 1.5, 0.8, -2.0]], rtol=1e-5)
    np.testing.assert_array_equal(clipped, [[True, False, True, False]])
    loss, clipped = clipped_surrogate(logps, old, adv, None, None)
    np.testing.assert_allclose(loss, [[-1.5, 1.5, 0.5, -2.0]], rtol=1e-5)
    assert not np.asarray(clipped).any()


def test_aggregate_by_hand():
    values = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    total, weight = aggregate(values, mask, "token_mean")
    assert (float(total), float(weight)) == (10.0, 4.0)
    total, weight = aggregate(values, mask, "seq_mean_token_mean")
    assert (float(total), float(weight)) == (2.0 + 4.0, 2.0)
    total, weight = aggregate(values, mask, "seq_sum", divisor=8.0)
    assert (float(total), float(weight)) == (10.0 / 8.0, 3.0)


def test_entropy_of_a_known_distribution():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], np.float32)
    for temperature in (1.0, 1.2):
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        logp, entropy = token_logps_and_entropy(jnp.asarray(logits)[None, None], jnp.eye(5), jnp.array([[3]]),
                                                temperature=temperature)
        np.testing.assert_allclose(float(entropy[0, 0]), -(p * np.log(p)).sum(), rtol=1e-6)
        np.testing.assert_allclose(float(logp[0, 0]), np.log(p[3]), rtol=1e-6)
    # The uniform distribution over 5 has entropy log 5.
    _, entropy = token_logps_and_entropy(jnp.zeros((1, 1, 5)), jnp.eye(5), jnp.array([[0]]))
    np.testing.assert_allclose(float(entropy[0, 0]), np.log(5), rtol=1e-6)


@pytest.mark.parametrize("seq,chunk", [(12, 4), (13, 5)])
def test_token_stats_vjp_matches_dense_autodiff(seq, chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, seq, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 11)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, seq)))
    g_logp = jnp.asarray(rng.normal(size=(2, seq)), jnp.float32)
    g_ent = jnp.asarray(rng.normal(size=(2, seq)), jnp.float32)
    temperature = 1.3

    def dense(h, k):
        z = h @ k / temperature
        logp = jax.nn.log_softmax(z, -1)
        ent = -(jnp.exp(logp) * logp).sum(-1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], ent

    def objective(fn):
        return lambda h, k: (fn(h, k)[0] * g_logp).sum() + (fn(h, k)[1] * g_ent).sum()

    chunked = lambda h, k: token_logps_and_entropy(h, k, targets, temperature=temperature, chunk_size=chunk)  # noqa: E731
    for got, want in zip(chunked(hidden, kernel), dense(hidden, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got = jax.grad(objective(chunked), argnums=(0, 1))(hidden, kernel)
    want = jax.grad(objective(dense), argnums=(0, 1))(hidden, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_ema_anchor_matches_its_closed_form():
    ref0 = {"w": jnp.array([1.0, -2.0, 4.0])}
    policy = {"w": jnp.array([0.0, 2.0, 1.0])}
    decay = 0.9
    objective = RLObjective(kl_coef=0.1, anchor="ema", ref_ema_decay=decay, anchor_update_every=2)
    ref = ref0
    for step in range(1, 8):  # updates at steps 2, 4, 6
        ref = objective.update_extra(ref, policy, jnp.asarray(step))
    n = 3
    want = decay**n * np.asarray(ref0["w"]) + (1 - decay**n) * np.asarray(policy["w"])
    np.testing.assert_allclose(ref["w"], want, rtol=1e-6)
    sync = RLObjective(kl_coef=0.1, anchor="sync", anchor_update_every=3)
    np.testing.assert_array_equal(sync.update_extra(ref0, policy, jnp.asarray(2))["w"], ref0["w"])
    np.testing.assert_array_equal(sync.update_extra(ref0, policy, jnp.asarray(3))["w"], policy["w"])
    np.testing.assert_allclose(blend_toward(ref0, policy, 0.25)["w"], 0.75 * ref0["w"] + 0.25 * policy["w"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="advantage"):
        RLObjective(advantage="ppo")
    with pytest.raises(ValueError, match="seq_sum_divisor"):
        RLObjective(loss_aggregation="seq_sum")
    with pytest.raises(ValueError, match="ref_ema_decay"):
        RLObjective(ref_ema_decay=1.0)
    with pytest.raises(ValueError, match="group_size"):
        RLObjective(group_size=1)


# -- the objective on a tiny model ---------------------------------------------------------------

K, PROMPT, SEQ = 4, 5, 16


def _batch(rewards):
    rng = np.random.default_rng(1)
    rows = len(rewards)
    ids = rng.integers(2, CONFIG.vocab_size, (rows, SEQ + 1), dtype=np.int32)
    lengths = rng.integers(PROMPT + 2, SEQ + 1, rows)
    segment = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    mask = segment * (np.arange(SEQ)[None] >= PROMPT - 1)
    return {"inputs": jnp.asarray(ids[:, :-1] * segment), "targets": jnp.asarray(ids[:, 1:] * segment),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(segment),
            "positions": jnp.asarray(np.arange(SEQ)[None].repeat(rows, 0) * segment),
            "rewards": jnp.asarray(rewards, jnp.float32)}


def _loss_and_grad(objective, model, batch, inputs):
    graphdef, params = nnx.split(model)

    def total(p):
        out = objective.loss(nnx.merge(graphdef, p), batch, inputs)
        return out.total / out.weight, out

    return jax.jit(jax.value_and_grad(total, has_aux=True))(params)


def test_on_policy_gradient_is_reinforce_with_rloo_and_entropy():
    model = create_model(CONFIG, seed=0)
    rewards = np.array([1.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0, 1.0])
    batch = _batch(rewards)
    inputs = StepInputs(rng=jax.random.key(0), step=jnp.asarray(0))
    coef = 0.05
    objective = RLObjective(group_size=K, kl_mode="none", entropy_coef=coef)
    (_, out), grads = _loss_and_grad(objective, model, batch, inputs)
    adv = np.asarray(rloo_advantages(jnp.asarray(rewards.reshape(-1, K)))).reshape(-1)
    graphdef, params = nnx.split(model)
    mask = batch["loss_mask"].astype(jnp.float32)

    def reinforce(p):
        m = nnx.merge(graphdef, p)
        z = m(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        logp_all = jax.nn.log_softmax(z, -1)
        logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0]
        ent = -(jnp.exp(logp_all) * logp_all).sum(-1)
        return (-(adv[:, None] * logp * mask).sum() - coef * (ent * mask).sum()) / mask.sum()

    want = jax.jit(jax.grad(reinforce))(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
    assert float(out.metrics["reward"].value()) == pytest.approx(rewards.mean())
    assert float(out.metrics["clip_fraction"].value()) == 0.0


def test_kl_in_reward_is_zero_against_an_identical_anchor_and_shapes_rewards_otherwise():
    model = create_model(CONFIG, seed=0)
    other = create_model(CONFIG, seed=7)
    batch = _batch(np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    objective = RLObjective(group_size=K, kl_coef=0.5, kl_mode="reward", anchor="ema")
    plain = RLObjective(group_size=K, kl_mode="none")
    params = nnx.state(model)
    same = StepInputs(rng=jax.random.key(0), step=jnp.asarray(0), extra=jax.tree.map(jnp.copy, params))
    (loss_same, out), _ = _loss_and_grad(objective, model, batch, same)
    (loss_plain, _), _ = _loss_and_grad(plain, model, batch, same)
    assert float(out.metrics["kl"].value()) == pytest.approx(0.0, abs=1e-6)
    assert float(loss_same) == pytest.approx(float(loss_plain), abs=1e-6)
    shifted = StepInputs(rng=jax.random.key(0), step=jnp.asarray(0), extra=nnx.state(other))
    (loss_kl, out_kl), _ = _loss_and_grad(objective, model, batch, shifted)
    assert float(out_kl.metrics["kl"].value()) != pytest.approx(0.0, abs=1e-3)
    assert float(loss_kl) != pytest.approx(float(loss_plain), abs=1e-4)  # the KL moved the advantages
    # As a loss term (token mean) the KL adds its token mean to the unshaped surrogate.
    kl_objective = RLObjective(group_size=K, kl_coef=1.0, kl_mode="loss", kl_estimator="k3", anchor="ema")
    (loss_loss_mode, out_loss), _ = _loss_and_grad(kl_objective, model, batch, shifted)
    assert float(loss_loss_mode) == pytest.approx(float(loss_plain) + float(out_loss.metrics["kl_token"].value()),
                                                  rel=1e-4)
