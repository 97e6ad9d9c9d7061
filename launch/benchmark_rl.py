r"""RL step benchmark: rollout tokens/s and the share of a step spent generating vs updating, and
(``--aot_preset``) the per-device memory of an RL run compiled ahead of time; prints JSON.

Rollouts: RL steps through ``launch.train``'s trainer on the built-in task (``--run_dir``: start
from a trained run's newest checkpoint; default: the quickstart-size model at random init, whose
responses run to the budget), with ``RLObjective`` (EMA anchor, KL in the reward, entropy bonus)
and ``RolloutSource``. Per step after ``--warmup`` steps: rollout seconds (engine generation plus
decoding and rewards, timed after the previous update finished), the update's seconds (the rest
of the step), generated tokens per second. Reported: medians with min/max, and the rollout share
of the step.

Memory (``--aot_preset=qwen2.5-32b``): the train step (policy, AdamW moments, the EMA anchor)
and the rollout engine's generation program for P x K responses, compiled for the fake CPU mesh
(``--mesh``), without running (``glmjax.rl.memory``).

Examples (CPU):
    python -m launch.benchmark_rl --steps=12 --run_dir=runs/quickstart/sft
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m launch.benchmark_rl --aot_preset=qwen2.5-32b --mesh=1,8,1,1 \
        --prompts_per_step=8 --samples_per_prompt=64 --prompt_len=512 --max_new_tokens=4096 \
        --num_microbatches=8 --engine_rows=64
"""
from __future__ import annotations

import json
import statistics
import tempfile

from absl import app, flags

from glmjax.checkpoints.orbax_io import read_model_config
from glmjax.data.factories import synthetic_arithmetic_file
from glmjax.flops import count_params
from glmjax.data.synthetic import ArithmeticConfig
from glmjax.data.tokenizer import default_tokenizer
from glmjax.evals.rewards import RuleReward
from glmjax.models import preset
from glmjax.objectives.rl import RLObjective
from glmjax.rl.memory import rl_memory_report
from glmjax.rl.rollouts import rl_rollouts
from glmjax.training.trainer import train
from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 12, "RL steps (after which the rollout/update times are read).")
flags.DEFINE_integer("warmup", 2, "Leading steps left out (compilation).")
flags.DEFINE_string("run_dir", None, "Start from this launch.train MODEL_DIR (its newest checkpoint).")
flags.DEFINE_integer("prompts_per_step", 8, "P.")
flags.DEFINE_integer("samples_per_prompt", 8, "K.")
flags.DEFINE_integer("max_new_tokens", 96, "Response budget.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_bool("stacked_layers", False, "Generate with the training layout (shared buffers) instead of "
                  "a per-layer copy of the weights.")
flags.DEFINE_string("aot_preset", None, "Instead: compile an RL run of this preset (e.g. qwen2.5-32b) "
                    "ahead of time and report memory per device.")
flags.DEFINE_list("mesh", ["1", "8", "1", "1"], "With --aot_preset: (data, fsdp, tensor, sequence).")
flags.DEFINE_integer("prompt_len", 1024, "With --aot_preset: prompt tokens.")
flags.DEFINE_integer("num_microbatches", 1, "With --aot_preset: gradient accumulation of the update.")
flags.DEFINE_string("attention_backend", "blockwise", "With --aot_preset: the model's attention backend "
                    "(blockwise: no [seq, seq] scores; splash on TPU).")
flags.DEFINE_string("compute_dtype", "bfloat16", "With --aot_preset: matmul/activation dtype (fp32 master weights).")
flags.DEFINE_string("remat_policy", "full", "With --aot_preset: what each layer saves for the backward pass.")
flags.DEFINE_integer("engine_rows", None, "With --aot_preset: rows per generation call (default P x K).")


def _quickstart_config():
    return preset("glm4-tiny").replace(vocab_size=384, hidden_size=192, intermediate_size=512, num_layers=3,
                                       num_heads=6, num_kv_heads=2, head_dim=32, attention_backend="blockwise")


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _rollout_benchmark() -> dict:
    workdir = tempfile.mkdtemp(prefix="benchmark_rl_")
    tokenizer = default_tokenizer(f"{workdir}/tokenizer")
    task = ArithmeticConfig(min_ops=1, max_ops=2, max_operand=9, max_factor=5, max_value=60, error_rate=0.2)
    prompts = synthetic_arithmetic_file(f"{workdir}/data", split="train", num_train=2000, config=task)
    k = FLAGS.samples_per_prompt

    def data(**kwargs):
        return rl_rollouts(**kwargs, prompts_path=prompts, tokenizer=tokenizer, reward=RuleReward(checker="arithmetic"),
                           prompts_per_step=FLAGS.prompts_per_step, samples_per_prompt=k,
                           max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                           stacked_layers=FLAGS.stacked_layers, engine_batch_size=FLAGS.prompts_per_step * k)

    objective = RLObjective(group_size=k, temperature=FLAGS.temperature, kl_coef=0.01, entropy_coef=0.001,
                            anchor="ema", ref_ema_decay=0.9)
    config = read_model_config(FLAGS.run_dir) if FLAGS.run_dir else _quickstart_config()
    train(model_dir=f"{workdir}/run", model_config=config, train_data=data, train_steps=FLAGS.steps,
          objective=objective, log_every=1, checkpoint_every=10**6, init_from_run=FLAGS.run_dir)
    with open(f"{workdir}/run/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("step", 0) > FLAGS.warmup and "rollout_seconds" in r]
    if not rows:
        raise app.UsageError(f"no timed steps: raise --steps above --warmup ({FLAGS.warmup})")
    rollout = [r["rollout_seconds"] for r in rows]
    step = [r["seconds_per_step"] for r in rows]
    update = [s - g for s, g in zip(step, rollout)]
    return {
        "benchmark": "rl_rollouts",
        "model_parameters": count_params(config).total,
        "prompts_per_step": FLAGS.prompts_per_step, "samples_per_prompt": k,
        "max_new_tokens": FLAGS.max_new_tokens, "temperature": FLAGS.temperature,
        "stacked_layers": FLAGS.stacked_layers, "timed_steps": len(rows),
        "rollout_seconds": _summary(rollout), "update_seconds": _summary(update),
        "step_seconds": _summary(step),
        "rollout_tokens_per_s": _summary([r["rollout_tokens_per_s"] for r in rows]),
        "rollout_share": _summary([g / s for g, s in zip(rollout, step)]),
        "response_length": _summary([r["response_length"] for r in rows]),
    }


def _memory_benchmark() -> dict:
    config = preset(FLAGS.aot_preset).replace(attention_backend=FLAGS.attention_backend,
                                              compute_dtype=FLAGS.compute_dtype, remat_policy=FLAGS.remat_policy)
    objective = RLObjective(group_size=FLAGS.samples_per_prompt, kl_coef=0.01, entropy_coef=0.001, anchor="ema",
                            temperature=FLAGS.temperature)
    report = rl_memory_report(config, objective, mesh_shape=tuple(int(x) for x in FLAGS.mesh),
                              prompts_per_step=FLAGS.prompts_per_step, prompt_len=FLAGS.prompt_len,
                              max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                              num_microbatches=FLAGS.num_microbatches, engine_rows=FLAGS.engine_rows)
    gib = 2.0**30
    report["summary_gib_per_device"] = {
        "train_state": report["train_state_bytes_per_device"] / gib,
        "train_step_peak": report["train"]["peak_bytes_per_device"] / gib,
        "engine_temporaries": report["engine"]["temp_bytes_per_device"] / gib,
        "rollout_peak": report["rollout_peak_bytes"] / gib,
        "peak": report["peak_bytes_per_device"] / gib,
    }
    return {"benchmark": "rl_memory", "preset": FLAGS.aot_preset, **report}


def main(argv: list[str]) -> None:
    del argv
    common.quiet_library_logs()
    result = _memory_benchmark() if FLAGS.aot_preset else _rollout_benchmark()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
