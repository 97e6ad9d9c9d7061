"""LongBench v2: loader errors, prompt modes, middle truncation, answer extraction, scoring and
the evaluation loop against a scripted client (values computed by hand)."""

from __future__ import annotations

import json
import re

import pytest

from glmjax.evals import longbench_v2 as lb
from glmjax.inference.llm_client import LLMClient, LLMClientError, SamplingParams, raise_item_failures
from tests.chat_tokenizers import plain_tokenizer

# (difficulty, length, answer) of the 6-item fixture: every category is present.
_SPECS = [("easy", "short", "A"), ("easy", "medium", "B"), ("hard", "short", "C"),
          ("hard", "long", "D"), ("hard", "medium", "A"), ("easy", "long", "B")]


def _row(k: int, difficulty: str = "easy", length: str = "short", answer: str = "A") -> dict:
    return {"_id": f"id{k}", "domain": "Single-Document QA", "sub_domain": "Financial",
            "difficulty": difficulty, "length": length, "question": f"  Which clause is {k}?  ",
            "choice_A": f" alpha{k} ", "choice_B": f"beta{k}", "choice_C": f"gamma{k}", "choice_D": f"delta{k}",
            "answer": answer, "context": f"\n DOCUMENT-{k} body text of item {k}. \n"}


def _items() -> list[lb.LongBenchV2Item]:
    return [lb.parse_item(_row(k, *spec), f"fixture: item {k}") for k, spec in enumerate(_SPECS)]


def _write(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


# --------------------------------------------------------------------------------------- loader

def test_load_json_and_jsonl(tmp_path):
    rows = [_row(k, *spec) for k, spec in enumerate(_SPECS)]
    rows[0]["retrieved_context"] = [{"c_idx": 5, "content": "five"}, {"c_idx": 2, "content": "two"}]
    from_json = lb.load_items(_write(tmp_path / "data.json", rows))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert lb.load_items(jsonl) == from_json
    first = from_json[0]
    assert (first.id, first.difficulty, first.length, first.answer) == ("id0", "easy", "short", "A")
    assert first.choices == (" alpha0 ", "beta0", "gamma0", "delta0")
    assert first.retrieved == ((5, "five"), (2, "two"))
    assert [item.answer for item in from_json] == [spec[2] for spec in _SPECS]


@pytest.mark.parametrize("edit, pattern", [
    (lambda row: row.pop("choice_C"), r"item 1 \(_id id1\): missing field 'choice_C'"),
    (lambda row: row.pop("_id"), r"item 1: missing field '_id'"),
    (lambda row: row.update(answer="E"), r"item 1 \(_id id1\): field 'answer' is 'E', expected one of A, B, C, D"),
    (lambda row: row.update(answer="a"), r"item 1 \(_id id1\): field 'answer' is 'a'"),
    (lambda row: row.update(difficulty="medium"), r"item 1 \(_id id1\): field 'difficulty' is 'medium', "
                                                  r"expected one of easy, hard"),
    (lambda row: row.update(length="huge"), r"item 1 \(_id id1\): field 'length' is 'huge', "
                                            r"expected one of short, medium, long"),
    (lambda row: row.update(context=None), r"item 1 \(_id id1\): field 'context' must be a string, got NoneType"),
    (lambda row: row.update(retrieved_context=[{"c_idx": "1", "content": "x"}]),
     r"item 1 \(_id id1\): field 'retrieved_context'\[0\]"),
])
def test_loader_errors_name_file_item_and_field(tmp_path, edit, pattern):
    rows = [_row(0), _row(1)]
    edit(rows[1])
    path = _write(tmp_path / "bad.json", rows)
    with pytest.raises(lb.LongBenchV2FormatError, match=re.escape(path) + ": " + pattern) as info:
        lb.load_items(path)
    assert "\n" not in str(info.value)


def test_loader_file_level_errors(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(_row(0)) + "\n{not json\n")
    with pytest.raises(lb.LongBenchV2FormatError, match=re.escape(f"{jsonl}:2: invalid JSON")):
        lb.load_items(jsonl)
    jsonl.write_text(json.dumps(_row(0)) + "\n" + json.dumps({**_row(1), "length": "x"}) + "\n")
    with pytest.raises(lb.LongBenchV2FormatError, match=re.escape(f"{jsonl}:2 (_id id1): field 'length'")):
        lb.load_items(jsonl)
    with pytest.raises(lb.LongBenchV2FormatError, match="expected a JSON list of items, got dict"):
        lb.load_items(_write(tmp_path / "obj.json", _row(0)))
    with pytest.raises(lb.LongBenchV2FormatError, match=r"item 1 \(_id id0\): duplicate '_id'"):
        lb.load_items(_write(tmp_path / "dup.json", [_row(0), _row(0)]))
    with pytest.raises(lb.LongBenchV2FormatError, match=r"item 0: expected a JSON object, got list"):
        lb.load_items(_write(tmp_path / "nested.json", [[1]]))


# -------------------------------------------------------------------------------------- prompts

_FORMAT_ENDING = '"The correct answer is (X)", where X is A, B, C or D.'


def test_prompt_modes_show_or_omit_the_context():
    item = _items()[2]
    choices = ["(A) alpha2\n", "(B) beta2\n", "(C) gamma2\n", "(D) delta2"]
    for mode in ("zero_shot", "cot", "no_context"):
        prompt = lb.build_prompt(item, mode)
        assert "Question: Which clause is 2?\n" in prompt  # stripped
        assert all(choice in prompt for choice in choices)
        assert ("DOCUMENT-2 body text of item 2." in prompt) == (mode != "no_context")
    assert "<document>\nDOCUMENT-2 body text of item 2.\n</document>" in lb.build_prompt(item, "zero_shot")
    for mode in ("zero_shot", "no_context"):
        assert lb.build_prompt(item, mode).endswith(_FORMAT_ENDING)
    cot = lb.build_prompt(item, "cot")
    assert "step by step" in cot and "The correct answer is" not in cot

    rag = lb.build_prompt(item, "rag", retrieved=[" first chunk ", "second chunk"])
    assert "DOCUMENT-2" not in rag and rag.endswith(_FORMAT_ENDING)
    assert "Retrieved chunk 1: first chunk\n\nRetrieved chunk 2: second chunk" in rag
    with pytest.raises(ValueError, match="retrieved chunks are given with mode='rag' and only"):
        lb.build_prompt(item, "rag")
    with pytest.raises(ValueError, match="retrieved chunks are given with mode='rag' and only"):
        lb.build_prompt(item, "zero_shot", retrieved=["x"])
    with pytest.raises(ValueError, match="unknown mode 'few_shot'"):
        lb.build_prompt(item, "few_shot")


def test_cot_answer_prompt_omits_the_document():
    item = _items()[1]
    prompt = lb.build_cot_answer_prompt(item, "  Step 1: clause 1 says beta1.  ")
    assert "DOCUMENT-1" not in prompt and "omitted" in prompt
    assert "\nStep 1: clause 1 says beta1.\n" in prompt and "(B) beta1" in prompt
    assert prompt.endswith(_FORMAT_ENDING)


def test_prompts_are_selectable():
    templates = {**lb.PROMPTS, "no_context": "Q={question} A={choice_A} D={choice_D}"}
    assert lb.build_prompt(_items()[0], "no_context", prompts=templates) == "Q=Which clause is 0? A=alpha0 D=delta0"


def test_retrieved_chunks_take_top_k_then_document_order():
    row = {**_row(0), "retrieved_context": [{"c_idx": 7, "content": "seven"}, {"c_idx": 3, "content": "three"},
                                            {"c_idx": 1, "content": "one"}]}
    item = lb.parse_item(row, "x")
    assert lb.retrieved_chunks(item, 2) == ["three", "seven"]
    assert lb.retrieved_chunks(item) == ["one", "three", "seven"]
    with pytest.raises(ValueError, match="item id1: no 'retrieved_context'"):
        lb.retrieved_chunks(_items()[1])


def _document_item() -> lb.LongBenchV2Item:
    """A context of 6 chunks of 8 words (the retrieval module's word count); chunk 4 alone names
    the lighthouse the question asks about, chunk 1 the keeper."""
    chunks = ["the harbour was quiet all winter that year ", "an old keeper kept the lamp burning nightly ",
              "ships passed far out on the grey water ", "gulls nested on the cliffs above the bay ",
              "the lighthouse at Brennock stood on black rock ", "a road ran inland past farms and churches "]
    assert all(len(chunk.split()) == 8 for chunk in chunks)
    return lb.parse_item({**_row(0), "question": "Where did the lighthouse stand?", "choice_A": "On black rock",
                          "choice_B": "In a field", "choice_C": "On a pier", "choice_D": "On sand",
                          "context": "".join(chunks)}, "x")


def test_retrieve_context_cuts_the_document_and_ranks_its_chunks():
    from glmjax.pipelines.retrieval import BM25Retriever
    item = _document_item()
    assert lb.retrieval_query(item) == "Where did the lighthouse stand?\nOn black rock\nIn a field\nOn a pier\nOn sand"
    found = lb.retrieve_context(item, BM25Retriever, chunk_tokens=8, top_k=2)
    assert found.retrieved == ((4, "the lighthouse at Brennock stood on black rock "),)  # the one that matches
    assert (found.question, found.context, found.answer) == (item.question, item.context, item.answer)
    grey = lb.parse_item({**_row(0), "question": "What was grey, the water or the rock?",
                          "context": item.context}, "x")
    assert [index for index, _ in lb.retrieve_context(grey, BM25Retriever, chunk_tokens=8).retrieved] == [2, 4]
    # A dense retriever (any chunks -> retriever callable) ranks by its own similarities.
    from glmjax.pipelines.retrieval import EmbeddingRetriever
    embed = lambda texts: [[float("keeper" in t), 1.0] for t in texts]  # noqa: E731
    dense = lb.retrieve_context(item, lambda chunks: EmbeddingRetriever(chunks, embed), chunk_tokens=8, top_k=1)
    assert dense.retrieved == ((0, "the harbour was quiet all winter that year "),)  # a tie: first chunk
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        lb.retrieve_context(item, BM25Retriever, top_k=0)
    with pytest.raises(ValueError, match="item id0: an empty context"):
        lb.retrieve_context(lb.parse_item({**_row(0), "context": "  "}, "x"), BM25Retriever)
    with pytest.raises(ValueError, match="item id0: no chunk of the context matches"):
        lb.retrieve_context(lb.parse_item({**_row(0), "context": "zzz qqq"}, "x"), BM25Retriever)


# ----------------------------------------------------------------------------------- truncation

def test_truncate_middle():
    ids = list(range(10))
    assert lb.truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert lb.truncate_middle(ids, 5) == [0, 1, 7, 8, 9]  # odd token at the end, like ids[-5//2:]
    assert lb.truncate_middle(ids, 1) == [9]
    assert lb.truncate_middle(ids, 9) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert lb.truncate_middle(ids, 10) == ids and lb.truncate_middle(ids, 50) == ids
    for budget in range(1, 10):  # the reference's slicing, for every budget
        assert lb.truncate_middle(ids, budget) == ids[:budget // 2] + ids[-budget // 2:]
    with pytest.raises(ValueError, match="budget must be >= 1"):
        lb.truncate_middle(ids, 0)


class WordTokenizer:
    """One id per space-separated word (decode joins words with spaces); records its calls."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls: list[tuple] = []

    def encode(self, text, add_special_tokens=True):
        self.calls.append(("encode", add_special_tokens))
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split(" ")]

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(("decode", skip_special_tokens))
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


def test_truncate_prompt_word_tokenizer():
    tokenizer = WordTokenizer()
    text = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
    assert lb.truncate_prompt(text, tokenizer, budget=5) == "w0 w1 w7 w8 w9"
    assert tokenizer.calls == [("encode", False), ("decode", True)]
    assert lb.truncate_prompt(text, tokenizer, budget=6) == "w0 w1 w2 w7 w8 w9"
    assert lb.truncate_prompt(text, tokenizer, budget=10) == text
    assert lb.truncate_prompt(text, tokenizer) == text


def test_truncate_prompt_hf_tokenizer(tmp_path):
    tokenizer = plain_tokenizer(tmp_path)
    text = " ".join(f"The weather in Paris is {k} degrees." for k in range(12))
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 40
    cut = lb.truncate_prompt(text, tokenizer, budget=21)
    assert cut == tokenizer.decode(ids[:10]) + tokenizer.decode(ids[-11:])
    assert cut.startswith("The weather in Paris is 0") and cut.endswith("is 11 degrees.")
    assert lb.truncate_prompt(text, tokenizer, budget=len(ids)) == text


# ----------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("response, expected", [
    ("The correct answer is (B)", "B"),
    ("The correct answer is C.", "C"),
    ("**The correct answer is (D)**", "D"),
    ("The correct answer is **(A)**", "A"),
    ("The correct answer is *B*", "B"),
    # the parenthesised form wins even when the bare form comes first
    ("The correct answer is C. On reflection, The correct answer is (A).", "A"),
    # within one form the first match wins
    ("The correct answer is (B), no wait, The correct answer is (D)", "B"),
    ("The correct answer is Apple", "A"),  # the reference's bare pattern has no word boundary
    ("the correct answer is (B)", None),  # case-sensitive
    ("The correct answer is (b)", None),
    ("The correct answer is (E)", None),
    ("The correct answer is: (B)", None),
    ("The correct answer is  (B)", None),
    ("I think (B).", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert lb.extract_answer(response) == expected


# -------------------------------------------------------------------------------------- scoring

def test_score_categories_and_table():
    items = _items()
    predictions = ["A", "C", "C", None, "A", "A"]  # right: items 0, 2, 4
    result = lb.score(items, predictions)
    expected = {"overall": (3, 6), "easy": (1, 3), "hard": (2, 3), "short": (2, 2), "medium": (1, 2),
                "long": (0, 2)}
    for category, (correct, count) in expected.items():
        assert result[category] == {"accuracy": pytest.approx(100 * correct / count), "correct": correct,
                                    "count": count}
    assert result["no_answer"] == 1
    assert lb.score(items, dict(zip([item.id for item in items], predictions))) == result
    # an id missing from a mapping counts as no answer
    partial = lb.score(items, {"id0": "A", "id2": "C"})
    assert (partial["overall"]["correct"], partial["no_answer"]) == (2, 4)
    table = lb.markdown_table(result, name="fake").splitlines()
    assert table[0] == "| | Overall | Easy | Hard | Short | Medium | Long |"
    assert table[2] == "| fake | 50.0 | 33.3 | 66.7 | 100.0 | 50.0 | 0.0 |"
    assert table[3] == "| items | 6 | 3 | 3 | 2 | 2 | 2 |"
    only_easy = lb.score(items[:2], ["A", "B"])
    assert only_easy["hard"]["accuracy"] is None
    assert "| model | 100.0 | 100.0 | - |" in lb.markdown_table(only_easy)
    with pytest.raises(ValueError, match="5 predictions for 6 items"):
        lb.score(items, predictions[:5])
    with pytest.raises(ValueError, match="not among the items"):
        lb.score(items, {"nope": "A"})


# ----------------------------------------------------------------------------------- evaluation

class ScriptedClient(LLMClient):
    """Replies by rule: ``reply(prompt)`` gives a text, or an LLMClientError for a failed item.
    Records every ``complete_batch`` call as ``(prompts, sampling)``."""

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def complete(self, messages, sampling=None):
        return self.complete_batch([messages], sampling)[0]

    def complete_batch(self, conversations, sampling=None):
        prompts = []
        for messages in conversations:
            assert [m["role"] for m in messages] == ["user"]
            prompts.append(messages[0]["content"])
        self.calls.append((prompts, sampling))
        outcomes = [self.reply(prompt) for prompt in prompts]
        raise_item_failures(outcomes)
        return outcomes

    def assistant_turns(self, conversations, sampling=None, tools=None):
        raise AssertionError("evaluate must use complete_batch")


def _item_of(prompt: str) -> int:
    return int(re.search(r"Which clause is (\d+)\?", prompt).group(1))


def test_evaluate_zero_shot():
    items = _items()
    script = {0: "The correct answer is (A)", 1: "**The correct answer is (C)**", 2: "The correct answer is C",
              3: "I cannot tell.", 4: "The correct answer is (A).", 5: "The correct answer is (A)"}
    client = ScriptedClient(lambda prompt: script[_item_of(prompt)])
    rows = lb.evaluate(items, client, mode="zero_shot", batch_size=4)
    assert [len(prompts) for prompts, _ in client.calls] == [4, 2]
    assert all(sampling == lb.DIRECT_SAMPLING for _, sampling in client.calls)
    sent = [p for prompts, _ in client.calls for p in prompts]
    assert sent == [lb.build_prompt(item, "zero_shot") for item in items]
    assert [row["prediction"] for row in rows] == ["A", "C", "C", None, "A", "A"]
    assert [row["correct"] for row in rows] == [True, False, True, False, True, False]
    assert rows[3] == {"id": "id3", "mode": "zero_shot", "difficulty": "hard", "length": "long", "answer": "D",
                       "truncated": False, "response": "I cannot tell.", "error": None, "prediction": None,
                       "correct": False}
    assert lb.score(items, [row["prediction"] for row in rows])["overall"]["correct"] == 3


def test_evaluate_cot_two_passes_second_without_document():
    items = _items()

    def reply(prompt):
        k = _item_of(prompt)
        if "omitted" in prompt:
            assert f"REASONING-{k}" in prompt
            return f"The correct answer is ({items[k].answer if k % 2 == 0 else 'A'})"
        if k == 1:
            return LLMClientError("server overloaded")
        return f"REASONING-{k}: the document says so. The correct answer is (D)"

    client = ScriptedClient(reply)
    sampling = SamplingParams(max_tokens=1024, temperature=0.1, seed=10)
    rows = lb.evaluate(items, client, mode="cot", sampling=sampling,
                       answer_sampling=SamplingParams(max_tokens=128, temperature=0.1, seed=50), batch_size=2)
    first = [(p, s) for prompts, s in client.calls for p in prompts if "omitted" not in p]
    second = [(p, s) for prompts, s in client.calls for p in prompts if "omitted" in p]
    assert [_item_of(p) for p, _ in first] == [0, 1, 2, 3, 4, 5]
    assert all(f"DOCUMENT-{_item_of(p)}" in p for p, _ in first)
    assert [_item_of(p) for p, _ in second] == [0, 2, 3, 4, 5]  # item 1 failed its first pass
    assert not any("DOCUMENT-" in p for p, _ in second)
    # item i samples with seed + i in both passes: batches of consecutive items, at most 2
    assert [(len(prompts), s.seed, s.max_tokens) for prompts, s in client.calls] == [
        (2, 10, 1024), (2, 12, 1024), (2, 14, 1024), (1, 50, 128), (2, 52, 128), (2, 54, 128)]
    assert rows[0]["reasoning"].startswith("REASONING-0") and rows[0]["response"] == "The correct answer is (A)"
    assert [row["prediction"] for row in rows] == ["A", None, "C", "A", "A", "A"]
    assert [row["correct"] for row in rows] == [True, False, True, False, True, False]
    assert rows[1]["error"] == "reasoning call: server overloaded"
    assert rows[1]["reasoning"] is None and rows[1]["response"] is None


def test_evaluate_cot_answer_failure_and_no_context():
    items = _items()[:3]
    client = ScriptedClient(lambda p: LLMClientError("boom") if "omitted" in p and _item_of(p) == 2
                            else "The correct answer is (A)")
    rows = lb.evaluate(items, client, mode="cot")
    assert [row["error"] for row in rows] == [None, None, "answer call: boom"]
    assert rows[2]["reasoning"] == "The correct answer is (A)" and rows[2]["prediction"] is None
    assert client.calls[0][1] == lb.COT_SAMPLING and client.calls[1][1] == lb.DIRECT_SAMPLING

    client = ScriptedClient(lambda p: "The correct answer is (B)")
    rows = lb.evaluate(items, client, mode="no_context")
    assert not any("DOCUMENT-" in p for p in client.calls[0][0])
    assert [row["correct"] for row in rows] == [False, True, False]


def test_evaluate_rag_and_truncation():
    row = {**_row(0), "retrieved_context": [{"c_idx": 9, "content": "NINE"}, {"c_idx": 4, "content": "FOUR"},
                                            {"c_idx": 1, "content": "ONE"}]}
    item = lb.parse_item(row, "x")
    client = ScriptedClient(lambda p: "The correct answer is (A)")
    rows = lb.evaluate([item], client, mode="rag", rag_top_k=2)
    prompt = client.calls[0][0][0]
    assert "Retrieved chunk 1: FOUR\n\nRetrieved chunk 2: NINE" in prompt
    assert "ONE" not in prompt and "DOCUMENT-0" not in prompt and rows[0]["correct"]

    tokenizer = WordTokenizer()
    full = lb.build_prompt(item, "zero_shot")
    budget = len(full.split(" ")) - 3
    rows = lb.evaluate([item], client, mode="zero_shot", tokenizer=tokenizer, budget=budget)
    sent = client.calls[-1][0][0]
    words = full.split(" ")
    assert sent == " ".join(words[:budget // 2] + words[-(budget - budget // 2):])
    assert rows[0]["truncated"] is True
    rows = lb.evaluate([item], client, mode="zero_shot", tokenizer=tokenizer, budget=len(words))
    assert client.calls[-1][0][0] == full and rows[0]["truncated"] is False


def test_evaluate_whole_call_failure_propagates():
    class Down(ScriptedClient):
        def complete_batch(self, conversations, sampling=None):
            raise LLMClientError("connection refused")

    with pytest.raises(LLMClientError, match="connection refused"):
        lb.evaluate(_items(), Down(None), mode="zero_shot")
    with pytest.raises(ValueError, match="unknown mode"):
        lb.evaluate(_items(), Down(None), mode="zeroshot")
