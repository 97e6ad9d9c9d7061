r"""Distillation step benchmark: online KD against an LM step of the same student; prints JSON.

Three jitted, state-donating train steps of the same student, weights and batch on one device,
interleaved (the order rotates every repeat) and repeated:

* ``lm``: ``LMObjective`` (next-token cross-entropy);
* ``offline_kd``: ``DistillObjective(mode="offline")`` with the teacher's truncated
  distribution already in the batch (what a dump gives): the cost of the KD loss alone;
* ``online_kd``: ``DistillObjective(mode="online")``: the teacher's forward pass and chunked
  truncation run inside the step.

Reported: medians and min/max per step, the ratios online/LM and offline/LM, the teacher's
share of the online step ((online - offline) / online), and the FLOP-based expectation
(student 6N + attention per token, teacher 2N + attention per token) next to it.

Example (CPU):
    python -m launch.benchmark_distill --repeats=7 --output=/tmp/distill_bench.json
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from glmjax import flops, sharding
from glmjax.models import ModelConfig
from glmjax.objectives import LMObjective
from glmjax.objectives.alpha import ConstantAlpha
from glmjax.objectives.base import StateContext
from glmjax.objectives.distill import DistillObjective, teacher_batch_spec
from glmjax.objectives.distill_losses import chunked_teacher_truncation
from glmjax.training.optimizer import adamw, learning_rate_schedule
from glmjax.training.state import init_random_params, init_train_state, model_graph, train_state_shardings
from glmjax.training.step import make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 2, "Student decoder layers.")
flags.DEFINE_integer("hidden", 256, "Student hidden size.")
flags.DEFINE_integer("intermediate", 704, "Student MLP intermediate size.")
flags.DEFINE_integer("heads", 4, "Student query heads.")
flags.DEFINE_integer("teacher_layers", 4, "Teacher decoder layers.")
flags.DEFINE_integer("teacher_hidden", 512, "Teacher hidden size.")
flags.DEFINE_integer("teacher_intermediate", 1408, "Teacher MLP intermediate size.")
flags.DEFINE_integer("teacher_heads", 8, "Teacher query heads.")
flags.DEFINE_integer("kv_heads", 2, "Key/value heads (both models).")
flags.DEFINE_integer("head_dim", 64, "Head dimension (both models).")
flags.DEFINE_integer("vocab", 16384, "Vocabulary size (both models).")
flags.DEFINE_integer("seq", 512, "Sequence length.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_float("top_p", 0.95, "Teacher truncation top-p.")
flags.DEFINE_integer("top_k", 50, "Teacher truncation top-k.")
flags.DEFINE_float("temperature", 2.0, "Teacher temperature.")
flags.DEFINE_enum("loss_type", "kl", ["kl", "soft_ce", "mse"], "KD loss.")
flags.DEFINE_integer("chunk", 512, "Sequence chunk of the fp32 logits.")
flags.DEFINE_integer("repeats", 5, "Timed steps per side (after --warmup untimed ones).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per side (the first one compiles).")
flags.DEFINE_string("attention_backend", "blockwise", "Attention backend (both models).")
flags.DEFINE_integer("seed", 0, "Weights and batch seed.")
flags.DEFINE_string("output", "", "Write the JSON here too.")


def _config(layers: int, hidden: int, intermediate: int, heads: int) -> ModelConfig:
    return ModelConfig(
        architecture="glm", vocab_size=FLAGS.vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_layers=layers, num_heads=heads, num_kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim,
        rms_norm_eps=1e-5, max_position_embeddings=max(FLAGS.seq, 2048), pad_token_id=0, eos_token_ids=(1,),
        attention_backend=FLAGS.attention_backend)


def _batch(vocab: int) -> dict[str, np.ndarray]:
    """The LM keys, one document per row, every target in the loss."""
    ids = np.random.default_rng(FLAGS.seed).integers(2, vocab, (FLAGS.batch, FLAGS.seq + 1), dtype=np.int32)
    ones = np.ones((FLAGS.batch, FLAGS.seq), np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": ones, "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(FLAGS.seq, dtype=np.int32), ones.shape).copy()}


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    """(seconds, fn's return value)."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleaved_runs(runs: dict[str, Callable[[], float]], repeats: int):
    """Every entry once per repeat, the order rotating each repeat (same shared-machine
    conditions for all). Returns (seconds, returned values) per name."""
    seconds = {name: [] for name in runs}
    values = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, value = _timed(runs[name])
            seconds[name].append(elapsed)
            values[name].append(value)
    return seconds, values


def _summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


class Step:
    """One objective's jitted, state-donating train step on one device."""

    def __init__(self, config: ModelConfig, objective, frozen, batch: dict, mesh):
        self.mesh = mesh
        schedule = learning_rate_schedule(1, kind="constant", peak=3e-4, warmup_steps=0)
        tx = adamw(schedule)
        shardings = train_state_shardings(tx, config, mesh)
        params = init_random_params(config, mesh, FLAGS.seed, shardings.params)
        self.state = init_train_state(config, tx, mesh, FLAGS.seed, shardings, params, donate=True)
        graphdef, _ = model_graph(config)
        step = make_train_step(graphdef, objective, tx, schedule, objective.batch_spec(),
                               param_shardings=shardings.params)
        self.frozen = frozen
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, mesh.devices.flat[0])
        with jax.set_mesh(mesh):
            self._step = jax.jit(step, donate_argnums=0)

    def __call__(self) -> float:
        with jax.set_mesh(self.mesh):
            self.state, outputs = self._step(self.state, self.frozen, self.batch)
            jax.block_until_ready((self.state, outputs))
        return float(outputs["means"]["loss"].value())


def _teacher_keys(objective: DistillObjective, teacher: ModelConfig, frozen: dict, batch: dict) -> dict:
    """The offline keys: the same truncated teacher the online step computes."""
    from flax import nnx

    model = nnx.merge(model_graph(teacher)[0], frozen)
    hidden = model.hidden_states(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                                 jnp.asarray(batch["segment_ids"]))
    ids, probs, _ = chunked_teacher_truncation(hidden, model.head_kernel(), top_p=objective.top_p,
                                               top_k=objective.top_k, temperature=objective.temperature,
                                               chunk_size=objective.chunk_size)
    return {"teacher_ids": np.asarray(ids), "teacher_probs": np.asarray(probs)}


def main(argv: list[str]) -> None:
    del argv
    student = _config(FLAGS.layers, FLAGS.hidden, FLAGS.intermediate, FLAGS.heads)
    teacher = _config(FLAGS.teacher_layers, FLAGS.teacher_hidden, FLAGS.teacher_intermediate, FLAGS.teacher_heads)
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    batch = _batch(FLAGS.vocab)
    settings = dict(top_p=FLAGS.top_p, top_k=FLAGS.top_k, temperature=FLAGS.temperature,
                    loss_type=FLAGS.loss_type, alpha=ConstantAlpha(0.9), chunk_size=FLAGS.chunk)
    online = DistillObjective(mode="online", teacher=teacher, teacher_seed=FLAGS.seed + 1, **settings)
    context = StateContext(mesh, student, lambda: None, {}, False)
    frozen = online.frozen_state(context)
    offline = DistillObjective(mode="offline", **settings)
    offline_batch = {**batch, **_teacher_keys(online, teacher, frozen, batch)}
    teacher_batch_spec().check(offline_batch)
    steps = {
        "lm": Step(student, LMObjective(chunk_size=FLAGS.chunk), None, batch, mesh),
        "offline_kd": Step(student, offline, None, offline_batch, mesh),
        "online_kd": Step(student, online, frozen, batch, mesh),
    }
    load_before = os.getloadavg()
    compile_s = {name: _timed(step)[0] for name, step in steps.items()}
    for _ in range(FLAGS.warmup - 1):
        for step in steps.values():
            step()
    seconds, values = interleaved_runs(steps, FLAGS.repeats)
    load_after = os.getloadavg()
    median = {name: statistics.median(s) for name, s in seconds.items()}
    student_flops = flops.training_flops_per_token(student, FLAGS.seq)
    teacher_flops = flops.training_flops_per_token(teacher, FLAGS.seq) / 3  # forward only
    result = {
        "config": {
            "student": {"layers": student.num_layers, "hidden": student.hidden_size,
                        "params": flops.count_params(student).total},
            "teacher": {"layers": teacher.num_layers, "hidden": teacher.hidden_size,
                        "params": flops.count_params(teacher).total},
            "vocab": FLAGS.vocab, "seq": FLAGS.seq, "batch": FLAGS.batch, "dtype": "float32",
            "truncation": {"top_p": FLAGS.top_p, "top_k": FLAGS.top_k, "temperature": FLAGS.temperature},
            "loss_type": FLAGS.loss_type, "chunk": FLAGS.chunk, "attention_backend": FLAGS.attention_backend,
            "jax": jax.__version__, "cpu_count": os.cpu_count(), "repeats": FLAGS.repeats,
        },
        **{name: _summary(s) for name, s in seconds.items()},
        "ratio_online_kd_over_lm": median["online_kd"] / median["lm"],
        "ratio_offline_kd_over_lm": median["offline_kd"] / median["lm"],
        "teacher_share_of_online_step": (median["online_kd"] - median["offline_kd"]) / median["online_kd"],
        "flop_ratio_online_over_lm": (student_flops + teacher_flops) / student_flops,
        "final_loss": {name: v[-1] for name, v in values.items()},
        "compile_and_first_step_s": compile_s,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
