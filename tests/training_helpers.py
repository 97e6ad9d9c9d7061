"""Shared pieces of the trainer tests: a tiny config, fixed-batch datasets with specs, a one-device
reference run of the step, and metrics.jsonl readers."""

from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np

from glmjax.data.spec import BatchSpec, lm_batch_spec, with_batch_spec
from glmjax.models import preset
from glmjax.sharding import make_mesh
from glmjax.training.optimizer import adamw, learning_rate_schedule
from glmjax.training.state import init_random_params, init_train_state, model_graph, train_state_shardings
from glmjax.training.step import make_train_step

CONFIG = preset("glm4-tiny").replace(vocab_size=384, num_heads=4, num_kv_heads=2)


def random_lm_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int, packed: bool) -> dict:
    """An LM batch: packed rows hold 2-3 documents; unpacked rows one document then padding.
    The first 3 targets of every document are masked out (a prompt)."""
    ids = rng.integers(2, vocab, (rows, seq + 1), dtype=np.int32)
    segment_ids = np.zeros((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    for row in range(rows):
        if packed:
            cuts = sorted(rng.choice(np.arange(6, seq - 6), size=int(rng.integers(1, 3)), replace=False))
            bounds = [0, *cuts, seq - int(rng.integers(0, 4))]
        else:
            bounds = [0, int(rng.integers(seq // 2, seq + 1))]
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            segment_ids[row, start:stop] = index + 1
            positions[row, start:stop] = np.arange(stop - start)
    loss_mask = ((segment_ids > 0) & (positions >= 3)).astype(np.int32)
    return {"inputs": ids[:, :-1] * (segment_ids > 0), "targets": ids[:, 1:] * (segment_ids > 0),
            "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def fixed_batches_factory(batches: list[dict], spec: BatchSpec | None = None):
    """A data factory cycling over ``batches`` (checkpointable iterator), carrying ``spec``."""

    def factory(seed: int, process_index: int, process_count: int):
        del seed
        rows = batches[0]["inputs"].shape[0] // process_count

        def local(batch):
            return {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}

        dataset = grain.MapDataset.source(batches).map(local).repeat().to_iter_dataset()
        return with_batch_spec(dataset, spec or lm_batch_spec())

    return factory


def reference_losses(objective, batches: list[dict], spec: BatchSpec, *, seed: int, train_steps: int,
                     num_microbatches: int = 1, config=CONFIG) -> list[float]:
    """Per-step losses of the plain step on ONE device (no trainer, no sharding)."""
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    schedule = learning_rate_schedule(train_steps)
    tx = adamw(schedule)
    shardings = train_state_shardings(tx, config, mesh)
    params = init_random_params(config, mesh, seed, shardings.params)
    state = init_train_state(config, tx, mesh, seed, shardings, params, None, donate=True)
    graphdef, _ = model_graph(config)
    step = jax.jit(make_train_step(graphdef, objective, tx, schedule, spec, num_microbatches=num_microbatches))
    losses = []
    for index in range(train_steps):
        batch = jax.device_put(batches[index % len(batches)], jax.devices()[0])
        state, out = step(state, None, batch)
        losses.append(float(out["means"]["loss"].value()))
    return losses


def metric_rows(model_dir) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses_by_step(model_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metric_rows(model_dir) if row["step"] > 0}


def tiny_run_dir(root):
    """What launch.train leaves in MODEL_DIR for a tiny random GLM-4 (``model_config.json``, a
    step-1 checkpoint, the tokenizer), under ``root / "run"``; returns (run dir, tokenizer)."""
    import optax
    from flax import nnx

    from glmjax.data.tokenizer import default_tokenizer, save_tokenizer
    from glmjax.models import create_model
    from glmjax.training.checkpointing import Checkpointer
    from glmjax.training.run_config import record_run_config
    from glmjax.training.state import fresh_train_state

    tokenizer = default_tokenizer(root / "tokenizers")
    config = preset("glm4-tiny").replace(hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1,
                                         head_dim=32, max_position_embeddings=2048)
    model = create_model(config, seed=0)
    run = root / "run"
    record_run_config(str(run), model.config)
    checkpointer = Checkpointer(str(run / "checkpoints"))
    checkpointer.save(fresh_train_state(model.config, optax.adamw(1e-3), 0,
                                        nnx.to_pure_dict(nnx.state(model, nnx.Param))), step=1)
    checkpointer.close()
    save_tokenizer(tokenizer, run / "tokenizer")
    return run, tokenizer
