"""The LongWriter SFT configs (configs/longwriter/): the recipe's settings, a one-line error while
the user's macros are unset, and a short run of each loss averaging on packed AgentWrite records
through launch.train, shrunk to a tiny model."""

import json
import os
import subprocess
import sys

import gin
import pytest

from glmjax import configurables  # noqa: F401  (registers what the gin files name)
from launch.train import parse_gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _value(binding):
    """A gin parameter's value, through a %MACRO when it is bound to one."""
    value = gin.query_parameter(binding)
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        return gin.query_parameter(f"%{value.scoped_selector.split('/')[0]}")
    return value


@pytest.mark.parametrize("extra, averaging", [([], "token"), (["configs/longwriter/longalign.gin"], "sequence")])
def test_the_recipe(clean_gin, extra, averaging):
    parse_gin(["configs/longwriter/sft.gin", *extra],
              ["SFT_FILES = ['sft.jsonl']", "INIT_FROM_HF = '/ckpt/glm-4-9b'"])
    assert gin.query_parameter("LMObjective.averaging") == averaging
    assert gin.query_parameter("preset.name") == "glm4-9b"
    assert (_value("lm_data.seq_len"), _value("lm_data.global_batch_size")) == (32768, 8)
    assert gin.query_parameter("lm_data.packing") is True and gin.query_parameter("lm_data.overlong") == "drop"
    assert gin.query_parameter("learning_rate_schedule.peak") == 1e-5
    assert gin.query_parameter("learning_rate_schedule.kind") == "cosine"
    assert (gin.query_parameter("adamw.b1"), gin.query_parameter("adamw.b2"),
            gin.query_parameter("adamw.weight_decay")) == (0.9, 0.95, 0.1)
    assert gin.query_parameter("learning_rate_schedule.warmup_steps") == 0.03 * _value("train.train_steps")


def _train(args, timeout=300):
    process = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=timeout)
    return process.returncode, process.stdout, process.stderr


def test_unset_macros_are_a_one_line_error(tmp_path):
    code, _, stderr = _train(["--gin_file=configs/longwriter/sft.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
                              "--gin.INIT_FROM_HF='/ckpt/glm-4-9b'"])
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("train: gin config error: macro SFT_FILES is used but not set: "
                                              "bind it in a gin file or give --gin.SFT_FILES=VALUE")
    assert not (tmp_path / "run").exists()


def _records(path):
    """Chat records of very different response lengths, as AgentWrite's sft.jsonl beside short SFT data."""
    rows = [{"messages": [{"role": "user", "content": f"Write {n} words on topic {i}."},
                          {"role": "assistant", "content": " ".join(f"w{(i * 7 + k) % 50}" for k in range(n))}]}
            for i, n in enumerate([3, 90, 4, 60, 2, 120, 5, 40])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_token_and_sequence_averaging_train_on_packed_rows(tmp_path):
    data = _records(tmp_path / "sft.jsonl")
    summaries = {}
    for name, extra in (("token", []), ("sequence", ["--gin_file=configs/longwriter/longalign.gin"])):
        code, stdout, stderr = _train([
            "--gin_file=configs/longwriter/sft.gin", *extra,
            f"--gin.MODEL_DIR='{tmp_path / name}'", f"--gin.SFT_FILES=['{data}']", "--gin.INIT_FROM_HF=None",
            "--gin.preset.name='glm4-tiny'", "--gin.preset.attention_backend='blockwise'",
            "--gin.preset.compute_dtype='float32'", "--gin.preset.remat_policy='none'",
            "--gin.SEQ_LEN=256", "--gin.BATCH=2", "--gin.TRAIN_STEPS=2", "--gin.learning_rate_schedule.warmup_steps=0",
            "--gin.train.log_every=1", "--gin.train.checkpoint_every=2", f"--gin.tokenizer.cache_dir='{tmp_path / 'tok'}'"])
        assert code == 0, stderr[-3000:]
        summaries[name] = json.loads(stdout.strip().splitlines()[-1])
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        summaries[name]["first_loss"] = next(row["loss"] for row in rows if row.get("step") == 1)
    # Same weights, same packed rows at step 1: only the averaging differs, so the losses do.
    assert summaries["token"]["step"] == summaries["sequence"]["step"] == 2
    assert abs(summaries["token"]["first_loss"] - summaries["sequence"]["first_loss"]) > 1e-4
