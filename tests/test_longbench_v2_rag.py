"""LongBench v2's "rag" mode end to end on the job (glmjax.evals.longbench_jobs.longbench_v2_job)
with our own retrieval: each item's context chunked and searched with BM25, the model shown only
the chunks found, graded, resumed; the same through a tiny model served by ``launch.serve``'s app
as through the local engine."""

import json

import pytest
from chat_tokenizers import qwen_tokenizer
from scripted_clients import ScriptedClient
from serving_models import MODEL_NAME, serving, tiny_engine

from glmjax.evals import longbench_v2 as lb2
from glmjax.evals.longbench_jobs import longbench_v2_job
from glmjax.inference.llm_client import OpenAIHTTPClient, SamplingParams
from glmjax.inference.local_client import LocalEngineClient
from glmjax.pipelines.retrieval import BM25Retriever

FACTS = {  # item id -> (the sentence that answers it, the question, the right choice's letter)
    "q0": ("The vault code is seven seven two.", "What is the vault code?", "B"),
    "q1": ("Captain Orla sailed the Merrow east.", "Who sailed the Merrow?", "C"),
}
FILLER = "Rain fell on the town while people walked to markets and shops. "  # 13 tokens: one chunk


def _items():
    rows = []
    for index, (item_id, (fact, question, answer)) in enumerate(FACTS.items()):
        context = FILLER * 6 + fact + " " + FILLER * 6
        choices = {"q0": ["one one one", "seven seven two", "nine", "zero"],
                   "q1": ["Ben", "Ada", "Captain Orla", "Nobody"]}[item_id]
        rows.append({"_id": item_id, "domain": "Single-Document QA", "sub_domain": "s",
                     "difficulty": ("easy", "hard")[index], "length": "short", "question": question,
                     **{f"choice_{letter}": choice for letter, choice in zip("ABCD", choices)},
                     "answer": answer, "context": context})
    return rows


def _rows(path):
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_rag_with_bm25_shows_the_found_chunks_and_resumes(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_items()))  # no retrieved_context: the job retrieves
    letters = {fact: answer for fact, _, answer in FACTS.values()}

    def reader(prompt, sampling):  # answers right only when the answering chunk is in the prompt
        found = [letter for fact, letter in letters.items() if fact in prompt]
        return f"The correct answer is ({found[0] if found else 'A'})"

    client = ScriptedClient(reader)
    report = longbench_v2_job(data, tmp_path / "out", client, mode="rag", retriever=BM25Retriever,
                              rag_chunk_tokens=13, rag_top_k=2, concurrency=1, progress=False)
    assert report["result"]["overall"]["accuracy"] == 100.0 and report["scored"] == 2
    assert report["retrieval"] == {"retriever": "BM25Retriever", "chunk_tokens": 13, "top_k": 2}
    rows = _rows(tmp_path / "out" / "predictions.jsonl")
    for (prompt, _), (item_id, (fact, question, _)) in zip(sorted(client.calls, key=lambda c: "Merrow" in c[0]),
                                                           FACTS.items()):
        item = lb2.parse_item(next(r for r in _items() if r["_id"] == item_id), item_id)
        chosen = lb2.retrieve_context(item, BM25Retriever, chunk_tokens=13, top_k=2)
        assert [index for index, _ in chosen.retrieved] == rows[item_id]["retrieved"]
        assert len(rows[item_id]["retrieved"]) <= 2 and fact in prompt and question in prompt
        assert prompt == lb2.build_prompt(item, "rag", retrieved=lb2.retrieved_chunks(chosen, 2))
        assert prompt.count(FILLER.strip()[:20]) < 12  # not the whole document
    rerun = ScriptedClient(reader)
    again = longbench_v2_job(data, tmp_path / "out", rerun, mode="rag", retriever=BM25Retriever,
                             rag_chunk_tokens=13, rag_top_k=2, progress=False)
    assert not rerun.calls and again["result"] == report["result"]
    # Without a retriever, data without retrieved_context is refused, naming the item.
    with pytest.raises(lb2.LongBenchV2FormatError, match="item _id q0 has no 'retrieved_context'"):
        longbench_v2_job(data, tmp_path / "other", client, mode="rag", progress=False)
    with pytest.raises(ValueError, match="a retriever is for the 'rag' mode"):
        longbench_v2_job(data, tmp_path / "other", client, mode="zero_shot", retriever=BM25Retriever)


def test_rag_through_the_server_equals_the_local_engine(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_items()))
    tokenizer = qwen_tokenizer(tmp_path / "qwen")
    engine = tiny_engine(len(tokenizer))
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    with serving(engine, tokenizer) as (_, server):
        http = OpenAIHTTPClient(server.base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)
        reports = {name: longbench_v2_job(data, tmp_path / name, client, mode="rag", retriever=BM25Retriever,
                                          tokenizer=tokenizer, rag_chunk_tokens=32, rag_top_k=1,
                                          sampling=greedy, concurrency=2, progress=False)
                   for name, client in (("http", http), ("local", LocalEngineClient(engine, tokenizer)))}
    served, direct = (_rows(tmp_path / name / "predictions.jsonl") for name in ("http", "local"))
    assert {k: (r["response"], r["prediction"], r["retrieved"]) for k, r in served.items()} == \
        {k: (r["response"], r["prediction"], r["retrieved"]) for k, r in direct.items()}
    assert all(len(row["retrieved"]) == 1 for row in served.values())
    assert reports["http"]["result"] == reports["local"]["result"]
    assert reports["http"]["result"]["overall"]["count"] == 2


def test_cli_rag_retrievers_bm25_and_embeddings(tmp_path):
    from fake_openai_server import FakeOpenAIServer
    from evaluate_cli import evaluate_cli

    data = tmp_path / "data.json"
    data.write_text(json.dumps(_items()))
    letters = {fact: answer for fact, _, answer in FACTS.values()}

    def reply(body):
        prompt = body["messages"][0]["content"]
        found = [letter for fact, letter in letters.items() if fact in prompt]
        return f"The correct answer is ({found[0] if found else 'A'})"

    with FakeOpenAIServer(reply=reply) as server:
        common = ["longbench_v2", f"--data={data}", "--client=http", f"--base_url={server.base_url}",
                  "--model=reader", "--noprogress", "--mode=rag", "--rag_chunk_tokens=13", "--rag_top_k=1"]
        codes, lines, stderr = evaluate_cli([
            [*common, f"--output_dir={tmp_path / 'bm25'}", "--rag_retriever=bm25"],
            [*common, f"--output_dir={tmp_path / 'dense'}", "--rag_retriever=embeddings", "--embeddings_model=e"],
            [*common, f"--output_dir={tmp_path / 'given'}"],
            [*common[:-2], f"--output_dir={tmp_path / 'zero'}", "--mode=zero_shot", "--rag_retriever=bm25"],
            [*common, f"--output_dir={tmp_path / 'zero_chunks'}", "--rag_retriever=bm25", "--rag_chunk_tokens=0"]])
        embedding_requests = [r for r in server.requests if r.path == "/v1/embeddings"]
    assert codes == [0, 0, 2, 2, 2], stderr[-3000:]
    bm25, dense = (json.loads(line) for line in lines)
    assert bm25["result"]["overall"]["accuracy"] == 100.0
    assert bm25["retrieval"] == {"retriever": "BM25Retriever", "chunk_tokens": 13, "top_k": 1}
    # The fake server's embedding is a hashed bag of words: the fact's chunk shares the question's words.
    assert dense["result"]["overall"]["accuracy"] == 100.0 and dense["retrieval"]["chunk_tokens"] == 13
    assert {r.body["model"] for r in embedding_requests} == {"e"} and len(embedding_requests) >= 2
    assert "item _id q0 has no 'retrieved_context'" in stderr
    assert "--rag_retriever=bm25 is for --mode=rag" in stderr
    assert "--rag_chunk_tokens must be >= 1, got 0" in stderr and not (tmp_path / "zero_chunks").exists()
