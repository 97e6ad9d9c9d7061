"""AgentWrite end to end through ``launch.serve``'s app: a tiny model served on loopback plans and
writes (OpenAIHTTPClient), and gives the same plans, paragraphs, SFT records and token counts as
the same model through the local engine client.

A random model cannot write a plan, so the served model is built to: the tokenizer gets one added
token whose text is a whole two-paragraph plan, and :func:`serving_models.scripted_engine` makes
that token (then end of turn) the greedy answer to any prompt. The writer is the same model, so
every paragraph it writes is that text again: what the test checks is the path (chat template,
HTTP, the pipeline's stages, usage), not the writing.
"""

import json

import pytest
from chat_tokenizers import qwen_tokenizer
from serving_models import MODEL_NAME, scripted_engine, serving, tiny_engine
from tokenizers import AddedToken

from glmjax.data.chat_format import chat_format_for
from glmjax.inference.llm_client import OpenAIHTTPClient
from glmjax.inference.local_client import LocalEngineClient
from glmjax.pipelines.agentwrite import PlanStep, agentwrite_pipeline, count_words, parse_plan

PLAN = ("Paragraph 1 - Main Point: The keeper lights the lamp - Word Count: 300 words\n"
        "Paragraph 2 - Main Point: The storm passes - Word Count: 400 words")
INSTRUCTIONS = [{"id": "lighthouse", "instruction": "Write a story about a lighthouse keeper."},
                {"id": "tides", "instruction": "Write an essay on tides."}]


@pytest.fixture(scope="module")
def planner_model(tmp_path_factory):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen"))
    tokenizer.add_tokens([AddedToken(PLAN, special=False, normalized=False)])
    (plan_token,) = tokenizer.encode(PLAN, add_special_tokens=False)
    generation_start = chat_format_for(tokenizer).prompt_ids([{"role": "user", "content": "x"}])[-1]
    engine = scripted_engine(len(tokenizer), [generation_start, plan_token,
                                              tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with serving(engine, tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        yield http, LocalEngineClient(engine, tokenizer)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tmp_path, name, client, **kwargs):
    (tmp_path / "instructions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in INSTRUCTIONS))
    return agentwrite_pipeline(tmp_path / "instructions.jsonl", tmp_path / name, client, client,
                               planner_temperature=0.0, writer_temperature=0.0, planner_max_tokens=8,
                               writer_max_tokens=8, concurrency=2, progress=False, **kwargs)


def test_served_model_plans_and_writes_as_the_local_engine(tmp_path, planner_model):
    http, local = planner_model
    served, direct = _run(tmp_path, "http", http), _run(tmp_path, "local", local)
    assert (served["planned"], served["sft_records"], served["failed"]) == (2, 2, 0)
    assert parse_plan(PLAN) == [PlanStep("The keeper lights the lamp", 300), PlanStep("The storm passes", 400)]
    plans = {row["id"]: row for row in _rows(tmp_path / "http" / "plans.jsonl")}
    assert {row["plan"] for row in plans.values()} == {PLAN}
    assert plans["tides"]["steps"] == [{"main_point": "The keeper lights the lamp", "words": 300},
                                       {"main_point": "The storm passes", "words": 400}]
    sft = _rows(tmp_path / "http" / "sft.jsonl")
    assert [row["id"] for row in sft] == ["lighthouse", "tides"]
    for row, instruction in zip(sft, INSTRUCTIONS):
        assert row["messages"] == [{"role": "user", "content": instruction["instruction"]},
                                   {"role": "assistant", "content": f"{PLAN}\n\n{PLAN}"}]
    assert served["words"] == 2 * count_words(f"{PLAN}\n\n{PLAN}")
    # The same rows (by id: they are appended as items finish) and token counts as the local engine; the server reported every call's usage.
    for name in ("plans.jsonl", "writes.jsonl", "sft.jsonl"):
        served_rows, local_rows = ({row["id"]: {k: v for k, v in row.items() if k != "usage"}
                                    for row in _rows(tmp_path / run / name)} for run in ("http", "local"))
        assert served_rows == local_rows and len(served_rows) == 2
    for stage in ("plans", "writes"):
        usage, local_usage = served["stages"][stage]["usage"], direct["stages"][stage]["usage"]
        assert usage == local_usage and usage["unreported"] == 0
        assert usage["calls"] == (2 if stage == "plans" else 4) and usage["completion_tokens"] == 2 * usage["calls"]


def test_a_random_served_model_fails_per_item_and_a_rerun_retries(tmp_path_factory, tmp_path):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen_random"))
    with serving(tiny_engine(len(tokenizer)), tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        first = _run(tmp_path, "out", http)
        assert (first["planned"], first["failed"], first["sft_records"]) == (0, 2, 0)
        errors = _rows(tmp_path / "out" / "plans.errors.jsonl")
        assert {row["id"] for row in errors} == {"lighthouse", "tides"}
        assert all(row["error"].startswith("PlanError: ") and row["usage"]["calls"] == 1 for row in errors)
        second = _run(tmp_path, "out", http)
        assert second["stages"]["plans"]["already_done"] == 0 and second["stages"]["plans"]["failed"] == 2
