"""launch.dump_logits end to end: a tiny random teacher over the arithmetic corpus, windows with
context, a run killed mid-shard and resumed, settings and input errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_helpers import CONFIG

from glmjax.checkpoints.orbax_io import save_model
from glmjax.data.pipeline import record_encoder, record_source
from glmjax.data.synthetic import write_arithmetic_jsonl
from glmjax.data.teacher_logits import TeacherLogitsError, TeacherLogitsReader
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer
from glmjax.models import create_model
from glmjax.objectives.distill import truncate_teacher_logits
from launch.dump_logits import DumpConfig, document_pieces, dump

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUNCATION = {"top_p": 0.9, "top_k": 8, "temperature": 2.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    model = create_model(CONFIG, seed=3)
    save_model(model, root / "teacher")
    paths = write_arithmetic_jsonl(root / "data", num_train=30, num_eval=2, fmt="text")
    tokenizer_dir = build_default_tokenizer(root / "tok")
    base = DumpConfig(corpus=[str(paths["train"])], output_dir=str(root / "reference"),
                      teacher_orbax_dir=str(root / "teacher"), tokenizer_dir=str(tokenizer_dir),
                      batch_size=4, seq_len=32, context=8, documents_per_shard=4, **TRUNCATION)
    summary = dump(base)
    return root, model, base, summary


def _records(directory):
    reader = TeacherLogitsReader(directory)
    return [reader[i] for i in range(len(reader))]


def test_pieces_cover_every_position_once_with_context():
    for n in (1, 2, 5, 32, 33, 34, 100):
        pieces = document_pieces(0, n, seq_len=32, context=8)
        covered = [p for piece in pieces for p in range(piece.first, piece.stop)]
        assert covered == list(range(n - 1))
        for piece in pieces:
            assert piece.stop - piece.start <= 32
            assert piece.first - piece.start == (0 if piece.first == 0 else 8)


def test_records_are_the_teachers_truncated_distribution(setup):
    """Every stored position equals the teacher run on its piece (windows with context)."""
    root, model, base, summary = setup
    tokenizer = load_tokenizer(base.tokenizer_dir)
    source = record_source(base.corpus, "text")
    encoder = record_encoder("text", tokenizer)
    reader = TeacherLogitsReader(base.output_dir)
    assert summary["documents"] == len(source) == 30 and summary["shards"] == 8
    teacher = jax.jit(lambda row: truncate_teacher_logits(model(row), **TRUNCATION))
    long_documents = 0
    for index in range(len(source)):
        tokens = encoder(source[index])["input_ids"]
        ids, probs, tail = reader.format.unpack(reader[index], tokens)
        pieces = document_pieces(index, len(tokens), base.seq_len, base.context)
        long_documents += len(pieces) > 1
        for piece in pieces:
            # right-padded to one shape (one compile); causal, so padding changes no earlier position
            row = np.zeros((1, base.seq_len), np.int32)
            row[0, :piece.stop - piece.start] = tokens[piece.start:piece.stop]
            want_ids, want_probs = (np.asarray(x)[0, piece.first - piece.start:piece.stop - piece.start]
                                    for x in teacher(jnp.asarray(row)))
            got_ids, got_probs = ids[piece.first:piece.stop], probs[piece.first:piece.stop]
            kept = want_probs > 0
            np.testing.assert_array_equal(got_probs > 0, kept)
            np.testing.assert_array_equal(got_ids[kept], want_ids[kept])
            assert np.all(np.abs(got_probs - want_probs) <= reader.format.prob_error_bound(want_probs) + 1e-6)
    assert long_documents > 5  # the windows-with-context path ran
    assert summary["tokens"] == sum(len(encoder(source[i])["input_ids"]) for i in range(len(source)))
    assert summary["bytes_per_token"] <= reader.format.bytes_per_position() + 1


def test_killed_run_resumes_to_identical_records(setup, tmp_path):
    root, _, base, _ = setup
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "launch.dump_logits", f"--corpus={base.corpus[0]}",
            f"--output_dir={out}", f"--teacher_orbax_dir={base.teacher_orbax_dir}",
            f"--tokenizer_dir={base.tokenizer_dir}", "--batch_size=4", "--seq_len=32", "--context=8",
            "--documents_per_shard=4", "--top_p=0.9", "--top_k=8", "--temperature=2.0",
            "--testing_kill_after_records=14"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(os.listdir(out))
    done = [n for n in names if n.endswith(".done.json")]
    assert len(done) == 3, names  # 12 records in 3 shards, then 2 of the 4th before the kill
    assert any(n.endswith(".tmp") for n in names)
    with pytest.raises(TeacherLogitsError, match="incomplete"):
        TeacherLogitsReader(out)
    summary = dump(dataclasses.replace(base, output_dir=str(out)))
    assert _records(out) == _records(base.output_dir)
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert summary["documents"] == 30
    # a rerun of a finished dump writes nothing and reports the same
    assert dump(dataclasses.replace(base, output_dir=str(out))) == summary


def test_other_settings_refused_in_an_existing_dump(setup):
    _, _, base, _ = setup
    with pytest.raises(TeacherLogitsError, match="differs in top_k"):
        dump(dataclasses.replace(base, top_k=4))


def test_vocabulary_mismatch_refused(setup, tmp_path):
    root, _, base, _ = setup
    small = CONFIG.replace(vocab_size=128)
    save_model(create_model(small, seed=0), tmp_path / "small")
    with pytest.raises(ValueError, match="tokens but the teacher's vocabulary is 128"):
        dump(dataclasses.replace(base, teacher_orbax_dir=str(tmp_path / "small"),
                                 output_dir=str(tmp_path / "out")))


def test_cli_bad_input_is_one_line_exit_2(setup, tmp_path):
    _, _, base, _ = setup
    result = subprocess.run(
        [sys.executable, "-m", "launch.dump_logits", f"--corpus={tmp_path / 'missing.jsonl'}",
         f"--output_dir={tmp_path / 'out'}", f"--teacher_orbax_dir={base.teacher_orbax_dir}",
         f"--tokenizer_dir={base.tokenizer_dir}"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("dump_logits: ") and "missing.jsonl" in lines[-1], result.stderr
    assert not any(line.startswith("Traceback") for line in lines)


def test_summary_json_printed(setup):
    _, _, _, summary = setup
    assert set(summary) >= {"documents", "tokens", "bytes_per_token", "ratio_to_full_fp32"}
    assert summary["ratio_to_full_fp32"] == pytest.approx(4 * 384 / summary["bytes_per_token"], rel=1e-3)
    json.dumps(summary)


@pytest.mark.slow
def test_two_processes_write_the_same_dump(setup, tmp_path):
    """Two jax.distributed processes (2 CPU devices each) share the shards and the global batch;
    the dump equals the one-process one (up to the order of ids whose probabilities tie in the
    last bits: another packing of rows changes the float rounding)."""
    _, _, base, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    args = [sys.executable, "-m", "launch.dump_logits", f"--corpus={base.corpus[0]}", f"--output_dir={out}",
            f"--teacher_orbax_dir={base.teacher_orbax_dir}", f"--tokenizer_dir={base.tokenizer_dir}",
            "--batch_size=4", "--seq_len=32", "--context=8", "--documents_per_shard=4", "--top_p=0.9",
            "--top_k=8", "--temperature=2.0", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    processes = [subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert json.loads(outputs[0][0].strip().splitlines()[-1])["documents"] == 30
    assert '"documents"' not in outputs[1][0]  # only process 0 prints the summary
    one, two = TeacherLogitsReader(base.output_dir), TeacherLogitsReader(out)
    for index in range(len(one)):
        ids_a, probs_a, _ = one.format.unpack(one[index])
        ids_b, probs_b, _ = two.format.unpack(two[index])
        # each within the format's bound of the (nearly equal) exact values: a code may flip
        assert np.all(np.abs(probs_a - probs_b) <= 2 * one.format.prob_error_bound(probs_a) + 1e-6)
        np.testing.assert_array_equal(np.sort(np.where(probs_a > 0, ids_a, -1), -1),
                                      np.sort(np.where(probs_b > 0, ids_b, -1), -1))
