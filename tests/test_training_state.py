"""Objective state (frozen from the initial weights, evolving and checkpointed), the step in the
loss, and the loop hook (batches from the current policy) with donation."""

import dataclasses
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.data.spec import lm_batch_spec
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models import create_model
from glmjax.objectives import LMObjective, LossOutput, Mean
from glmjax.training.trainer import train
from training_helpers import CONFIG, fixed_batches_factory, metric_rows, random_lm_batch


@pytest.fixture
def constant_schedule():
    """A constant learning rate, so a run cut in two equals one run (gin, cleared afterwards)."""
    gin.parse_config(["learning_rate_schedule.kind = 'constant'", "learning_rate_schedule.warmup_steps = 0",
                      "learning_rate_schedule.peak = 3e-3"])
    yield
    gin.clear_config()


def _squared_distance(a: dict, b: dict) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@dataclasses.dataclass(frozen=True)
class _AnchoredObjective(LMObjective):
    """LM loss plus a pull towards an EMA anchor of the policy (evolving state), with the distance
    to the initial weights (frozen state, like a DPO reference) and the step as metrics."""

    pull: float = 0.1
    decay: float = 0.5

    def frozen_state(self, context):
        params = context.initial_params()
        return params if context.abstract else jax.tree.map(jnp.copy, params)

    def extra_state(self, context):
        return self.frozen_state(context)

    def update_extra(self, extra, params, step):
        return jax.tree.map(lambda a, p: self.decay * a + (1 - self.decay) * p, extra, params)

    def loss(self, model, batch, inputs):
        out = super().loss(model, batch, inputs)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        anchor = _squared_distance(params, inputs.extra)
        one = jnp.ones(())
        return LossOutput(out.total + self.pull * anchor * out.weight, out.weight, {
            **out.metrics,
            "reference_distance": Mean(_squared_distance(params, inputs.frozen), one),
            "anchor_distance": Mean(anchor, one),
            "step_seen": Mean(inputs.step.astype(jnp.float32), one),
        })


def _batches():
    rng = np.random.default_rng(7)
    return [random_lm_batch(rng, 8, 32, CONFIG.vocab_size, packed=True) for _ in range(2)]


def _run(model_dir, steps, **kwargs):
    args = dict(model_dir=str(model_dir), model_config=CONFIG, train_data=fixed_batches_factory(_batches()),
                train_steps=steps, objective=_AnchoredObjective(), log_every=1, checkpoint_every=2,
                mesh_shape=(2, 2, 2, 1), seed=4)
    args.update(kwargs)
    return train(**args)


def test_frozen_and_evolving_state_survive_a_resume(tmp_path, constant_schedule):
    _run(tmp_path / "full", 4)
    _run(tmp_path / "cut", 2)
    _run(tmp_path / "cut", 4)
    full, cut = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["step_seen"] for r in full] == [0, 1, 2, 3]
    assert full[0]["reference_distance"] == 0 and full[0]["anchor_distance"] == 0
    assert 0 < full[1]["anchor_distance"] < full[1]["reference_distance"]
    for key in ("loss", "reference_distance", "anchor_distance", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in cut], [r[key] for r in full], rtol=2e-5, err_msg=key)
    # The frozen reference is not part of the checkpoint; the evolving anchor is.
    metadata = json.loads((tmp_path / "cut" / "checkpoints" / "4" / "state" / "_METADATA").read_text())
    top_level = {key.split(".")[0] for key in _tree_paths(metadata)}
    assert top_level == {"step", "params", "opt_state", "rng", "extra"}


def _tree_paths(metadata: dict) -> list[str]:
    tree = metadata.get("tree_metadata", metadata)
    return [str(key).strip("()'\" ").split(",")[0].strip("'\" ") for key in tree]


def test_frozen_state_is_built_from_the_initial_hf_weights(tmp_path, constant_schedule):
    hf_dir = tmp_path / "hf"
    glmjax.save_pretrained(create_model(CONFIG, seed=11), str(hf_dir))
    _run(tmp_path / "from_hf", 1, init_from_hf=str(hf_dir), seed=0)
    row = metric_rows(tmp_path / "from_hf")[0]
    assert row["reference_distance"] == 0 and row["anchor_distance"] == 0


# -- the loop hook ------------------------------------------------------------------------------

_PROMPT, _NEW, _K = 6, 10, 2


class _SelfSampledBatches:
    """A stand-in for RL rollouts: each step, the CURRENT policy samples ``_K`` continuations of
    each of 4 prompts, and the batch trains on them (loss on the sampled tokens). The engine
    shares the trainer's parameter buffers (``stacked_layers=True``) and is rebound every call."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.prompts = rng.integers(2, CONFIG.vocab_size, (16, _PROMPT)).tolist()
        self.batch_spec = lm_batch_spec()
        self.engine = None
        self.index = 0
        self.previous_policy_leaf = None
        self.saw_donated_previous = []

    def next_batch(self, policy, step, mesh):
        if self.engine is None:
            self.engine = GenerationEngine(policy, mesh=mesh, stacked_layers=True, max_batch_size=8,
                                           length_buckets=(16,))
        else:
            self.engine.update_model(policy)
        if self.previous_policy_leaf is not None:
            self.saw_donated_previous.append(self.previous_policy_leaf.is_deleted())
        self.previous_policy_leaf = policy.embedding[...]
        prompts = [self.prompts[(self.index + i) % len(self.prompts)] for i in range(4) for _ in range(_K)]
        results = self.engine.generate(prompts, SamplingConfig(temperature=1.0), max_new_tokens=_NEW,
                                       seed=1000 * self.index)
        self.index += 4
        return _lm_rows(prompts, [r.tokens for r in results])

    def abstract_batch(self):
        return {k: jax.ShapeDtypeStruct((8, _PROMPT + _NEW - 1), np.int32) for k in lm_batch_spec().features}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def _lm_rows(prompts, completions) -> dict[str, np.ndarray]:
    seq = _PROMPT + _NEW - 1
    out = {k: np.zeros((len(prompts), seq), np.int32) for k in lm_batch_spec().features}
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = np.asarray(prompt + completion, np.int32)
        n = len(ids) - 1
        out["inputs"][row, :n], out["targets"][row, :n] = ids[:-1], ids[1:]
        out["loss_mask"][row, _PROMPT - 1:n] = 1
        out["segment_ids"][row, :n] = 1
        out["positions"][row, :n] = np.arange(n)
    return out


def test_batch_source_gets_the_current_policy_and_its_state_is_checkpointed(tmp_path, constant_schedule):
    sources = {}

    def factory(name):
        def make(**kwargs):
            sources[name] = _SelfSampledBatches(seed=3)
            return sources[name]
        return make

    common = dict(model_config=CONFIG, objective=LMObjective(), log_every=1, checkpoint_every=2,
                  mesh_shape=(-1, 1, 1, 1), seed=2)
    train(model_dir=str(tmp_path / "full"), train_data=factory("full"), train_steps=4, **common)
    # The policy a step trained was donated to it; the source never read it again.
    assert sources["full"].saw_donated_previous == [True, True, True]
    train(model_dir=str(tmp_path / "cut"), train_data=factory("cut1"), train_steps=2, **common)
    train(model_dir=str(tmp_path / "cut"), train_data=factory("cut2"), train_steps=4, **common)
    assert sources["cut2"].index == 16  # restored at 8 (after 2 steps), then 2 more steps
    full, cut = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "cut")
    np.testing.assert_allclose([r["loss"] for r in cut], [r["loss"] for r in full], rtol=2e-5)
    assert len({round(r["loss"], 4) for r in full}) == 4
    assert os.path.exists(tmp_path / "cut" / "checkpoints" / "4")
