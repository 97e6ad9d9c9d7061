"""Batch generation (glmjax.inference.batch_runner) end to end, resumption, malformed rows, never
losing input; the launch.generate CLI; the terminal chat."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import optax
import pytest
from flax import nnx

import glmjax
from glmjax.checkpoints.orbax_io import save_model
from glmjax.flops import count_params
from glmjax.data.tokenizer import default_tokenizer, save_tokenizer
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models import create_model, preset
from glmjax.training.checkpointing import Checkpointer
from glmjax.training.run_config import record_run_config
from glmjax.training.state import fresh_train_state
from glmjax.data.chat_template import stop_token_ids
from glmjax.inference import batch_runner, terminal_chat
from test_inference_chat import ScriptedEngine

MAX_NEW = 6
SAMPLING = SamplingConfig(temperature=1.0, top_k=50)
GOOD_ROWS = [
    {"id": "a", "prompt": "1+2="},
    {"messages": [{"role": "user", "content": "What is 3*4?"}]},
    {"input_ids": [5, 17, 42, 9]},
    {"id": 7, "prompt": "Compute 10 - 3 step by step."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, tokenizer dir, model, engine) for a tiny random GLM-4 model."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer = default_tokenizer(root / "tokenizers")
    (tokenizer_dir,) = (root / "tokenizers").iterdir()
    model = create_model(preset("glm4-tiny").replace(max_position_embeddings=64), seed=0)
    engine = GenerationEngine(model, max_batch_size=2)
    return tokenizer, str(tokenizer_dir), model, engine


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(setup, input_path, output_path, on_error="skip"):
    tokenizer, _, _, engine = setup
    report = io.StringIO()
    counts = batch_runner.run_batch(engine, tokenizer, str(input_path), str(output_path), sampling=SAMPLING,
                                    max_new_tokens=MAX_NEW, batch_size=2, seed=11, on_error=on_error,
                                    report=report)
    return counts, report.getvalue()


def test_batch_mode_rows_and_malformed_lines(setup, tmp_path):
    tokenizer = setup[0]
    lines = [json.dumps(r) for r in GOOD_ROWS[:2]] + [
        "{not json",
        json.dumps({"prompt": "x", "input_ids": [1]}),
        json.dumps(GOOD_ROWS[2]),
        json.dumps({"input_ids": [1, "2"]}),
        json.dumps({"messages": [{"role": "robot", "content": "?"}]}),
        json.dumps({"input_ids": [100000]}),
    ] + [json.dumps(r) for r in GOOD_ROWS[3:]]
    _write_lines(tmp_path / "in.jsonl", lines)
    counts, report = _run(setup, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert counts == {"written": 5, "already_done": 0, "malformed": 5}
    path = tmp_path / "in.jsonl"
    assert f"{path}:3: not valid JSON" in report
    assert (f"{path}:4: needs exactly one of 'prompt', 'messages', 'input_ids'; "
            "got ['prompt', 'input_ids']") in report
    assert f"{path}:6: field 'input_ids' must be a non-empty list of integers" in report
    assert f"{path}:7: field 'messages': message 0: role 'robot'" in report
    assert f"{path}:8: field 'input_ids': token ids [100000] are outside the vocabulary" in report
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 4, 8, 9]
    assert [r["id"] for r in rows] == ["a", 1, 4, 7, 9]
    stops = set(stop_token_ids(tokenizer))
    for row in rows:
        assert set(row) == {"index", "id", "text", "output_ids", "logprobs", "finish_reason"}
        assert len(row["output_ids"]) == len(row["logprobs"]) <= MAX_NEW
        assert all(lp <= 0 for lp in row["logprobs"])
        ends_with_stop = row["output_ids"][-1] in stops
        assert row["finish_reason"] == ("stop" if ends_with_stop else "length")
        body = row["output_ids"][:-1] if ends_with_stop else row["output_ids"]
        assert row["text"] == tokenizer.decode(body, skip_special_tokens=False)


def test_undecodable_rows_are_malformed_rows_with_their_line(setup, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join([
        json.dumps(GOOD_ROWS[2]).encode() + b"\n",
        b'{"prompt": "caf\xe9"}\n',                          # latin-1, not UTF-8
        b'{"prompt": "lone \\ud800 surrogate"}\n',            # valid JSON, not valid Unicode
        json.dumps(GOOD_ROWS[0]).encode() + b"\n",
    ]))
    counts, report = _run(setup, path, tmp_path / "out.jsonl")
    assert counts == {"written": 2, "already_done": 0, "malformed": 2}
    assert f"{path}:2: not UTF-8" in report and f"{path}:3: contains an unpaired surrogate" in report
    assert [r["index"] for r in _rows(tmp_path / "out.jsonl")] == [0, 3]


def test_output_that_is_not_ours_is_refused_and_untouched(setup, tmp_path):
    source = tmp_path / "in.jsonl"
    _write_lines(source, [json.dumps(r) for r in GOOD_ROWS])
    source.write_bytes(source.read_bytes() + b'{"prompt": "unterminated')  # no newline at the end
    before = source.read_bytes()
    with pytest.raises(batch_runner.OutputFileError, match="the output is the input file"):
        _run(setup, source, source)
    other = tmp_path / "notes.jsonl"
    other.write_bytes(before)
    with pytest.raises(batch_runner.OutputFileError, match=r"notes.jsonl:1: not an output row"):
        _run(setup, source, other)
    assert source.read_bytes() == before and other.read_bytes() == before


def test_token_rows_need_no_tokenizer(setup, tmp_path):
    _, _, _, engine = setup
    _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD_ROWS[2]), json.dumps(GOOD_ROWS[0])])
    report = io.StringIO()
    counts = batch_runner.run_batch(engine, None, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                                    sampling=SAMPLING, max_new_tokens=MAX_NEW, batch_size=2, seed=11,
                                    on_error="skip", report=report)
    assert counts == {"written": 1, "already_done": 0, "malformed": 1}
    assert "in.jsonl:2: field 'prompt' needs a tokenizer" in report.getvalue()
    (row,) = _rows(tmp_path / "out.jsonl")
    assert row["text"] is None and len(row["output_ids"]) >= 1


def test_on_error_stop_names_the_line(setup, tmp_path):
    _write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in GOOD_ROWS[:2]] + ['{"prompt": 3}'])
    with pytest.raises(batch_runner.RowError, match=r"in.jsonl:3: field 'prompt' must be a non-empty string"):
        _run(setup, tmp_path / "in.jsonl", tmp_path / "out.jsonl", on_error="stop")
    assert [r["index"] for r in _rows(tmp_path / "out.jsonl")] == [0, 1]  # the batch before it


def test_resume_skips_written_rows_and_matches_a_full_run(setup, tmp_path):
    _write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in GOOD_ROWS])
    _run(setup, tmp_path / "in.jsonl", tmp_path / "full.jsonl")
    full = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    # A run that died after three rows, in the middle of writing the fourth.
    (tmp_path / "resumed.jsonl").write_text("".join(full[:3]) + full[3][:20])
    counts, _ = _run(setup, tmp_path / "in.jsonl", tmp_path / "resumed.jsonl")
    assert counts == {"written": 2, "already_done": 3, "malformed": 0}
    # Row i samples with seed + i whatever its batch, so the result equals the uninterrupted run
    # (log-probs up to float rounding: the resumed rows run in a batch of another shape).
    resumed = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in full]
    assert [{k: v for k, v in r.items() if k != "logprobs"} for r in resumed] == [
        {k: v for k, v in r.items() if k != "logprobs"} for r in expected]
    for got, want in zip(resumed, expected):
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
    counts, _ = _run(setup, tmp_path / "in.jsonl", tmp_path / "resumed.jsonl")
    assert counts == {"written": 0, "already_done": 5, "malformed": 0}


@pytest.mark.parametrize("source", ["orbax", "run"])
def test_cli_with_orbax_checkpoint_or_training_run(setup, tmp_path, source):
    _, tokenizer_dir, model, _ = setup
    if source == "orbax":
        save_model(model, str(tmp_path / "orbax"))
        model_flags = [f"--orbax_dir={tmp_path / 'orbax'}"]
    else:  # what launch.train leaves in MODEL_DIR: model_config.json + train-state checkpoints
        record_run_config(str(tmp_path / "run"), model.config)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"))
        checkpointer.save(fresh_train_state(model.config, optax.adamw(1e-3), 0, params), step=3)
        checkpointer.close()
        save_tokenizer(setup[0], tmp_path / "run" / "tokenizer")  # train.tokenizer records it
        model_flags = [f"--run_dir={tmp_path / 'run'}"]
    _write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in GOOD_ROWS[:3]] + ["[]"])
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    tokenizer_flags = [f"--tokenizer_dir={tokenizer_dir}"] if source == "orbax" else []
    command = [sys.executable, "-m", "launch.generate", *model_flags,
               *tokenizer_flags, f"--input={tmp_path / 'in.jsonl'}",
               f"--output={tmp_path / 'out.jsonl'}", f"--max_new_tokens={MAX_NEW}", "--batch_size=4"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(glmjax.__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts == {"written": 3, "already_done": 0, "malformed": 1}
    assert "in.jsonl:4: expected a JSON object, got list" in done.stderr
    assert [r["index"] for r in _rows(tmp_path / "out.jsonl")] == [0, 1, 2]
    # The parameters arrived intact: greedy ids equal those of the in-process model.
    tokenizer, _, _, engine = setup
    batch_runner.run_batch(engine, tokenizer, str(tmp_path / "in.jsonl"), str(tmp_path / "local.jsonl"),
                           sampling=SamplingConfig(), max_new_tokens=MAX_NEW, batch_size=4, seed=0,
                           on_error="skip", report=io.StringIO())
    if source == "run":  # the recorded tokenizer also serves an interactive chat; stdout is the chat
        chat = subprocess.run([sys.executable, "-m", "launch.generate", *model_flags, "--interactive",
                               "--max_new_tokens=4"], input="hello\n/exit\n", capture_output=True,
                              text=True, env=env, timeout=300,
                              cwd=os.path.dirname(os.path.dirname(glmjax.__file__)))
        assert chat.returncode == 0, chat.stderr[-2000:]
        lines = chat.stdout.splitlines()
        assert lines[0] == "Chat: /reset starts over, /exit quits." and lines[1].startswith("user> ")
        assert all(line.startswith(("user> ", "assistant> ", "[")) for line in lines[1:]), lines
    assert ([r["output_ids"] for r in _rows(tmp_path / "out.jsonl")]
            == [r["output_ids"] for r in _rows(tmp_path / "local.jsonl")])


def test_interactive_tool_calling_run(setup):
    tokenizer = setup[0]
    engine = ScriptedEngine(tokenizer, ['python\n{"code": "print(6 * 7)"}', "\n6 * 7 = 42."])
    stdout = io.StringIO()
    terminal_chat.run_interactive(engine, tokenizer, sampling=None, tools=["python"], system=None,
                             max_turns=4, stdin=io.StringIO("What is 6 * 7?\n/exit\n"), stdout=stdout)
    lines = stdout.getvalue().splitlines()
    assert 'user> [tool call] python {"code": "print(6 * 7)"}' in lines
    assert "[observation] 42" in stdout.getvalue()
    assert "assistant> 6 * 7 = 42." in lines


def test_compile_only_reports_memory_per_device_without_weights(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "launch.generate", "--compile_only", "--preset=glm4-tiny",
               "--mesh_shape=2,1,4,1", "--batch_size=4", "--prompt_len=40", "--max_new_tokens=20",
               "--temperature=0.7", "--top_p=0.9"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(glmjax.__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["parameters"] == count_params(preset("glm4-tiny")).total
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1}
    # fp32 parameters, tensor-parallel over 4: each device holds well under all of them.
    all_param_bytes = 4 * report["parameters"]
    assert all_param_bytes / 4 <= report["argument_bytes_per_device"] < all_param_bytes
    assert report["temp_bytes_per_device"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--topology=v9z:2x2"], "'v9z:2x2'"),              # a topology libtpu rejects (or no libtpu)
    (["--topology=v5e:2x2", "--mesh_shape=1,8,1,1"], "'v5e:2x2' (4 devices)"),
    (["--prefill_chunk=0"], "prefill_chunk must be a positive number of tokens"),
])
def test_compile_only_bad_flags_are_one_line_errors(flags, message):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "launch.generate", "--compile_only", "--preset=glm4-tiny",
               "--batch_size=1", "--prompt_len=16", "--max_new_tokens=4", *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(glmjax.__file__)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
