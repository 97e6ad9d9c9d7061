"""The trainer: mesh and microbatch invariance, divergence handling, config checks."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.checkpoints import CheckpointError
from glmjax.data.factories import lm_data, synthetic_arithmetic_file
from glmjax.data.tokenizer import default_tokenizer
from glmjax.models import preset
from glmjax.objectives import LMObjective, LossOutput
from glmjax.training.optimizer import learning_rate_schedule
from glmjax.training.trainer import TrainingDivergedError, train

CONFIG = preset("glm4-tiny").replace(vocab_size=384, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def data_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tokenizer = default_tokenizer(str(root / "tokenizer"))
    path = synthetic_arithmetic_file(data_dir=str(root), split="train", num_train=400, num_eval=20)

    def factory(**kwargs):
        return lm_data(paths=path, data_format="chat", tokenizer=tokenizer, seq_len=64,
                       global_batch_size=8, num_data_shards=1, **kwargs)

    return factory


def _losses(model_dir) -> dict[int, float]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def _train(tmp_path, name, data_factory, **kwargs):
    model_dir = str(tmp_path / name)
    args = dict(model_dir=model_dir, model_config=CONFIG, train_data=data_factory, train_steps=3,
                log_every=1, checkpoint_every=100)
    args.update(kwargs)
    train(**args)
    return _losses(model_dir)


def test_mesh_shapes_and_microbatches_give_the_same_losses(tmp_path, data_factory):
    reference = _train(tmp_path, "data8", data_factory, mesh_shape=(8, 1, 1, 1))
    assert sorted(reference) == [1, 2, 3] and reference[3] < reference[1]
    for name, kwargs in {
        "mesh2221": dict(mesh_shape=(2, 2, 2, 1)),
        "mesh1241": dict(mesh_shape=(1, 2, 4, 1)),
        "micro4": dict(mesh_shape=(2, 1, 4, 1), num_microbatches=4),
    }.items():
        losses = _train(tmp_path, name, data_factory, **kwargs)
        np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)],
                                   rtol=2e-5, err_msg=name)


@dataclasses.dataclass(frozen=True)
class _DivergingObjective(LMObjective):
    """LM loss that becomes NaN from the third step on (counts steps in its extra state)."""

    def extra_state(self, mesh, params):
        return jax.device_put(jnp.zeros((), jnp.int32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def update_extra(self, extra, params, step):
        return extra + 1

    def loss(self, model, batch, rng, extra):
        out = super().loss(model, batch, rng, None)
        poison = jnp.where(extra >= 2, jnp.nan, 0.0)
        return LossOutput(out.total + poison, out.weight, out.metrics)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_factory):
    model_dir = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 3"):
        train(model_dir=str(model_dir), model_config=CONFIG, train_data=data_factory, train_steps=6,
              log_every=1, checkpoint_every=2, objective=_DivergingObjective(), mesh_shape=(-1, 1, 1, 1))
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["2"]


def test_model_dir_of_another_config_is_refused(tmp_path, data_factory):
    _train(tmp_path, "run", data_factory, train_steps=1, mesh_shape=(-1, 1, 1, 1))
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    with pytest.raises(CheckpointError, match=r"recorded run and the run.s model config differ \(hidden_size: 128 vs 64"):
        train(model_dir=str(tmp_path / "run"), model_config=CONFIG.replace(hidden_size=64),
              train_data=data_factory, train_steps=2, mesh_shape=(-1, 1, 1, 1))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before


def test_compile_only_reports_memory(data_factory):
    report = train(model_dir="unused", model_config=CONFIG, train_data=data_factory, train_steps=10,
                   mesh_shape=(1, 4, 2, 1), compile_only=True)
    assert report["devices"] == 8 and report["mesh"]["fsdp"] == 4
    assert report["argument_bytes_per_device"] > 0 and report["temp_bytes_per_device"] > 0


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


def test_init_from_hf_checkpoint(tmp_path, data_factory):
    import glmjax
    from glmjax.models import create_model

    glmjax.save_pretrained(create_model(CONFIG, seed=5), str(tmp_path / "hf"))
    from_hf = _train(tmp_path, "from_hf", data_factory, seed=5, init_from_hf=str(tmp_path / "hf"),
                     mesh_shape=(-1, 1, 1, 1))
    random_init = _train(tmp_path, "random", data_factory, seed=5, mesh_shape=(-1, 1, 1, 1))
    np.testing.assert_allclose([from_hf[s] for s in (1, 2, 3)], [random_init[s] for s in (1, 2, 3)], rtol=1e-6)
    with pytest.raises(ValueError, match="hidden_size=128 but the run's model config has 64"):
        _train(tmp_path, "mismatch", data_factory, init_from_hf=str(tmp_path / "hf"),
               model_config=CONFIG.replace(hidden_size=64), mesh_shape=(-1, 1, 1, 1))
