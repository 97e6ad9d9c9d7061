"""Train-step parity with transformers + ``torch.optim.AdamW``, and the weight-decay mask.

The trainer (``glmjax.training.trainer.train``, configured through gin) and the PyTorch
reference in ``torch_reference`` start from the same weights and see the same batches; per
step their losses, pre-clipping gradient norms and learning rates, and at the end their
parameters, must agree. The settings make each ingredient visible: a large weight decay at a
high learning rate (decaying norm scales or biases would shrink them by lr * wd per step),
clipping below the gradient norm (so the gradient scale matters), a warmup + cosine schedule,
and prompt tokens and right padding outside the loss mask (so the token weighting matters).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import gin
import grain
import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from numpy.typing import ArrayLike

import glmjax
from glmjax.models import create_model, flat_params, preset
from glmjax.checkpoints.training_runs import load_trained_model
from glmjax.training.optimizer import learning_rate_schedule, weight_decay_mask
from glmjax.training.trainer import train
from torch_reference import AdamWSettings, train_reference

CONFIG = preset("glm4-tiny").replace(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16
)
SEQ_LEN = 32
STEPS = 4
PEAK_LR = 1e-2
# eps 1e-6 rather than 1e-8: the key bias of the unrotated head dims has no gradient (adding
# it shifts a query's scores uniformly), so both sides see round-off (~1e-11) there, which
# Adam would blow up to ~lr * noise / eps (~5e-5 with eps 1e-8).
ADAMW = dict(b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.5)

LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4
# Final parameters: |ours - torch| <= PARAM_ATOL + PARAM_RTOL * |torch| (observed: at most
# 3.4e-6, in embedding rows; decay on a norm scale would move it by ~1e-2).
PARAM_ATOL, PARAM_RTOL = 2e-5, 1e-5


def _batch(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    """Unpacked rows: a prompt outside the loss, a response in it, then right padding (id 0)."""
    batch = {k: np.zeros((rows, SEQ_LEN), np.int32)
             for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    for row in range(rows):
        length = int(rng.integers(SEQ_LEN // 2, SEQ_LEN + 1))
        prompt = int(rng.integers(1, length // 2))
        tokens = rng.integers(2, CONFIG.vocab_size, length + 1)
        batch["inputs"][row, :length] = tokens[:-1]
        batch["targets"][row, :length] = tokens[1:]
        batch["loss_mask"][row, prompt:length] = 1
        batch["segment_ids"][row, :length] = 1
        batch["positions"][row, :length] = np.arange(length)
    return batch


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """The starting weights as an HF checkpoint, with norm scales and biases moved off 1 and 0."""
    model = create_model(CONFIG, seed=11)
    for name, variable in flat_params(model).items():
        if "norm" in name or name.endswith("bias"):
            noise = jax.random.normal(jax.random.key(len(name)), variable.shape) * 0.1
            variable.set_value(variable[...] + noise)
    path = str(tmp_path_factory.mktemp("hf"))
    glmjax.save_pretrained(model, path)
    return path


@pytest.fixture
def clean_gin():
    """Clears the gin bindings a test made."""
    yield
    gin.clear_config()


def _bind_optimizer(settings: AdamWSettings) -> None:
    """Configures ``adamw`` and a warmup + cosine ``learning_rate_schedule`` through gin."""
    gin.parse_config(
        [f"adamw.{k} = {v!r}" for k, v in dataclasses.asdict(settings).items()]
        + ["learning_rate_schedule.kind = 'cosine'", f"learning_rate_schedule.peak = {PEAK_LR!r}",
           "learning_rate_schedule.warmup_steps = 2", "learning_rate_schedule.final_fraction = 0.1"]
    )


def _hf_weights(model: glmjax.Decoder, path: str) -> dict[str, np.ndarray]:
    """``model``'s parameters under their HF names (written to ``path`` and read back)."""
    glmjax.save_pretrained(model, path)
    weights = {}
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        weights.update(safetensors.numpy.load_file(file))
    return weights


def _mismatch(
    name: str, actual: ArrayLike, expected: ArrayLike, *, rtol: float, atol: float = 0.0
) -> list[str]:
    """[] if ``|actual - expected| <= atol + rtol * |expected|`` everywhere, else one line
    naming the worst element."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    if excess.max() <= 0:
        return []
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
    return [f"{name}: {int((excess > 0).sum())}/{excess.size} out of tolerance, worst at {worst}: "
            f"{actual[worst]:.7g} vs torch {expected[worst]:.7g}"]


# clip_norm lies between the gradient norms of the steps with a nonzero learning rate (both
# sides' norms agree to ~1e-6, so the margins only need to survive changes of the data).
@pytest.mark.parametrize(
    "mesh_shape,rows,num_microbatches,clip_norm",
    [((-1, 1, 1, 1), 8, 1, 0.95), ((2, 2, 2, 1), 4, 2, 1.45)],
    ids=["data8", "mesh222-micro2"],
)
def test_train_steps_match_torch_adamw(tmp_path, hf_dir, clean_gin, mesh_shape, rows, num_microbatches,
                                       clip_norm):
    settings = AdamWSettings(**ADAMW, clip_norm=clip_norm)
    _bind_optimizer(settings)
    rng = np.random.default_rng(rows + num_microbatches)
    batches = [_batch(rng, rows) for _ in range(STEPS)]

    def factory(seed: int, process_index: int, process_count: int) -> grain.IterDataset:
        del seed, process_index, process_count
        return grain.MapDataset.source(batches).repeat().to_iter_dataset()

    model_dir = str(tmp_path / "run")
    train(model_dir=model_dir, model_config=CONFIG, train_data=factory, train_steps=STEPS, objective=None,
          seed=3, mesh_shape=mesh_shape, num_microbatches=num_microbatches, log_every=1,
          checkpoint_every=STEPS, init_from_hf=hf_dir)
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows_by_step = {row["step"]: row for row in map(json.loads, f) if "loss" in row}
    assert sorted(rows_by_step) == list(range(1, STEPS + 1))
    ours = {key: [rows_by_step[s][key] for s in range(1, STEPS + 1)]
            for key in ("loss", "grad_norm", "learning_rate")}
    trained = _hf_weights(load_trained_model(model_dir), str(tmp_path / "trained_hf"))

    schedule = learning_rate_schedule(STEPS)
    reference = train_reference(hf_dir, batches, steps=STEPS, schedule=schedule, settings=settings,
                                num_microbatches=num_microbatches)

    # The settings exercise what they are meant to: warmup then cosine, clipping in some step.
    np.testing.assert_allclose(reference.learning_rates, [0.0, PEAK_LR / 2, PEAK_LR, 0.55 * PEAK_LR],
                               rtol=1e-6)
    assert min(reference.grad_norms[1:]) < settings.clip_norm < max(reference.grad_norms[1:])
    np.testing.assert_allclose(ours["learning_rate"], reference.learning_rates, rtol=1e-6)
    assert sorted(trained) == sorted(reference.weights)
    initial = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, expected in reference.weights.items():  # every tensor moved, so every one is checked
        assert np.abs(expected - initial[name]).max() > 1e-3, f"{name} did not train"

    mismatches = [
        *_mismatch("loss per step", ours["loss"], reference.losses, rtol=LOSS_RTOL),
        *_mismatch("grad_norm per step", ours["grad_norm"], reference.grad_norms, rtol=GRAD_NORM_RTOL),
        *(line for name, expected in reference.weights.items()
          for line in _mismatch(name, trained[name], expected, rtol=PARAM_RTOL, atol=PARAM_ATOL)),
    ]
    if mismatches:
        pytest.fail("glmjax vs torch:\n" + "\n".join(mismatches), pytrace=False)


ARCHITECTURES = {
    "glm": (preset("glm4-tiny"), ()),
    "glm4": (preset("glm4-0414-tiny"),
             ("layers.post_self_attention_norm.scale", "layers.post_mlp_norm.scale")),
    "qwen2": (preset("qwen2.5-tiny").replace(tie_word_embeddings=True), ()),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_weight_decay_mask_is_matrices_only(architecture):
    config, post_norms = ARCHITECTURES[architecture]
    model = nnx.eval_shape(lambda: create_model(config, seed=0))  # the tree, without initialising it
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = {
        ".".join(str(k.key) for k in path): value
        for path, value in jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))[0]
    }
    kernels = [f"layers.attention.{p}_kernel" for p in "qkvo"] + ["layers.mlp.gate_up_kernel",
                                                                   "layers.mlp.down_kernel"]
    matrices = ["embedding", *kernels] + ([] if config.tie_word_embeddings else ["lm_head"])
    vectors = ["final_norm.scale", "layers.input_norm.scale", "layers.post_attention_norm.scale",
               *post_norms, *(f"layers.attention.{p}_bias" for p in "qkv")]
    assert sorted(mask) == sorted(matrices + vectors)
    assert sorted(name for name, decays in mask.items() if decays) == sorted(matrices)
