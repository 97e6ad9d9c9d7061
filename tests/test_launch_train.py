"""launch.train end to end: resume after a kill, SIGTERM, two processes, bad configs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bindings(tmp_path, model_dir, steps=8, extra=()):
    return [
        "--gin_file=configs/arithmetic_sft.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.DATA_DIR='{tmp_path / 'data'}'",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.SEQ_LEN=64",
        "--gin.BATCH=8",
        "--gin.preset.hidden_size=64",
        "--gin.preset.intermediate_size=128",
        "--gin.preset.num_layers=2",
        "--gin.preset.num_heads=4",
        "--gin.train.log_every=1",
        "--gin.train.checkpoint_every=3",
        "--gin.train.eval_data=None",
        "--gin.train.evaluators=[]",
        "--gin.synthetic_arithmetic_file.num_train=400",
        "--gin.synthetic_arithmetic_file.num_eval=20",
        f"--gin.tokenizer.cache_dir='{tmp_path / 'tokenizer'}'",
        "--gin.lm_data.num_data_shards=2",
        "--gin.lm_data.overlong='window'",
        *extra,
    ]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _start(args, devices=8, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _run(args, devices=8, timeout=300):
    process = _start(args, devices)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _wait_for_step(model_dir, step, process, timeout=240):
    deadline = time.time() + timeout
    path = os.path.join(model_dir, "metrics.jsonl")
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        if os.path.exists(path) and max(_losses(model_dir), default=0) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    model_dir = tmp_path / "full"
    code, stdout, stderr = _run(_bindings(tmp_path, model_dir))
    assert code == 0, stderr[-3000:]
    return tmp_path, model_dir, json.loads(stdout.strip().splitlines()[-1])


def test_run_writes_metrics_config_and_summary(uninterrupted):
    _, model_dir, summary = uninterrupted
    assert summary["step"] == 8 and np.isfinite(summary["loss"])
    assert sorted(_losses(model_dir)) == list(range(1, 9))
    config = (model_dir / "config.gin").read_text()
    assert "TRAIN_STEPS = 8" in config and "preset.hidden_size = 64" in config
    assert os.listdir(model_dir / "tensorboard")
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["3", "6", "8"]
    assert (model_dir / "tokenizer" / "tokenizer.json").is_file()  # train.tokenizer: generation finds it


def test_resume_after_kill_matches_uninterrupted(uninterrupted):
    tmp_path, full_dir, _ = uninterrupted
    model_dir = tmp_path / "killed"
    process = _start(_bindings(tmp_path, model_dir))
    _wait_for_step(model_dir, 5, process)
    process.kill()
    process.wait()
    code, _, stderr = _run(_bindings(tmp_path, model_dir))
    assert code == 0, stderr[-3000:]
    resumed, full = _losses(model_dir), _losses(full_dir)
    assert sorted(resumed) == list(range(1, 9))
    np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [full[s] for s in range(1, 9)], rtol=1e-6)


def test_sigterm_saves_and_exits_cleanly(uninterrupted):
    tmp_path, _, _ = uninterrupted
    model_dir = tmp_path / "term"
    process = _start(_bindings(tmp_path, model_dir, steps=200))
    _wait_for_step(model_dir, 4, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_early"] and 4 <= summary["step"] < 200
    assert str(summary["step"]) in os.listdir(model_dir / "checkpoints")


def test_two_processes_match_one(uninterrupted):
    tmp_path, full_dir, _ = uninterrupted
    model_dir = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [
        _start([*_bindings(tmp_path, model_dir), f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", f"--process_id={i}"], devices=4)
        for i in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    two, one = _losses(model_dir), _losses(full_dir)
    np.testing.assert_allclose([two[s] for s in range(1, 9)], [one[s] for s in range(1, 9)], rtol=1e-5)


def test_unknown_gin_binding_is_a_clear_error(tmp_path):
    code, _, stderr = _run(_bindings(tmp_path, tmp_path / "bad", extra=["--gin.train.no_such_param=1"]))
    assert code != 0 and "no_such_param" in stderr and "gin config error" in stderr
    assert not (tmp_path / "bad").exists()


def test_mesh_shape_mismatch_is_a_clear_error(tmp_path):
    code, _, stderr = _run(_bindings(tmp_path, tmp_path / "bad", extra=["--gin.MESH_SHAPE=(3, 1, 1, 1)"]))
    assert code != 0 and "MESH_SHAPE (3, 1, 1, 1) needs 3 devices but 8 are available" in stderr


def test_refused_config_leaves_the_run_untouched(uninterrupted, tmp_path):
    run_tmp, model_dir, _ = uninterrupted
    before = {name: (model_dir / name).read_bytes() for name in ("config.gin", "model_config.json", "metrics.jsonl")}
    code, _, stderr = _run(_bindings(run_tmp, model_dir, extra=["--gin.preset.rms_norm_eps=1e-5"]))
    assert code == 2 and "rms_norm_eps" in stderr and "Traceback" not in stderr
    assert {name: (model_dir / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["3", "6", "8"]


def test_malformed_gin_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.seed = 1\ntrain.log_every = (1,\n")
    code, _, stderr = _run([*_bindings(tmp_path, tmp_path / "bad"), f"--gin_file={bad}"])
    assert code == 2 and f"{bad}: line 3: EOF in multi-line statement" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "bad").exists()


def test_nonpositive_train_steps_is_a_one_line_error(tmp_path):
    code, _, stderr = _run(_bindings(tmp_path, tmp_path / "bad", steps=-5))
    assert code == 2 and "train: train.train_steps=-5: must be an integer >= 1" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "bad").exists()
