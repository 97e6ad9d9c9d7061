"""LongReward's pipeline over HTTP: policy and judge behind the fake OpenAI server on loopback (token
usage, a failed request retried by the next run), and a tiny model served by launch.serve's app as the
policy with a scripted judge (the served samples equal the local engine's at the same seeds)."""

import json
import re

import pytest
from chat_tokenizers import qwen_tokenizer
from fake_openai_server import Behaviour, FakeOpenAIServer
from scripted_clients import ScriptedClient
from serving_models import MODEL_NAME, serving, tiny_engine

from glmjax.inference.llm_client import OpenAIHTTPClient
from glmjax.inference.local_client import LocalEngineClient
from glmjax.pipelines import longreward as lr
from glmjax.pipelines.t1_cot import item_seed

CONTEXT = ("Ferns reproduce by spores. A spore grows into a small plant called a prothallus. The prothallus "
           "makes sperm and eggs; after fertilisation a new fern grows from it. Ferns have no seeds or flowers.")
PROMPTS = [{"id": "ferns", "context": CONTEXT, "query": "How do ferns reproduce?"},
           {"id": "seeds", "context": CONTEXT, "query": "Do ferns have seeds?"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(path):
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def _answer(prompt):
    return re.search(r"\[Answer\]\n(.*?)\n\[End of answer\]", prompt, re.S).group(1)


def rule_judge(prompt):
    """Rates an answer by its length in words (capped at 10); every statement fully supported when its
    words all occur in the passages, else not; chunk information: the chunk's sentences about spores."""
    if "whether a statement is supported" in prompt:
        passages = re.search(r"\[Passages\]\n(.*?)\n\[End of passages\]", prompt, re.S).group(1).lower()
        statement = re.search(r"\[Statement\]\n(.*?)\n\[End of statement\]", prompt, re.S).group(1)
        words = re.findall(r"\w+", statement.lower())
        return "[[Fully supported]]" if all(w in passages for w in words) else "[[Not supported]]"
    if "Extract from this part" in prompt:
        chunk = re.search(r"\[Part of the document\]\n(.*?)\n\[End of part\]", prompt, re.S).group(1)
        return chunk if "spore" in chunk else "[[None]]"
    answer = _answer(prompt)
    if "FACTUAL" in prompt:
        return "\n".join(f"- {s.strip()}." for s in answer.split(".") if s.strip()) or "[[None]]"
    return f"Analysis: {len(answer.split())} words.\nRating: [[{min(10, len(answer.split()))}]]"


def test_pipeline_against_the_fake_server(tmp_path):
    def reply(request):
        prompt = request["messages"][-1]["content"]
        if request["model"] == "policy":
            assert prompt.startswith(CONTEXT + "\n\n")
            return "Ferns reproduce by spores" + ". A spore grows" * (request["seed"] % 4)
        assert request["model"] == "judge" and request["temperature"] == 0.0
        return rule_judge(prompt)

    prompts = _jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    with FakeOpenAIServer(reply=reply) as server:
        policy = OpenAIHTTPClient(server.base_url, "policy", max_retries=0, use_env_proxy=False)
        judge = OpenAIHTTPClient(server.base_url, "judge", max_retries=0, use_env_proxy=False)
        server.script(Behaviour.error(400, "bad request"))  # the first policy request fails
        first = lr.longreward_pipeline(prompts, tmp_path / "out", policy, judge, num_samples=4, concurrency=1,
                                       chunk_tokens=12, top_k_chunks=2, completeness_chunk_tokens=20,
                                       progress=False)
        assert first["failed"] == 1 and first["stages"]["responses"]["failed"] == 1 and first["unfinished"] == 1
        before = len(server.requests)
        second = lr.longreward_pipeline(prompts, tmp_path / "out", policy, judge, num_samples=4, concurrency=2,
                                        chunk_tokens=12, top_k_chunks=2, completeness_chunk_tokens=20,
                                        progress=False)
        retried = server.requests[before:]
    assert second["failed"] == 0 and second["scored_prompts"] == 2 and second["stages"]["responses"]["already_done"] == 1
    assert sum(r.body["model"] == "policy" for r in retried) == 4  # the failed prompt's samples, again
    assert second["stages"]["relevant"]["already_done"] == 2  # its information was kept
    responses, scores = _rows(tmp_path / "out" / "responses.jsonl"), _rows(tmp_path / "out" / "scores.jsonl")
    for prompt_id, row in responses.items():
        base = item_seed(0, "responses", 0, prompt_id)
        assert row["responses"] == ["Ferns reproduce by spores" + ". A spore grows" * ((base + k) % 4) for k in range(4)]
        for k, text in enumerate(row["responses"]):
            score = scores[lr.score_key(prompt_id, k)]
            words = min(10, len(text.split()))
            # helpfulness, logicality and completeness rate the length; every sentence is in the context's words.
            assert score["scores"] == {"helpfulness": words, "logicality": words, "faithfulness": 10.0,
                                       "completeness": words}
            assert score["usage"]["calls"] == score["usage"]["unreported"] == 4 + len(score["statements"])
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    for pair in pairs:
        texts = responses[pair["id"]]["responses"]
        rewards = [(3 * min(10, len(t.split())) + 10.0) / 4 for t in texts]  # three length scores and 10
        assert pair["rewards"] == rewards
        assert pair["win_response"] == texts[rewards.index(max(rewards))]  # the first of the best
        assert pair["lose_response"] == texts[rewards.index(min(rewards))]
    assert len(pairs) + second["ties"] == 2


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    tokenizer = qwen_tokenizer(tmp_path_factory.mktemp("qwen"))
    engine = tiny_engine(len(tokenizer))
    with serving(engine, tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        yield http, LocalEngineClient(engine, tokenizer), tokenizer


def test_served_tiny_policy_with_a_scripted_judge(tmp_path, served_model):
    http, local, tokenizer = served_model
    prompts = _jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    judge = ScriptedClient(lambda prompt, params: rule_judge(prompt))
    settings = dict(num_samples=5, policy_max_tokens=8, policy_temperature=1.0, chunk_tokens=12, top_k_chunks=2,
                    completeness_chunk_tokens=20, concurrency=2, progress=False)
    served = lr.longreward_pipeline(prompts, tmp_path / "http", http, judge, **settings)
    direct = lr.longreward_pipeline(prompts, tmp_path / "local", local, ScriptedClient(judge.reply), **settings)
    assert served["failed"] == direct["failed"] == 0 and served["scored_prompts"] == 2
    responses = {name: _rows(tmp_path / name / "responses.jsonl") for name in ("http", "local")}
    assert {k: r["responses"] for k, r in responses["http"].items()} == \
        {k: r["responses"] for k, r in responses["local"].items()}
    texts = [t for row in responses["http"].values() for t in row["responses"]]
    assert len(set(texts)) > 2  # sampled, not greedy: the samples differ
    assert _rows(tmp_path / "http" / "scores.jsonl").keys() == {lr.score_key(p, k) for p in ("ferns", "seeds")
                                                               for k in range(5)}
    assert (tmp_path / "http" / "pairs.jsonl").read_text() == (tmp_path / "local" / "pairs.jsonl").read_text()
    assert served["pairs"] + served["ties"] + served["identical"] == 2
    # The policy's served calls report their tokens: usage in each responses row.
    usage = {k: r["usage"] for k, r in responses["http"].items()}
    assert all(u["calls"] == 5 and u["unreported"] == 0 and 0 < u["completion_tokens"] <= 40 for u in usage.values())
    local_usage = {k: r["usage"] for k, r in responses["local"].items()}
    assert {k: u["prompt_tokens"] for k, u in usage.items()} == {k: u["prompt_tokens"] for k, u in local_usage.items()}
    assert usage["ferns"]["prompt_tokens"] > 5 * len(tokenizer.encode(CONTEXT, add_special_tokens=False))
