"""CoF from the command line: launch.pipeline cof against the fake OpenAI server on loopback (BM25 and
/v1/embeddings retrieval), bad input and flags (exit 2), and a kill -9 in the middle of a run.

Every launch imports glmjax (about 20 s on 2 shared cores), so all but the BM25 run are slow tests."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cof_scripted import CITED, DOCUMENTS, FIXTURE, cof_reply
from fake_openai_server import Behaviour, FakeOpenAIServer

import glmjax

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# -- kill -9 ------------------------------------------------------------------------------------

_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from scripted_clients import ScriptedClient
from cof_scripted import cof_reply
from glmjax.pipelines.cof import cof_pipeline

def slow(prompt, params):
    time.sleep(float(sys.argv[4]))
    return cof_reply(prompt, params)

result = cof_pipeline(sys.argv[1], sys.argv[2], ScriptedClient(slow), concurrency=3, chunk_tokens=24, progress=False)
print(result["sft_records"], result["failed"], result["stages"]["qa"]["already_done"],
      result["stages"]["chunk_cites"]["already_done"])
"""


@pytest.mark.slow
def test_kill_9_resumes_without_losing_or_repeating_rows(tmp_path):
    documents = [{**row, "id": f"{row['id']}-{k}"} for k in range(4) for row in DOCUMENTS.values()]
    _write(tmp_path / "documents.jsonl", documents)
    out = tmp_path / "out"
    command = [sys.executable, "-c", _WORKER, str(tmp_path / "documents.jsonl"), str(out),
               str(Path(__file__).parent)]
    process = subprocess.Popen([*command, "0.2"], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "chunk_cites.jsonl").exists() or b"\n" not in (out / "chunk_cites.jsonl").read_bytes():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "sft.jsonl").exists()
    # Killed in the chunk-citation stage (the stages run one after another): the QA is complete.
    data = (out / "chunk_cites.jsonl").read_bytes()  # a row torn by the kill is no row
    kept = {json.loads(line)["id"] for line in data[: data.rfind(b"\n") + 1].splitlines()}
    assert len(_rows(out / "qa.jsonl")) == len(documents) and 1 <= len(kept) < len(documents)
    done = subprocess.run([*command, "0"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sft_records, failed, qa_done, chunks_done = map(int, done.stdout.split())
    assert (sft_records, failed, qa_done) == (len(documents), 0, len(documents))
    assert chunks_done >= len(kept)  # every row written before the kill was kept (a torn one is redone)
    for name in ("qa", "chunk_cites", "sentence_cites"):
        ids = [row["id"] for row in _rows(out / f"{name}.jsonl")]
        assert sorted(ids) == sorted(d["id"] for d in documents)  # each once
    sft = {row["id"]: row["messages"][1]["content"] for row in _rows(out / "sft.jsonl")}
    assert sft == {d["id"]: CITED[d["id"].rsplit("-", 1)[0]] for d in documents}


# -- launch.pipeline ----------------------------------------------------------------------------

def _launch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.pipeline", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def _server_reply(request):
    assert request["model"] == "m"
    return cof_reply(request["messages"][-1]["content"])


@pytest.mark.parametrize("retriever", [
    "bm25", pytest.param("embeddings", marks=pytest.mark.slow),
    pytest.param("wordllama", marks=pytest.mark.slow)])  # glmjax[test] installs wordllama
def test_cli_against_the_fake_server(tmp_path, retriever):
    out = tmp_path / "out"
    args = ["cof", f"--input={FIXTURE}", f"--output={out}", "--client=http", "--model=m", "--concurrency=2",
            "--gin.cof_pipeline.chunk_tokens=24", f"--retriever={retriever}", "--embeddings_model=e"]
    with FakeOpenAIServer(reply=_server_reply) as server:
        server.script(Behaviour.error(400, "bad request"))  # the first call fails (not retried): an item error
        first = _launch(*args, f"--base_url={server.base_url}")
        assert first.returncode == 1, first.stderr[-3000:]
        assert "qa.errors.jsonl" in first.stderr
        second = _launch(*args, f"--base_url={server.base_url}")
        assert second.returncode == 0, second.stderr[-3000:]
        embedded = [r for r in server.requests if r.path == "/v1/embeddings"]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert (summary["sft_records"], summary["unfinished"], summary["failed"]) == (3, 0, 0)
    assert summary["stages"]["qa"]["already_done"] == 2
    sft = {row["id"]: row["messages"][1]["content"] for row in _rows(out / "sft.jsonl")}
    assert sft == CITED
    if retriever == "embeddings":
        assert embedded and {r.body["model"] for r in embedded} == {"e"}
    else:
        assert not embedded


@pytest.mark.slow
def test_cli_bad_input_and_flags_exit_2(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [DOCUMENTS["orrin"], '{"context": 3}'])
    done = _launch("cof", f"--input={bad}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"pipeline: {bad}:2: field 'context' must be a non-empty string"
    assert not (tmp_path / "o").exists()
    done = _launch("cof", f"--input={FIXTURE}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m", "--retriever=embeddings")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "pipeline: the embeddings retriever needs --embeddings_model"
    done = _launch("cof", f"--input={FIXTURE}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m", "--gin.cof_pipeline.min_cited_fraction=2.0")
    assert done.returncode == 2 and "min_cited_fraction in [0, 1]" in done.stderr.strip().splitlines()[-1]
    shadow = tmp_path / "shadow" / "wordllama"  # a wordllama that cannot be imported
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = subprocess.run([sys.executable, "-m", "launch.pipeline", "cof", f"--input={FIXTURE}",
                           f"--output={tmp_path / 'o'}", "--client=http", "--base_url=http://127.0.0.1:9/v1",
                           "--model=m", "--retriever=wordllama"], capture_output=True, text=True, cwd=REPO,
                          env={**ENV, "PYTHONPATH": str(shadow.parent)}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "pipeline: the local embedding model needs the 'wordllama' package (pip install 'wordllama>=0.4')")
    assert not (tmp_path / "o").exists()
