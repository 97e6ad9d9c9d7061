"""CoF (glmjax.pipelines.cof): the parsers and the local-to-global mapping by hand, every stage with a
scripted client (hand-checked rows and SFT records on the fixture tests/cof_documents.jsonl),
filtering, resume and retries. The CLI and kill -9: tests/test_cof_cli.py; a served model:
tests/test_cof_served.py."""

import json
import re
from pathlib import Path

import gin
import numpy as np
import pytest

from glmjax.data.factories import lm_data
from glmjax.data.tokenizer import default_tokenizer
from glmjax.evals.longcite import build_cite_prompt, parse_cited_response, sentence_spans, split_sentences
from glmjax.pipelines.cof import (
    QUESTION_TYPES,
    CitationFormatError,
    answer_statements,
    chunk_windows,
    cof_pipeline,
    document_language,
    format_snippets,
    global_spans,
    local_passage,
    parse_chunk_citations,
    parse_questions,
    parse_sentence_citations,
    rejection,
    retrieval_k,
)
from glmjax.pipelines.retrieval import EmbeddingRetriever, chunk_spans
from glmjax.pipelines.runner import InputError
from glmjax.pipelines.t1_cot import PromptError
from cof_scripted import ANSWERS, CITED, DOCUMENTS, MARROW, QUESTIONS, cof_reply, document_of
from fake_openai_server import hashed_bag_of_words
from scripted_clients import ScriptedClient

def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _run(tmp_path, client, name="documents.jsonl", **kwargs):
    return cof_pipeline(tmp_path / name, tmp_path / "out", client, progress=False,
                        **{"concurrency": 2, "chunk_tokens": 24, **kwargs})


# -- the pieces, by hand ------------------------------------------------------------------------

def test_language_and_questions():
    assert document_language(MARROW) == "en" and document_language(DOCUMENTS["shiqiao"]["context"]) == "zh"
    assert document_language("abcd 中") == "zh" and document_language("abcde 中") == "en"
    assert parse_questions(QUESTIONS["marrow"], 5) == ["When was the lighthouse first lit?", "Who designed the tower?",
                                                       "What is the festival?"]
    assert parse_questions(QUESTIONS["shiqiao"], 5) == ["石桥是哪一年建的？", "石桥什么时候被洪水损坏？"]
    assert parse_questions("1: a?\n1: again?\n7: too far?\n Q2) b?\n3:\n", 5) == ["a?", "b?"]
    assert parse_questions("Sorry, I cannot.", 5) == []
    assert retrieval_k(4) == 10 and retrieval_k(8) == 5 and retrieval_k(7) == 6 and retrieval_k(100) == 1


def test_parse_chunk_citations_by_hand():
    reply = ("Sure.\n[Answer with Citations]\n<statement>A is 1.<cite>[1][3][9][1]</cite></statement>\n\n"
             "<statement >B is 2.<cite></cite></statement> Trailing words here.\n")
    statements, tail = parse_chunk_citations(reply, [4, 7, 9])
    assert statements == [{"gap": "", "statement": "A is 1.", "chunks": [4, 9]},
                          {"gap": "\n\n", "statement": "B is 2.", "chunks": []},
                          {"gap": " ", "statement": "Trailing words here.", "chunks": []}]
    assert tail == "\n"
    statements, tail = parse_chunk_citations("Opening words. <statement>A<cite>[2]</cite></statement>1. "
                                             "<statement>B<cite>[1]", [4, 7])
    assert statements == [{"gap": "", "statement": "Opening words.", "chunks": []},
                          {"gap": " ", "statement": "A", "chunks": [7]}] and tail == ""  # unclosed: dropped
    many = "<statement>S<cite>" + "".join(f"[{n}]" for n in range(1, 9)) + "</cite></statement>"
    assert parse_chunk_citations(many, list(range(10)))[0][0]["chunks"] == [0, 1, 2, 3, 4]
    assert parse_chunk_citations(many, list(range(10)), max_chunks=2)[0][0]["chunks"] == [0, 1]
    with pytest.raises(CitationFormatError, match="no <statement>"):
        parse_chunk_citations("The answer, without any tags.", [0])
    assert format_snippets([" a \n", "b"]) == "Snippet [1]\na\n\nSnippet [2]\nb"


def test_windows_local_numbering_and_global_ids_by_hand():
    assert chunk_windows([5, 3, 9], 10) == [(2, 7), (8, 10)]
    assert chunk_windows([0, 4], 10) == [(0, 2), (3, 6)]
    assert chunk_windows([9], 10, neighbours=2) == [(7, 10)]
    assert chunk_windows([1, 3], 10, neighbours=0) == [(1, 2), (3, 4)]
    sentences, spans = split_sentences(MARROW), sentence_spans(MARROW)
    chunks = chunk_spans(MARROW, 24)
    assert len(chunks) == 10 and "1872" in MARROW[slice(*chunks[3])] and "1990" in MARROW[slice(*chunks[9])]
    # The statement citing chunks 4 and 9: windows 3-5 and 8-9; their sentences 4-9 and 13-17.
    passage, ids = local_passage(chunk_windows([4, 9], 10), chunks, spans, sentences)
    assert ids == [4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17]
    assert passage.startswith("<C0>After three ships were lost") and "<C3>The tower was designed" in passage
    assert "spray.\n\n<C5>The keepers lived in two cottages at the foot of the tower.\n\n<C6>Boats are decorated" in passage
    assert passage.endswith("<C10>Today it is listed as a protected monument.")
    # Local [3-3] and [9-9] are global sentences 7 and 16.
    assert global_spans(parse_sentence_citations("[3-3]\n[9-9]", len(ids)), ids) == [(7, 7), (16, 16)]
    assert global_spans([(0, 1), (2, 2), (4, 5)], [10, 11, 12, 20, 21, 22]) == [(10, 12), (21, 22)]
    assert global_spans([(0, 0), (2, 2), (4, 4), (6, 6)], list(range(0, 14, 2))) == [(0, 0), (4, 4), (8, 8)]
    assert global_spans([(5, 6), (6, 7)], [3, 4, 5, 8, 9, 10, 13, 14]) == [(10, 14)]  # across windows


def test_parse_sentence_citations_and_filter():
    assert parse_sentence_citations("[0-2]\n[5-9]\n[7]\n[3-1]\n[ 4 ]", 6) == [(0, 2), (5, 5), (4, 4)]
    assert parse_sentence_citations("No relevant information", 4) == []
    assert parse_sentence_citations("[0-3]", 0) == []
    assert rejection(4, 0) == "no statement is cited"
    assert rejection(4, 1) is None and rejection(5, 1) is None  # 1/5 is not below 0.2
    assert rejection(6, 1) == "only 1 of 6 statements are cited (fewer than 0.2)"
    assert rejection(6, 1, min_cited_fraction=0.1) is None and rejection(6, 1, min_statements=7) is None


# -- the pipeline with a scripted client --------------------------------------------------------

def test_every_stage_hand_checked(tmp_path):
    _write(tmp_path / "documents.jsonl", DOCUMENTS.values())
    client = ScriptedClient(cof_reply)
    result = _run(tmp_path, client)
    assert (result["documents"], result["answered"], result["sft_records"], result["rejected"],
            result["unfinished"], result["failed"]) == (3, 3, 3, 0, 0, 0)
    out = tmp_path / "out"
    qa = {row["id"]: row for row in _rows(out / "qa.jsonl")}
    assert qa["marrow"]["language"] == "en" and qa["shiqiao"]["language"] == "zh"
    assert qa["shiqiao"]["question_language"] == "zh"
    assert qa["marrow"]["questions"] == parse_questions(QUESTIONS["marrow"], 5)
    assert qa["marrow"]["query"] in qa["marrow"]["questions"] and qa["marrow"]["answer"] == ANSWERS["marrow"]
    assert qa["orrin"]["question_type"] == "given" and qa["orrin"]["query"] == DOCUMENTS["orrin"]["query"]
    assert "usage" not in qa["orrin"]  # given query and answer: no call
    question_prompts = [p for p, _ in client.calls if "questions about it" in p]
    assert len(question_prompts) == 2
    for prompt in question_prompts:
        row = qa[document_of(prompt)]
        assert QUESTION_TYPES[row["question_type"]] in prompt
        assert f"in {'Chinese' if row['question_language'] == 'zh' else 'English'}." in prompt
    answer_prompts = [p for p, _ in client.calls if "Answer the following question" in p]
    assert {p.rstrip("\n").rsplit("\n\n", 1)[1] for p in answer_prompts} == {qa["marrow"]["query"], qa["shiqiao"]["query"]}

    chunk_rows = {row["id"]: row for row in _rows(out / "chunk_cites.jsonl")}
    marrow = chunk_rows["marrow"]
    assert marrow["chunk_spans"] == [list(span) for span in chunk_spans(MARROW, 24)]
    assert {3, 4, 7, 9} <= set(marrow["snippets"]) and marrow["snippets"] == sorted(marrow["snippets"])
    assert [s["chunks"] for s in marrow["statements"]] == [[3], [4, 9], [7], []]
    assert chunk_rows["orrin"]["snippets"] == [0, 1]  # "was built" matches the second chunk too

    sentence_rows = {row["id"]: row for row in _rows(out / "sentence_cites.jsonl")}
    assert [s["sentences"] for s in sentence_rows["marrow"]["statements"]] == [
        [3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17], [9, 10, 11, 12, 13, 14, 15], []]
    assert [s["reply"] for s in sentence_rows["marrow"]["statements"]] == ["[2-2]", "[3-3]\n[4-4]\n[9-9]", "[3-3]", None]  # sentences 7 and 8 name Brandt
    sentence_prompts = [p for p, _ in client.calls if p.startswith("You are given a passage")]
    assert len(sentence_prompts) == 3 + 2 + 2
    first = next(p for p in sentence_prompts if "first lit in 1872.\n\n[Output]" in p)
    assert ("[Passage Start]\n<C0>Storms often closed the harbour for weeks at a time.\n\n<C1>After three ships"
            in first) and "<C5>Brandt chose granite from the quarry at Hollin because it resisted the salt spray.\n[Passage End]" in first
    assert {params.max_tokens for p, params in client.calls if p in sentence_prompts} == {128}

    sft = _rows(out / "sft.jsonl")
    assert [row["id"] for row in sft] == ["marrow", "shiqiao", "orrin"]
    for row in sft:
        context = DOCUMENTS[row["id"]]["context"]
        assert row["messages"] == [
            {"role": "user", "content": build_cite_prompt(split_sentences(context), qa[row["id"]]["query"])},
            {"role": "assistant", "content": CITED[row["id"]]}]
        # What LongCite's parser reads back from the record: the same spans.
        parsed = parse_cited_response(row["messages"][1]["content"], len(split_sentences(context)))
        assert [c["citations"] for c in parsed] == [[tuple(map(int, span)) for span in re.findall(r"\[(\d+)-(\d+)\]", s)]
                                                    for s in re.findall(r"<cite>(.*?)</cite>", CITED[row["id"]])]
    assert "<C5>The lighthouse at Marrow Point was first lit in 1872. " in sft[0]["messages"][0]["content"]
    assert _rows(out / "rejected.jsonl") == []
    assert len(client.calls) == 2 + 2 + 3 + 7  # questions, answers, chunk citations, sentence citations

    again = _run(tmp_path, ScriptedClient(cof_reply))
    assert all(stage["finished"] == 0 and stage["already_done"] == 3 for stage in again["stages"].values())
    assert _rows(out / "sft.jsonl") == sft


def test_filter_rejects_and_reexports_without_calls(tmp_path):
    context = MARROW
    answer = ("The lighthouse was first lit in 1872. The town is on a coast. Its people fish. Boats go out early. "
              "The weather is often bad. Many visitors come in summer.")
    _write(tmp_path / "documents.jsonl", [
        {"id": "few", "context": context, "query": "Tell me about the town.", "answer": answer},
        {"id": "none", "context": context, "query": "What about the weather?", "answer": "The weather is often bad there."}])
    result = _run(tmp_path, ScriptedClient(cof_reply))
    assert (result["sft_records"], result["rejected"], result["failed"]) == (0, 2, 0)
    assert _rows(tmp_path / "out" / "rejected.jsonl") == [
        {"id": "few", "reason": "only 1 of 6 statements are cited (fewer than 0.2)", "statements": 6, "cited": 1},
        {"id": "none", "reason": "no statement is cited", "statements": 1, "cited": 0}]
    client = ScriptedClient(cof_reply)
    lenient = _run(tmp_path, client, stages=("sentence_cites",), min_cited_fraction=0.1)
    assert not client.calls and (lenient["sft_records"], lenient["rejected"]) == (1, 1)
    (record,) = _rows(tmp_path / "out" / "sft.jsonl")
    assert record["messages"][1]["content"].startswith(
        "<statement>The lighthouse was first lit in 1872.<cite>[5-5]</cite></statement> "
        "<statement>The town is on a coast.<cite></cite></statement>")


def test_failures_are_item_errors_retried_and_stages_rerun_alone(tmp_path):
    _write(tmp_path / "documents.jsonl", [DOCUMENTS["marrow"], DOCUMENTS["shiqiao"]])
    broken = {"on": True}

    def reply(prompt, params):
        if broken["on"] and prompt.startswith("You are given numbered snippets") and "1820" in prompt:
            return "I would rather not add tags."
        if broken["on"] and "questions about it" in prompt and "Marrow" in prompt:
            return "Here are some thoughts, but no numbered questions."
        return cof_reply(prompt, params)

    first = _run(tmp_path, ScriptedClient(reply))
    assert first["failed"] == 2 and first["sft_records"] == 0 and first["unfinished"] == 2
    errors = {row["stage"]: row for row in _rows(tmp_path / "out" / "qa.errors.jsonl")
              + _rows(tmp_path / "out" / "chunk_cites.errors.jsonl")}
    assert errors["qa"]["id"] == "marrow" and errors["qa"]["error"].startswith("CitationFormatError: no numbered question")
    assert errors["chunk_cites"]["id"] == "shiqiao" and "no <statement>" in errors["chunk_cites"]["error"]
    broken["on"] = False
    client = ScriptedClient(reply)
    second = _run(tmp_path, client)
    assert (second["sft_records"], second["failed"]) == (2, 0)
    assert second["stages"]["qa"]["already_done"] == 1 and second["stages"]["chunk_cites"]["already_done"] == 0
    assert not any("石桥" in p and "questions about it" in p for p, _ in client.calls)  # its QA was kept
    (tmp_path / "out" / "sentence_cites.jsonl").unlink()
    client = ScriptedClient(cof_reply)
    third = _run(tmp_path, client)
    assert client.calls and all(p.startswith("You are given a passage whose sentences") for p, _ in client.calls)
    assert third["stages"]["sentence_cites"]["finished"] == 2 and third["sft_records"] == 2


def test_an_edited_document_is_refused(tmp_path):
    _write(tmp_path / "documents.jsonl", [DOCUMENTS["orrin"]])
    _run(tmp_path, ScriptedClient(cof_reply))
    _write(tmp_path / "documents.jsonl", [{**DOCUMENTS["orrin"], "context": DOCUMENTS["orrin"]["context"] + " More."}])
    with pytest.raises(ValueError, match=r"qa.jsonl: the row of id 'orrin' was made from another context"):
        _run(tmp_path, ScriptedClient(cof_reply))


def test_no_matching_chunk_means_no_call_and_a_rejection(tmp_path):
    _write(tmp_path / "documents.jsonl", [{"id": "x", "context": MARROW, "query": "Q?",
                                           "answer": "Quantum chromodynamics explains gluons."}])
    client = ScriptedClient(cof_reply)
    result = _run(tmp_path, client)
    assert not client.calls and result["rejected"] == 1
    (row,) = _rows(tmp_path / "out" / "chunk_cites.jsonl")
    assert row["snippets"] == [] and row["reply"] is None


def test_dense_retrieval_and_a_tokenizer(tmp_path):
    _write(tmp_path / "documents.jsonl", [DOCUMENTS["orrin"]])
    tokenizer = default_tokenizer(tmp_path / "tokenizer")
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return np.array([hashed_bag_of_words(t) for t in texts])

    result = _run(tmp_path, ScriptedClient(cof_reply), tokenizer=tokenizer, chunk_tokens=20,
                  retriever_factory=lambda chunks: EmbeddingRetriever(chunks, embed), top_k=1)
    assert result["sft_records"] == 1
    (row,) = _rows(tmp_path / "out" / "chunk_cites.jsonl")
    assert row["chunk_spans"] == [list(s) for s in chunk_spans(DOCUMENTS["orrin"]["context"], 20, tokenizer)]
    assert len(row["chunk_spans"]) > 2
    assert seen[1] == answer_statements(DOCUMENTS["orrin"]["answer"])  # the chunks, then the statements
    assert len(row["snippets"]) <= 2  # top_k = 1 per statement


def test_records_train_through_lm_data(tmp_path):
    _write(tmp_path / "documents.jsonl", [DOCUMENTS["orrin"], DOCUMENTS["shiqiao"]])
    _run(tmp_path, ScriptedClient(cof_reply))
    tokenizer = default_tokenizer(str(tmp_path / "tokenizer"))
    data = lm_data(seed=0, process_index=0, process_count=1, paths=str(tmp_path / "out" / "sft.jsonl"),
                   data_format="chat", tokenizer=tokenizer, seq_len=2048, global_batch_size=2, shuffle=False,
                   num_epochs=1, packing=False, num_data_shards=1)
    (batch,) = list(data)
    for row, record in enumerate(_rows(tmp_path / "out" / "sft.jsonl")):
        trained = np.asarray(batch["targets"][row])[np.asarray(batch["loss_mask"][row]) == 1]
        text = tokenizer.decode(trained.tolist())
        assert record["messages"][1]["content"] in text and "<C0>" not in text


def test_prompt_files_by_gin_and_bad_ones(tmp_path):
    _write(tmp_path / "documents.jsonl", [DOCUMENTS["orrin"]])
    (tmp_path / "sentence.txt").write_text("PICK [Passage Start]\n{{passage}}\n[Passage End] | {{question}} | "
                                           "[Statement]\n{{statement}}\n\n[Output]")
    seen = []

    def reply(prompt, params):
        seen.append((prompt, params))
        return "[0-0]" if prompt.startswith("PICK") else cof_reply(prompt, params)

    with gin.unlock_config():
        gin.parse_config(f"cof_pipeline.sentence_cite_prompt = '{tmp_path / 'sentence.txt'}'\n"
                         "cof_pipeline.sentence_cite_max_tokens = 32\ncof_pipeline.temperature = 0.7")
    try:
        result = _run(tmp_path, ScriptedClient(reply))
    finally:
        gin.clear_config()
    picks = [(p, params) for p, params in seen if p.startswith("PICK")]
    assert len(picks) == 2 and {params.max_tokens for _, params in picks} == {32}
    assert {params.temperature for _, params in seen} == {0.7}
    assert result["sft_records"] == 1
    (tmp_path / "bad.txt").write_text("{{passage}} {{statement}} {{context}}")
    with pytest.raises(PromptError, match=r"bad.txt: .*missing: \['question'\], unknown: \['context'\]"):
        _run(tmp_path, ScriptedClient(cof_reply), sentence_cite_prompt=str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="question_types"):
        _run(tmp_path, ScriptedClient(cof_reply), question_types=("riddles",))


def test_input_errors_name_the_line(tmp_path):
    _write(tmp_path / "documents.jsonl", [DOCUMENTS["orrin"], {"id": "y", "context": "Text.", "answer": "A."}])
    with pytest.raises(InputError, match=r"documents.jsonl:2: field 'answer' needs the field 'query'"):
        _run(tmp_path, ScriptedClient(cof_reply))
    _write(tmp_path / "documents.jsonl", [{"id": "z", "context": "  "}])
    with pytest.raises(InputError, match=r"(?m)documents.jsonl:1: field 'context' must be a non-empty string$"):
        _run(tmp_path, ScriptedClient(cof_reply))
    assert not (tmp_path / "out").exists()


