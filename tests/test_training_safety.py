"""Run safety: function-changing config fields refused, model_config.json at the first save, URL
paths stay URLs, stop requests off the main thread and across processes, the precision policy,
per-document averaging, and the metrics.jsonl / TensorBoard contract."""

import json
import os
import shutil
import struct
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

import glmjax
from glmjax.checkpoints import CheckpointError
from glmjax.data.spec import lm_batch_spec, with_batch_spec
from glmjax.models import create_model
from glmjax.objectives.lm import segment_token_weights
from glmjax.training import preemption
from glmjax.training.metrics import MetricsWriter
from glmjax.training.optimizer import adamw
from glmjax.training.run_config import record_run_config
from glmjax.training.trainer import train
from training_helpers import CONFIG, fixed_batches_factory, metric_rows, random_lm_batch


def _batches(count=2):
    rng = np.random.default_rng(9)
    return [random_lm_batch(rng, 8, 32, CONFIG.vocab_size, packed=True) for _ in range(count)]


def _run(model_dir, steps=2, config=CONFIG, **kwargs):
    args = dict(model_dir=str(model_dir), model_config=config, train_data=fixed_batches_factory(_batches()),
                train_steps=steps, log_every=1, checkpoint_every=2, mesh_shape=(-1, 1, 1, 1))
    args.update(kwargs)
    return train(**args)


# -- configs that change the function ----------------------------------------------------------

def test_initial_checkpoint_with_another_rope_theta_is_refused(tmp_path):
    glmjax.save_pretrained(create_model(CONFIG.replace(rope_theta=5e6), seed=1), str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"hf: the initial checkpoint and the run's model config differ "
                                              r"\(rope_theta: 5000000.0 vs 10000.0"):
        _run(tmp_path / "run", init_from_hf=str(tmp_path / "hf"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_starts_from_another_runs_newest_checkpoint(tmp_path):
    from flax import nnx

    from glmjax.checkpoints.training_runs import load_trained_model
    from glmjax.training.initial_params import InitialParams
    from glmjax.sharding import make_mesh
    from glmjax.training.state import model_graph

    _run(tmp_path / "sft")
    expected = nnx.to_pure_dict(nnx.state(load_trained_model(tmp_path / "sft"), nnx.Param))
    mesh = make_mesh((-1, 1, 1, 1))
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                             model_graph(CONFIG)[1])
    initial = InitialParams(CONFIG, mesh, shardings, seed=0, run_dir=str(tmp_path / "sft"))()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(initial), jax.device_get(expected))
    with pytest.raises(ValueError, match="at most one of train.init_from_hf, train.init_from_orbax and "
                                         "train.init_from_run"):
        InitialParams(CONFIG, mesh, shardings, 0, orbax_dir="x", run_dir=str(tmp_path / "sft"))
    result = _run(tmp_path / "dpo", steps=1, init_from_run=str(tmp_path / "sft"), checkpoint_every=1)
    assert result.step == 1


def test_resume_refuses_another_function_but_allows_runtime_changes(tmp_path):
    _run(tmp_path / "run")
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    gin_config = (tmp_path / "run" / "config.gin").read_text()
    with pytest.raises(CheckpointError, match=r"model_config.json: the recorded run and the run's model config "
                                              r"differ \(rms_norm_eps: 1.5625e-07 vs 1e-05"):
        _run(tmp_path / "run", steps=3, config=CONFIG.replace(rms_norm_eps=1e-5))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before
    assert (tmp_path / "run" / "config.gin").read_text() == gin_config
    result = _run(tmp_path / "run", steps=3, config=CONFIG.replace(attention_backend="blockwise",
                                                                      compute_dtype="bfloat16"))
    assert result.step == 3


class _Crash(RuntimeError):
    pass


def test_model_config_is_recorded_at_the_first_save(tmp_path):
    batches = _batches(1)

    def crashing(seed, process_index, process_count):
        def read(index):
            if index == 2:
                raise _Crash("data went away")
            return batches[0]
        return with_batch_spec(grain.MapDataset.range(10).map(read).to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)), lm_batch_spec())

    with pytest.raises(_Crash):
        _run(tmp_path / "run", steps=4, checkpoint_every=3, train_data=crashing)
    assert not (tmp_path / "run" / "model_config.json").exists()
    # Nothing was saved, so the run can start again with a corrected model config.
    corrected = CONFIG.replace(hidden_size=64)
    _run(tmp_path / "run", steps=2, config=corrected)
    recorded = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert recorded["hidden_size"] == 64


# -- URLs ------------------------------------------------------------------------------------------

def test_url_model_dir_paths_stay_urls(tmp_path):
    """MODEL_DIR files written through epath: a gs:// path is never made local."""
    touched = []

    def local(path):
        path = str(path)
        if path.startswith(str(tmp_path)):  # epath's own nested calls, already mapped
            return path
        touched.append(path)
        assert path.startswith("gs://bucket/"), path
        return str(tmp_path / path[len("gs://"):])

    def mocked(name):
        def fn(original, path, *args, **kwargs):
            return original(local(path), *args, **kwargs)
        return fn

    def rename(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    with epath.testing.mock_epath(open=mocked("open"), exists=mocked("exists"), mkdir=mocked("mkdir"),
                                  makedirs=mocked("makedirs"), rename=rename, replace=rename):
        record_run_config("gs://bucket/run", CONFIG)
        writer = MetricsWriter("gs://bucket/run", tensorboard=False)
        writer.write(1, {"loss": 2.0})
        writer.write(2, {"loss": 1.5})
    assert touched and not os.path.exists("gs:")
    assert json.loads((tmp_path / "bucket" / "run" / "model_config.json").read_text())["hidden_size"] == 128
    rows = (tmp_path / "bucket" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r) for r in rows] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


# -- stopping --------------------------------------------------------------------------------------

def test_train_off_the_main_thread_stops_on_its_event(tmp_path):
    stop, results = threading.Event(), []
    stop.set()  # asked to stop before it starts: it trains one step, saves, and returns
    thread = threading.Thread(target=lambda: results.append(
        _run(tmp_path / "run", steps=50, stop_event=stop)))
    thread.start()
    thread.join(timeout=300)
    assert results and results[0].stopped_early and results[0].step == 1
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["1"]


def test_multi_process_stop_requests_are_agreed_every_n_steps(monkeypatch):
    gathers = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption.multihost_utils, "process_allgather",
                        lambda x: gathers.append(int(x[0])) or np.array([[0], [1]]))
    request = preemption.StopRequest(sync_every=10)
    try:
        decisions = [request.should_stop(step) for step in range(1, 25)]
    finally:
        request.close()
    assert len(gathers) == 2 and decisions.count(True) == 2 and decisions[9] and decisions[19]


# -- precision -------------------------------------------------------------------------------------

def test_pure_bf16_parameters_need_an_explicit_moment_dtype():
    schedule = optax.constant_schedule(1e-3)
    with pytest.raises(ValueError, match="need adamw.moment_dtype set explicitly"):
        adamw(schedule, param_dtype="bfloat16")
    params = {"kernel": jnp.ones((4, 4), jnp.bfloat16), "scale": jnp.ones((4,), jnp.bfloat16)}
    for moment_dtype in ("float32", "bfloat16"):
        tx = adamw(schedule, param_dtype="bfloat16", moment_dtype=moment_dtype)
        state = tx.init(params)
        moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (4, 4)]
        assert moments and all(m.dtype == jnp.dtype(moment_dtype) for m in moments)
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    from glmjax.checkpoints.training_runs import load_trained_model

    _run(tmp_path / "run", steps=1, config=CONFIG.replace(compute_dtype="bfloat16"))
    from flax import nnx

    params = jax.tree.leaves(nnx.state(load_trained_model(str(tmp_path / "run")), nnx.Param))
    assert {x.dtype for x in params} == {jnp.dtype("float32")}


# -- per-document averaging -----------------------------------------------------------------------

def test_sequence_averaging_weights_each_packed_document_equally():
    mask = np.array([[0, 1, 1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]], np.float32)
    segments = np.array([[1, 1, 1, 2, 2, 3, 3, 0], [1, 1, 2, 2, 0, 0, 0, 0]], np.int32)
    weights, documents = segment_token_weights(jnp.asarray(mask), jnp.asarray(segments))
    # Row 0: document 1 has 2 loss tokens, document 2 has 2, document 3 has 1; row 1: document 1
    # has 2, document 2 has none (skipped).
    expected = np.array([[0, 1 / 2, 1 / 2, 1 / 2, 1 / 2, 0, 1, 0], [1 / 2, 1 / 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-6)
    assert float(documents) == 4
    row_weights, rows = segment_token_weights(jnp.asarray(mask), None)
    np.testing.assert_allclose(np.asarray(row_weights).sum(-1), [1, 1], rtol=1e-6)
    assert float(rows) == 2


# -- metrics.jsonl and TensorBoard -----------------------------------------------------------------

def _event_file_records(path):
    """(step, is-a-start-marker) of every event in a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    records, data = [], open(path, "rb").read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        records.append((event.step, event.HasField("session_log") and event.session_log.status == 1))
        offset += 12 + length + 4
    return records


def test_metrics_rows_have_step_and_loss_once_and_resume_drops_later_rows(tmp_path):
    def evaluator(model, step):
        return {"custom": float(step)}

    model_dir = tmp_path / "run"
    _run(model_dir, steps=4, log_every=1, checkpoint_every=2, evaluators=[evaluator], eval_every=2)
    rows = metric_rows(model_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(isinstance(r["loss"], float) for r in rows)
    assert [r.get("eval/custom") for r in rows] == [0.0, None, 2.0, None, 4.0]
    # The interrupted run's rows and events past its last checkpoint are dropped on resume.
    shutil.rmtree(model_dir / "checkpoints" / "4")
    _run(model_dir, steps=4, log_every=1, checkpoint_every=2, evaluators=[evaluator], eval_every=2)
    assert [r["step"] for r in metric_rows(model_dir)] == [0, 1, 2, 3, 4]
    event_files = sorted((model_dir / "tensorboard").iterdir(), key=os.path.getmtime)
    assert len(event_files) == 2
    assert (3, True) in _event_file_records(event_files[-1])  # purge marker: TensorBoard drops steps >= 3
