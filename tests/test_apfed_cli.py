"""launch.apfed command-line errors (one line, exit 2: id mismatch on both parties, bad CSV,
bad config, unreachable passive party) and the experiment role's table."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cli(role, *args):
    return [sys.executable, "-m", "launch.apfed", f"--role={role}", *args]


def _apfed_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("apfed:")]


def test_cli_id_mismatch_exits_2_with_one_line_on_both_sides(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.arange(100)
    np.savez(tmp_path / "active.npz", id=ids, x=rng.normal(size=(100, 4)), y=rng.integers(0, 3, 100))
    np.savez(tmp_path / "passive.npz", id=np.concatenate([ids[:97], [500, 501]]), x=rng.normal(size=(99, 3)))
    files = ["--gin_file=configs/apfed/digits_r.gin", "--gin.party_data.dataset=None",
             f"--gin.active/party_data.path='{tmp_path / 'active.npz'}'", "--gin.active/party_data.label_column='y'",
             f"--gin.passive/party_data.path='{tmp_path / 'passive.npz'}'",
             f"--gin.ActiveConfig.checkpoint_dir='{tmp_path / 'ckpt'}'", "--gin.ActiveConfig.batch_size=16"]
    passive = subprocess.Popen(_cli("passive", *files, f"--gin.PassiveConfig.checkpoint_dir='{tmp_path / 'ckpt'}'"),
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = json.loads(passive.stdout.readline())["address"]
        active = subprocess.run(_cli("active", *files, f"--passive=view1={address}"), cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=120)
        _, passive_err = passive.communicate(timeout=60)
    finally:
        if passive.poll() is None:
            passive.kill()
    want = ("sample ids differ between the active party (100 ids) and passive party 'view1' (99 ids): 3 only in the "
            "active party (e.g. ['97', '98', '99']), 2 only in passive party 'view1' (e.g. ['500', '501'])")
    assert active.returncode == 2 and _apfed_lines(active.stderr) == [f"apfed: {want}"], active.stderr[-2000:]
    assert passive.returncode == 2 and _apfed_lines(passive_err) == [f"apfed: {want}"], passive_err[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--gin.party_data.dataset=None", "--gin.active/party_data.path='{bad}'"],
     "apfed: {bad}, line 3, column 'f2': 'x' is not a number"),
    (["--gin.ActiveConfig.on_passive_loss='later'"],
     "apfed: ActiveConfig.on_passive_loss='later': expected one of ('continue', 'stop')"),
    (["--passive=view1"], "apfed: --passive='view1': expected NAME=HOST:PORT"),
    (["--passive=view1=127.0.0.1:9", "--gin.GrpcPassiveChannel.connect_timeout_s=1.0"],
     "apfed: passive party 'view1' unavailable: DEADLINE_EXCEEDED at 127.0.0.1:9"),
    (["--gin.NoSuchThing.x=1"], "apfed: gin config error: binding 'NoSuchThing.x = 1'"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,f1,f2,label\n1,0.5,1,0\n2,0.1,x,1\n")
    args = [a.format(bad=bad) for a in args]
    done = subprocess.run(_cli("active", "--gin_file=configs/apfed/digits_r.gin", *args), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    lines = _apfed_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(message.format(bad=bad)), lines[0]


def test_passive_without_calls_exits_4_after_its_idle_timeout():
    done = subprocess.run(_cli("passive", "--gin_file=configs/apfed/digits_r.gin", "--idle_timeout_s=1"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[0])["name"] == "view1"
    assert _apfed_lines(done.stderr) == ["apfed: passive view1: no call for 1 s, exiting"]


def test_passive_stops_on_sigterm():
    passive = subprocess.Popen(_cli("passive", "--gin_file=configs/apfed/digits_r.gin"), cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(passive.stdout.readline())["address"].startswith("127.0.0.1:")
        passive.send_signal(signal.SIGTERM)
        out, err = passive.communicate(timeout=30)
    finally:
        if passive.poll() is None:
            passive.kill()
    assert passive.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["outcome"] == "terminated"


@pytest.mark.slow  # six short trainings in one process: ~30-60 s on 2 shared cores
def test_experiment_role_prints_the_table():
    done = subprocess.run(
        _cli("experiment", "--gin_file=configs/apfed/experiments.gin", "--gin.apfed_experiments.sweeps=['breast_cancer']",
             "--gin.apfed_sweep.seeds=[0, 1]", "--gin.apfed_sweep.trade_offs=[0.0, 1.0]",
             "--gin.breast_cancer/ActiveConfig.epochs=2"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("breast_cancer, 3 views, active view 1, test accuracy % (mean ± std over seeds [0, 1])")
    assert lines[2:4] == ["| variant | λ=0 | λ=1 |", "|---|---|---|"]
    rows = [line.split(" | ") for line in lines[4:6]]
    assert [r[0] for r in rows] == ["| APFed-R", "| APFed-C"]
    assert rows[0][1] == rows[1][1]  # lambda = 0 is one active-alone baseline for both variants
    for row in rows:
        for cell in row[1:]:
            mean, std = (float(v) for v in cell.strip(" |").split(" ± "))
            assert 30.0 < mean <= 100.0 and 0.0 <= std < 30.0
