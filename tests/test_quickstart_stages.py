"""The main job (configs/quickstart.gin) end to end at a tiny size: SFT -> RL -> inference scaling,
one JSON line per stage, the plot written, and a rerun that reports the finished stages without
running them again."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path):
    root = tmp_path / "job"
    return [
        "--gin_file=configs/quickstart.gin",
        f"--gin.MODEL_DIR='{root}'",
        f"--gin.DATA_DIR='{tmp_path / 'data'}'",
        f"--gin.SFT_DIR='{root / 'sft'}'",
        f"--gin.RL_DIR='{root / 'rl'}'",
        f"--gin.run_stages.results_path='{root / 'stages.json'}'",
        f"--gin.InferenceScalingStage.output_dir='{root / 'scaling'}'",
        "--gin.TRAIN_STEPS=4",
        "--gin.RL_STEPS=2",
        "--gin.SEQ_LEN=64",
        "--gin.BATCH=8",
        "--gin.PROMPTS_PER_STEP=2",
        "--gin.SAMPLES_PER_PROMPT=4",
        "--gin.MAX_NEW_TOKENS=16",
        "--gin.preset.hidden_size=64",
        "--gin.preset.intermediate_size=128",
        "--gin.preset.num_layers=2",
        "--gin.preset.num_heads=4",
        "--gin.train.log_every=2",
        "--gin.train.checkpoint_every=2",
        "--gin.sft/train.eval_data=None",
        "--gin.ArithmeticExactMatch.max_problems=8",
        "--gin.ArithmeticExactMatch.max_new_tokens=16",
        "--gin.synthetic_arithmetic_file.num_train=200",
        "--gin.synthetic_arithmetic_file.num_eval=20",
        "--gin.InferenceScalingStage.budgets=(4, 8)",
        "--gin.InferenceScalingStage.num_samples=2",
        "--gin.InferenceScalingStage.max_problems=4",
        f"--gin.tokenizer.cache_dir='{tmp_path / 'tokenizer'}'",
    ]


def _run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    process = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_quickstart_stages_run_and_resume(tmp_path):
    results = _run(_args(tmp_path))
    assert [r["stage"] for r in results] == ["sft", "rl", "scaling"]
    sft, rl, scaling = results
    assert sft["step"] == 4 and rl["step"] == 2
    for stage in (sft, rl):
        assert 0.0 <= stage["after"]["exact_match"] <= 1.0
    # RL starts from the SFT model: its "before" is the SFT model's "after".
    assert rl["before"]["exact_match"] == pytest.approx(sft["after"]["exact_match"])
    assert set(scaling["pass_at_1"]) == {"SFT step 4", "RL step 2"}
    assert set(scaling["pass_at_1"]["SFT step 4"]) == {"4", "8"}
    with open(scaling["files"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    again = _run(_args(tmp_path))
    assert again == results
