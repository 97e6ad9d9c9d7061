"""T1 CoT synthesis (glmjax.pipelines.t1_cot) with a scripted LLM client; the launch.pipeline CLI
with the local engine of a tiny random run and with an OpenAI-compatible fake server."""

import json
import os
import re
import subprocess
import sys

import gin
import numpy as np
import pytest

import glmjax
from glmjax.data.factories import lm_data
from glmjax.data.synthetic import generate_problems
from glmjax.data.tokenizer import default_tokenizer
from glmjax.inference.llm_client import LLMClientError
from glmjax.pipelines import t1_cot
from glmjax.pipelines.runner import InputError
from glmjax.pipelines.t1_cot import PromptError, item_seed, t1_cot_pipeline, write_builtin_problems
from scripted_clients import ScriptedClient
from training_helpers import tiny_run_dir
from fake_openai_server import FakeOpenAIServer, Behaviour

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")

PROBLEMS = [
    {"id": "add", "problem": "What is 2+3?", "answer": "5"},
    {"id": "mul", "problem": "What is 4*6?", "answer": 24},  # a numeric answer becomes "24"
    {"id": "hard", "problem": "What is 7*8-1?", "answer": "55"},
]


def boxed_checker(text, gold):
    """Exact match of the last \\boxed{} (the tests' checker: no math-verify processes)."""
    found = BOXED.findall(text)
    return bool(found) and found[-1].strip() == gold


def _problem_of(prompt):
    return next(p for p in PROBLEMS if p["problem"] in prompt)


def attempt_reply(prompt, params):
    """Even seeds answer right, odd seeds off by one."""
    problem = _problem_of(prompt)
    gold = int(problem["answer"])
    value = gold if params.seed % 2 == 0 else gold + 1
    return f"[attempt seed={params.seed}] {problem['problem']} I get \\boxed{{{value}}}"


def critic_reply(prompt, params):
    attempt = re.search(r"\[attempt seed=(\d+)\]", prompt).group(1)
    verdict = "right" if "Verdict on the attempt's final answer: correct" in prompt else "wrong"
    return f"[critique of {attempt}: {verdict}]"


def writer_reply(prompt, params):
    problem = _problem_of(prompt)
    if problem["id"] == "hard":
        return "I think it is \\boxed{54}."
    if problem["id"] == "mul" and params.seed % 2 == 0:
        return "4*6 is 24, no box."  # the first sample fails the boxed check, the second passes
    return (f"Try: the answer is {int(problem['answer']) + 1}. Wait, let me check that: it is wrong. "
            f"Redo: {problem['answer']}. Check: ok. \\boxed{{{problem['answer']}}}")


def _clients():
    return ([ScriptedClient(attempt_reply), ScriptedClient(attempt_reply)], ScriptedClient(critic_reply),
            ScriptedClient(writer_reply))


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tmp_path, clients, out="out", **kwargs):
    attempts, critic, writer = clients
    args = dict(num_attempts=2, checker=boxed_checker, progress=False)
    args.update(kwargs)
    return t1_cot_pipeline(tmp_path / "problems.jsonl", tmp_path / out, attempts, critic, writer, **args)


def test_stages_prompts_and_verified_records(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS)
    clients = _clients()
    result = _run(tmp_path, clients)
    assert (result["problems"], result["sft_records"], result["rejected"], result["unfinished"],
            result["failed"]) == (3, 2, 1, 0, 0)
    assert {name: stage["finished"] for name, stage in result["stages"].items()} == {
        "attempts": 3, "critiques": 3, "rewrites": 3}

    attempts = {row["id"]: row["attempts"] for row in _rows(tmp_path / "out" / "attempts.jsonl")}
    for problem in PROBLEMS:
        rows = attempts[problem["id"]]
        assert [a["client"] for a in rows] == [0, 0, 1, 1]
        for client in (0, 1):
            base = item_seed(0, "attempts", client, problem["id"])
            assert [a["seed"] for a in rows if a["client"] == client] == [base, base + 1]
        assert all(a["correct"] == (a["seed"] % 2 == 0) for a in rows)
        assert all(a["text"].startswith(f"[attempt seed={a['seed']}]") for a in rows)

    # Each critique prompt holds the problem, the reference answer, one attempt and its verdict.
    critic_prompts = [prompt for prompt, _ in clients[1].calls]
    assert len(critic_prompts) == 12
    for problem in PROBLEMS:
        for attempt in attempts[problem["id"]]:
            (prompt,) = [p for p in critic_prompts if attempt["text"] in p]
            assert problem["problem"] in prompt and f"Reference answer: {problem['answer']}" in prompt
            verdict = "correct" if attempt["correct"] else "wrong"
            assert f"Verdict on the attempt's final answer: {verdict}" in prompt
    critiques = {row["id"]: row["critiques"] for row in _rows(tmp_path / "out" / "critiques.jsonl")}
    assert critiques["add"] == [f"[critique of {a['seed']}: {'right' if a['correct'] else 'wrong'}]"
                                for a in attempts["add"]]

    # The rewrite prompt holds every attempt with its verdict and its critique, in order.
    writer_prompts = {_problem_of(prompt)["id"]: prompt for prompt, _ in clients[2].calls}
    for problem_id, prompt in writer_prompts.items():
        positions = []
        for number, (attempt, critique) in enumerate(zip(attempts[problem_id], critiques[problem_id]), 1):
            verdict = "right" if attempt["correct"] else "wrong"
            assert f"### Attempt {number} (its final answer is {verdict})\n{attempt['text']}" in prompt
            assert f"### Critique of attempt {number}\n{critique}" in prompt
            positions.append(prompt.index(attempt["text"]))
        assert positions == sorted(positions)
        assert "Reference answer" not in prompt and "{{" not in prompt
    assert [p.temperature for _, p in clients[0][0].calls] == [1.0] * 6
    assert {p.max_tokens for _, p in clients[2].calls} == {4096}

    sft = _rows(tmp_path / "out" / "sft.jsonl")
    assert [r["id"] for r in sft] == ["add", "mul"]
    for record in sft:
        problem = next(p for p in PROBLEMS if p["id"] == record["id"])
        user, assistant = record["messages"]
        assert user == {"role": "user", "content": problem["problem"]}
        assert assistant["role"] == "assistant" and assistant["content"].endswith(f"\\boxed{{{problem['answer']}}}")
        assert record["answer"] == str(problem["answer"]) and set(record) == {"id", "messages", "answer"}
    assert _rows(tmp_path / "out" / "rejected.jsonl") == [{"id": "hard", "reason": (
        "no verified rewrite in 2: final answer does not match the gold answer (x2)")}]
    rewrites = {r["id"]: r for r in _rows(tmp_path / "out" / "rewrites.jsonl")}
    assert rewrites["hard"]["solutions"] == ["I think it is \\boxed{54}."] * 2
    # mul: the writer's first sample had no box, the second one is kept.
    assert sft[1]["messages"][1]["content"].startswith("Try:")


def test_same_inputs_same_files_and_resume_calls_nothing(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS)
    _run(tmp_path, _clients(), out="a", concurrency=3)
    _run(tmp_path, _clients(), out="b", concurrency=1)
    for name in ("sft.jsonl", "rejected.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    clients = _clients()
    again = _run(tmp_path, clients, out="a")
    assert all(not c.calls for c in (*clients[0], clients[1], clients[2]))
    assert {name: stage["already_done"] for name, stage in again["stages"].items()} == {
        "attempts": 3, "critiques": 3, "rewrites": 3}
    assert again["sft_records"] == 2


def test_a_later_stage_reruns_alone(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS)
    _run(tmp_path, _clients())
    before = (tmp_path / "out" / "sft.jsonl").read_text()
    (tmp_path / "out" / "rewrites.jsonl").unlink()
    clients = _clients()
    result = _run(tmp_path, clients)
    assert not clients[0][0].calls and not clients[1].calls and len(clients[2].calls) == 6
    assert result["stages"]["rewrites"]["finished"] == 3
    assert (tmp_path / "out" / "sft.jsonl").read_text() == before
    clients = _clients()
    only = _run(tmp_path, clients, stages=["rewrites"], writer_temperature=0.2)
    assert only["stages"].keys() == {"rewrites"} and not clients[2].calls


def test_failed_items_are_recorded_and_retried(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS)

    def flaky_writer(prompt, params):
        if "4*6" in prompt:
            raise LLMClientError("HTTP 503 after 4 retries")
        return writer_reply(prompt, params)

    attempts, critic, _ = _clients()
    result = _run(tmp_path, (attempts, critic, ScriptedClient(flaky_writer)))
    assert (result["failed"], result["unfinished"], result["sft_records"]) == (1, 1, 1)
    (error,) = _rows(tmp_path / "out" / "rewrites.errors.jsonl")
    assert error["id"] == "mul" and error["stage"] == "rewrites"
    assert error["error"] == "LLMClientError: HTTP 503 after 4 retries"
    assert [r["id"] for r in _rows(tmp_path / "out" / "sft.jsonl")] == ["add"]
    clients = _clients()
    result = _run(tmp_path, clients)
    assert (result["failed"], result["unfinished"], result["sft_records"]) == (0, 0, 2)
    assert {_problem_of(prompt)["id"] for prompt, _ in clients[2].calls} == {"mul"}
    assert [r["id"] for r in _rows(tmp_path / "out" / "sft.jsonl")] == ["add", "mul"]


def test_critiques_of_other_attempts_are_refused(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS)
    _run(tmp_path, _clients())
    (tmp_path / "out" / "attempts.jsonl").unlink()
    (tmp_path / "out" / "rewrites.jsonl").unlink()
    with pytest.raises(ValueError, match="critiques of id 'add' review other attempts"):
        _run(tmp_path, _clients(), seed=1)


def test_sft_records_train_through_lm_data(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS)
    _run(tmp_path, _clients())
    tokenizer = default_tokenizer(str(tmp_path / "tokenizer"))
    data = lm_data(seed=0, process_index=0, process_count=1, paths=str(tmp_path / "out" / "sft.jsonl"),
                   data_format="chat", tokenizer=tokenizer, seq_len=256, global_batch_size=2,
                   shuffle=False, num_epochs=1, packing=False, num_data_shards=1)
    (batch,) = list(data)
    assert batch["inputs"].shape == (2, 256)
    sft = _rows(tmp_path / "out" / "sft.jsonl")
    for row, record in zip(range(2), sft):
        trained = np.asarray(batch["targets"][row])[np.asarray(batch["loss_mask"][row]) == 1]
        text = tokenizer.decode(trained.tolist())
        assert record["messages"][1]["content"] in text  # the solution is what the model learns
        assert record["messages"][0]["content"] not in text  # the question is not trained on


def test_input_errors_name_the_line(tmp_path):
    _write(tmp_path / "problems.jsonl", [PROBLEMS[0], {"id": "x", "problem": "", "answer": "1"}])
    with pytest.raises(InputError, match=r"(?m)problems.jsonl:2: field 'problem' must be a non-empty string$"):
        _run(tmp_path, _clients())
    _write(tmp_path / "problems.jsonl", [{"problem": "What is 2+3?"}])
    with pytest.raises(InputError, match=r"problems.jsonl:1: field 'answer' must be"):
        _run(tmp_path, _clients())
    assert not (tmp_path / "out" / "attempts.jsonl").exists()


def test_prompt_files_are_selectable_and_checked(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS[:1])
    (tmp_path / "attempt.txt").write_text("Q: {{problem}}\nA:")
    clients = _clients()
    _run(tmp_path, clients, attempt_prompt=str(tmp_path / "attempt.txt"))
    assert clients[0][0].calls[0][0] == "Q: What is 2+3?\nA:"
    (tmp_path / "bad.txt").write_text("{{problem}} {{answr}}")
    with pytest.raises(PromptError, match=r"bad.txt: .*missing: \['answer', 'attempt', 'verdict'\], "
                                          r"unknown: \['answr'\]"):
        _run(tmp_path, _clients(), critique_prompt=str(tmp_path / "bad.txt"))
    with pytest.raises(PromptError, match="cannot read the prompt"):
        _run(tmp_path, _clients(), rewrite_prompt=str(tmp_path / "missing.txt"))
    assert t1_cot.load_prompt(None, "t1_attempt_plain.txt", ["problem"]) == "{{problem}}\n"


def test_gin_configures_the_pipeline(tmp_path):
    _write(tmp_path / "problems.jsonl", PROBLEMS[:1])
    clients = _clients()
    with gin.unlock_config():
        gin.parse_config("t1_cot_pipeline.num_attempts = 3\nt1_cot_pipeline.attempt_temperature = 1.2")
    try:
        attempts, critic, writer = clients
        t1_cot_pipeline(tmp_path / "problems.jsonl", tmp_path / "out", attempts, critic, writer,
                        checker=boxed_checker, progress=False)
    finally:
        gin.clear_config()
    assert len(clients[0][0].calls) == 3 and {p.temperature for _, p in clients[0][0].calls} == {1.2}


def test_builtin_problems_are_the_task_questions_and_answers(tmp_path):
    assert write_builtin_problems(tmp_path / "p.jsonl", 4, split="eval", seed=3) == 4
    expected = generate_problems(4, seed=3, split="eval")
    assert _rows(tmp_path / "p.jsonl") == [
        {"id": f"arith-eval-{n}", "problem": p.question, "answer": str(p.answer)} for n, p in enumerate(expected)]
    t1_cot.read_items(tmp_path / "p.jsonl", t1_cot.validate_problem)  # valid pipeline input


def test_render_substitutes_once():
    assert t1_cot.render("{{a}} and {{b}}", a="{{b}}", b="x") == "{{b}} and x"
    assert t1_cot.has_boxed_answer("so \\boxed{5}.") and not t1_cot.has_boxed_answer("\\boxed{5")


# -- launch.pipeline ---------------------------------------------------------------------------

def _launch(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "launch.pipeline", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def _summary(done):
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_IN_PROCESS_RUNNER = """
import json, sys
import gin
from absl import flags
from absl.testing import flagsaver
from launch import pipeline
out = []
for args in json.loads(sys.argv[1]):
    with flagsaver.flagsaver():
        argv = flags.FLAGS(["pipeline", *args])
        try:
            out.append(pipeline.main(argv, []))
        finally:
            gin.clear_config()
print(json.dumps(out))
"""


def _main_in_fresh_process(cases):
    """launch.pipeline's exit codes for several argument lists, and its stderr, from ONE fresh
    interpreter (absl flags of other launch modules a test worker imported would clash)."""
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS_RUNNER, json.dumps(cases)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_cli_usage_errors_exit_2(tmp_path):
    problems = _write(tmp_path / "problems.jsonl", PROBLEMS)
    cases = [
        (["t1_cot", f"--input={problems}", f"--output={tmp_path / 'o'}"], "this command needs --client"),
        (["nope"], "give one pipeline name, one of t1_cot, builtin_problems"),
        (["t1_cot", f"--input={problems}", f"--output={tmp_path / 'o'}", "--client=local"], "needs --run_dir"),
        (["t1_cot", f"--input={problems}", f"--output={tmp_path / 'o'}", "--client=http", "--model=m"],
         "needs --base_url"),
    ]
    codes, stderr = _main_in_fresh_process([args for args, _ in cases])
    assert codes == [2] * len(cases)
    lines = [line for line in stderr.splitlines() if line.startswith("pipeline: ")]
    assert len(lines) == len(cases)
    for line, (_, message) in zip(lines, cases):
        assert message in line, line
    assert not (tmp_path / "o").exists()


def test_cli_malformed_input_exits_2_naming_the_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [PROBLEMS[0], "not an object"])
    done = _launch("t1_cot", f"--input={bad}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"pipeline: {bad}:2: expected a JSON object, got str"
    assert not (tmp_path / "o" / "attempts.jsonl").exists()


HTTP_PROBLEMS = [
    {"id": "p1", "problem": "What is 2+3?", "answer": "5"},
    {"id": "p2", "problem": "What is 10/4?", "answer": "\\frac{5}{2}"},  # verified as 2.5 by math-verify
    {"id": "p3", "problem": "What is 7*8-1?", "answer": "55"},
]


def _server_reply(request):
    prompt = request["messages"][-1]["content"]
    problem = next(p for p in HTTP_PROBLEMS if p["problem"] in prompt)
    if prompt.startswith("Solve the problem below"):  # m1 answers right (2.5 for 5/2), m2 wrong
        answer = {"p1": "5", "p2": "2.5", "p3": "55"}[problem["id"]] if request["model"] == "m1" else "999"
        return f"[{request['model']} seed {request['seed']}] I get \\boxed{{{answer}}}"
    if prompt.startswith("You are reviewing one attempt"):
        return "The second step is off by one."
    answer = {"p1": "5", "p2": "2.5", "p3": "54"}[problem["id"]]
    return f"First try: wrong. Wait, check it: that fails. Redo and verify: ok. \\boxed{{{answer}}}"


def test_cli_http_fake_server_records_and_resume(tmp_path):
    problems = _write(tmp_path / "problems.jsonl", HTTP_PROBLEMS)
    out = tmp_path / "out"
    args = ["t1_cot", f"--input={problems}", f"--output={out}", "--client=http", "--model=m1,m2",
            "--writer_model=w", "--concurrency=2", "--gin.t1_cot_pipeline.num_attempts=2",
            "--gin_bindings=t1_cot_pipeline.num_rewrites=1"]
    with FakeOpenAIServer(reply=_server_reply) as server:
        server.script(Behaviour.error(400, "bad request"))  # the first request fails, not retried
        first = _launch(*args, f"--base_url={server.base_url}")
        assert first.returncode == 1, first.stderr[-3000:]
        assert "pipeline: 1 items failed (reasons in" in first.stderr and "attempts.errors.jsonl" in first.stderr
        summary = _summary(first)
        assert (summary["failed"], summary["unfinished"]) == (1, 1)
        (error,) = _rows(out / "attempts.errors.jsonl")
        assert "HTTP 400: bad request" in error["error"]
        requests_before = len(server.requests)
        second = _launch(*args, f"--base_url={server.base_url}")
        assert second.returncode == 0, second.stderr[-3000:]
        summary = _summary(second)
        retried = server.requests[requests_before:]
    assert summary["stages"]["attempts"]["already_done"] == 2 and summary["stages"]["attempts"]["finished"] == 1
    # The retried problem alone: 2 models x 2 attempts, 4 critiques, 1 rewrite.
    assert len(retried) == 9 and {error["id"]} == {
        next(p["id"] for p in HTTP_PROBLEMS if p["problem"] in r.body["messages"][-1]["content"]) for r in retried}
    assert sorted(r.body["model"] for r in retried) == ["m1"] * 6 + ["m2"] * 2 + ["w"]
    assert (summary["sft_records"], summary["rejected"], summary["unfinished"]) == (2, 1, 0)
    sft = _rows(out / "sft.jsonl")
    assert [r["id"] for r in sft] == ["p1", "p2"]
    assert sft[1]["messages"][0] == {"role": "user", "content": "What is 10/4?"}
    assert sft[1]["messages"][1]["content"].endswith("\\boxed{2.5}") and sft[1]["answer"] == "\\frac{5}{2}"
    assert _rows(out / "rejected.jsonl") == [{"id": "p3", "reason": (
        "no verified rewrite in 1: final answer does not match the gold answer (x1)")}]
    attempts = {r["id"]: r["attempts"] for r in _rows(out / "attempts.jsonl")}
    for problem_id in ("p1", "p2", "p3"):  # the default checker (math-verify) marked each attempt
        assert [(a["client"], a["correct"]) for a in attempts[problem_id]] == [
            (0, True), (0, True), (1, False), (1, False)]


@pytest.mark.slow
def test_cli_local_engine_on_the_builtin_task(tmp_path):
    run, _ = tiny_run_dir(tmp_path)
    problems = tmp_path / "problems.jsonl"
    done = _launch("builtin_problems", f"--output={problems}", "--num_problems=3")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(problems)
    assert [r["id"] for r in rows] == ["arith-eval-0", "arith-eval-1", "arith-eval-2"]
    assert all(r["problem"].startswith("Compute ") and r["answer"].isdigit() for r in rows)
    out = tmp_path / "out"
    done = _launch("t1_cot", f"--input={problems}", f"--output={out}", "--client=local", f"--run_dir={run}",
                   "--concurrency=2", "--gin.t1_cot_pipeline.num_attempts=2",
                   "--gin.t1_cot_pipeline.num_rewrites=1", "--gin.t1_cot_pipeline.attempt_max_tokens=8",
                   "--gin.t1_cot_pipeline.critic_max_tokens=8", "--gin.t1_cot_pipeline.writer_max_tokens=8")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done)
    assert summary["failed"] == 0 and summary["unfinished"] == 0
    assert summary["sft_records"] + summary["rejected"] == 3
    attempts = _rows(out / "attempts.jsonl")
    assert sorted(r["id"] for r in attempts) == [r["id"] for r in rows]
    assert all(len(r["attempts"]) == 2 and r["attempts"][1]["seed"] == r["attempts"][0]["seed"] + 1
               for r in attempts)
    assert all(len(r["critiques"]) == 2 for r in _rows(out / "critiques.jsonl"))
    rejected = _rows(out / "rejected.jsonl")
    assert all(r["reason"].startswith("no verified rewrite in 1: ") for r in rejected)
    assert len(_rows(out / "sft.jsonl")) == summary["sft_records"]
    assert "attempts: 100%" in done.stderr and "item/s" in done.stderr  # the progress bars
