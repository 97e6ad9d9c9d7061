"""``python -m launch.pipeline longreward``: policy and judge over HTTP (the fake OpenAI server on
loopback), the policy judging itself, a local launch.train run as the policy, resume with exit 1 then
0, and one-line usage/input errors with exit 2 (needs the ``longreward`` subcommand of
/work/notes/longreward_pipeline.diff applied to launch/pipeline.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
from fake_openai_server import Behaviour, FakeOpenAIServer
from training_helpers import tiny_run_dir

import glmjax
from glmjax.pipelines import longreward as lr
from glmjax.pipelines.t1_cot import item_seed

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")

CONTEXT = ("The river Alder rises in the Kell hills. It flows west for 80 kilometres. It meets the sea at "
           "Port Ness. A ferry crosses it at Dunmore.")
PROMPTS = [{"id": "river", "context": CONTEXT, "query": "Where does the Alder meet the sea?"},
           {"context": CONTEXT, "query": "How long is the Alder?"}]


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _launch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.pipeline", "longreward", *args], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=timeout)


def judge_reply(prompt):
    """A rule judge: every dimension rates the answer's length in words (at most 10); statements are
    the answer's sentences, fully supported when the passages hold them."""
    if "whether a statement is supported" in prompt:
        statement = re.search(r"\[Statement\]\n(.*?)\n\[End of statement\]", prompt, re.S).group(1)
        return "[[Fully supported]]" if statement.rstrip(".") in prompt.split("[Statement]")[0] else "[[Not supported]]"
    if "Extract from this part" in prompt:
        return "- It meets the sea at Port Ness."
    answer = re.search(r"\[Answer\]\n(.*?)\n\[End of answer\]", prompt, re.S).group(1)
    if "FACTUAL" in prompt:
        return "\n".join(f"- {s.strip()}." for s in answer.split(".") if s.strip()) or "[[None]]"
    return f"Rating: [[{min(10, len(answer.split()))}]]"


def _server_reply(request):
    prompt = request["messages"][-1]["content"]
    if request["model"] == "policy":
        return "It meets the sea at Port Ness" + ". It flows west" * (request["seed"] % 3)
    return judge_reply(prompt)


def test_cli_http_policy_and_judge(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out"
    args = [f"--input={prompts}", f"--output={out}", "--client=http", "--model=policy", "--concurrency=2",
            "--gin.longreward_pipeline.num_samples=3", "--gin.longreward_pipeline.policy_max_tokens=32"]
    with FakeOpenAIServer(reply=_server_reply) as server:
        server.script(Behaviour.error(400, "bad request"))  # one request fails (not retried by the client)
        judge = [f"--judge_base_url={server.base_url}", "--judge_model=judge"]
        first = _launch(*args, f"--base_url={server.base_url}", *judge)
        assert first.returncode == 1, first.stderr[-3000:]
        assert ".errors.jsonl" in first.stderr and "rerun the same command" in first.stderr
        before = len(server.requests)
        second = _launch(*args, f"--base_url={server.base_url}", *judge)
        assert second.returncode == 0, second.stderr[-3000:]
        requests = server.requests
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert (summary["prompts"], summary["scored_prompts"], summary["unfinished"], summary["failed"]) == (2, 2, 0, 0)
    assert summary["pairs"] + summary["ties"] + summary["identical"] == 2 and summary["pairs"] >= 1
    assert {r.body["model"] for r in requests} == {"policy", "judge"}
    assert {r.body["max_tokens"] for r in requests if r.body["model"] == "policy"} == {32}
    assert len(requests) - before < before  # the rerun redid only the failed item's calls
    responses = {row["id"]: row for row in _rows(out / "responses.jsonl")}
    base = item_seed(0, "responses", 0, "river")
    assert responses["river"]["responses"] == ["It meets the sea at Port Ness" + ". It flows west" * ((base + k) % 3)
                                               for k in range(3)]
    scores = {row["id"]: row for row in _rows(out / "scores.jsonl")}
    assert len(scores) == 6 and scores[lr.score_key("river", 0)]["scores"]["faithfulness"] == 10.0
    for pair in _rows(out / "pairs.jsonl"):
        texts = responses[pair["id"]]["responses"]
        assert {"context", "query", "win_response", "lose_response"} <= pair.keys()
        assert len(pair["win_response"].split()) > len(pair["lose_response"].split())
        assert pair["win_response"] in texts and pair["lose_response"] in texts


def test_cli_policy_judges_itself(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", PROMPTS[:1])
    seen = []

    def reply(request):
        seen.append(request["model"])
        prompt = request["messages"][-1]["content"]
        if prompt.startswith(CONTEXT):
            return "It meets the sea at Port Ness" + ". It flows west" * (request["seed"] % 3)
        return judge_reply(prompt)

    with FakeOpenAIServer(reply=reply) as server:
        done = _launch(f"--input={prompts}", f"--output={tmp_path / 'out'}", "--client=http", "--model=policy",
                       f"--base_url={server.base_url}", "--gin.longreward_pipeline.num_samples=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(seen) == {"policy"} and len(seen) > 2  # the policy's 2 samples and every judge call
    assert json.loads(done.stdout.strip().splitlines()[-1])["scored_prompts"] == 1


@pytest.mark.slow  # loads a model in the subprocess
def test_cli_local_policy_http_judge(tmp_path):
    run, _ = tiny_run_dir(tmp_path)
    prompts = _write(tmp_path / "prompts.jsonl", PROMPTS)
    with FakeOpenAIServer(reply=lambda request: judge_reply(request["messages"][-1]["content"])) as server:
        done = _launch(f"--input={prompts}", f"--output={tmp_path / 'out'}", "--client=local", f"--run_dir={run}",
                       f"--judge_base_url={server.base_url}", "--judge_model=judge",
                       "--gin.longreward_pipeline.num_samples=4", "--gin.longreward_pipeline.policy_max_tokens=6")
        judged = [r.body["model"] for r in server.requests]
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["scored_prompts"] == 2 and summary["failed"] == 0
    assert set(judged) == {"judge"}
    responses = _rows(tmp_path / "out" / "responses.jsonl")
    assert all(len(row["responses"]) == 4 and row["usage"]["calls"] == 4 for row in responses)
    assert all(row["usage"]["completion_tokens"] <= 4 * 6 for row in responses)  # the local engine's ids


def test_cli_errors_are_one_line_exit_2(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", PROMPTS)
    done = _launch(f"--input={prompts}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m", "--judge_base_url=http://127.0.0.1:9/v1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "pipeline: --judge_base_url and --judge_model go together"
    bad = _write(tmp_path / "bad.jsonl", [PROMPTS[0], '{"context": "text", "query": ""}'])
    done = _launch(f"--input={bad}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"pipeline: {bad}:2: field 'query' must be a non-empty string"
    assert not (tmp_path / "o").exists()
