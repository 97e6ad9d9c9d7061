"""LongBench-Cite scoring against hand-computed values: the judge reply parsers, citation recall /
precision / F1 and correctness with a scripted judge (retries at a higher temperature), the data
loader's one-line errors, and the per-dataset / per-group summary."""

from __future__ import annotations

import json

import pytest
from scripted_clients import ScriptedClient

from glmjax.evals import longcite as lc
from glmjax.inference.llm_client import SamplingParams

# ----------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("reply, expected", [
    ("Rating: [[Fully supported]] Analysis:", 1.0),
    ("Rating: [[Partially supported]]", 0.5),
    ("Rating: [[No support]]", 0.0),
    ("Rating: [Partially supported]", 0.5),          # single brackets
    ("rating: fully supported.", 1.0),               # bare words
    ("Rating: [[Rating]] no support", 0.0),          # a label without a rating word is skipped
    ("Rating: [[ ]]", None),
    ("I cannot tell.", None),
    ("", None),
])
def test_parse_support(reply, expected):
    assert lc.parse_support(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Rating: [[Relevant]]", 1), ("Rating: [[Unrelevant]]", 0), ("[[Irrelevant]]", 0),
    ("Rating: not relevant at all", 0), ("[relevant]", 1), ("Rating:", None),
])
def test_parse_relevance(reply, expected):
    assert lc.parse_relevance(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Need Citation: [[Yes]] ", True), ("Need Citation: [[No]]", False), ("[[no]]", False),
    ("Need Citation: [[Yes/No]] Need Citation: [[No]]", False),  # the echoed format is skipped
    ("Need Citation: No", False), ("Yes.", True), ("Need Citation: [[Maybe]]", None), ("Hmm.", None),
    ("I do not know", None),  # a "no" inside other words is not an answer
])
def test_parse_need_citation(reply, expected):
    assert lc.parse_need_citation(reply) == expected


@pytest.mark.parametrize("reply, low, high, expected", [
    ("[[2]]", 1, 3, 2), ("Rating: [[3]]", 1, 3, 3), ("e.g. [[1]] ... my rating: [[3]]", 1, 3, 3),
    ("[[rating: 4]]", 1, 5, 4), ("[[4]]", 1, 3, None), ("[[2.5]]", 1, 5, None), ("[[2.0]]", 1, 5, 2),
    ("Rating: 7", 1, 10, 7), ("8", 1, 10, 8), ("8.", 1, 10, 8), ("[[0]]", 1, 10, None),
    ("I rate it highly", 1, 10, None), ("[[ten]]", 1, 10, None),
])
def test_parse_rating(reply, low, high, expected):
    assert lc.parse_rating(reply, low, high) == expected


# -------------------------------------------------------------------------------- citations

SENTENCES = ["Alpha was founded in 1901. ", "It makes bells. ", "Beta lies north of Alpha. ",
             "Beta has a port. ", "Gamma is a river. ", "Gamma floods in May."]
QUERY = "What do we know about Alpha and Beta?"
RESPONSE = ("Here is what the document says.\n"
            "<statement>Alpha, founded in 1901, makes bells.<cite>[0-1]</cite></statement>"
            "<statement>Beta lies north of Alpha and has a port.<cite>[2-2][4-4]</cite></statement>"
            "<statement>This sums it up.<cite></cite></statement>"
            "<statement>The count is 7.<cite></cite></statement>")


def _citation_judge(overrides=None):
    """A judge replying by the prompt's kind and statement; ``overrides[key]`` (a list) answers the
    first calls of that key instead."""
    overrides = {k: list(v) for k, v in (overrides or {}).items()}

    def reply(prompt, sampling):
        if "how well the passage supports" in prompt:
            key = "support:" + ("A" if "makes bells" in prompt.split("<statement>")[1] else "B")
            answer = {"support:A": "Rating: [[Partially supported]]", "support:B": "Rating: [[Fully supported]]"}[key]
        elif "holds key information" in prompt:
            passage = prompt.split("<passage>\n")[1]
            key = "relevance:" + passage.split("\n</passage>")[0]
            answer = "Rating: [[Unrelevant]]" if "Gamma" in passage else "Rating: [[Relevant]]"
        else:
            sentence = prompt.split("<sentence>\n")[1].split("\n</sentence>")[0]
            key = "need:" + sentence
            needs = "sums" not in sentence and "Here is what" not in sentence
            answer = "Need Citation: [[Yes]]" if needs else "Need Citation: [[No]]"
        if overrides.get(key):
            return overrides[key].pop(0)
        return answer

    return ScriptedClient(reply)


def test_citation_recall_precision_f1_hand_computed():
    judge = _citation_judge()
    result = lc.judge_citations(judge, QUERY, RESPONSE, SENTENCES)
    # The intro line (32 characters outside the tags) is an uncited statement. Recall: intro needs
    # no citation 1, A partially 0.5, B fully 1, "sums it up" needs none 1, "count is 7" needs one 0.
    assert result["citation_recall"] == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)
    # precision: A's [0-1] relevant, B's [2-2] relevant, B's [4-4] (Gamma) not: 2 / 3
    assert result["citation_precision"] == pytest.approx(2 / 3)
    r, p = 0.7, 2 / 3
    assert result["citation_f1"] == pytest.approx(2 * r * p / (r + p))
    assert (result["total_statements"], result["judged_statements"]) == (5, 5)
    intro, a, b, c, d = result["statements"]
    assert intro["statement"] == "Here is what the document says.\n" and intro["support"] == 1.0
    # 4 need/support judgements + 3 relevance ones, all in one batch, greedy, cut at "Analysis:"
    assert len(judge.calls) == 8
    assert {(s.temperature, s.max_tokens, s.stop) for _, s in judge.calls} == {(0.0, 10, ("Analysis:",))}
    assert a["citations"] == [{"start": 0, "end": 1, "cite": SENTENCES[0] + SENTENCES[1], "relevant": 1,
                               "replies": ["Rating: [[Relevant]]"]}]
    assert a["support"] == 0.5 and a["replies"] == ["Rating: [[Partially supported]]"]
    assert [cite["relevant"] for cite in b["citations"]] == [1, 0]
    assert c["support"] == 1.0 and c["needs_citation"] is False
    assert d["support"] == 0.0 and d["needs_citation"] is True
    # the support snippet of B: its cited texts joined by a blank line, stripped
    support_b = next(p for p, _ in judge.calls if "<statement>\nBeta lies" in p and "supports the statement" in p)
    assert f"<passage>\n{SENTENCES[2]}\n\n{SENTENCES[4].strip()}\n</passage>" in support_b
    # an uncited sentence is judged with the whole answer, its citation markup removed
    need = next(p for p, _ in judge.calls if "<sentence>\nThis sums it up.\n</sentence>" in p)
    assert ("<response>\nHere is what the document says.\nAlpha, founded in 1901, makes bells.Beta lies north of "
            "Alpha and has a port.This sums it up.The count is 7.\n</response>") in need


def test_unreadable_replies_are_retried_hotter_then_fail_the_item():
    judge = _citation_judge({"need:The count is 7.": ["Need Citation:", "unsure"]})
    sampling = SamplingParams(max_tokens=10, temperature=0.0, seed=100, stop=("Analysis:",))
    result = lc.judge_citations(judge, QUERY, RESPONSE, SENTENCES, sampling=sampling)
    assert result["statements"][4]["replies"] == ["Need Citation:", "unsure", "Need Citation: [[Yes]]"]
    first = judge.calls[:8]
    assert [s.seed for _, s in first] == list(range(100, 108)) and {s.temperature for _, s in first} == {0.0}
    # the last ask (index 7 of 8) retried at temperature 1 with seed + k * 8 + 7
    assert [(s.temperature, s.seed) for _, s in judge.calls[8:]] == [(1.0, 100 + 8 + 7), (1.0, 100 + 16 + 7)]
    judge = _citation_judge({"need:The count is 7.": ["?"] * 3})
    with pytest.raises(lc.JudgeReplyError, match="need_citation judge gave no readable rating for statement 4 "
                                                  "in 3 tries; last reply: '\\?'"):
        lc.judge_citations(judge, QUERY, RESPONSE, SENTENCES, tries=3)
    assert len(judge.calls) == 8 + 2


def test_only_the_first_statements_are_judged():
    response = "".join(f"<statement>Fact {i}.<cite>[0-0]</cite></statement>" for i in range(45))
    judge = ScriptedClient(lambda prompt, sampling: "Rating: [[Fully supported]] [[Relevant]]")
    result = lc.judge_citations(judge, QUERY, response, SENTENCES)
    assert (result["total_statements"], result["judged_statements"]) == (45, 40)
    assert len(judge.calls) == 80 and result["citation_f1"] == 1.0
    result = lc.judge_citations(judge, QUERY, response, SENTENCES, max_statements=3)
    assert result["judged_statements"] == 3


def test_no_statements_and_no_citations_score_zero():
    judge = ScriptedClient(lambda prompt, sampling: "Need Citation: [[No]]")
    assert lc.judge_citations(judge, QUERY, "ok", SENTENCES)["citation_f1"] == 0.0
    assert judge.calls == []
    result = lc.judge_citations(judge, QUERY, "<statement>Nothing cited here.<cite></cite></statement>", SENTENCES)
    # recall 1 (no citation needed), precision 0 (no citation): F1 0
    assert (result["citation_recall"], result["citation_precision"], result["citation_f1"]) == (1.0, 0.0, 0.0)


def test_citation_token_counts():
    class WordTokenizer:
        def encode(self, text, add_special_tokens=False):
            assert add_special_tokens is False
            return text.split()

    response = RESPONSE + "".join(f"<statement>F{i}.<cite>[5-5]</cite></statement>" for i in range(41))
    # [0-1]: 5 + 3 words; [2-2]: 5; [4-4]: 4; 41 x [5-5]: 4 each (all statements, not only 40)
    assert lc.citation_token_counts(response, SENTENCES, WordTokenizer()) == (44, 8 + 5 + 4 + 41 * 4)
    assert lc.citation_token_counts(response, SENTENCES, None) == (44, None)


# ------------------------------------------------------------------------------ correctness


def _item(dataset, answers=("ref one",), few_shot=()):
    return lc.CiteItem(1, dataset, "Why?", tuple(answers), tuple(few_shot), "ctx", "f: item 0")


def test_correctness_qa_takes_the_best_reference_of_the_answer_without_citations():
    judge = ScriptedClient(lambda prompt, sampling: "[[3]]" if "ref two" in prompt else "[[1]]")
    result = lc.judge_correctness(judge, _item("hotpotqa", ("ref one", "ref two")),
                                  "<statement>It is X.<cite>[0-1]</cite></statement>")
    assert result == {"correctness": 1.0, "scale": "qa", "ratings": [1, 3], "unparsed": 0,
                      "replies": [["[[1]]"], ["[[3]]"]]}
    assert all("[Assistant's answer]\nIt is X.\nRating:" in prompt for prompt, _ in judge.calls)
    assert {(s.temperature, s.max_tokens, s.stop) for _, s in judge.calls} == {(0.0, 128, ())}
    judge = ScriptedClient(lambda prompt, sampling: "Rating: [[2]]")
    assert lc.judge_correctness(judge, _item("dureader"), "x")["correctness"] == 0.5


def test_correctness_summary_and_fewshot_scales():
    judge = ScriptedClient(lambda prompt, sampling: "[[4]]")
    result = lc.judge_correctness(judge, _item("gov_report"), "A summary.")
    assert (result["correctness"], result["scale"]) == (0.75, "summary")
    assert "[Question]" not in judge.calls[0][0]
    shots = (("good answer", 9), ("bad answer", 2), ("fair answer", 5))
    judge = ScriptedClient(lambda prompt, sampling: "[[7]]\n\nbecause")
    result = lc.judge_correctness(judge, _item("longbench-chat", few_shot=shots), "Line one.\nLine two.", seed=4)
    assert (result["correctness"], result["scale"]) == (0.7, "fewshot")
    prompt, sampling = judge.calls[0]
    assert sampling.stop == ("\n\n",)
    assert "[Assistant's answer begins]\nLine one. Line two.\n[Assistant's answer ends]\n\nRating: " in prompt
    assert lc.few_shot_examples(shots, 4) in prompt
    for answer, score in shots:
        assert f"[Assistant's answer begins]\n{answer}\n[Assistant's answer ends]\n\nRating: [[{score}]]" in prompt
    assert lc.few_shot_examples(shots, 4) == lc.few_shot_examples(shots, 4)


def test_correctness_unreadable_counts_half_after_hotter_retries():
    judge = ScriptedClient(lambda prompt, sampling: "I would say good.")
    sampling = SamplingParams(max_tokens=128, temperature=0.0, seed=10)
    result = lc.judge_correctness(judge, _item("multifieldqa_en", ("a", "b")), "x", sampling=sampling, tries=3)
    assert result["correctness"] == 0.5 and result["ratings"] == [None, None] and result["unparsed"] == 2
    assert [(s.temperature, s.seed) for _, s in judge.calls] == [(0.0, 10), (0.0, 11), (1.0, 12), (1.0, 13),
                                                                  (1.0, 14), (1.0, 15)]
    # one readable reference beats the unreadable one's 0.5 only when it is higher
    judge = ScriptedClient(lambda prompt, sampling: "[[1]]" if "\na\n" in prompt else "eh")
    assert lc.judge_correctness(judge, _item("hotpotqa", ("a", "b")), "x", tries=2)["correctness"] == 0.5


# ----------------------------------------------------------------------------------- loader


def _row(**changes):
    row = {"idx": 0, "dataset": "hotpotqa", "query": "Q?", "answer": ["A"], "few_shot_scores": [], "context": "C."}
    row.update(changes)
    return row


def test_load_items_json_and_jsonl(tmp_path):
    rows = [_row(), _row(idx="b", dataset="longbench-chat", few_shot_scores=[{"answer": "x", "score": 3}])]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    items = lc.load_cite_items(path)
    assert [(i.idx, i.dataset, i.answers, i.few_shot) for i in items] == [
        (0, "hotpotqa", ("A",), ()), ("b", "longbench-chat", ("A",), (("x", 3.0),))]
    assert items[1].location == f"{path}: item 1"
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [i.location for i in lc.load_cite_items(jsonl)] == [f"{jsonl}:1", f"{jsonl}:2"]


@pytest.mark.parametrize("rows, message", [
    ([_row(dataset="narrativeqa")], "item 0 (idx 0): field 'dataset' must be one of longbench-chat,"),
    ([_row(), _row(idx=True)], "item 1 (idx True): field 'idx' must be an integer or a non-empty string"),
    ([_row(answer="A")], "item 0 (idx 0): field 'answer' must be a non-empty list of non-empty strings"),
    ([_row(query=" ")], "field 'query' must be a non-empty string"),
    ([_row(dataset="longbench-chat")], "field 'few_shot_scores' must be a non-empty list"),
    ([_row(dataset="longbench-chat", few_shot_scores=[{"answer": "x", "score": 11}])],
     "field 'few_shot_scores' entry 0 must be {answer: string, score: 1-10}"),
    ([_row(), _row()], "item 1 (idx 0): duplicate 'idx' (first at"),
    ([], "no items"),
    ({"idx": 0}, "expected a JSON list of items, got dict"),
    (["x"], "item 0: expected a JSON object, got str"),
])
def test_load_items_errors_name_the_item_and_field(tmp_path, rows, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(lc.LongBenchCiteError) as err:
        lc.load_cite_items(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_items_bad_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row()) + "\n{oops\n")
    with pytest.raises(lc.LongBenchCiteError, match="bad.jsonl:2: invalid JSON"):
        lc.load_cite_items(path)


# ---------------------------------------------------------------------------------- summary


def _scored(dataset, r, p, correct, count=2, tokens=None):
    f1 = 0.0 if r + p == 0 else 2 * r * p / (r + p)
    return {"dataset": dataset, "citation_recall": r, "citation_precision": p, "citation_f1": f1,
            "correctness": correct, "citation_count": count, "citation_tokens": tokens}


def test_summary_per_dataset_group_and_average():
    rows = [_scored("multifieldqa_en", 1.0, 0.5, 1.0, 2, 30), _scored("multifieldqa_zh", 0.5, 0.5, 0.0, 1, 12),
            _scored("hotpotqa", 0.0, 0.0, 0.5, 0, 0), _scored("gov_report", 1.0, 1.0, 0.75, 3, 60)]
    summary = lc.summarize(rows)
    assert list(summary["datasets"]) == ["multifieldqa_en", "multifieldqa_zh", "hotpotqa", "gov_report"]
    mfqa = summary["groups"]["multifieldqa"]
    assert mfqa["count"] == 2 and mfqa["citation_recall"] == pytest.approx(0.75)
    assert mfqa["citation_f1"] == pytest.approx((2 / 3 + 0.5) / 2)   # the mean of per-answer F1s
    assert mfqa["correctness"] == pytest.approx(0.5) and mfqa["citation_length"] == pytest.approx(42 / 3)
    assert summary["groups"]["hotpotqa"]["citation_length"] is None   # no citation
    assert summary["groups"]["dureader"] == {"count": 0, "citation_recall": None, "citation_precision": None,
                                             "citation_f1": None, "correctness": None, "citations": 0,
                                             "citation_length": None}
    average = summary["average"]
    assert average["groups"] == ["multifieldqa", "hotpotqa", "gov_report"]
    assert average["citation_recall"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert average["correctness"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert average["citation_length"] == pytest.approx((30 + 12 + 0 + 60) / 6)  # pooled over answers
    markdown = lc.render_markdown(summary)
    assert "| multifieldqa | 2 | 75.0 | 50.0 | 58.3 | 50.0 | 14.0 |" in markdown
    assert "| hotpotqa | 1 | 0.0 | 0.0 | 0.0 | 50.0 | - |" in markdown
    assert "dureader" not in markdown
    assert "| Average | 4 | 58.3 | 50.0 | 52.8 | 58.3 | 17.0 |" in markdown


def test_summary_without_token_counts_has_no_length():
    summary = lc.summarize([_scored("dureader", 1.0, 1.0, 1.0, 2, None)])
    assert summary["groups"]["dureader"]["citation_length"] is None and summary["average"]["citation_length"] is None
