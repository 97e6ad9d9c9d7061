"""APFed parties as separate processes over gRPC on loopback: a two-process run, prediction with
the passive process stopped, a passive process killed mid-training (both on_passive_loss
policies) and resume after a restart. CLI errors: test_apfed_cli.py."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from glmjax.federated.checkpoints import read_party_checkpoint_meta
from glmjax.federated.data import builtin_party
from glmjax.federated.grpc_channel import GrpcPassiveChannel
from glmjax.federated.training import ActiveConfig, train_active

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--gin.ActiveConfig.epochs=2", "--gin.ActiveConfig.batch_size=256", "--gin.ActiveConfig.checkpoint_every=4",
         "--gin.ActiveConfig.encoder_hidden=(32,)", "--gin.PassiveConfig.hidden=(16,)",
         "--gin.party_optimizer.learning_rate=0.02"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cli(role, *args):
    return [sys.executable, "-m", "launch.apfed", f"--role={role}", *args]


def _start_passive(ckpt, view=1, gin_file="configs/apfed/digits_r.gin", extra=()):
    """Starts a passive party on a free port; returns (process, address)."""
    process = subprocess.Popen(
        _cli("passive", f"--gin_file={gin_file}", f"--gin.passive/party_data.view={view}",
             f"--gin.PassiveConfig.name='view{view}'", f"--gin.PassiveConfig.checkpoint_dir='{ckpt}'",
             "--address=127.0.0.1:0", "--idle_timeout_s=120", *SMALL, *extra),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line:
        process.wait(30)
        raise AssertionError(f"passive did not start: {process.stderr.read()[-3000:]}")
    return process, json.loads(line)["address"]


@pytest.mark.slow  # three process start-ups: ~60 s on 2 shared cores
def test_two_processes_then_active_alone_prediction(tmp_path):
    ckpt = tmp_path / "ckpt"
    passive, address = _start_passive(ckpt)
    try:
        active = subprocess.run(
            _cli("active", "--gin_file=configs/apfed/digits_r.gin", f"--gin.ActiveConfig.checkpoint_dir='{ckpt}'",
                 f"--passive=view1={address}", *SMALL),
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert active.returncode == 0, active.stderr[-3000:]
        summary = json.loads(active.stdout.strip().splitlines()[-1])
        assert summary["step"] == summary["total_steps"] == 10 and summary["lost"] == []
        assert summary["test_accuracy"] > 0.3 and np.isfinite(summary["passive_losses"]["view1"])
        out, err = passive.communicate(timeout=60)
        assert passive.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"role": "passive", "name": "view1", "outcome": "finished"}
    finally:
        if passive.poll() is None:
            passive.kill()
    assert read_party_checkpoint_meta(str(ckpt / "view1.npz"))["step"] == 10
    # every passive process is gone now: the active party predicts alone
    predictions = tmp_path / "pred.csv"
    done = subprocess.run(
        _cli("predict", "--gin_file=configs/apfed/digits_r.gin", f"--gin.ActiveConfig.checkpoint_dir='{ckpt}'",
             f"--predictions_out={predictions}", *SMALL),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 1797 and result["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    with open(predictions) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "prediction"] and len(rows) == 1798 and rows[1][0] == "digits-00000"
    assert {int(r[1]) for r in rows[1:]} <= set(range(10))


def _active_config(ckpt, policy):
    return ActiveConfig(variant="R", encoder_hidden=(32,), rep_dim=32, epochs=4, batch_size=256,
                        checkpoint_dir=str(ckpt), checkpoint_every=4, on_passive_loss=policy)


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_passive_process_killed_mid_training(tmp_path, policy):
    ckpt = tmp_path / "ckpt"
    passive, address = _start_passive(ckpt)
    data = builtin_party("digits", 0, 3, with_labels=True)
    channel = GrpcPassiveChannel("view1", address, timeout_s=20.0)

    def kill_at_6(step):
        if step == 6:
            passive.kill()
            passive.wait(30)

    try:
        result = train_active(data, [channel], _active_config(ckpt, policy), on_step=kill_at_6)
    finally:
        channel.close()
        if passive.poll() is None:
            passive.kill()
    assert result.lost == ["view1"]
    loss_lines = [e for e in result.events if "lost at step 6" in e]
    assert len(loss_lines) == 1 and "UNAVAILABLE" in loss_lines[0]
    assert read_party_checkpoint_meta(str(ckpt / "view1.npz"))["step"] == 4  # its last save before the kill
    if policy == "continue":
        assert result.stopped is None and result.step == result.total_steps == 20
        assert "on_passive_loss=continue: training continues without it" in loss_lines[0]
        assert read_party_checkpoint_meta(str(ckpt / "active.npz"))["step"] == 20
        return
    assert result.stopped == "passive_lost" and result.step == 6
    assert "on_passive_loss=stop: saving a checkpoint at step 6 and stopping" in loss_lines[0]
    assert read_party_checkpoint_meta(str(ckpt / "active.npz"))["step"] == 6
    # restart both: the passive restores its step-4 modules, the active resumes at step 6
    passive, address = _start_passive(ckpt)
    channel = GrpcPassiveChannel("view1", address, timeout_s=20.0)
    try:
        resumed = train_active(data, [channel], _active_config(ckpt, policy))
        assert passive.wait(60) == 0
    finally:
        channel.close()
        if passive.poll() is None:
            passive.kill()
    assert resumed.resumed_from == 6 and resumed.step == 20 and resumed.lost == [] and resumed.stopped is None
    assert "active: passive party 'view1' joined (its restored step 4)" in resumed.events
    assert read_party_checkpoint_meta(str(ckpt / "view1.npz"))["step"] == 20
