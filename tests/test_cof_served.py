"""CoF end to end through ``launch.serve``'s app: a tiny model served on loopback runs every stage
(OpenAIHTTPClient; also ``launch.pipeline cof`` pointed at it) and gives the same rows, SFT record
and token counts as the same model through the local engine client; a random served model fails
per item, and scripted later stages finish what it could not.

A random model cannot write questions or citations, so the served model is built to: the tokenizer
gets one added token whose text is :data:`REPLY`, and :func:`serving_models.scripted_engine` makes
that token (then end of turn) the greedy answer to any prompt. :data:`REPLY` reads as a numbered
question (stage 1), an answer, a chunk-cited answer citing snippet 1 (stage 2) and, with its
``[1]`` and ``[0-0]``, as sentence spans 1 and 0 (stage 3), so the whole pipeline runs on it. The
prompts are short files (selected as any prompt file is) to fit the served model's 1024 tokens.
"""

import json
import os
import subprocess
import sys

import pytest
from chat_tokenizers import qwen_tokenizer
from cof_scripted import CITED, DOCUMENTS, cof_reply
from scripted_clients import ScriptedClient
from serving_models import MODEL_NAME, scripted_engine, serving, tiny_engine
from tokenizers import AddedToken

import glmjax
from glmjax.data.chat_format import chat_format_for
from glmjax.inference.llm_client import OpenAIHTTPClient
from glmjax.inference.local_client import LocalEngineClient
from glmjax.pipelines.cof import cof_pipeline

REPLY = "1: <statement>The railway closed in 1961.<cite>[1]</cite></statement> [0-0]"
ORRIN = DOCUMENTS["orrin"]
PROMPTS = {"questions_prompt": "Questions ({{count}}, {{kind}}, {{language}}) on: {{context}}",
           "answer_prompt": "Answer {{question}} from: {{context}}",
           "chunk_cite_prompt": "Cite snippets.\n{{snippets}}\nQ: {{question}}\nA: {{answer}}",
           "sentence_cite_prompt": "Pick sentences.\n{{passage}}\nQ: {{question}}\nS: {{statement}}"}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prompts")
    for name, text in PROMPTS.items():
        (directory / f"{name}.txt").write_text(text)
    return {name: str(directory / f"{name}.txt") for name in PROMPTS}


@pytest.fixture(scope="module")
def cof_model(tmp_path_factory):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen"))
    tokenizer.add_tokens([AddedToken(REPLY, special=False, normalized=False)])
    (reply_token,) = tokenizer.encode(REPLY, add_special_tokens=False)
    generation_start = chat_format_for(tokenizer).prompt_ids([{"role": "user", "content": "x"}])[-1]
    engine = scripted_engine(len(tokenizer), [generation_start, reply_token,
                                              tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with serving(engine, tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        yield http, LocalEngineClient(engine, tokenizer)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(tmp_path, name, client, prompt_files, documents, **kwargs):
    (tmp_path / "documents.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
    return cof_pipeline(tmp_path / "documents.jsonl", tmp_path / name, client, temperature=0.0, max_tokens=8,
                        sentence_cite_max_tokens=8, chunk_tokens=24, concurrency=2, progress=False,
                        **prompt_files, **kwargs)


def test_served_model_runs_every_stage_as_the_local_engine(tmp_path, cof_model, prompt_files):
    http, local = cof_model
    documents = [{"id": "orrin", "context": ORRIN["context"]}]
    served = _run(tmp_path, "http", http, prompt_files, documents)
    direct = _run(tmp_path, "local", local, prompt_files, documents)
    assert (served["sft_records"], served["rejected"], served["failed"]) == (1, 0, 0)
    (qa,) = _rows(tmp_path / "http" / "qa.jsonl")
    assert qa["questions"] == [REPLY[3:]] and qa["query"] == REPLY[3:] and qa["answer"] == REPLY
    (chunks,) = _rows(tmp_path / "http" / "chunk_cites.jsonl")
    assert chunks["snippets"][0] == 0
    assert chunks["statements"] == [{"gap": "1: ", "statement": "The railway closed in 1961.", "chunks": [0]}]
    assert chunks["tail"] == " [0-0]"
    (sentences,) = _rows(tmp_path / "http" / "sentence_cites.jsonl")
    assert sentences["statements"] == [{"sentences": [0, 1, 2, 3], "reply": REPLY}]
    (record,) = _rows(tmp_path / "http" / "sft.jsonl")
    assert record["messages"][1]["content"] == (
        "1: <statement>The railway closed in 1961.<cite>[1-1][0-0]</cite></statement> [0-0]")
    assert "<C2>The line closed in 1961 after the new road was built. " in record["messages"][0]["content"]
    for name in ("qa.jsonl", "chunk_cites.jsonl", "sentence_cites.jsonl", "sft.jsonl"):
        served_rows, local_rows = ([{k: v for k, v in row.items() if k != "usage"} for row in _rows(tmp_path / run / name)]
                                   for run in ("http", "local"))
        assert served_rows == local_rows
    for stage, calls in (("qa", 2), ("chunk_cites", 1), ("sentence_cites", 1)):
        usage = served["stages"][stage]["usage"]
        assert usage == direct["stages"][stage]["usage"] and usage["unreported"] == 0
        assert usage["calls"] == calls and usage["completion_tokens"] == 2 * calls


@pytest.mark.slow
def test_the_cli_through_the_served_model(tmp_path, cof_model, prompt_files):
    http, _ = cof_model
    (tmp_path / "documents.jsonl").write_text(json.dumps({"id": "orrin", "context": ORRIN["context"]}) + "\n")
    gin_flags = [f"--gin.cof_pipeline.{name}='{path}'" for name, path in prompt_files.items()]
    done = subprocess.run(
        [sys.executable, "-m", "launch.pipeline", "cof", f"--input={tmp_path / 'documents.jsonl'}",
         f"--output={tmp_path / 'out'}", "--client=http", f"--base_url={http.url.removesuffix('/chat/completions')}",
         f"--model={MODEL_NAME}", "--gin.cof_pipeline.chunk_tokens=24", "--gin.cof_pipeline.temperature=0.0",
         "--gin.cof_pipeline.max_tokens=8", "--gin.cof_pipeline.sentence_cite_max_tokens=8", *gin_flags],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(glmjax.__file__)),
        env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["sft_records"], summary["failed"]) == (1, 0)
    assert summary["stages"]["qa"]["usage"]["completion_tokens"] == 4  # the server's usage, 2 tokens a call
    (record,) = _rows(tmp_path / "out" / "sft.jsonl")
    assert record["messages"][1]["content"] == (
        "1: <statement>The railway closed in 1961.<cite>[1-1][0-0]</cite></statement> [0-0]")


def test_a_random_served_model_fails_per_item_and_scripted_stages_finish(tmp_path_factory, tmp_path, prompt_files):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen_random"))
    documents = [ORRIN, {"id": "marrow", "context": DOCUMENTS["marrow"]["context"]}]
    with serving(tiny_engine(len(tokenizer)), tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        first = _run(tmp_path, "out", http, prompt_files, documents)
    assert first["sft_records"] == 0 and first["failed"] >= 1
    errors = _rows(tmp_path / "out" / "chunk_cites.errors.jsonl")
    assert "orrin" in {row["id"] for row in errors}  # its query and answer are given: stage 2 is the first call
    assert all(row["error"].startswith("CitationFormatError: ") and row["usage"]["calls"] == 1 for row in errors)
    # The given QA of "orrin" is kept; scripted later stages (our default prompts) finish it.
    second = cof_pipeline(tmp_path / "documents.jsonl", tmp_path / "out", ScriptedClient(cof_reply),
                          stages=("chunk_cites", "sentence_cites"), chunk_tokens=24, progress=False)
    assert second["stages"]["chunk_cites"]["finished"] >= 1
    records = {row["id"]: row["messages"][1]["content"] for row in _rows(tmp_path / "out" / "sft.jsonl")}
    assert records["orrin"] == CITED["orrin"]
