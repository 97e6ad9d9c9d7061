"""The truncation probe (glmjax.evals.inference_scaling) and ``launch.evaluate inference_scaling``:
truncation at budgets, pass@1 by hand on scripted responses with a stub summariser and checker,
the report files, both summarisers, problem files, and the CLI on a tiny two-checkpoint run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import optax
import pytest
from flax import nnx

import glmjax
from fake_openai_server import FakeOpenAIServer
from glmjax.data.chat_template import stop_token_ids
from glmjax.data.sources import DataFormatError
from glmjax.data.synthetic import ArithmeticConfig, write_arithmetic_jsonl
from glmjax.data.tokenizer import default_tokenizer, save_tokenizer
from glmjax.evals import inference_scaling as scaling
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import AssistantTurn, LLMClient, OpenAIHTTPClient
from glmjax.inference.sampling import SamplingConfig
from glmjax.models import create_model, preset
from glmjax.training.checkpointing import Checkpointer
from glmjax.training.run_config import record_run_config
from glmjax.training.state import fresh_train_state

CONFIG = preset("glm4-tiny").replace(vocab_size=384, max_position_embeddings=64)
TASK = ArithmeticConfig(min_ops=1, max_ops=2, max_operand=9, max_factor=5, max_value=60)
REPO = os.path.dirname(os.path.dirname(glmjax.__file__))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """A launch.train-style MODEL_DIR with checkpoints at steps 1 and 2 (two random models), its
    tokenizer and data/eval.jsonl, and the in-process probe of both checkpoints."""
    run = tmp_path_factory.mktemp("run")
    models = {1: create_model(CONFIG, seed=1), 2: create_model(CONFIG, seed=2)}
    record_run_config(str(run), CONFIG)
    checkpointer = Checkpointer(str(run / "checkpoints"))
    for step, model in models.items():
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        checkpointer.save(fresh_train_state(CONFIG, optax.adamw(1e-3), 0, params), step=step)
    checkpointer.close()
    save_tokenizer(tokenizer, run / "tokenizer")
    write_arithmetic_jsonl(run / "data", num_train=4, num_eval=5, config=TASK)
    problems = scaling.load_scaling_problems(run / "data" / "eval.jsonl", tokenizer, max_problems=3)
    engine = GenerationEngine(models[1], max_batch_size=16)
    report = scaling.evaluate_inference_scaling(
        {f"step {s}": m for s, m in models.items()}, tokenizer, problems, [8, 16], 2, 1.0, seed=5,
        batch_size=16, engine=engine, progress=False)
    return run, problems, engine, report


# -- truncation ----------------------------------------------------------------------------------


def test_truncate_response_keeps_the_first_budget_tokens_without_the_stop_token():
    stops = [90, 91]
    assert scaling.truncate_response([5, 6, 7, 8, 9], 3, stops) == ([5, 6, 7], True)
    assert scaling.truncate_response([5, 6, 7, 8, 9], 5, stops) == ([5, 6, 7, 8, 9], False)
    assert scaling.truncate_response([5, 6, 7, 8, 9], 64, stops) == ([5, 6, 7, 8, 9], False)
    # The stop token that ended the turn neither counts nor is kept; one mid-response is content.
    assert scaling.truncate_response([5, 6, 91], 2, stops) == ([5, 6], False)
    assert scaling.truncate_response([5, 6, 91], 1, stops) == ([5], True)
    assert scaling.truncate_response([90, 6, 7], 2, stops) == ([90, 6], True)
    assert scaling.truncate_response([91], 4, stops) == ([], False)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        scaling.truncate_response([1, 2], 0)


# -- pass@1 by hand ------------------------------------------------------------------------------


class ScriptedClient(LLMClient):
    """Replies with the scripted texts in order (conversation ``k`` of the whole run gets text
    ``k``) and records the seeds it was asked for."""

    def __init__(self, texts):
        self.texts, self.seeds, self.calls = list(texts), [], 0

    def complete(self, messages, sampling=None):
        raise AssertionError("not used")

    def complete_batch(self, conversations, sampling=None):  # as a summariser: reads the reasoning
        reasoning = [c[-1]["content"].split("Reasoning so far:\n", 1)[1].split("\n\n", 1)[0] for c in conversations]
        return ["Answer: 7" if "7" in r else "Answer: 0" for r in reasoning]

    def assistant_turns(self, conversations, sampling=None, tools=None):
        self.seeds.append(sampling.seed)
        out = []
        for _ in conversations:
            text = self.texts[self.calls]
            self.calls += 1
            out.append(AssistantTurn(text, [], [], "stop", None))
        return out


class SeesSeven:
    """Answers "7" when the truncated trace contains a 7, else "0"; records the traces."""

    def __init__(self):
        self.traces = []

    def answers(self, problems, truncated_traces):
        self.traces.extend(truncated_traces)
        return ["7" if "7" in t.text else "0" for t in truncated_traces]


def ends_with_gold(answer_text: str, gold: str) -> bool:
    return answer_text.endswith(gold)


PROBLEMS = [scaling.ScalingProblem("p0", None, [{"role": "user", "content": "first"}], "7"),
            scaling.ScalingProblem("p1", None, [{"role": "user", "content": "second"}], "7")]
# Digits are single tokens of the default tokenizer: lengths 4, 4, 9 | 4, 2, 8.
SCRIPT = ["7000", "0070", "000000007", "0007", "00", "12345678"]


@pytest.fixture(scope="module")
def hand_report(tokenizer):
    assert [len(tokenizer.encode(t, add_special_tokens=False)) for t in SCRIPT] == [4, 4, 9, 4, 2, 8]
    summarizer = SeesSeven()
    client_a, client_b = ScriptedClient(SCRIPT), ScriptedClient(["7"] * 6)
    report = scaling.evaluate_inference_scaling(
        {"a": client_a, "b": client_b}, tokenizer, PROBLEMS, [2, 4, 8], 3, 1.2,
        checker=ends_with_gold, summarizer=summarizer, seed=100, progress=False)
    return report, summarizer, client_a


def test_pass_at_1_is_averaged_over_samples_then_problems(hand_report):
    report, summarizer, client = hand_report
    assert client.seeds == [100]  # conversation i * N + j samples with seed 100 + i * N + j
    a = {cell.budget: cell for cell in report.checkpoints[0].budgets}
    # Budget 2: p0 [1, 0, 0], p1 [0, 0, 0]. Budget 4: p0 [1, 1, 0], p1 [1, 0, 0]. Budget 8: p0 [1, 1, 0]
    # ("000000007" has its 7 at token 9), p1 [1, 0, 1].
    assert [a[b].accuracy for b in (2, 4, 8)] == pytest.approx([(1 / 3 + 0) / 2, (2 / 3 + 1 / 3) / 2,
                                                                (2 / 3 + 2 / 3) / 2])
    assert [(a[b].correct, a[b].total) for b in (2, 4, 8)] == [(1, 6), (3, 6), (4, 6)]
    assert a[4].stderr == pytest.approx(np.std([2 / 3, 1 / 3], ddof=1) / np.sqrt(2))
    assert [a[b].truncated_fraction for b in (2, 4, 8)] == pytest.approx([5 / 6, 2 / 6, 1 / 6])
    assert [a[b].mean_trace_tokens for b in (2, 4, 8)] == pytest.approx([2, 22 / 6, 30 / 6])
    entry = report.checkpoints[0]
    assert (entry.full_accuracy, entry.full_correct, entry.full_total) == (pytest.approx(1 / 3), 2, 6)
    assert entry.mean_response_tokens == pytest.approx(31 / 6)
    assert report.accuracy("b", 2) == report.checkpoints[1].full_accuracy == 1.0
    # One summariser call per distinct cut trace: 2 + 2 + 3 | 2 + 1 + 3 for "a", 6 for "b".
    assert len(summarizer.traces) == 13 + 6
    assert [t.tokens for t in summarizer.traces[:2]] == [[29, 22], [29, 22, 22, 22]]
    assert [t.truncated for t in summarizer.traces[:2]] == [True, False]
    records = [r for r in report.samples if r.checkpoint == "a"]
    assert [(r.problem_id, r.sample, r.response_tokens) for r in records] == [
        ("p0", 0, 4), ("p0", 1, 4), ("p0", 2, 9), ("p1", 0, 4), ("p1", 1, 2), ("p1", 2, 8)]
    assert records[2].answers == ("0", "0", "0") and records[2].full_correct
    assert records[5].correct == (False, False, True)


def test_finished_responses_keep_their_own_answer(tokenizer):
    summarizer = SeesSeven()
    report = scaling.evaluate_inference_scaling(
        {"a": ScriptedClient(SCRIPT)}, tokenizer, PROBLEMS, [2, 4, 8], 3, 1.2, checker=ends_with_gold,
        summarizer=summarizer, seed=100, progress=False, finished_responses="own_answer")
    # Budget 2: every response but "00" is cut (summariser as before: p0 [1, 0, 0], p1 [0, 0, 0]).
    # Budget 4: "7000" and "0070" fit and end in 0 (their own answers: wrong), "0007" ends in 7;
    # budget 8: likewise, "12345678" fits and ends in 8, "000000007" is cut to eight 0s.
    assert [c.accuracy for c in report.checkpoints[0].budgets] == pytest.approx([1 / 6, 1 / 6, 1 / 6])
    assert all(t.truncated for t in summarizer.traces)  # only cut traces reach the summariser
    with pytest.raises(ValueError, match="finished_responses"):
        scaling.evaluate_inference_scaling({"a": ScriptedClient(SCRIPT)}, tokenizer, PROBLEMS, [2], 1, 1.0,
                                           finished_responses="neither")


def test_a_client_checkpoint_summarises_itself_by_default(tokenizer, hand_report):
    report = scaling.evaluate_inference_scaling({"a": ScriptedClient(SCRIPT)}, tokenizer, PROBLEMS, [2, 4, 8], 3,
                                                1.2, seed=100, progress=False)
    assert report.checker == "arithmetic" and "ScriptedClient asked for the final answer" in report.summarizer
    assert ([c.accuracy for c in report.checkpoints[0].budgets]
            == [c.accuracy for c in hand_report[0].checkpoints[0].budgets])
    assert report.samples[0].answers == ("Answer: 7",) * 3


def test_math_checker_verifies_the_final_boxed_answer():
    pytest.importorskip("glmjax.evals.math")
    assert scaling.math_checker("x" + scaling.ANSWER_PREFIXES["math"] + "3/4}", "0.75")
    assert not scaling.math_checker("x" + scaling.ANSWER_PREFIXES["math"] + "2}", "3")


def test_evaluate_rejects_bad_arguments(tokenizer):
    client = {"a": ScriptedClient(SCRIPT)}
    with pytest.raises(ValueError, match="budgets must be ascending"):
        scaling.evaluate_inference_scaling(client, tokenizer, PROBLEMS, [4, 2], 1, 1.0, progress=False)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        scaling.evaluate_inference_scaling(client, tokenizer, PROBLEMS, [2], 0, 1.0, progress=False)
    with pytest.raises(ValueError, match="custom checker needs a summarizer"):
        scaling.evaluate_inference_scaling(client, tokenizer, PROBLEMS, [2], 1, 1.0, checker=ends_with_gold)
    with pytest.raises(ValueError, match="checker must be one of"):
        scaling.evaluate_inference_scaling(client, tokenizer, PROBLEMS, [2], 1, 1.0, checker="exact")


# -- report files --------------------------------------------------------------------------------


def test_report_json_markdown_and_png(hand_report, tmp_path):
    report = hand_report[0]
    written = scaling.write_scaling_report(report, tmp_path / "out")
    assert set(written) == {"json", "markdown", "png", "samples"}
    data = json.loads(written["json"].read_text())
    assert data["evaluation"] == "inference_scaling" and data["budgets"] == [2, 4, 8]
    assert (data["num_problems"], data["num_samples"], data["temperature"]) == (2, 3, 1.2)
    first = data["checkpoints"][0]
    assert first["name"] == "a" and first["full_response"] == {"accuracy": pytest.approx(1 / 3), "correct": 2,
                                                                 "total": 6}
    assert [cell["correct"] for cell in first["budgets"]] == [1, 3, 4]
    lines = written["markdown"].read_text().splitlines()
    assert "| checkpoint | 2 | 4 | 8 | own answer (whole response) |" in lines
    assert "| a | 16.7 | 50.0 | 66.7 | 33.3 |" in lines and "| b | 100.0 | 100.0 | 100.0 | 100.0 |" in lines
    png = written["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    samples = [json.loads(line) for line in written["samples"].read_text().splitlines()]
    assert len(samples) == 12 and samples[2]["answers"] == ["0", "0", "0"]


# -- summarisers ---------------------------------------------------------------------------------


def test_continuation_summarizer_answers_after_the_forced_prefix(tiny, tokenizer):
    _, problems, engine, _ = tiny
    traces = [scaling.TruncatedTrace([40, 41, 42], "", True), scaling.TruncatedTrace([], "", False)]
    for prefix in (scaling.ANSWER_PREFIXES["arithmetic"], scaling.ANSWER_PREFIXES["math"]):
        summarizer = scaling.ContinuationSummarizer(engine, tokenizer, prefix, max_answer_tokens=4, batch_size=1)
        answers = summarizer.answers(problems[:2], traces)
        assert all(answer.startswith(prefix) for answer in answers)
        # The same greedy continuation as generating from prompt + trace + prefix directly.
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
        for problem, trace, answer in zip(problems[:2], traces, answers):
            (result,) = engine.generate([problem.prompt_ids + trace.tokens + prefix_ids], SamplingConfig(),
                                        max_new_tokens=4, stop_token_ids=stop_token_ids(tokenizer))
            body, _ = scaling.truncate_response(result.tokens, 4, stop_token_ids(tokenizer))
            assert answer == prefix + tokenizer.decode(body, skip_special_tokens=True)


def test_client_summarizer_prompt_and_replies(tmp_path):
    def reply(request):
        content = request["messages"][-1]["content"]
        return "Answer: 12" if "Step 1: 7+5=12." in content else "Answer: 0"

    problem = scaling.ScalingProblem("0", None, [{"role": "user", "content": "Compute 7+5."}], "12")
    traces = [scaling.TruncatedTrace([], "Step 1: 7+5=12.", False), scaling.TruncatedTrace([], "Step 1: 7+", True)]
    with FakeOpenAIServer(reply) as server:
        summarizer = scaling.ClientSummarizer(OpenAIHTTPClient(server.base_url, "m", max_retries=0), seed=3)
        answers = summarizer.answers([problem, problem], traces)
        assert answers == ["Answer: 12", "Answer: 0"]
        assert [scaling.arithmetic_checker(a, problem.gold) for a in answers] == [True, False]
        prompts = sorted(r.body["messages"][0]["content"] for r in server.requests)  # sent concurrently
        assert "Problem:\nCompute 7+5.\n" in prompts[1] and "Reasoning so far:\nStep 1: 7+5=12.\n" in prompts[1]
        assert "Reasoning so far:\nStep 1: 7+\n" in prompts[0]
        assert all(prompt.endswith(scaling.ANSWER_FORMATS["arithmetic"]) for prompt in prompts)
        assert sorted(r.body["seed"] for r in server.requests) == [3, 4]
        assert {r.body["temperature"] for r in server.requests} == {0.0}
    template = tmp_path / "prompt.txt"
    template.write_text("Q: {problem}\nR: {reasoning}")
    custom = scaling.ClientSummarizer(OpenAIHTTPClient("http://127.0.0.1:9/v1", "m"), template_file=str(template))
    assert custom.prompt(problem, traces[1]) == [{"role": "user", "content": "Q: Compute 7+5.\nR: Step 1: 7+"}]
    template.write_text("Q: {problem} {answer}")
    with pytest.raises(ValueError, match=r"prompt.txt: needs the fields \{problem\} and \{reasoning\}"):
        scaling.ClientSummarizer(OpenAIHTTPClient("http://127.0.0.1:9/v1", "m"), template_file=str(template))


# -- problem files -------------------------------------------------------------------------------


def test_problem_files(tiny, tokenizer, tmp_path):
    run, problems, _, _ = tiny
    assert scaling.detect_problem_format(run / "data" / "eval.jsonl") == "arithmetic"
    first = json.loads((run / "data" / "eval.jsonl").read_text().splitlines()[0])
    assert problems[0].messages == first["messages"][:-1] and problems[0].gold == str(first["answer"])
    assert problems[0].question.startswith("Compute ")
    math_file = tmp_path / "math.jsonl"
    math_file.write_text('{"id": "q1", "problem": "What is 1/2 + 1/4?", "answer": "3/4"}\n'
                         '{"problem": "Solve x + 1 = 3.", "answer": 2}\n')
    assert scaling.detect_problem_format(math_file) == "math"
    loaded = scaling.load_scaling_problems(math_file, tokenizer)
    assert [(p.id, p.gold, p.prompt_ids) for p in loaded] == [("q1", "3/4", None), ("1", "2", None)]
    assert loaded[0].messages[0]["content"] == "What is 1/2 + 1/4?\n\n" + scaling.MATH_INSTRUCTION
    assert loaded[0].prompt(tokenizer)[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    math_file.write_text('{"problem": "ok", "answer": "1"}\n{"problem": "", "answer": "1"}\n')
    with pytest.raises(DataFormatError, match=r"math.jsonl:2: field 'problem' must be a non-empty string"):
        scaling.load_math_problems(math_file)
    math_file.write_text('{"question": "?", "answer": "1"}\n')
    with pytest.raises(DataFormatError, match=r"math.jsonl:1: record has none of 'problem'"):
        scaling.detect_problem_format(math_file)


# -- the command line ----------------------------------------------------------------------------


def _evaluate(*args: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "launch.evaluate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_launch_evaluate_inference_scaling_on_a_two_checkpoint_run(tiny, tmp_path):
    run, problems, _, expected = tiny
    # A bad --steps runs alongside (most of either run is importing): one line, exit status 2.
    bad = _evaluate("inference_scaling", f"--run_dir={run}", "--steps=1,7")
    good = _evaluate("inference_scaling", f"--run_dir={run}", "--budgets=8,16", "--num_samples=2",
                     "--max_problems=3", "--seed=5", "--batch_size=16", "--noprogress",
                     f"--output_dir={tmp_path / 'out'}")
    stdout, stderr = good.communicate(timeout=300)
    _, bad_stderr = bad.communicate(timeout=300)
    assert bad.returncode == 2
    assert bad_stderr.strip().splitlines()[-1] == (
        f"evaluate inference_scaling: {run}: no checkpoint at step(s) 7 (it has 1, 2)")
    assert good.returncode == 0, stderr[-3000:]
    assert "| step 1 |" in stdout and "| step 2 |" in stdout
    data = json.loads((tmp_path / "out" / "inference_scaling.json").read_text())
    assert [c["name"] for c in data["checkpoints"]] == ["step 1", "step 2"]
    assert data["checker"] == "arithmetic" and data["num_problems"] == 3
    for entry in data["checkpoints"]:
        assert [cell["total"] for cell in entry["budgets"]] == [6, 6]
        assert all(0.0 <= cell["accuracy"] <= 1.0 for cell in entry["budgets"])
    assert (tmp_path / "out" / "inference_scaling.png").read_bytes()[:4] == b"\x89PNG"
    # Each checkpoint was loaded intact and sampled as in process: same lengths and answers.
    rows = [json.loads(line) for line in (tmp_path / "out" / "inference_scaling_samples.jsonl").read_text().splitlines()]
    assert ([(r["checkpoint"], r["response_tokens"], r["answers"]) for r in rows]
            == [(r.checkpoint, r.response_tokens, list(r.answers)) for r in expected.samples])
    assert all(a.startswith("\nAnswer:") for r in rows for a in r["answers"])
    assert [r["answers"] for r in rows[:6]] != [r["answers"] for r in rows[6:]]  # two different models
