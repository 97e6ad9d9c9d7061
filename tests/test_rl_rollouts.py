"""RL rollouts: prompt loading, the rows a rollout makes (groups, masks, engine log-probs equal to
the trainer's), dynamic sampling, the checkpointed stream state, several updates per rollout, and
RL steps through the trainer with an EMA anchor, resumed from a checkpoint."""

import json

import jax
import numpy as np
import pytest

from glmjax.data.sources import DataFormatError
from glmjax.data.synthetic import ArithmeticConfig, write_arithmetic_jsonl
from glmjax.data.tokenizer import default_tokenizer
from glmjax.evals.rewards import Response, Reward, RuleReward
from glmjax.inference.sampling import SamplingConfig
from glmjax.models import create_model
from glmjax.objectives.rl import RLObjective
from glmjax.rl.rollouts import RolloutSource, _trainer_logps, load_rl_prompts, rl_rollouts
from glmjax.sharding import make_mesh
from glmjax.training.trainer import train
from training_helpers import CONFIG, metric_rows

SMALL = ArithmeticConfig(min_ops=1, max_ops=1, max_operand=9, max_factor=5, max_value=60, eval_fraction=0.3)
K, P, NEW = 4, 2, 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_arithmetic_jsonl(tmp_path_factory.mktemp("task"), num_train=32, num_eval=8, config=SMALL)


@pytest.fixture(scope="module")
def prompts(tokenizer, paths):
    return load_rl_prompts(str(paths["train"]), tokenizer)


def _source(prompts, tokenizer, reward=None, **options):
    return RolloutSource(prompts, tokenizer, reward or RuleReward(checker="arithmetic"), prompts_per_step=P,
                         samples_per_prompt=K, sampling=SamplingConfig(temperature=1.2),
                         max_new_tokens=NEW, engine_batch_size=16, stacked_layers=False, **options)


def test_load_prompts_from_messages_and_problems(tokenizer, paths, tmp_path):
    prompts = load_rl_prompts(str(paths["train"]), tokenizer)
    first = json.loads(open(paths["train"]).readline())
    assert prompts[0].gold == str(first["answer"]) and prompts[0].id == "0"
    text = tokenizer.decode(prompts[0].input_ids.tolist())
    assert first["messages"][0]["content"] in text and first["messages"][1]["content"] not in text
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "p1", "problem": "Compute 2+2.", "answer": "4"}) + "\n"
                        + json.dumps({"question": "?", "answer": "1"}) + "\n")
    with pytest.raises(DataFormatError, match=r"problems.jsonl:2: row has neither"):
        load_rl_prompts(str(problems), tokenizer)


def test_rollout_rows(prompts, tokenizer):
    model = create_model(CONFIG, seed=0)
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    source = _source(prompts, tokenizer)
    batch = source.next_batch(model, 0, mesh)
    rows = P * K
    assert {k: v.shape for k, v in batch.items()} == {k: v.shape for k, v in source.abstract_batch().items()}
    assert batch["inputs"].shape == (rows, source.seq_len)
    source.batch_spec.check(batch)
    reward = RuleReward(checker="arithmetic")
    for row in range(rows):
        group_first = row - row % K
        mask = batch["loss_mask"][row].astype(bool)
        prompt_len = int(np.argmax(mask)) + 1
        # The K rows of a group share the prompt; the mask starts at its last token's target.
        np.testing.assert_array_equal(batch["inputs"][row, :prompt_len], batch["inputs"][group_first, :prompt_len])
        n = int(batch["segment_ids"][row].sum())
        assert mask[prompt_len - 1:n].all() and not mask[n:].any() and not mask[:prompt_len - 1].any()
        response = batch["targets"][row, prompt_len - 1:n].tolist()
        assert len(response) <= NEW
        # The reward is the rule reward of the decoded response.
        finish = "stop" if response[-1] in source.stop_ids else "length"
        want = reward(_gold(batch, row, prompts),
                      Response(tokenizer.decode(response, skip_special_tokens=True), len(response), finish))
        assert batch["rewards"][row] == pytest.approx(want.value)
    # The engine's temperature-scaled log-probs equal the trainer's forward at the same temperature.
    trainer = _trainer_logps(model, batch, 1.2, mesh)
    mask = batch["loss_mask"] > 0
    np.testing.assert_allclose(batch["sample_logps"][mask], trainer[mask], atol=2e-4)
    metrics = source.pop_metrics()
    assert metrics["rollout_seconds"] > 0 and metrics["sampling_rounds"] == 1.0
    assert source.pop_metrics() == {}


def _gold(batch, row, prompts):
    """The gold answer of the prompt a row was sampled for (matched by its prompt ids)."""
    mask = batch["loss_mask"][row].astype(bool)
    prompt = batch["inputs"][row, :int(np.argmax(mask)) + 1].tolist()
    matches = [p.gold for p in prompts if p.input_ids.tolist() == prompt]
    assert matches
    return matches[0]


def test_dynamic_sampling_drops_constant_groups(prompts, tokenizer):
    model = create_model(CONFIG, seed=0)
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    varied = {p.gold for p in prompts[::3]}

    def reward(gold, response):  # constant for most prompts, varied by the sample's length for a few
        value = float(response.num_tokens % 2) if gold in varied else 0.5
        return Reward(value, False, ())

    source = _source(prompts, tokenizer, reward, dynamic_sampling=True, max_sampling_rounds=3, seed=3)
    batch = source.next_batch(model, 0, mesh)
    metrics = source.pop_metrics()
    groups = batch["rewards"].reshape(P, K)
    kept_varied = sum(len(set(g)) > 1 for g in groups)
    assert metrics["filtered_groups"] >= 1
    assert kept_varied == P - metrics["unfilled_groups"]
    never = _source(prompts, tokenizer, lambda gold, response: Reward(1.0, True, ()), dynamic_sampling=True,
                    max_sampling_rounds=2)
    never.next_batch(model, 0, mesh)
    assert never.pop_metrics()["unfilled_groups"] == P  # all constant: filled with dropped groups


def test_state_round_trip_repeats_the_stream(prompts, tokenizer):
    model = create_model(CONFIG, seed=0)
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    source = _source(prompts, tokenizer, seed=5)
    source.next_batch(model, 0, mesh)
    state = source.get_state()
    after = source.next_batch(model, 1, mesh)
    fresh = _source(prompts, tokenizer, seed=5)
    fresh.set_state(json.loads(json.dumps(state)))
    again = fresh.next_batch(model, 1, mesh)
    for key in after:
        np.testing.assert_array_equal(after[key], again[key])


def test_several_updates_per_rollout_carry_old_logps(prompts, tokenizer):
    model = create_model(CONFIG, seed=0)
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    source = _source(prompts, tokenizer, updates_per_rollout=2)
    first = source.next_batch(model, 0, mesh)
    second = source.next_batch(model, 1, mesh)
    assert source.pop_metrics()["sampling_rounds"] == 1.0  # one rollout served both
    assert "old_logps" in first and first["inputs"].shape == second["inputs"].shape
    mask = first["loss_mask"] > 0
    np.testing.assert_allclose(first["old_logps"][mask], first["sample_logps"][mask], atol=2e-4)
    assert not np.array_equal(first["inputs"], second["inputs"])


@pytest.mark.slow
def test_rl_steps_through_the_trainer_resume_with_the_anchor(paths, tokenizer, tmp_path):
    def data(**kwargs):
        return rl_rollouts(**kwargs, prompts_path=str(paths["train"]), tokenizer=tokenizer,
                           reward=RuleReward(checker="arithmetic"), prompts_per_step=P, samples_per_prompt=K,
                           max_new_tokens=NEW, temperature=1.0, engine_batch_size=16, stacked_layers=False)

    objective = RLObjective(group_size=K, kl_coef=0.05, anchor="ema", ref_ema_decay=0.5, entropy_coef=0.01,
                            temperature=1.0)
    common = dict(model_dir=str(tmp_path / "run"), model_config=CONFIG, train_data=data, objective=objective,
                  log_every=1, checkpoint_every=2, mesh_shape=(-1, 1, 1, 1))
    first = train(train_steps=2, **common)
    assert first.step == 2
    resumed = train(train_steps=3, **common)
    assert resumed.step == 3
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for name in ("reward", "accuracy", "entropy", "kl", "logprob_gap", "rollout_seconds", "response_length"):
        assert all(np.isfinite(r[name]) for r in rows), name
    # The anchor starts at the policy (step 1 updates with learning rate 0 in the warmup), and
    # lags it once updates move the policy: the EMA is restored from the checkpoint on resume.
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[1]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[2]["kl"] > 1e-6
    assert max(r["logprob_gap"] for r in rows) < 1e-3
