"""DPOObjective: log-probs from the chunked head against full logits, the loss and metrics against
numpy, ln 2 at the start, precomputed == policy reference, length averaging, SFT folding over
microbatches, TR-DPO syncing, and DPO steps through the trainer raising margin and accuracy."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glmjax.data.pairs import pair_data, write_arithmetic_pairs_jsonl
from glmjax.data.synthetic import ArithmeticConfig
from glmjax.data.tokenizer import default_tokenizer
from glmjax.models import create_model
from glmjax.objectives.base import StepInputs
from glmjax.objectives.lm import LMObjective
from glmjax.objectives.dpo import DPOObjective, dpo_loss, sequence_logps
from glmjax.training.trainer import train
from training_helpers import CONFIG, metric_rows

# One operation per problem keeps every pair within 64 positions.
SMALL = ArithmeticConfig(min_ops=1, max_ops=1, max_operand=9, max_factor=5, max_value=60, error_rate=0.2,
                         eval_fraction=0.3)
SEQ = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def pair_paths(tmp_path_factory):
    return write_arithmetic_pairs_jsonl(tmp_path_factory.mktemp("pairs"), num_train=64, num_eval=16, config=SMALL)


@pytest.fixture(scope="module")
def batch(tokenizer, pair_paths):
    data = pair_data(seed=0, process_index=0, process_count=1, paths=str(pair_paths["train"]),
                     tokenizer=tokenizer, seq_len=SEQ, global_batch_size=8, shuffle=False)
    return {k: jnp.asarray(v) for k, v in next(iter(data)).items()}


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@nnx.jit
def _logits(model, batch):
    return model(batch["inputs"], batch["positions"], batch["segment_ids"])


def _loss(objective, model, batch, inputs):
    """``objective.loss`` jitted (eager tiny-model forwards are slow on CPU)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, b, i: objective.loss(nnx.merge(graphdef, p), b, i))(params, batch, inputs)


def _full_logps(model, batch):
    """float64 numpy per-row summed completion log-probs and per-token NLL from full logits."""
    logits = np.asarray(_logits(model, batch), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    target_logp = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    return (target_logp * mask).sum(-1), -target_logp, mask


def _inputs(frozen=None, extra=None):
    return StepInputs(jax.random.key(0), jnp.zeros((), jnp.int32), frozen, extra)


def test_sequence_logps_match_full_logits(batch):
    model = create_model(CONFIG, seed=1)
    logps, token_nll, mask = nnx.jit(lambda m, b: sequence_logps(m, b, chunk_size=16))(model, batch)
    expected, expected_nll, expected_mask = _full_logps(model, batch)
    np.testing.assert_allclose(np.asarray(logps), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(token_nll) * expected_mask, expected_nll * expected_mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)


def _numpy_objective(policy, reference, batch, *, beta, loss_type, eps, sft_weight, average):
    pl, nll, mask = _full_logps(policy, batch)
    rl, _, _ = _full_logps(reference, batch)
    if average:
        pl, rl = pl / mask.sum(-1), rl / mask.sum(-1)
    with jax.enable_x64(True):
        losses = np.asarray(dpo_loss(pl[0::2], pl[1::2], rl[0::2], rl[1::2], beta=beta, loss_type=loss_type,
                                     label_smoothing=eps))
    sft = (nll[0::2] * mask[0::2]).sum() / mask[0::2].sum()
    rewards_c, rewards_r = beta * (pl[0::2] - rl[0::2]), beta * (pl[1::2] - rl[1::2])
    return {"objective": losses.mean() + sft_weight * sft, "dpo_loss": losses.mean(), "sft_loss": sft,
            "reward_accuracy": (rewards_c > rewards_r).mean(), "reward_margin": (rewards_c - rewards_r).mean(),
            "chosen_reward": rewards_c.mean(), "rejected_reward": rewards_r.mean(),
            "chosen_logp": pl[0::2].mean(), "rejected_logp": pl[1::2].mean()}


@pytest.mark.parametrize("loss_type, eps, sft_weight, average", [
    ("sigmoid", 0.0, 0.0, False), ("sigmoid", 0.1, 0.1, False), ("ipo", 0.0, 0.0, True),
    ("hinge", 0.0, 0.5, False), ("discopop", 0.0, 0.0, True),
])
def test_loss_and_metrics_match_numpy(batch, loss_type, eps, sft_weight, average):
    policy, reference = create_model(CONFIG, seed=1), create_model(CONFIG, seed=2)
    objective = DPOObjective(beta=0.15, loss_type=loss_type, label_smoothing=eps, sft_weight=sft_weight,
                             average_logps=average, chunk_size=16)
    out = _loss(objective, policy, batch, _inputs(frozen=_params(reference)))
    expected = _numpy_objective(policy, reference, batch, beta=0.15, loss_type=loss_type, eps=eps,
                                sft_weight=sft_weight, average=average)
    assert float(out.weight) == 4
    np.testing.assert_allclose(float(out.total) / float(out.weight), expected["objective"], rtol=1e-4)
    for name, mean in out.metrics.items():
        np.testing.assert_allclose(float(mean.value()), expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(out.metrics["sft_loss"].count) == float(np.asarray(batch["loss_mask"])[0::2].sum())


def test_policy_as_its_own_reference_gives_ln2_and_zero_rewards(batch):
    policy = create_model(CONFIG, seed=1)
    out = _loss(DPOObjective(beta=0.1), policy, batch, _inputs(frozen=jax.tree.map(jnp.copy, _params(policy))))
    np.testing.assert_allclose(float(out.total) / float(out.weight), np.log(2.0), rtol=1e-6)
    assert float(out.metrics["reward_margin"].value()) == 0 and float(out.metrics["reward_accuracy"].value()) == 0


def test_the_gradient_does_not_reach_the_reference(batch):
    policy, reference = create_model(CONFIG, seed=1), create_model(CONFIG, seed=2)
    graphdef, params = nnx.split(policy, nnx.Param)
    objective = DPOObjective(beta=0.1)

    def loss(ref_params):
        return objective.loss(nnx.merge(graphdef, params), batch, _inputs(frozen=ref_params)).total

    grads = jax.grad(loss)(_params(reference))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_precomputed_reference_equals_the_policy_reference(batch):
    policy, reference = create_model(CONFIG, seed=1), create_model(CONFIG, seed=2)
    ref_logps = jnp.asarray(_full_logps(reference, batch)[0], jnp.float32)
    live = _loss(DPOObjective(beta=0.1, sft_weight=0.1), policy, batch, _inputs(frozen=_params(reference)))
    stored = DPOObjective(beta=0.1, sft_weight=0.1, reference="precomputed")
    assert "ref_logps" in stored.batch_spec().features and stored.batch_spec().group_size == 2
    out = _loss(stored, policy, {**batch, "ref_logps": ref_logps}, _inputs())
    np.testing.assert_allclose(float(out.total), float(live.total), rtol=1e-6)
    assert stored.frozen_state(None) is None


def test_sft_term_folds_over_microbatches_as_documented(batch):
    policy, reference = create_model(CONFIG, seed=1), create_model(CONFIG, seed=2)
    objective = DPOObjective(beta=0.1, sft_weight=0.5)
    inputs = _inputs(frozen=_params(reference))
    halves = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]
    outs = [_loss(objective, policy, half, inputs) for half in halves]
    folded = sum(float(o.total) for o in outs) / sum(float(o.weight) for o in outs)
    dpo = np.mean([float(o.metrics["dpo_loss"].value()) for o in outs])
    microbatch_token_means = [float(o.metrics["sft_loss"].value()) for o in outs]
    np.testing.assert_allclose(folded, dpo + 0.5 * np.mean(microbatch_token_means), rtol=1e-5)
    whole = _loss(objective, policy, batch, inputs)
    # one microbatch: exactly mean_pairs(dpo) + lambda * the global token mean
    np.testing.assert_allclose(float(whole.total) / float(whole.weight),
                               float(whole.metrics["dpo_loss"].value()) + 0.5 * float(whole.metrics["sft_loss"].value()),
                               rtol=1e-6)


def test_tr_dpo_mixes_the_policy_in_every_n_steps():
    objective = DPOObjective(ref_sync_every=3, ref_mix_rate=0.25)
    ref, params = {"w": jnp.zeros(4, jnp.bfloat16)}, {"w": jnp.full(4, 4.0, jnp.bfloat16)}
    for step, expected in ((1, 0.0), (2, 0.0), (3, 1.0), (6, 1.0)):
        mixed = objective.update_extra(ref, params, jnp.asarray(step))
        assert mixed["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(mixed["w"], np.float32), expected)
    assert DPOObjective().update_extra(None, params, jnp.asarray(3)) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="kto"), "valid: sigmoid"),
    (dict(reference="precomputed", ref_sync_every=4), "needs reference='policy'"),
    (dict(ref_sync_every=0), "ref_sync_every >= 1"),
    (dict(reference="teacher"), "use 'policy' or 'precomputed'"),
    (dict(sft_weight=-1.0), "sft_weight must be >= 0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOObjective(**kwargs)


# -- through the trainer ------------------------------------------------------------------------

@pytest.fixture
def fast_schedule():
    gin.parse_config(["learning_rate_schedule.kind = 'constant'", "learning_rate_schedule.warmup_steps = 0",
                      "learning_rate_schedule.peak = 2e-3"])
    yield
    gin.clear_config()


def _pairs(tokenizer, path, **kwargs):
    def factory(**context):
        return pair_data(paths=str(path), tokenizer=tokenizer, seq_len=SEQ, global_batch_size=16,
                         num_data_shards=1, **kwargs, **context)
    return factory


def test_dpo_steps_raise_margin_and_accuracy(tmp_path, tokenizer, pair_paths, fast_schedule):
    # 16 pairs, two batches of 8, cycled: a few steps must move every pair the right way
    few = tmp_path / "few.jsonl"
    few.write_text("".join(pair_paths["train"].read_text().splitlines(keepends=True)[:16]))
    result = train(model_dir=str(tmp_path / "run"), model_config=CONFIG, train_steps=8, log_every=1,
                   checkpoint_every=100, mesh_shape=(4, 2, 1, 1), num_microbatches=2,
                   train_data=_pairs(tokenizer, few),
                   eval_data=_pairs(tokenizer, few, shuffle=False, num_epochs=1),
                   eval_batches=2, objective=DPOObjective(beta=0.1, sft_weight=0.1))
    rows = metric_rows(tmp_path / "run")
    train_rows = [r for r in rows if r["step"] > 0]
    first, last = train_rows[0], train_rows[-1]
    np.testing.assert_allclose(first["dpo_loss"], np.log(2.0), rtol=1e-5)
    assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0
    assert last["reward_margin"] > 0.05 and last["reward_accuracy"] > 0.7
    assert last["dpo_loss"] < np.log(2.0) - 0.02
    assert rows[0]["step"] == 0 and rows[0]["eval/reward_accuracy"] == 0
    assert result.before["reward_margin"] == 0
    assert result.after["reward_margin"] > 0.05 and result.after["reward_accuracy"] > 0.7
    assert result.dropped_examples == 0


@pytest.mark.slow
def test_tr_dpo_hard_sync_makes_the_reference_the_policy(tmp_path, tokenizer, pair_paths, fast_schedule):
    train(model_dir=str(tmp_path / "run"), model_config=CONFIG, train_steps=3, log_every=1, checkpoint_every=100,
          mesh_shape=(8, 1, 1, 1), train_data=_pairs(tokenizer, pair_paths["train"]),
          objective=DPOObjective(beta=0.1, ref_sync_every=2, ref_mix_rate=1.0))
    rows = {r["step"]: r for r in metric_rows(tmp_path / "run")}
    # step 2's loss is taken after one update against the initial reference; after update 2 the
    # reference is the policy, so step 3 starts from zero rewards again
    assert rows[2]["reward_margin"] != 0
    np.testing.assert_allclose(rows[3]["dpo_loss"], np.log(2.0), rtol=1e-5)
    assert abs(rows[3]["reward_margin"]) < 1e-6


def test_the_experiment_configs_parse_and_build(tmp_path, tokenizer):
    from launch.train import parse_gin

    for extra in ([], ["configs/experiments/dpo_arithmetic_precomputed.gin"]):
        parse_gin(["configs/experiments/dpo_arithmetic.gin", *extra],
                  [f"PAIRS_DIR = '{tmp_path}'", "synthetic_arithmetic_pairs_file.num_train = 40",
                   "synthetic_arithmetic_pairs_file.num_eval = 8", f"tokenizer.cache_dir = '{tmp_path}/tok'"])
        try:
            objective = DPOObjective()
            assert (objective.beta, objective.sft_weight, objective.loss_type) == (0.1, 1.0, "sigmoid")
            assert objective.reference == ("precomputed" if extra else "policy")
            if not extra:
                with gin.config_scope("train"):
                    data = pair_data(seed=0, process_index=0, process_count=1)
                batch = next(iter(data))
                assert batch["inputs"].shape == (32, 128) and data.batch_spec.group_size == 2
        finally:
            gin.clear_config()


@pytest.mark.slow
@pytest.mark.parametrize("sync", [None, 4])
def test_compile_only_builds_the_reference_abstractly(tokenizer, pair_paths, sync):
    def compile_with(objective):
        return train(model_dir="unused", model_config=CONFIG, train_data=_pairs(tokenizer, pair_paths["train"]),
                     train_steps=10, mesh_shape=(2, 2, 2, 1), compile_only=True, objective=objective)

    report = compile_with(DPOObjective(ref_sync_every=sync))
    assert report["devices"] == 8 and report["global_batch"] == 16
    # the reference (frozen or evolving) is a second copy of the parameters among the arguments
    lm = compile_with(LMObjective())
    assert report["argument_bytes_per_device"] > lm["argument_bytes_per_device"]
