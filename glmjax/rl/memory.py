"""Does an RL run fit? Per-device memory of the train step (policy, optimiser, anchor) and of the
rollout engine (its KV cache for P x K responses), compiled ahead of time on any mesh.

The engine generates with the policy's own (stacked) weights, so its parameters are the train
state's buffers, not a copy; what the rollout adds is the engine program's temporaries (the KV
cache of ``P * K`` rows of prompt + response, the sampling state). The two programs do not run at
once: a rollout holds the train state plus the engine's temporaries, an update holds the train
step's peak.
"""

from __future__ import annotations

from typing import Any

import math

import grain
import numpy as np

from glmjax import sharding as sharding_lib
from glmjax.data.spec import with_batch_spec
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models import ModelConfig, abstract_model
from glmjax.objectives.rl import RLObjective
from glmjax.rl.rollouts import rollout_batch_spec
from glmjax.training.trainer import train


def placeholder_rollouts(*, seed: int, process_index: int, process_count: int, prompts_per_step: int,
                         samples_per_prompt: int, seq_len: int, updates_per_rollout: int = 1) -> Any:
    """All-zero rollout batches of the right shapes and spec (one response per row filling
    ``seq_len``), for compile-only memory checks: no model, prompts or engine needed."""
    del seed, process_index
    spec = rollout_batch_spec(samples_per_prompt, updates_per_rollout)
    rows = prompts_per_step // process_count * samples_per_prompt
    batch = {}
    for key, feature in spec.features.items():
        shape = (rows, seq_len) if feature.ndim == 2 else (rows,)
        batch[key] = np.zeros(shape, np.dtype(feature.dtype))
    batch["segment_ids"][:] = 1
    batch["positions"][:] = np.arange(seq_len)
    batch["loss_mask"][:] = 1
    return with_batch_spec(grain.MapDataset.source([batch]).repeat().to_iter_dataset(), spec)


def rl_memory_report(
    config: ModelConfig,
    objective: RLObjective,
    *,
    mesh_shape: tuple[int, ...],
    prompts_per_step: int,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float = 1.2,
    num_microbatches: int = 1,
    engine_rows: int | None = None,
) -> dict[str, Any]:
    """Compiles the RL train step and the rollout engine for ``config`` on ``mesh_shape`` over
    the available devices (e.g. 8 fake CPU devices), without running them.

    Args:
      config: the policy's config (the anchor is a second copy of its parameters when the
        objective uses one).
      objective: the RL objective; its ``group_size`` is K.
      mesh_shape: (data, fsdp, tensor, sequence).
      prompts_per_step: P; the update sees P * K rows of ``prompt_len + max_new_tokens - 1``.
      prompt_len, max_new_tokens: rollout shapes.
      temperature: the rollout's sampling (selects the sampling program).
      num_microbatches: gradient accumulation of the update (groups stay whole: P must divide).
      engine_rows: rows per generation call (a multiple of K; default all P * K at once): the
        rollout then runs in ``P * K / engine_rows`` calls and holds one call's KV cache.

    Returns:
      JSON-ready dict: ``train`` (the trainer's compile report, bytes per device), ``engine``
      (argument / temporary bytes of the generation program per device), ``rollout_peak_bytes``
      (train state + engine temporaries) and ``peak_bytes_per_device`` (the larger of that and
      the train step's peak).
    """
    k = objective.group_size
    seq_len = prompt_len + max_new_tokens - 1

    def data(**kwargs):
        return placeholder_rollouts(**kwargs, prompts_per_step=prompts_per_step, samples_per_prompt=k,
                                    seq_len=seq_len)

    train_report = train(model_dir="unused-for-compile-only", model_config=config, train_data=data,
                         train_steps=1, objective=objective, mesh_shape=mesh_shape,
                         num_microbatches=num_microbatches, compile_only=True)
    mesh = sharding_lib.make_mesh(mesh_shape)
    rows = engine_rows or prompts_per_step * k
    if rows % k or rows > prompts_per_step * k:
        raise ValueError(f"engine_rows={rows} must be a multiple of K={k} and at most P * K")
    engine = GenerationEngine(abstract_model(config), mesh=mesh, stacked_layers=True, max_batch_size=rows,
                              length_buckets=sorted({prompt_len, max_new_tokens}))
    compiled = engine.compile(rows // k, prompt_len, max_new_tokens,
                              SamplingConfig(temperature=temperature), num_samples=k)
    memory = compiled.memory_analysis()
    state_bytes = train_report["argument_bytes_per_device"] - _batch_bytes(data, mesh)
    rollout_peak = state_bytes + memory.temp_size_in_bytes
    return {
        "train": train_report,
        "engine": {"rows": rows, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
                   "argument_bytes_per_device": memory.argument_size_in_bytes,
                   "temp_bytes_per_device": memory.temp_size_in_bytes},
        "train_state_bytes_per_device": state_bytes,
        "rollout_peak_bytes": rollout_peak,
        "peak_bytes_per_device": max(rollout_peak, train_report["peak_bytes_per_device"]),
    }


def _batch_bytes(data, mesh) -> int:
    """Bytes per device of one global batch (the step's batch argument), each key sharded by its
    logical axes as the trainer shards it."""
    dataset = data(seed=0, process_index=0, process_count=1)
    spec = dataset.batch_spec
    total = 0
    for key, value in next(iter(dataset)).items():
        sharding = sharding_lib.named_sharding(spec.features[key].axes, value.shape, mesh)
        total += math.prod(sharding.shard_shape(value.shape)) * value.dtype.itemsize
    return total
