"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx

from glmjax import flops
from glmjax import sharding as sharding_lib
from glmjax.data.global_batch import make_global_batch
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.objectives.base import Objective
from glmjax.objectives.lm import LMObjective
from glmjax.training import optimizer as optimizer_lib
from glmjax.training.checkpointing import Checkpointer
from glmjax.training.preemption import StopRequest
from glmjax.training.run_config import check_run_config, record_run_config
from glmjax.training.metrics import MetricsWriter, ProgressLine
from glmjax.training.state import (
    abstract_train_state,
    init_train_state,
    model_graph,
    train_state_shardings,
)
from glmjax.training.step import make_eval_step, make_train_step

# Dense bf16 peak FLOP/s per chip, for MFU. Unknown devices (CPUs) report no MFU unless
# ``train.peak_flops_per_device`` is set.
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}

DataFactory = Callable[..., Any]
Evaluator = Callable[[Decoder, int], dict[str, float]]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for prefix, value in sorted(_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return value
    return None


@dataclasses.dataclass
class TrainResult:
    """What a run ends with: the last step, the last logged metrics, evaluator results at the
    start (``before``) and end (``after``), and where things are."""

    step: int
    metrics: dict[str, float]
    before: dict[str, float]
    after: dict[str, float]
    model_dir: str
    checkpoint_dir: str
    stopped_early: bool = False


def _host_batch_shape(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    rows, seq = batch["inputs"].shape
    return rows * jax.process_count(), seq


def _check_finite(pending: list[tuple[int, jax.Array]]) -> None:
    for step, loss in pending:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"loss is {value} at step {step}; stopping. The last checkpoint before it is kept."
            )
    pending.clear()


@gin.configurable(denylist=["compile_only"])
def train(
    model_dir: str = gin.REQUIRED,
    model_config: ModelConfig = gin.REQUIRED,
    train_data: DataFactory = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    objective: Objective | None = None,
    eval_data: DataFactory | None = None,
    evaluators: Sequence[Evaluator] = (),
    seed: int = 0,
    mesh_shape: Sequence[int] = (-1, 1, 1, 1),
    num_microbatches: int = 1,
    log_every: int = 10,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 3,
    eval_every: int | None = None,
    eval_batches: int = 10,
    init_from_hf: str | None = None,
    init_from_orbax: str | None = None,
    peak_flops_per_device: float | None = None,
    compile_only: bool = False,
) -> TrainResult | dict[str, float]:
    """Trains ``model_config`` on ``train_data`` with ``objective`` (default: LM cross-entropy).

    Args:
      model_dir: run directory: metrics.jsonl, tensorboard/, checkpoints/, model_config.json.
      train_data: ``factory(seed=, process_index=, process_count=)`` -> iterable dataset of host
        batches (dicts of numpy [host_batch, seq]) with a checkpointable iterator.
      eval_data: same kind of factory for held-out loss (finite or cut at ``eval_batches``).
      evaluators: ``fn(model, step) -> {name: value}`` run before training, every ``eval_every``
        steps and at the end (e.g. exact-match accuracy of generated answers).
      mesh_shape: (data, fsdp, tensor, sequence); -1 fills with the remaining devices.
      num_microbatches: gradient accumulation steps per optimiser step.
      init_from_hf / init_from_orbax: initial parameters for a fresh run (ignored on resume).
      compile_only: compile the step for the configured model and mesh, report memory per
        device, and return without training.

    Returns:
      A ``TrainResult``; with ``compile_only`` a dict of compiled memory figures (bytes per device).
    """
    objective = LMObjective() if objective is None else objective
    mesh = sharding_lib.make_mesh(mesh_shape)
    schedule = optimizer_lib.learning_rate_schedule(train_steps)
    tx = optimizer_lib.adamw(schedule)
    graphdef, abstract_params = model_graph(model_config)

    data = train_data(seed=seed, process_index=jax.process_index(), process_count=jax.process_count())
    data_iterator = iter(data)
    first_batch = next(data_iterator)
    batch_shape = _host_batch_shape(first_batch)
    batch_sharding = sharding_lib.named_sharding(("act_batch", "act_seq"), batch_shape, mesh)

    extra = objective.extra_state(mesh, abstract_params)
    shardings = train_state_shardings(tx, model_config, mesh, extra)
    step_fn = make_train_step(graphdef, objective, tx, schedule, num_microbatches)
    with jax.set_mesh(mesh):
        jitted_step = jax.jit(
            step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
            donate_argnums=0,
        )
    if compile_only:
        return _compile_report(jitted_step, tx, model_config, shardings, first_batch, batch_shape,
                               batch_sharding, mesh, extra)

    check_run_config(model_dir, model_config)
    record_run_config(model_dir, model_config)
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    checkpointer = Checkpointer(checkpoint_dir, keep=keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:
        data_iterator = iter(data)
        abstract = abstract_train_state(model_config, tx, shardings, extra)
        state = checkpointer.restore(abstract, data_iterator, latest)
        logging.info("resumed from %s at step %d", checkpoint_dir, latest)
        pending_batch = None
    else:
        params = _initial_params(init_from_hf, init_from_orbax, model_config, mesh)
        state = init_train_state(model_config, tx, mesh, seed, shardings, params=params, extra=extra)
        pending_batch = first_batch
    start_step = int(state.step)

    eval_step = None
    if eval_data is not None:
        with jax.set_mesh(mesh):
            eval_step = jax.jit(make_eval_step(graphdef, objective), in_shardings=(shardings, batch_sharding))

    def run_evaluations(step: int) -> dict[str, float]:
        results: dict[str, float] = {}
        if eval_step is not None:
            results.update(_eval_loss(eval_step, state, eval_data, eval_batches, batch_sharding, seed))
        if evaluators:
            model = nnx.merge(graphdef, state.params)
            with jax.set_mesh(mesh):
                for evaluator in evaluators:
                    results.update(evaluator(model, step))
        return results

    writer = MetricsWriter(model_dir, resume_step=start_step)
    progress = ProgressLine(train_steps)
    termination = StopRequest()
    tokens_per_step = batch_shape[0] * batch_shape[1]
    flops_per_step = flops.training_flops_per_token(model_config, batch_shape[1]) * tokens_per_step
    peak = peak_flops_per_device or device_peak_flops()

    before = run_evaluations(start_step) if (evaluators or eval_step) and start_step == 0 else {}
    if before:
        writer.write(start_step, before, prefix="eval/")
    metrics: dict[str, float] = {}
    pending_losses: list[tuple[int, jax.Array]] = []
    last_log_time, last_log_step = time.time(), start_step
    stopped_early = False
    step = start_step
    try:
        with jax.set_mesh(mesh):
            while step < train_steps:
                host_batch = pending_batch if pending_batch is not None else next(data_iterator)
                pending_batch = None
                batch = make_global_batch(host_batch, batch_sharding)
                state, step_metrics = jitted_step(state, batch)
                step += 1
                pending_losses.append((step, step_metrics["loss"]))
                if step % log_every == 0 or step == train_steps:
                    _check_finite(pending_losses)
                    now = time.time()
                    seconds_per_step = (now - last_log_time) / max(step - last_log_step, 1)
                    last_log_time, last_log_step = now, step
                    metrics = {k: float(v) for k, v in step_metrics.items()}
                    metrics["tokens_per_s"] = tokens_per_step / seconds_per_step
                    metrics["seconds_per_step"] = seconds_per_step
                    if peak:
                        metrics["mfu"] = flops_per_step / seconds_per_step / (peak * jax.device_count())
                    writer.write(step, metrics)
                    progress.show(step, metrics)
                if eval_every and step % eval_every == 0 and step < train_steps:
                    writer.write(step, run_evaluations(step), prefix="eval/")
                if step % checkpoint_every == 0 or step == train_steps:
                    _check_finite(pending_losses)
                    checkpointer.save(state, data_iterator, step=step)
                if termination.should_stop(step):
                    _check_finite(pending_losses)
                    if checkpointer.latest_step() != step:
                        checkpointer.save(state, data_iterator, step=step)
                    logging.warning("termination requested: saved step %d and stopping", step)
                    stopped_early = True
                    break
        after = run_evaluations(step) if (evaluators or eval_step) and not stopped_early else {}
        if after:
            writer.write(step, after, prefix="eval/")
    finally:
        checkpointer.close()
        writer.close()
        termination.close()
    return TrainResult(step, metrics, before, after, model_dir, checkpoint_dir, stopped_early)


def _initial_params(hf_dir: str | None, orbax_dir: str | None, config: ModelConfig, mesh) -> dict | None:
    if hf_dir and orbax_dir:
        raise ValueError("set at most one of train.init_from_hf and train.init_from_orbax")
    if not (hf_dir or orbax_dir):
        return None
    if hf_dir:
        from glmjax.checkpoints.hf import from_pretrained

        model = from_pretrained(hf_dir, config.param_dtype, mesh=mesh)
    else:
        from glmjax.checkpoints.orbax_io import load_model

        model = load_model(orbax_dir, mesh=mesh, param_dtype=config.param_dtype)
    for field in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(model.config, field) != getattr(config, field):
            raise ValueError(
                f"initial checkpoint {hf_dir or orbax_dir}: {field}={getattr(model.config, field)!r} "
                f"but the run's model config has {getattr(config, field)!r}"
            )
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _eval_loss(eval_step, state, eval_data: DataFactory, max_batches: int, batch_sharding, seed: int):
    data = eval_data(seed=seed, process_index=jax.process_index(), process_count=jax.process_count())
    iterator: Iterator = iter(data)
    total = weight = 0.0
    sums: dict[str, float] = {}
    for _ in range(max_batches):
        try:
            host_batch = next(iterator)
        except StopIteration:
            break
        out = eval_step(state, make_global_batch(host_batch, batch_sharding))
        total += float(out["total"])
        weight += float(out["weight"])
        for key, value in out.items():
            if key not in ("total", "weight"):
                sums[key] = sums.get(key, 0.0) + float(value)
    if weight == 0:
        return {}
    return {"loss": total / weight, **{k: v / weight for k, v in sums.items()}}


def _compile_report(jitted_step, tx, config, shardings, first_batch, batch_shape, batch_sharding, mesh, extra):
    abstract_state = abstract_train_state(config, tx, shardings, extra)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(batch_shape, np.asarray(v).dtype, sharding=batch_sharding)
        for k, v in first_batch.items()
    }
    start = time.time()
    with jax.set_mesh(mesh):
        compiled = jitted_step.lower(abstract_state, abstract_batch).compile()
    memory = compiled.memory_analysis()
    return {
        "devices": jax.device_count(),
        "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "global_batch": batch_shape[0],
        "seq_len": batch_shape[1],
        "parameters": flops.count_params(config).total,
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "output_bytes_per_device": memory.output_size_in_bytes,
        "temp_bytes_per_device": memory.temp_size_in_bytes,
        "compile_seconds": round(time.time() - start, 2),
    }
