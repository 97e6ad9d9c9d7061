"""The trainer: per-key batches on meshes and microbatches, groups, divergence guards, settings."""

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.data.factories import lm_data, synthetic_arithmetic_file
from glmjax.data.spec import BatchSpec, BatchSpecError, FeatureSpec, lm_batch_spec
from glmjax.data.tokenizer import default_tokenizer
from glmjax.objectives import LMObjective, LossOutput, Mean
from glmjax.training.optimizer import learning_rate_schedule
from glmjax.training.step import split_microbatches
from glmjax.training.trainer import ConfigError, TrainingDivergedError, train
from training_helpers import (
    CONFIG,
    fixed_batches_factory,
    losses_by_step,
    metric_rows,
    random_lm_batch,
    reference_losses,
)


@pytest.fixture
def fast_schedule():
    """A schedule that moves the weights within 3 steps (gin, cleared afterwards)."""
    gin.parse_config(["learning_rate_schedule.warmup_steps = 0", "learning_rate_schedule.peak = 3e-3"])
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def data_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tokenizer = default_tokenizer(str(root / "tokenizer"))
    path = synthetic_arithmetic_file(data_dir=str(root), split="train", num_train=400, num_eval=20)

    def factory(**kwargs):
        return lm_data(paths=path, data_format="chat", tokenizer=tokenizer, seq_len=64,
                       global_batch_size=8, num_data_shards=1, overlong="window", **kwargs)

    return factory


def _train(tmp_path, name, data_factory, **kwargs):
    model_dir = str(tmp_path / name)
    args = dict(model_dir=model_dir, model_config=CONFIG, train_data=data_factory, train_steps=3,
                log_every=1, checkpoint_every=100)
    args.update(kwargs)
    train(**args)
    return losses_by_step(model_dir)


# -- batches of any rank, on meshes and microbatches ------------------------------------------

_RANKED_SPEC = lm_batch_spec({
    "row_weight": FeatureSpec("float32", ("act_batch",)),
    "alt_targets": FeatureSpec("int32", ("act_batch", "act_seq", None)),
})


@dataclasses.dataclass(frozen=True)
class _RankedObjective(LMObjective):
    """Cross-entropy of the targets plus the mean cross-entropy of K alternative targets
    ([B, S, K]), each row weighted by ``row_weight`` ([B])."""

    def batch_spec(self):
        return _RANKED_SPEC

    def loss(self, model, batch, inputs):
        hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32))
        main = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        alt = -jnp.take_along_axis(logp, batch["alt_targets"], axis=-1).mean(-1)
        mask = batch["loss_mask"].astype(jnp.float32)
        per_token = (main + alt) * batch["row_weight"][:, None] * mask
        return LossOutput(per_token.sum(), mask.sum(), {
            "alt": Mean.of(alt, mask), "row_weight": Mean.of(batch["row_weight"])})


def _ranked_batches(packed: bool, count: int = 1, rows: int = 8, seq: int = 32):
    rng = np.random.default_rng(1 if packed else 2)
    batches = []
    for _ in range(count):
        batch = random_lm_batch(rng, rows, seq, CONFIG.vocab_size, packed)
        batch["row_weight"] = rng.uniform(0.5, 2.0, rows).astype(np.float32)
        batch["alt_targets"] = rng.integers(0, CONFIG.vocab_size, (rows, seq, 3), dtype=np.int32)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("packed, runs", [
    (True, [((2, 2, 2, 1), 1), ((8, 1, 1, 1), 4)]),
    (False, [((1, 2, 4, 1), 4)]),
])
def test_keys_of_rank_1_2_3_give_one_device_losses_on_any_mesh(tmp_path, fast_schedule, packed, runs):
    batches = _ranked_batches(packed)  # one batch, seen every step: the loss must fall
    objective = _RankedObjective()
    reference = reference_losses(objective, batches, _RANKED_SPEC, seed=3, train_steps=3)
    assert reference[2] < reference[0]
    for mesh_shape, micro in runs:
        name = f"{'packed' if packed else 'unpacked'}_{'x'.join(map(str, mesh_shape))}_{micro}"
        losses = _train(tmp_path, name, fixed_batches_factory(batches, _RANKED_SPEC), objective=objective,
                        seed=3, mesh_shape=mesh_shape, num_microbatches=micro)
        np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], reference, rtol=2e-5, err_msg=name)
        row = metric_rows(tmp_path / name)[-1]
        assert row["row_weight"] == pytest.approx(float(batches[0]["row_weight"].mean()), rel=1e-6)


def test_mesh_shapes_and_microbatches_give_the_same_losses(tmp_path, data_factory):
    reference = _train(tmp_path, "data8", data_factory, mesh_shape=(8, 1, 1, 1))
    assert sorted(reference) == [1, 2, 3] and reference[3] < reference[1]
    losses = _train(tmp_path, "micro4", data_factory, mesh_shape=(2, 1, 4, 1), num_microbatches=4)
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)], rtol=2e-5)


def test_a_batch_key_without_a_spec_is_refused(tmp_path):
    batch = _ranked_batches(packed=False, count=1)[0]
    with pytest.raises(BatchSpecError, match=r"keys without a batch spec: alt_targets int32 \[8, 32, 3\]"):
        train(model_dir=str(tmp_path / "run"), model_config=CONFIG, train_steps=1,
              train_data=fixed_batches_factory([batch], lm_batch_spec({"row_weight": _RANKED_SPEC.features["row_weight"]})))
    assert not (tmp_path / "run").exists()


# -- groups --------------------------------------------------------------------------------------

def test_microbatch_split_keeps_groups_whole():
    rows = jnp.arange(16)
    micro = split_microbatches({"x": rows}, 2, group_size=2)["x"]
    assert micro.tolist() == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    with pytest.raises(ValueError, match="whole groups of 4 rows"):
        split_microbatches({"x": jnp.arange(12)}, 2, group_size=4)


@dataclasses.dataclass(frozen=True)
class _PairObjective(LMObjective):
    """A pairwise loss over consecutive rows (chosen, rejected): -log sigmoid of the difference
    of their summed log-likelihoods; it changes if a pair is split."""

    def batch_spec(self):
        return BatchSpec(lm_batch_spec().features, group_size=2)

    def loss(self, model, batch, inputs):
        hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32))
        token = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        sequence = (token * batch["loss_mask"]).sum(-1)
        margin = sequence[0::2] - sequence[1::2]
        losses = -jax.nn.log_sigmoid(margin)
        return LossOutput(losses.sum(), jnp.asarray(losses.shape[0], jnp.float32),
                          {"pair_accuracy": Mean.of(margin > 0)})


def test_groups_never_straddle_microbatches():
    rng = np.random.default_rng(5)
    batches = [random_lm_batch(rng, 8, 32, CONFIG.vocab_size, packed=False) for _ in range(2)]
    spec = _PairObjective().batch_spec()
    whole = reference_losses(_PairObjective(), batches, spec, seed=1, train_steps=2)
    split = reference_losses(_PairObjective(), batches, spec, seed=1, train_steps=2, num_microbatches=4)
    np.testing.assert_allclose(split, whole, rtol=1e-5)


# -- divergence ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _PoisonedObjective(LMObjective):
    """LM loss whose gradient (not the loss) becomes NaN from step ``start`` on, while the
    loss stays finite: the guard must look at the gradients."""

    start: int = 2

    def loss(self, model, batch, inputs):
        out = super().loss(model, batch, inputs)
        poison = jnp.where(inputs.step >= self.start, jnp.nan, 0.0)
        scale = model.embedding[...].sum()
        # x - stop_gradient(x) is 0 in the forward pass; its gradient carries the NaN.
        total = out.total + poison * (scale - jax.lax.stop_gradient(scale))
        return LossOutput(jnp.nan_to_num(total), out.weight, out.metrics)


def test_nonfinite_gradients_stop_and_keep_last_good_checkpoint(tmp_path, data_factory):
    model_dir = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match=r"at step 3 the loss is [0-9.]+ and the gradient norm nan"):
        train(model_dir=str(model_dir), model_config=CONFIG, train_data=data_factory, train_steps=6,
              log_every=1, checkpoint_every=2, objective=_PoisonedObjective(), mesh_shape=(-1, 1, 1, 1))
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["2"]


def test_nonfinite_updates_can_be_skipped_and_counted(tmp_path, data_factory):
    model_dir = tmp_path / "skip"
    result = train(model_dir=str(model_dir), model_config=CONFIG, train_data=data_factory, train_steps=4,
                   log_every=1, checkpoint_every=100, objective=_PoisonedObjective(start=2),
                   skip_nonfinite_updates=5, mesh_shape=(-1, 1, 1, 1))
    assert result.skipped_updates == 2 and result.step == 4
    assert [r["skipped_updates"] for r in metric_rows(model_dir)] == [0, 0, 1, 2]
    # Steps 3 and 4 were skipped: the parameters are the ones after step 2, and finite.
    from glmjax.checkpoints.training_runs import load_trained_model

    model = load_trained_model(str(model_dir))
    assert np.isfinite(np.asarray(model.embedding[...])).all()
    with pytest.raises(TrainingDivergedError, match="at step 4"):
        train(model_dir=str(tmp_path / "give_up"), model_config=CONFIG, train_data=data_factory,
              train_steps=6, log_every=1, objective=_PoisonedObjective(start=2), skip_nonfinite_updates=1,
              mesh_shape=(-1, 1, 1, 1))


# -- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    (dict(checkpoint_every=0), r"train.checkpoint_every=0: must be an integer >= 1"),
    (dict(train_steps=-5), r"train.train_steps=-5: must be an integer >= 1"),
    (dict(eval_every=0), r"train.eval_every=0"),
    (dict(num_microbatches=0), r"train.num_microbatches=0"),
])
def test_bad_settings_name_the_binding(tmp_path, data_factory, setting, message):
    args = dict(model_dir=str(tmp_path / "run"), model_config=CONFIG, train_data=data_factory, train_steps=3)
    args.update(setting)
    with pytest.raises(ConfigError, match=message):
        train(**args)
    assert not (tmp_path / "run").exists()


def test_compile_only_reports_memory(data_factory):
    report = train(model_dir="unused", model_config=CONFIG, train_data=data_factory, train_steps=10,
                   mesh_shape=(1, 4, 2, 1), compile_only=True)
    assert report["devices"] == 8 and report["mesh"]["fsdp"] == 4 and report["platform"] == "cpu"
    assert report["argument_bytes_per_device"] > 0 and report["temp_bytes_per_device"] > 0
    assert report["xla_flops_per_device"] > 0
    assert not os.path.exists("unused")


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_schedules(kind):
    schedule = learning_rate_schedule(100, kind=kind, peak=1.0, warmup_steps=10, final_fraction=0.1,
                                      decay_fraction=0.2)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.1, abs=1e-6)
    if kind == "wsd":
        assert float(schedule(50)) == pytest.approx(1.0) and float(schedule(79)) == pytest.approx(1.0)
        assert float(schedule(90)) == pytest.approx(0.55)
    else:
        assert 0.1 < float(schedule(55)) < 1.0
