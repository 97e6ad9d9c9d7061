r"""Train-step benchmark: glmjax (jitted) against transformers + PyTorch eager; prints JSON.

Both sides train the same GLM-4 config (``GlmForCausalLM`` on the PyTorch side) from the
same weights (written with ``glmjax.save_pretrained``, read with ``from_pretrained``) on the
same batch with the same AdamW (betas, eps, weight decay on matrices only, clipping at 1.0,
constant learning rate) and token-averaged next-token cross-entropy. Steps are interleaved
(the order alternates every repeat) and repeated; medians and min/max are reported with the
load average before and after. Both sides take the same number of steps, so their final
losses must agree (a check that they compute the same thing).

Achieved FLOP/s count 6 x matmul parameters per token plus causal attention
(``glmjax.flops.training_flops_per_token``) against a matmul peak measured in the same run:
the better of fp32 ``jnp.dot`` and ``torch.mm`` on square matrices, measured once per repeat
between the steps; the fraction of peak uses the median of those (the same shared-machine
conditions as the step medians) and, for reference, their maximum.

``--profile`` adds where our step time goes (``launch.train_step_profile``): the fastest run
of each sub-program against our fastest step (the least disturbed figures on a shared CPU).

Example (CPU):
    python -m launch.benchmark_train --repeats=7 --output=/tmp/train_bench.json
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import glmjax
from glmjax import flops, sharding
from glmjax.models import ModelConfig, create_model
from glmjax.objectives import LMObjective
from glmjax.training.optimizer import adamw, learning_rate_schedule
from glmjax.training.state import init_train_state, model_graph, train_state_shardings
from glmjax.training.step import make_train_step
from launch import train_step_profile

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("hidden", 512, "Hidden size.")
flags.DEFINE_integer("intermediate", 1408, "MLP intermediate size.")
flags.DEFINE_integer("heads", 8, "Query heads.")
flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
flags.DEFINE_integer("head_dim", 64, "Head dimension.")
flags.DEFINE_integer("vocab", 16384, "Vocabulary size.")
flags.DEFINE_integer("seq", 512, "Sequence length.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_integer("repeats", 5, "Timed steps per side (after --warmup untimed ones).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per side (the first one compiles ours).")
flags.DEFINE_string("attention_backend", "blockwise", "Our attention backend.")
flags.DEFINE_string("remat_policy", "none", "Our remat policy.")
flags.DEFINE_integer("ce_chunk", 512, "Our cross-entropy sequence chunk.")
flags.DEFINE_enum("peer_attention", "sdpa", ["sdpa", "eager"], "transformers attn_implementation.")
flags.DEFINE_float("learning_rate", 3e-4, "Constant learning rate of both sides.")
flags.DEFINE_integer("peak_size", 2048, "Side of the square fp32 matmuls that measure the peak.")
flags.DEFINE_bool("profile", False, "Also time sub-programs of our step.")
flags.DEFINE_integer("seed", 0, "Weights and batch seed.")
flags.DEFINE_string("output", "", "Write the JSON here too.")

_BETAS, _EPS, _WEIGHT_DECAY, _CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0


def _model_config() -> ModelConfig:
    return ModelConfig(
        architecture="glm", vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
        intermediate_size=FLAGS.intermediate, num_layers=FLAGS.layers, num_heads=FLAGS.heads,
        num_kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim, rms_norm_eps=1e-5,
        max_position_embeddings=max(FLAGS.seq, 2048), pad_token_id=0, eos_token_ids=(1,),
        attention_backend=FLAGS.attention_backend, remat_policy=FLAGS.remat_policy,
    )


def _batch(config: ModelConfig) -> dict[str, np.ndarray]:
    """int32 ``inputs``, ``targets``, ``loss_mask`` (all ones), each [batch, seq]."""
    ids = np.random.default_rng(FLAGS.seed).integers(
        2, config.vocab_size, (FLAGS.batch, FLAGS.seq + 1), dtype=np.int32
    )
    mask = np.ones((FLAGS.batch, FLAGS.seq), np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    """(seconds, fn's return value)."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


class OursStep:
    """Our jitted, state-donating train step on one device."""

    def __init__(self, config: ModelConfig, params: dict, batch: dict[str, np.ndarray]):
        self.mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
        schedule = learning_rate_schedule(1, kind="constant", peak=FLAGS.learning_rate, warmup_steps=0)
        self.tx = adamw(
            schedule, b1=_BETAS[0], b2=_BETAS[1], eps=_EPS, weight_decay=_WEIGHT_DECAY, clip_norm=_CLIP
        )
        shardings = train_state_shardings(self.tx, config, self.mesh)
        self.state = init_train_state(config, self.tx, self.mesh, FLAGS.seed, shardings, params)
        self.graphdef, _ = model_graph(config)
        self.objective = LMObjective(chunk_size=FLAGS.ce_chunk)
        step = make_train_step(self.graphdef, self.objective, self.tx, schedule, self.objective.batch_spec(),
                               param_shardings=shardings.params)
        batch_sharding = sharding.named_sharding(("act_batch", "act_seq"), batch["inputs"].shape, self.mesh)
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, batch_sharding)
        with jax.set_mesh(self.mesh):
            self._step = jax.jit(
                step, in_shardings=(shardings, None, batch_sharding), out_shardings=(shardings, None),
                donate_argnums=0,
            )

    def __call__(self) -> float:
        """One step; returns the loss before the update."""
        with jax.set_mesh(self.mesh):
            self.state, outputs = self._step(self.state, None, self.batch)
            jax.block_until_ready((self.state, outputs))
        return float(outputs["means"]["loss"].value())


class PeerStep:
    """transformers ``GlmForCausalLM`` + ``torch.optim.AdamW``, eager."""

    def __init__(self, path: str, batch: dict[str, np.ndarray], attention: str):
        self.model = transformers.GlmForCausalLM.from_pretrained(
            path, attn_implementation=attention, dtype=torch.float32
        )
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": _WEIGHT_DECAY},
            {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=FLAGS.learning_rate, betas=_BETAS, eps=_EPS)
        self.inputs = torch.from_numpy(batch["inputs"]).long()
        self.targets = torch.from_numpy(batch["targets"]).long()

    def __call__(self) -> float:
        """One step; returns the loss before the update."""
        logits = self.model(input_ids=self.inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, _CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def matmul_peak(n: int, repeats: int = 2) -> float:
    """Best fp32 FLOP/s of an [n, n] x [n, n] matmul, the better of ``jnp.dot`` and ``torch.mm``."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    dot(ja, jb).block_until_ready()
    torch.mm(ta, tb)
    jax_s = min(_timed(lambda: dot(ja, jb).block_until_ready())[0] for _ in range(repeats))
    torch_s = min(_timed(lambda: torch.mm(ta, tb))[0] for _ in range(repeats))
    return 2 * n**3 / min(jax_s, torch_s)


def interleaved_runs(
    runs: dict[str, Callable[[], float]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Runs every entry once per repeat, rotating the order each repeat, so that all see the
    same shared-machine conditions. Returns (seconds, returned values) per name."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    values: dict[str, list[float]] = {name: [] for name in runs}
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


def _config_record(config: ModelConfig) -> dict:
    return {
        "architecture": config.architecture, "layers": config.num_layers,
        "hidden": config.hidden_size, "intermediate": config.intermediate_size,
        "heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "vocab": config.vocab_size, "seq": FLAGS.seq, "batch": FLAGS.batch, "dtype": "float32",
        "attention_backend": config.attention_backend, "remat_policy": config.remat_policy,
        "ce_chunk": FLAGS.ce_chunk,
        "peer": f"transformers {transformers.__version__} GlmForCausalLM + torch.optim.AdamW, "
                f"eager, attn_implementation={FLAGS.peer_attention}, torch {torch.__version__}",
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "repeats": FLAGS.repeats,
    }


def main(argv: list[str]) -> None:
    del argv
    config = _model_config()
    batch = _batch(config)
    model = create_model(config, seed=FLAGS.seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with tempfile.TemporaryDirectory() as path:
        glmjax.save_pretrained(model, path)
        peer = PeerStep(path, batch, FLAGS.peer_attention)
    ours = OursStep(config, params, batch)
    del model, params

    load_before = os.getloadavg()
    compile_s, _ = _timed(ours)
    for _ in range(FLAGS.warmup - 1):
        ours()
    for _ in range(FLAGS.warmup):
        peer()
    seconds, values = interleaved_runs(
        {"ours": ours, "peer": peer, "peak": lambda: matmul_peak(FLAGS.peak_size)}, FLAGS.repeats
    )
    load_after = os.getloadavg()

    tokens = FLAGS.batch * FLAGS.seq
    flops_per_step = flops.training_flops_per_token(config, FLAGS.seq) * tokens
    peaks = values["peak"]
    peak = statistics.median(peaks)
    step_s = {name: statistics.median(seconds[name]) for name in ("ours", "peer")}
    result = {
        "config": _config_record(config),
        "ours": _summary(seconds["ours"]),
        "peer": _summary(seconds["peer"]),
        "tokens_per_s_ours": tokens / step_s["ours"],
        "tokens_per_s_peer": tokens / step_s["peer"],
        "ratio_ours_over_peer": step_s["peer"] / step_s["ours"],
        "flops_per_step": flops_per_step,
        "flop_per_s_ours": flops_per_step / step_s["ours"],
        "flop_per_s_peer": flops_per_step / step_s["peer"],
        "matmul_peak_flop_per_s": {
            "median": peak, "min": min(peaks), "max": max(peaks), "size": FLAGS.peak_size},
        "fraction_of_peak_ours": flops_per_step / step_s["ours"] / peak,
        "fraction_of_peak_peer": flops_per_step / step_s["peer"] / peak,
        "fraction_of_max_peak_ours": flops_per_step / step_s["ours"] / max(peaks),
        "final_loss_ours": values["ours"][-1],
        "final_loss_peer": values["peer"][-1],
        "compile_and_first_step_s": compile_s,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    if FLAGS.profile:
        result["profile"] = train_step_profile.profile(
            config, ours.graphdef, ours.objective, ours.tx, ours.state, ours.batch, ours.mesh,
            step_seconds=min(seconds["ours"]),
        )
    text = json.dumps(result, indent=2)
    print(text)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
