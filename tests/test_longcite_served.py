"""LongBench-Cite through ``launch.serve``'s app: a tiny model served on loopback (OpenAIHTTPClient)
answers with citations and gives the same responses, scores and token counts as the same model
through the local engine client; the scores follow the LongBench-Cite rules on its replies.

A random model cannot cite, so the served model is built to: the tokenizer gets one added token
whose text is a whole cited answer, and :func:`serving_models.scripted_engine` makes that token
(then end of turn) the greedy answer to any prompt. What the test checks is the path (chat
template, HTTP, truncation by the served model's tokenizer, the three stages, usage), not the
answering.
"""

import json

import pytest
from chat_tokenizers import qwen_tokenizer
from scripted_clients import ScriptedClient
from serving_models import MODEL_NAME, scripted_engine, serving
from tokenizers import AddedToken

from glmjax.data.chat_format import chat_format_for
from glmjax.evals import longcite as lc
from glmjax.evals.longbench_cite_jobs import longbench_cite_job
from glmjax.evals.longbench_v2 import truncate_prompt
from glmjax.inference.llm_client import OpenAIHTTPClient, SamplingParams
from glmjax.inference.local_client import LocalEngineClient

ANSWER = ("<statement>The lamp is lit at dusk.<cite>[0-0]</cite></statement>"
          "<statement>Storms pass by morning.<cite>[1-1][2-2]</cite></statement>")
ITEMS = [
    {"idx": "lamp", "dataset": "hotpotqa", "query": "When is the lamp lit?", "answer": ["At dusk."],
     "few_shot_scores": [], "context": "The keeper lights the lamp at dusk. Storms come at night. They pass by "
                                       "morning. The keeper sleeps at noon."},
    {"idx": "report", "dataset": "gov_report", "query": "Summarize the report.", "answer": ["Lamps and storms."],
     "few_shot_scores": [], "context": "The lamp is lit at dusk every day of the year. " * 6
                                       + "Storms pass. They always pass by the morning."},
]


@pytest.fixture(scope="module")
def citing_model(tmp_path_factory):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen"))
    tokenizer.add_tokens([AddedToken(ANSWER, special=False, normalized=False)])
    (answer_token,) = tokenizer.encode(ANSWER, add_special_tokens=False)
    generation_start = chat_format_for(tokenizer).prompt_ids([{"role": "user", "content": "x"}])[-1]
    engine = scripted_engine(len(tokenizer), [generation_start, answer_token,
                                              tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with serving(engine, tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        yield http, LocalEngineClient(engine, tokenizer), tokenizer


def _judge(prompt, sampling):
    if "how well the passage supports" in prompt:
        return "Rating: [[Fully supported]]" if "<statement>\nThe lamp is lit" in prompt else "Rating: [[Partially supported]]"
    if "holds key information" in prompt:
        return "Rating: [[Relevant]]"
    return "[[5]]" if "[Assistant's summary]" in prompt else "[[3]]"


def _rows(path):
    return {row["id"]: {k: v for k, v in row.items() if k != "usage"}
            for row in map(json.loads, path.read_text().splitlines())}


def test_served_model_answers_with_citations_as_the_local_engine(tmp_path, citing_model):
    http, local, tokenizer = citing_model
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ITEMS))
    items = lc.load_cite_items(data)
    prompts = [lc.build_cite_prompt(lc.split_sentences(item.context), item.query) for item in items]
    lengths = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    budget = (lengths[0] + lengths[1]) // 2  # the first prompt fits, the second is cut
    assert lengths[0] <= budget < lengths[1]
    reports = {}
    for name, client in (("http", http), ("local", local)):
        judge = ScriptedClient(_judge)
        reports[name] = longbench_cite_job(data, tmp_path / name, client, judge, tokenizer=tokenizer,
                                           budget=budget, sampling=SamplingParams(max_tokens=4, temperature=0.0),
                                           concurrency=2, progress=False)
        # 2 support + 2 relevance ([1-1][2-2] merged into one span) + 1 correctness, per item
        assert len(judge.calls) == 2 * 5
    served, direct = reports["http"], reports["local"]
    for stage in ("responses", "citations", "correctness"):
        assert _rows(tmp_path / "http" / f"{stage}.jsonl") == _rows(tmp_path / "local" / f"{stage}.jsonl")
    responses = _rows(tmp_path / "http" / "responses.jsonl")
    assert {row["response"] for row in responses.values()} == {ANSWER}
    assert (responses["lamp"]["truncated"], responses["report"]["truncated"]) == (False, True)
    assert served["truncation"] == {"budget": budget, "truncated": 1}
    # recall (fully 1 + partially 0.5) / 2; precision 2 of 2 relevant; F1 2 * 0.75 / 1.75
    for group in ("hotpotqa", "gov_report"):
        metrics = served["summary"]["groups"][group]
        assert metrics["citation_recall"] == pytest.approx(0.75) and metrics["citation_precision"] == 1.0
        assert metrics["citation_f1"] == pytest.approx(1.5 / 1.75) and metrics["correctness"] == 1.0
    cites = _rows(tmp_path / "http" / "citations.jsonl")
    spans = [[(c["start"], c["end"]) for c in s["citations"]] for s in cites["lamp"]["statements"]]
    assert spans == [[(0, 0)], [(1, 2)]]
    sentences = lc.split_sentences(ITEMS[0]["context"])
    texts = [sentences[0], sentences[1] + sentences[2]]
    assert served["summary"]["groups"]["hotpotqa"]["citation_length"] == pytest.approx(
        sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) / 2)
    assert served["summary"] == direct["summary"]
    # The server's token counts equal the local engine's: the truncated prompts in the chat template,
    # and the answer token plus end of turn.
    usage = served["stages"]["responses"]["usage"]
    assert usage == direct["stages"]["responses"]["usage"] and usage["unreported"] == 0
    sent = [truncate_prompt(p, tokenizer, budget) for p in prompts]
    assert usage["prompt_tokens"] == sum(len(chat_format_for(tokenizer).prompt_ids(
        [{"role": "user", "content": p}])) for p in sent)
    assert (usage["calls"], usage["completion_tokens"]) == (2, 4)
    assert served["usage"]["calls"] == 2  # the scripted judge reports no calls
