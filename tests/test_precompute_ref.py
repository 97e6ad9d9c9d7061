"""launch.precompute_ref: reference log-probs equal the in-process ones, a killed run resumes to the
same file, foreign outputs and malformed records are one-line errors, and training on the stored
log-probs equals training against the live reference."""

import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.checkpoints.orbax_io import save_model
from glmjax.data.pairs import PairEncoder, pair_data, pair_rows, write_arithmetic_pairs_jsonl
from glmjax.data.synthetic import ArithmeticConfig
from glmjax.data.tokenizer import default_tokenizer
from glmjax.models import create_model
from glmjax.objectives.dpo import DPOObjective
from glmjax.training.trainer import train
from training_helpers import CONFIG, metric_rows

SEQ = 64
# Up to two operations: some pairs exceed 64 positions and are written without log-probs.
SMALL = ArithmeticConfig(min_ops=1, max_ops=2, max_operand=9, max_factor=5, max_value=60, error_rate=0.2)
REPO = os.path.dirname(os.path.dirname(glmjax.__file__))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    tokenizer = default_tokenizer(str(root / "tokenizer"))
    pairs = write_arithmetic_pairs_jsonl(root / "pairs", num_train=24, num_eval=4, config=SMALL)["train"]
    model = create_model(CONFIG, seed=5)
    save_model(model, str(root / "reference"))
    full = root / "full.jsonl"
    done = _precompute(tokenizer, root / "reference", pairs, full)
    assert done.returncode == 0, done.stderr[-2000:]
    return tokenizer, pairs, root / "reference", full, done


def _precompute(tokenizer, reference, pairs, output, *extra):
    command = [sys.executable, "-m", "launch.precompute_ref", f"--pairs={pairs}", f"--output={output}",
               f"--orbax_dir={reference}", f"--tokenizer_dir={tokenizer.name_or_path}", f"--seq_len={SEQ}",
               "--batch_pairs=4", *extra]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def _lines(path):
    return open(path).read().splitlines()


def test_log_probs_match_the_in_process_reference(setup):
    tokenizer, pairs, reference, full, done = setup
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    inputs, outputs = _lines(pairs), [json.loads(line) for line in _lines(full)]
    assert summary["pairs"] == summary["written"] == len(inputs) == len(outputs) == 24
    assert summary["resumed_at"] == 0 and 0 < summary["overlong"] < 24
    assert "precompute_ref: 24/24 pairs" in done.stderr
    # the reference computed here, with full logits in numpy
    from glmjax.checkpoints.orbax_io import load_model

    model = load_model(str(reference))
    forward = nnx.jit(lambda m, r: m(r["inputs"], r["positions"], r["segment_ids"]))
    encoder = PairEncoder(tokenizer)
    overlong = 0
    for line, record in zip(inputs, outputs):
        original = json.loads(line)
        rows = pair_rows(encoder(original), SEQ)
        if rows is None:
            overlong += 1
            assert record == original
            continue
        assert {k: v for k, v in record.items() if not k.startswith("ref_")} == original
        logits = np.asarray(forward(model, rows), np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        target = np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
        expected = (target * rows["loss_mask"]).sum(-1)
        np.testing.assert_allclose([record["ref_chosen_logp"], record["ref_rejected_logp"]], expected, rtol=1e-5)
    assert overlong == summary["overlong"]


def test_a_killed_run_resumes_to_the_same_file(setup, tmp_path):
    tokenizer, pairs, reference, full, _ = setup
    text = open(full).read()
    cut = sum(len(line) + 1 for line in _lines(full)[:9]) + 17  # 9 lines and part of the 10th
    partial = tmp_path / "partial.jsonl"
    partial.write_text(text[:cut])
    done = _precompute(tokenizer, reference, pairs, partial)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_at"] == 9 and summary["written"] == 15
    assert partial.read_text() == text
    again = _precompute(tokenizer, reference, pairs, partial)  # nothing left to do
    assert json.loads(again.stdout.strip().splitlines()[-1])["written"] == 0
    assert partial.read_text() == text


@pytest.mark.slow
def test_a_foreign_output_and_a_malformed_record_are_one_line_errors(setup, tmp_path):
    tokenizer, pairs, reference, full, _ = setup
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(_lines(full)[1] + "\n")
    done = _precompute(tokenizer, reference, pairs, foreign)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"precompute_ref: {foreign}:1 is not {pairs}:1 (was the output written for another input?); "
        "use a new --output")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_lines(pairs)[0] + "\n" + json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    done = _precompute(tokenizer, reference, bad, tmp_path / "out.jsonl")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"precompute_ref: {bad}:2: missing field 'rejected'"


@pytest.fixture
def constant_schedule():
    gin.parse_config(["learning_rate_schedule.kind = 'constant'", "learning_rate_schedule.warmup_steps = 0",
                      "learning_rate_schedule.peak = 2e-3"])
    yield
    gin.clear_config()


@pytest.mark.slow
def test_training_on_stored_log_probs_equals_the_live_reference(setup, tmp_path, constant_schedule):
    tokenizer, pairs, reference, full, _ = setup
    runs = {}
    for name, path, ref in (("live", pairs, "policy"), ("stored", full, "precomputed")):
        def factory(path=path, ref=ref, **context):
            return pair_data(paths=str(path), tokenizer=tokenizer, seq_len=SEQ, global_batch_size=8,
                             num_data_shards=1, ref_logps=ref == "precomputed", **context)

        result = train(model_dir=str(tmp_path / name), model_config=CONFIG, train_data=factory, train_steps=3,
                       log_every=1, checkpoint_every=100, mesh_shape=(4, 2, 1, 1), init_from_orbax=str(reference),
                       objective=DPOObjective(beta=0.1, reference=ref))
        runs[name] = metric_rows(tmp_path / name)
        assert result.dropped_examples > 0
    np.testing.assert_allclose(runs["stored"][0]["dpo_loss"], np.log(2.0), rtol=1e-5)
    for key in ("loss", "reward_margin", "chosen_logp", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in runs["stored"]], [r[key] for r in runs["live"]],
                                   rtol=1e-4, atol=1e-5, err_msg=key)
