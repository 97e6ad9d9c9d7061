"""The training loop: build, restore or initialise, step, log, evaluate, checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from glmjax import flops, hardware
from glmjax import sharding as sharding_lib
from glmjax.checkpoints.training_runs import TOKENIZER_DIR
from glmjax.data.global_batch import make_global_batch
from glmjax.data.pipeline import dropped_examples as iterator_dropped_examples
from glmjax.data.spec import BatchSpec, BatchSpecError
from glmjax.data.tokenizer import save_tokenizer
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.objectives.base import (
    Mean,
    Objective,
    StateContext,
    batch_spec_of_objective,
    extra_state_of,
    frozen_state_of,
)
from glmjax.objectives.lm import LMObjective
from glmjax.training import optimizer as optimizer_lib
from glmjax.training.batch_source import BatchSource, DatasetStream
from glmjax.training.checkpointing import Checkpointer
from glmjax.training.initial_params import InitialParams
from glmjax.training.metrics import MetricsWriter, ProgressLine
from glmjax.training.preemption import StopRequest
from glmjax.training.run_config import check_run_config, record_run_config
from glmjax.training.state import (
    TrainState,
    abstract_train_state,
    init_train_state,
    leaf_shardings,
    model_graph,
    train_state_shardings,
)
from glmjax.training.step import make_eval_step, make_train_step

DataFactory = Callable[..., Any]
Evaluator = Callable[[Decoder, int], dict[str, float]]


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN or infinite; the last good checkpoint is kept."""


class ConfigError(ValueError):
    """A ``train.*`` setting that cannot work (the message names the binding)."""


@dataclasses.dataclass
class TrainResult:
    """What a run ends with: the last step, the last logged metrics, evaluator results at the
    start (``before``) and end (``after``), where things are, and how many updates were skipped
    as non-finite and over-long examples dropped (run totals over all processes)."""

    step: int
    metrics: dict[str, float]
    before: dict[str, float]
    after: dict[str, float]
    model_dir: str
    checkpoint_dir: str
    stopped_early: bool = False
    skipped_updates: int = 0
    dropped_examples: int = 0


def _check_settings(**settings: Any) -> None:
    positive = ("train_steps", "log_every", "checkpoint_every", "keep_checkpoints", "num_microbatches",
                "eval_batches", "preemption_sync_every")
    for name in positive:
        value = settings[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"train.{name}={value!r}: must be an integer >= 1")
    eval_every = settings["eval_every"]
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ConfigError(f"train.eval_every={eval_every!r}: must be None or an integer >= 1")
    skip = settings["skip_nonfinite_updates"]
    if skip is not None and (not isinstance(skip, int) or skip < 1):
        raise ConfigError(f"train.skip_nonfinite_updates={skip!r}: must be None or the number of "
                          "consecutive non-finite updates to skip before giving up (>= 1)")


class _Batches:
    """The run's batches: shapes, per-key shardings, global arrays, and what to checkpoint."""

    def __init__(self, data: Any, objective: Objective, mesh: Mesh, where: str):
        self.mesh = mesh
        self.source: BatchSource | None = data if isinstance(data, BatchSource) else None
        self.stream = None if self.source is not None else DatasetStream(data)
        declared = self.source.batch_spec if self.source is not None else self.stream.batch_spec
        objective_spec = batch_spec_of_objective(objective)
        if declared is None and objective_spec is None:
            raise BatchSpecError(f"{where}: neither the data nor the objective declares a batch spec")
        self.spec: BatchSpec = (declared or objective_spec).merge(objective_spec if declared else None)
        if self.source is not None:
            example = dict(self.source.abstract_batch())
        else:
            example = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in self.stream.first.items()}
            self.spec.check(self.stream.first, where)
        self.host_shapes = example
        self.shardings = {k: sharding_lib.named_sharding(self.spec.features[k].axes, self.global_shape(k), mesh)
                          for k in example}

    def global_shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self.host_shapes[key].shape)
        return (shape[0] * jax.process_count(), *shape[1:])

    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(self.global_shape(k), v.dtype, sharding=self.shardings[k])
                for k, v in self.host_shapes.items()}

    @property
    def host_states(self) -> dict[str, Any]:
        return {"hook": self.source} if self.source is not None else {"data": self.stream.iterator}

    def restart(self) -> None:
        if self.stream is not None:
            self.stream.restart()

    def dropped_examples(self) -> int:
        """Over-long examples dropped so far by all processes (a collective in multi-process
        runs: every process calls it at the same steps)."""
        if self.stream is not None:
            local = iterator_dropped_examples(self.stream.iterator)
        else:
            local = int(getattr(self.source, "dropped_examples", 0))
        if jax.process_count() == 1:
            return local
        return int(np.sum(multihost_utils.process_allgather(np.asarray(local, np.int64))))

    def next(self, graphdef: nnx.GraphDef, state: TrainState, step: int) -> dict[str, jax.Array]:
        if self.source is not None:
            host = self.source.next_batch(nnx.merge(graphdef, state.params), step, self.mesh)
        else:
            host = self.stream.next()
        self.spec.check(host, f"batch for step {step + 1}")
        local = {k: v for k, v in host.items() if not isinstance(v, jax.Array)}
        out = make_global_batch(local, {k: self.shardings[k] for k in local})
        for key, value in host.items():
            if isinstance(value, jax.Array):
                out[key] = jax.device_put(value, self.shardings[key])
        return out


def _buffer_ids(tree: Any) -> set[int]:
    ids = set()
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            ids.update(shard.data.unsafe_buffer_pointer() for shard in leaf.addressable_shards)
    return ids


def _check_not_shared(frozen: Any, state: TrainState) -> None:
    """The frozen state must not alias the (donated) train state."""
    if _buffer_ids(frozen) & _buffer_ids(state):
        raise ConfigError("the objective's frozen state shares buffers with the train state, which "
                          "every step donates; copy what it keeps (e.g. jnp.copy of the parameters)")


def _fetch_means(means: Mapping[str, Mean]) -> dict[str, float | None]:
    host = jax.device_get(means)
    return {k: (float(m.total) / float(m.count) if float(m.count) > 0 else None) for k, m in host.items()}


@jax.jit
def _add_means(running: dict[str, Mean], means: dict[str, Mean]) -> dict[str, Mean]:
    return jax.tree.map(jnp.add, running, means)


def _write_text(path: epath.Path, text: str) -> None:
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@gin.configurable(denylist=["compile_only", "topology", "stop_event"])
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
    init_from_run: str | None = None,
    peak_flops_per_device: float | None = None,
    skip_nonfinite_updates: int | None = None,
    preemption_sync_every: int = 10,
    tokenizer: PreTrainedTokenizerBase | None = None,
    compile_only: bool = False,
    topology: str | None = None,
    stop_event: threading.Event | None = None,
) -> TrainResult | dict[str, Any]:
    """Trains ``model_config`` on ``train_data`` with ``objective`` (default: LM cross-entropy).

    Args:
      model_dir: run directory (a local path or a URL such as ``gs://``): metrics.jsonl,
        tensorboard/, checkpoints/, model_config.json (written at the first save), config.gin.
      train_data: ``factory(seed=, process_index=, process_count=)`` -> a grain dataset of host
        batches (dicts of numpy ``[host_rows, ...]``, ideally carrying a ``batch_spec``) with a
        checkpointable iterator, or a ``BatchSource`` (batches from the current policy).
      objective: what to optimise; its frozen state is rebuilt at the start of every run, its
        evolving state is built once from the initial parameters and checkpointed.
      eval_data: same kind of dataset factory for held-out loss (finite or cut at ``eval_batches``).
      evaluators: ``fn(model, step) -> {name: value}`` run before training, every ``eval_every``
        steps and at the end (e.g. exact-match accuracy of generated answers).
      mesh_shape: (data, fsdp, tensor, sequence); -1 fills with the remaining devices.
      num_microbatches: gradient accumulation steps per optimiser step.
      init_from_hf / init_from_orbax / init_from_run: initial parameters for a fresh run (an HF
        directory, an orbax model checkpoint, or another run's MODEL_DIR: its newest verified
        checkpoint); a checkpoint whose config computes another function than ``model_config``
        is refused.
      skip_nonfinite_updates: None stops the run at a non-finite loss or gradient; N skips such
        updates (``optax.apply_if_finite``, counted as ``skipped_updates``) and stops after N in a row.
      preemption_sync_every: multi-process runs agree on stop requests every this many steps.
      tokenizer: the run's tokenizer, saved into ``MODEL_DIR/tokenizer`` at the first save, so
        generation and serving from the run find it (``glmjax.checkpoints.training_runs``).
      compile_only: compile the step for the configured model and mesh, report memory per
        device, and return without training.
      topology: with ``compile_only``, a TPU topology name (e.g. "v5p:2x2x1") to compile for
        through libtpu, without a TPU.
      stop_event: set it to stop cleanly at the next step boundary (for ``train()`` running off the
        main thread, where no SIGTERM handler can be installed).

    Returns:
      A ``TrainResult``; with ``compile_only`` a dict of compiled memory figures (bytes per device).
    """
    _check_settings(train_steps=train_steps, log_every=log_every, checkpoint_every=checkpoint_every,
                    keep_checkpoints=keep_checkpoints, num_microbatches=num_microbatches,
                    eval_batches=eval_batches, preemption_sync_every=preemption_sync_every,
                    eval_every=eval_every, skip_nonfinite_updates=skip_nonfinite_updates)
    if topology and not compile_only:
        raise ConfigError(f"topology={topology!r} is only for compile_only")
    objective = LMObjective() if objective is None else objective
    mesh = _make_mesh(mesh_shape, topology)
    schedule = optimizer_lib.learning_rate_schedule(train_steps)
    tx = optimizer_lib.adamw(schedule, param_dtype=model_config.param_dtype)
    if skip_nonfinite_updates:
        tx = optax.apply_if_finite(tx, skip_nonfinite_updates)
    graphdef, _ = model_graph(model_config)
    model_dir_path = epath.Path(model_dir)

    data = train_data(seed=seed, process_index=jax.process_index(), process_count=jax.process_count())
    batches = _Batches(data, objective, mesh, "train_data")
    param_shardings = train_state_shardings(tx, model_config, mesh).params
    initial = InitialParams(model_config, mesh, param_shardings, seed, init_from_hf, init_from_orbax,
                            init_from_run)

    def context(abstract: bool) -> StateContext:
        return StateContext(mesh, model_config, initial.abstract if abstract else initial,
                            param_shardings, abstract)

    step_fn = make_train_step(graphdef, objective, tx, schedule, batches.spec,
                              num_microbatches=num_microbatches, param_shardings=param_shardings,
                              skip_nonfinite_updates=skip_nonfinite_updates)
    if compile_only:
        frozen = frozen_state_of(objective, context(abstract=True))
        extra = extra_state_of(objective, context(abstract=True))
        return _compile_report(step_fn, tx, model_config, mesh, batches, frozen, extra, topology)

    config_recorded = check_run_config(model_dir_path, model_config)
    checkpoint_dir = model_dir_path / "checkpoints"
    # A fresh run creates its checkpoint directory only once the initial weights passed their checks.
    checkpointer = Checkpointer(checkpoint_dir, keep=keep_checkpoints) if checkpoint_dir.exists() else None
    frozen = frozen_state_of(objective, context(abstract=False))
    if checkpointer is not None and checkpointer.latest_step() is not None:
        extra_abstract = extra_state_of(objective, context(abstract=True))
        shardings = train_state_shardings(tx, model_config, mesh, extra_abstract)
        batches.restart()
        state, restored_step = checkpointer.restore(
            abstract_train_state(model_config, tx, shardings, extra_abstract), host_states=batches.host_states)
        logging.info("resumed from %s at step %d", checkpoint_dir, restored_step)
    else:
        extra = extra_state_of(objective, context(abstract=False))
        shardings = train_state_shardings(tx, model_config, mesh, extra)
        params, shared = initial.take()
        state = init_train_state(model_config, tx, mesh, seed, shardings, params, extra, donate=not shared)
        del params
        checkpointer = checkpointer or Checkpointer(checkpoint_dir, keep=keep_checkpoints)
    initial.release()
    _check_not_shared(frozen, state)
    frozen_shardings = leaf_shardings(frozen, mesh)
    _write_text(model_dir_path / "config.gin", gin.config_str())

    with jax.set_mesh(mesh):
        jitted_step = jax.jit(
            step_fn, in_shardings=(shardings, frozen_shardings, batches.shardings),
            out_shardings=(shardings, None), donate_argnums=0)
    loop = _Loop(
        model_dir=model_dir_path, model_config=model_config, mesh=mesh, graphdef=graphdef,
        objective=objective, batches=batches, state=state, frozen=frozen, jitted_step=jitted_step,
        checkpointer=checkpointer, schedule=schedule, train_steps=train_steps, log_every=log_every,
        checkpoint_every=checkpoint_every, eval_every=eval_every, eval_data=eval_data,
        eval_batches=eval_batches, evaluators=evaluators, seed=seed,
        peak=peak_flops_per_device or hardware.peak_flops(mesh),
        stop=StopRequest(preemption_sync_every, stop_event), config_recorded=config_recorded,
        tokenizer=tokenizer,
    )
    result = loop.run()
    _write_text(model_dir_path / "config.gin", gin.operative_config_str())
    return result


def _make_mesh(mesh_shape: Sequence[int], topology: str | None) -> Mesh:
    if topology is None:
        return sharding_lib.make_mesh(mesh_shape)
    try:
        return hardware.tpu_topology_mesh(topology, mesh_shape)
    except RuntimeError as err:
        raise ConfigError(str(err)) from err


class _Loop:
    """One run of the step loop with its logging, evaluation, checkpointing and stop handling."""

    def __init__(self, *, model_dir, model_config, mesh, graphdef, objective, batches, state, frozen,
                 jitted_step, checkpointer, schedule, train_steps, log_every, checkpoint_every, eval_every,
                 eval_data, eval_batches, evaluators, seed, peak, stop, config_recorded, tokenizer):
        self.model_dir, self.config, self.mesh, self.graphdef = model_dir, model_config, mesh, graphdef
        self.objective, self.batches, self.state, self.frozen = objective, batches, state, frozen
        self.jitted_step, self.checkpointer, self.schedule = jitted_step, checkpointer, schedule
        self.train_steps, self.log_every, self.checkpoint_every = train_steps, log_every, checkpoint_every
        self.eval_every, self.eval_data, self.eval_batches = eval_every, eval_data, eval_batches
        self.evaluators, self.seed, self.peak, self.stop = evaluators, seed, peak, stop
        self.eval_step = jax.jit(make_eval_step(graphdef, objective, batches.spec))
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.running: dict[str, Mean] | None = None
        self.config_recorded = config_recorded
        self.tokenizer = tokenizer
        self.skipped_total = 0
        self.dropped_total = 0

    # -- evaluation ---------------------------------------------------------------------------

    def _evaluate(self, step: int) -> dict[str, float | None]:
        results: dict[str, float | None] = {}
        if self.eval_data is not None:
            results.update(self._eval_loss())
        if self.evaluators:
            model = nnx.merge(self.graphdef, self.state.params)
            with jax.set_mesh(self.mesh):
                for evaluator in self.evaluators:
                    results.update(evaluator(model, step))
        return results

    def _eval_loss(self) -> dict[str, float | None]:
        data = self.eval_data(seed=self.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
        eval_batches = _Batches(data, self.objective, self.mesh, "eval_data")
        sums = None
        for index in range(self.eval_batches):
            try:
                batch = eval_batches.next(self.graphdef, self.state, index)
            except StopIteration:
                break
            with jax.set_mesh(self.mesh):
                out = self.eval_step(self.state, self.frozen, batch)
            sums = out if sums is None else _add_means(sums, out)
        return _fetch_means(sums) if sums is not None else {}

    # -- guards and logging ---------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Raises at the first step whose loss or gradient norm was not finite and whose update
        was applied; done before every save and log."""
        for step, out in jax.device_get(self.pending):
            if out["nonfinite"] and not out["skipped"]:
                loss = out["means"]["loss"]
                raise TrainingDivergedError(
                    f"at step {step} the loss is {float(loss.total) / max(float(loss.count), 1e-30):.6g} and "
                    f"the gradient norm {float(out['means']['grad_norm'].total):.6g}; stopping. The last "
                    "checkpoint before it is kept.")
            self.skipped_total = int(out["skipped_total"])
        if self.pending and self.skipped_total:
            logging.warning("%d non-finite updates skipped so far", self.skipped_total)
        self.pending.clear()

    def _save(self, step: int) -> None:
        self._check_finite()
        if not self.config_recorded:
            record_run_config(self.model_dir, self.config)
            if self.tokenizer is not None and jax.process_index() == 0:
                save_tokenizer(self.tokenizer, self.model_dir / TOKENIZER_DIR)
            self.config_recorded = True
        self.checkpointer.save(self.state, step=step, host_states=self.batches.host_states)

    def run(self) -> TrainResult:
        state_step = int(self.state.step)
        writer = MetricsWriter(self.model_dir, resume_step=state_step)
        progress = ProgressLine(self.train_steps)
        before: dict[str, float | None] = {}
        after: dict[str, float | None] = {}
        metrics: dict[str, float | None] = {}
        stopped_early = False
        step = state_step
        wants_eval = bool(self.evaluators) or self.eval_data is not None
        last_time, last_step = time.time(), step
        try:
            with jax.set_mesh(self.mesh):
                first = self.batches.next(self.graphdef, self.state, step) if step < self.train_steps else None
                if wants_eval and step == 0:
                    before = self._evaluate(0)
                    initial = _fetch_means(self.eval_step(self.state, self.frozen, first))
                    writer.write(0, {"loss": initial["loss"], **{f"eval/{k}": v for k, v in before.items()}})
                while step < self.train_steps:
                    batch = first if first is not None else self.batches.next(self.graphdef, self.state, step)
                    first = None
                    self.state, out = self.jitted_step(self.state, self.frozen, batch)
                    step += 1
                    self.pending.append((step, out))
                    self.running = out["means"] if self.running is None else _add_means(self.running, out["means"])
                    final = step == self.train_steps
                    eval_due = wants_eval and (final or bool(self.eval_every and step % self.eval_every == 0))
                    if step % self.log_every == 0 or final or eval_due:
                        self._check_finite()
                        now = time.time()
                        metrics = self._interval_metrics(step, (now - last_time) / max(step - last_step, 1))
                        last_time, last_step = now, step
                        if eval_due:
                            results = self._evaluate(step)
                            if final:
                                after = results
                            metrics.update({f"eval/{k}": v for k, v in results.items()})
                        writer.write(step, metrics)
                        progress.show(step, metrics)
                    if step % self.checkpoint_every == 0 or final:
                        self._save(step)
                    if not final and self.stop.should_stop(step):
                        if self.checkpointer.latest_step() != step:
                            self._save(step)
                        logging.warning("stop requested: saved step %d and stopping", step)
                        stopped_early = True
                        break
            self._check_finite()
        finally:
            self.checkpointer.close()
            writer.close()
            self.stop.close()
        return TrainResult(step, metrics, before, after, str(self.model_dir), str(self.model_dir / "checkpoints"),
                           stopped_early, self.skipped_total, self.dropped_total)

    def _interval_metrics(self, step: int, seconds_per_step: float) -> dict[str, float | None]:
        metrics = _fetch_means(self.running)
        self.running = None
        metrics["learning_rate"] = float(self.schedule(step - 1))
        metrics["skipped_updates"] = self.skipped_total
        self.dropped_total = self.batches.dropped_examples()
        metrics["dropped_examples"] = self.dropped_total
        metrics["seconds_per_step"] = seconds_per_step
        pop_metrics = getattr(self.batches.source, "pop_metrics", None)
        if pop_metrics is not None:  # a batch source's own metrics (RL: rollout time, filtered groups)
            metrics.update(pop_metrics())
        if "inputs" in self.batches.host_shapes:
            rows, seq = self.batches.global_shape("inputs")[:2]
            metrics["tokens_per_s"] = rows * seq / seconds_per_step
            if self.peak:
                flops_per_step = flops.training_flops_per_token(self.config, seq) * rows * seq
                metrics["mfu"] = flops_per_step / seconds_per_step / (self.peak * self.mesh.size)
        return metrics


def _compile_report(step_fn, tx, config: ModelConfig, mesh: Mesh, batches: _Batches, frozen: Any,
                    extra: Any, topology: str | None) -> dict[str, Any]:
    shardings = train_state_shardings(tx, config, mesh, extra)
    abstract_state = abstract_train_state(config, tx, shardings, extra)
    frozen_shardings = leaf_shardings(frozen, mesh)
    abstract_frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   frozen, frozen_shardings)
    start = time.time()
    with jax.set_mesh(mesh):
        jitted = jax.jit(step_fn, in_shardings=(shardings, frozen_shardings, batches.shardings),
                         out_shardings=(shardings, None), donate_argnums=0)
        compiled = jitted.lower(abstract_state, abstract_frozen, batches.abstract()).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rows, seq = batches.global_shape("inputs")[:2] if "inputs" in batches.host_shapes else (None, None)
    return {
        "platform": mesh.devices.flat[0].platform,
        "device_kind": mesh.devices.flat[0].device_kind,
        "topology": topology,
        "devices": mesh.size,
        "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "global_batch": rows,
        "seq_len": seq,
        "parameters": flops.count_params(config).total,
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "output_bytes_per_device": memory.output_size_in_bytes,
        "temp_bytes_per_device": memory.temp_size_in_bytes,
        "alias_bytes_per_device": memory.alias_size_in_bytes,
        "peak_bytes_per_device": memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes,
        # XLA counts a loop body once (the layer scan, the flash kernels' block loops): compare
        # like with like; the model's FLOPs per device (6N + attention, glmjax.flops) are absolute.
        "xla_flops_per_device": (cost or {}).get("flops"),
        "model_flops_per_device": None if seq is None
        else flops.training_flops_per_token(config, seq) * rows * seq / mesh.size,
        "compile_seconds": round(time.time() - start, 2),
    }
