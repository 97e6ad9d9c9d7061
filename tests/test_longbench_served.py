"""LongBench-Write and LongBench v2 jobs against a tiny model served by ``launch.serve``'s app
(OpenAIHTTPClient on loopback) give what the same model gives through the local engine client,
with the served token counts; the scores follow the published rules on its replies."""

import json

import pytest
from chat_tokenizers import qwen_tokenizer
from scripted_clients import ScriptedClient
from serving_models import MODEL_NAME, serving, tiny_engine

from glmjax.evals import longbench_v2 as lb2
from glmjax.evals import longbench_write as lbw
from glmjax.evals.longbench_jobs import longbench_v2_job, longbench_write_job
from glmjax.inference.llm_client import OpenAIHTTPClient, SamplingParams
from glmjax.inference.local_client import LocalEngineClient

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen"))
    engine = tiny_engine(len(tokenizer))
    with serving(engine, tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        yield http, LocalEngineClient(engine, tokenizer), tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(path):
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_longbench_v2_through_the_server_equals_the_local_engine(tmp_path, model):
    http, local, tokenizer = model
    items = [{"_id": f"q{i}", "domain": "d", "sub_domain": "s", "difficulty": ("easy", "hard")[i % 2],
              "length": ("short", "medium", "long")[i], "question": f"Question {i}?", "choice_A": "a",
              "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": "ABC"[i],
              "context": f"Document {i}. " * (5 + 20 * i)} for i in range(3)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))
    parsed = [lb2.parse_item(item, item["_id"]) for item in items]
    lengths = [len(tokenizer.encode(lb2.build_prompt(item, "zero_shot"), add_special_tokens=False))
               for item in parsed]
    budget = (lengths[0] + lengths[2]) // 2  # the first prompt fits, the last is cut
    reports = {name: longbench_v2_job(data, tmp_path / name, client, tokenizer=tokenizer, budget=budget,
                                      sampling=GREEDY, concurrency=2, progress=False)
               for name, client in (("http", http), ("local", local))}
    served, direct = (_rows(tmp_path / name / "predictions.jsonl") for name in ("http", "local"))
    assert {k: (r["response"], r["prediction"]) for k, r in served.items()} == \
        {k: (r["response"], r["prediction"]) for k, r in direct.items()}
    assert all(row["prediction"] == lb2.extract_answer(row["response"]) for row in served.values())
    expected = lb2.score(parsed, {k: r["prediction"] for k, r in served.items()})
    assert reports["http"]["result"] == expected == reports["local"]["result"]
    assert reports["http"]["result"]["overall"]["count"] == 3
    assert served["q2"]["truncated"] and not served["q0"]["truncated"]
    # The server's usage equals the local engine's count of the same prompts and replies.
    assert sum(r["usage"]["prompt_tokens"] for r in served.values()) == \
        sum(r["usage"]["prompt_tokens"] for r in direct.values()) > 0
    assert all(r["usage"]["unreported"] == 0 for r in served.values())


def test_longbench_write_through_the_server_scores_the_served_replies(tmp_path, model):
    http, _, _ = model
    prompts = _jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Write about the sea.", "type": "Literature and Creative Writing", "length": 8},
        {"prompt": "Write a report on rain.", "type": "Report", "length": 600}])
    judge = ScriptedClient(lambda prompt, sampling: json.dumps({name: 4 for name in lbw.DIMENSIONS}))
    report = longbench_write_job(prompts, tmp_path / "out", http, judge,
                                 sampling=SamplingParams(max_tokens=16, temperature=0.0),
                                 concurrency=2, progress=False)
    responses = _rows(tmp_path / "out" / "responses.jsonl")
    scores = _rows(tmp_path / "out" / "scores.jsonl")
    for item_id, row in responses.items():
        length = lbw.length_score(row["length"], lbw.count_words(row["response"]))
        assert scores[item_id]["s_l"] == pytest.approx(length)
        assert scores[item_id]["s_q"] == pytest.approx(75.0)  # all 4s: (4 - 1) * 25
        assert row["usage"]["calls"] == 1 and row["usage"]["completion_tokens"] > 0
    assert len(judge.calls) == 2
    assert report["scored"] == 2 and report["usage"]["calls"] == 2  # the model's calls (the judge is local)
