"""``launch.evaluate longbench_cite`` killed with SIGKILL mid-run resumes: finished answers are
kept and not asked again, and the finished report equals the hand-computed one."""

import json
import signal
import subprocess
import sys
import time

import pytest

import longcite_script as script
from fake_openai_server import FakeOpenAIServer

from glmjax.data.tokenizer import load_tokenizer
from glmjax.evals import longcite as lc


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return script.tokenizer_dir(tmp_path_factory.mktemp("tok"))


_KILLED_RUN = """
import sys
from absl import app
from launch import evaluate
app.run(evaluate.main, argv=["evaluate", *sys.argv[1:]])
"""


def test_cli_resumes_after_kill_9(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    asked: list[str] = []

    def slow_reply(body):
        if body["model"] == "reader":
            asked.append(body["messages"][0]["content"])
            time.sleep(0.3)
        return script.reply(body)

    with FakeOpenAIServer(reply=slow_reply) as server:
        args = script.cli_args(server, out, f"--tokenizer_dir={tokenizer_dir}", "--concurrency=1")
        process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, *args], cwd=script.REPO, env=script.ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        responses = out / "responses.jsonl"
        deadline = time.monotonic() + 180
        while not responses.exists() or responses.read_text().count("\n") < 2:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        done_before = set(script.rows(responses))
        asked_before = len(asked)
        assert 2 <= len(done_before) < 6 and not (out / "report.json").exists()
        codes, lines, stderr = script.evaluate_cli([args])
    assert codes == [0], stderr[-3000:]
    (report,) = map(json.loads, lines)
    assert report["stages"]["responses"]["already_done"] == len(done_before)
    assert report["stages"]["responses"]["finished"] == 6 - len(done_before)
    finished_questions = [item.query for item in lc.load_cite_items(script.FIXTURE) if item.idx in done_before]
    assert not any(prompt.endswith(q) for prompt in asked[asked_before:] for q in finished_questions)
    assert sorted(script.rows(responses)) == list(range(6))
    script.check_report(report, load_tokenizer(tokenizer_dir))


