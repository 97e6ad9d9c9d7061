"""LongBench-Write scoring against hand-computed values: word counts, length scores, the judge reply
parser, the judge's retries with a scripted client, the prompts loader and the summary buckets."""

from __future__ import annotations

import json

import pytest

from glmjax.data.chat_format import Reply
from glmjax.evals import longbench_write as lbw
from glmjax.inference.llm_client import AssistantTurn, LLMClient, LLMClientError, SamplingParams

ALL_SIX = ('{"Analysis": "fine", "Relevance": 5, "Accuracy": 4, "Coherence": 4, "Clarity": 3, '
           '"Breadth and Depth": 3, "Reading Experience": 2}')
ALL_SIX_SCORES = {"relevance": 5.0, "accuracy": 4.0, "coherence": 4.0, "clarity": 3.0,
                  "breadth_and_depth": 3.0, "reading_experience": 2.0}
# (5-1 + 4-1 + 4-1 + 3-1 + 3-1 + 2-1) * 25 / 6 = 15 * 25 / 6
ALL_SIX_SQ = 62.5


class ScriptedClient(LLMClient):
    """Answers each call with the next canned reply (an exception instance is raised instead) and
    records every call's messages and sampling."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls: list[tuple[list, SamplingParams]] = []

    def complete(self, messages, sampling=None):
        self.calls.append((list(messages), sampling))
        if not self.replies:
            raise AssertionError("the scripted client ran out of replies")
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def complete_batch(self, conversations, sampling=None):
        return [self.complete(messages, sampling) for messages in conversations]

    def assistant_turns(self, conversations, sampling=None, tools=None):
        texts = self.complete_batch(conversations, sampling)
        return [AssistantTurn(text, [], [], "stop", Reply(text)) for text in texts]


# ------------------------------------------------------------------------------------ count_words


@pytest.mark.parametrize("text, expected", [
    ("", 0),
    ("Hello, world! 你好世界。", 2 + 4),
    ("I have 3 apples and 2 bananas.", 5),            # digits never count
    ("abc123 def_ghi x-ray don't", 0 + 0 + 2 + 2),    # joined to digits/_: no word; - and ' split
    ("hello世界", 0 + 2),                              # 世 is a word character: no boundary after o
    ("GPT-4o 模型，2024年发布", 1 + 2 + 3),              # "4o" is no word; ， is not U+4E00-U+9FFF
    ("café ünter", 0),                                 # letters joined to é / ü form no word
    ("こんにちは 안녕하세요", 0),                          # kana and hangul are not counted
    ("\u4e00\u9fff\u3400\ua000", 2),                   # the range ends count, outside it not
    ("The quick brown fox.\n\nJumps over... the lazy dog?!", 9),
])
def test_count_words(text, expected):
    assert lbw.count_words(text) == expected


# ----------------------------------------------------------------------------------- length_score


@pytest.mark.parametrize("required, produced, expected", [
    (1000, 1000, 100.0),
    (1000, 2000, 100 * (1 - 1 / 3)),   # 66.67
    (1000, 1300, 90.0),                # 1 - 0.3/3
    (1000, 4000, 0.0),                 # 1 - 3/3
    (1000, 9000, 0.0),                 # clipped at 0
    (1000, 500, 50.0),                 # 1 - (2 - 1)/2
    (1000, 800, 87.5),                 # 1 - (1.25 - 1)/2
    (1000, 333, 0.0),                  # below x/3
    (1000, 0, 0.0),                    # empty output
    (100, 101, 100 * (1 - 0.01 / 3)),
])
def test_length_score(required, produced, expected):
    assert lbw.length_score(required, produced) == pytest.approx(expected, abs=1e-9)


def test_length_score_rounded_examples():
    assert round(lbw.length_score(1000, 2000), 2) == 66.67


@pytest.mark.parametrize("required, produced", [(0, 10), (-5, 10), (100, -1)])
def test_length_score_rejects_bad_lengths(required, produced):
    with pytest.raises(lbw.LongBenchWriteError, match="length must be"):
        lbw.length_score(required, produced)


# ---------------------------------------------------------------------------------------- parser


def test_parse_plain_json():
    assert lbw.parse_quality_scores(ALL_SIX) == ALL_SIX_SCORES


def test_parse_fenced_json_with_text_and_newlines_in_strings():
    reply = ("Here is my evaluation {of the text}:\n```json\n"
             '{"Analysis": "Good start.\nWeak ending {sadly}.", "Relevance": 5, "Accuracy": 4,\n'
             '"Coherence": 4, "Clarity": 3, "Breadth and Depth": 3, "Reading Experience": 2}\n'
             "```\nHope this helps.")
    assert lbw.parse_quality_scores(reply) == ALL_SIX_SCORES


def test_parse_unfenced_json_among_text_with_string_values_and_key_variants():
    reply = ('Sure! My scores: {"analysis": "ok", "RELEVANCE": "4", "accuracy": " 3.5 ", '
             '"Coherence": 2, "clarity": 1, "breadth_and_depth": "5", "Reading-Experience": 4.0} '
             "Thanks.")
    assert lbw.parse_quality_scores(reply) == {
        "relevance": 4.0, "accuracy": 3.5, "coherence": 2.0, "clarity": 1.0,
        "breadth_and_depth": 5.0, "reading_experience": 4.0}
    assert lbw.parse_quality_scores('{"Breadth & Depth": 2}') == {"breadth_and_depth": 2.0}


def test_parse_missing_and_out_of_range_dimensions_are_left_out():
    reply = ('{"Relevance": 6, "Accuracy": 0, "Coherence": "five", "Clarity": true, '
             '"Breadth and Depth": 4, "Reading Experience": "4/5"}')
    assert lbw.parse_quality_scores(reply) == {"breadth_and_depth": 4.0}
    assert lbw.parse_quality_scores('{"Relevance": 3, "Accuracy": 2}') == {"relevance": 3.0, "accuracy": 2.0}
    scores, problems = lbw._parse(reply)
    assert "Relevance: 6 is not a score in 1-5" in problems
    assert "Reading Experience: '4/5' is not a score in 1-5" in problems
    assert len(problems) == 5


@pytest.mark.parametrize("reply", ["", "I cannot judge this.", "```json\n{broken\n```",
                                   '{"Score": 4, "Quality": 5}', "[1, 2, 3]"])
def test_parse_garbage_raises(reply):
    with pytest.raises(lbw.LongBenchWriteError, match="no JSON object with a score dimension"):
        lbw.parse_quality_scores(reply)


# ----------------------------------------------------------------------------------------- judge


def test_judge_retries_garbage_then_scores_a_valid_reply():
    client = ScriptedClient(["Let me think... the response is decent.", "```json\n" + ALL_SIX + "\n```"])
    judgement = lbw.judge_quality(client, "Write a 300-word story about a cat.", "Once upon a time",
                                  sampling=SamplingParams(max_tokens=64, temperature=0.5, seed=7))
    assert judgement.tries == 2
    assert judgement.missing == []
    assert judgement.scores == ALL_SIX_SCORES
    assert judgement.dimension_scores == {"relevance": 100.0, "accuracy": 75.0, "coherence": 75.0,
                                          "clarity": 50.0, "breadth_and_depth": 50.0,
                                          "reading_experience": 25.0}
    assert judgement.s_q == pytest.approx(ALL_SIX_SQ)
    assert len(judgement.problems) == 1 and judgement.problems[0].startswith("try 1: ")
    assert [sampling.seed for _, sampling in client.calls] == [7, 8]
    (messages, _), _ = client.calls
    assert len(messages) == 1 and messages[0]["role"] == "user"
    prompt = messages[0]["content"]
    assert "Write a 300-word story about a cat." in prompt and "Once upon a time" in prompt
    assert "length" in prompt.lower()


def test_judge_missing_dimension_counts_as_middle_after_all_tries():
    two_missing = '{"Relevance": 5, "Coherence": 4, "Clarity": 3, "Breadth and Depth": 3}'
    one_missing = ('{"Relevance": 5, "Coherence": 4, "Clarity": 3, "Breadth and Depth": 3, '
                   '"Reading Experience": 2}')
    client = ScriptedClient([two_missing, one_missing, "garbage", two_missing, '{"Relevance": 9}'])
    judgement = lbw.judge_quality(client, "instruction", "response")
    assert judgement.tries == 5 and len(client.calls) == 5
    assert judgement.missing == ["accuracy"]
    assert judgement.scores == {**ALL_SIX_SCORES, "accuracy": 3.0}
    assert judgement.reply == one_missing
    # (4 + 2 + 3 + 2 + 2 + 1) * 25 / 6
    assert judgement.s_q == pytest.approx(14 * 25 / 6)
    assert len(judgement.problems) == 5
    assert judgement.problems[1] == "try 2: Accuracy: missing"
    assert client.calls[0][1] == lbw.DEFAULT_JUDGE_SAMPLING


def test_judge_all_garbage_counts_every_dimension_as_middle():
    client = ScriptedClient(["no"] * 3)
    judgement = lbw.judge_quality(client, "instruction", "response", tries=3)
    assert judgement.tries == 3 and judgement.missing == list(lbw.DIMENSIONS)
    assert judgement.scores == {d: 3.0 for d in lbw.DIMENSIONS}
    assert judgement.s_q == pytest.approx(50.0)
    assert judgement.reply == "no" and len(judgement.problems) == 3


def test_judge_stops_at_the_first_complete_reply():
    client = ScriptedClient([ALL_SIX, "unused"])
    judgement = lbw.judge_quality(client, "i", "r")
    assert judgement.tries == 1 and judgement.problems == [] and client.replies == ["unused"]


def test_judge_client_failure_propagates_and_bad_tries_rejected():
    with pytest.raises(LLMClientError, match="unreachable"):
        lbw.judge_quality(ScriptedClient([LLMClientError("judge unreachable")]), "i", "r")
    with pytest.raises(lbw.LongBenchWriteError, match="tries must be >= 1"):
        lbw.judge_quality(ScriptedClient([]), "i", "r", tries=0)


def test_judge_prompt_fills_in_one_pass_and_checks_the_template():
    prompt = lbw.judge_prompt("write {{response}} here", "RESPONSE TEXT")
    assert "write {{response}} here" in prompt and "RESPONSE TEXT" in prompt
    assert "{{instruction}}" not in prompt
    assert lbw.judge_prompt("a", "b", template="I={{instruction}} R={{response}}") == "I=a R=b"
    with pytest.raises(lbw.LongBenchWriteError, match=r"\{\{instruction\}\} and \{\{response\}\}"):
        lbw.judge_prompt("a", "b", template="only {{instruction}}")


# ---------------------------------------------------------------------------------------- loader


def _write(tmp_path, text: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_prompts(tmp_path):
    lines = [{"prompt": "Write a poem.", "type": "Literature and Creative Writing", "length": 300},
             {"prompt": "写一篇科普文章。", "type": "Popular Science", "length": 5000, "extra": 1}]
    path = _write(tmp_path, json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1], ensure_ascii=False))
    items = lbw.load_prompts(path)
    assert items == [
        lbw.WritePrompt("Write a poem.", "Literature and Creative Writing", 300, f"{path}:1"),
        lbw.WritePrompt("写一篇科普文章。", "Popular Science", 5000, f"{path}:3"),
    ]


GOOD = '{"prompt": "p", "type": "t", "length": 100}'


@pytest.mark.parametrize("text, line, message", [
    (GOOD + "\n{not json\n", 2, "malformed JSON"),
    ('{"prompt": "p", "length": 100}\n', 1, "missing field 'type'"),
    ('{"type": "t", "length": 100}\n', 1, "missing field 'prompt'"),
    (GOOD + "\n" + GOOD + '\n{"prompt": "p", "type": "t"}\n', 3, "missing field 'length'"),
    ('{"prompt": "p", "type": "t", "length": "1000"}\n', 1, "field 'length' must be a positive int"),
    ('{"prompt": "p", "type": "t", "length": 1.5}\n', 1, "field 'length' must be a positive int"),
    ('{"prompt": "p", "type": "t", "length": true}\n', 1, "field 'length' must be a positive int"),
    ('{"prompt": "p", "type": "t", "length": 0}\n', 1, "field 'length' must be a positive int"),
    ('{"prompt": "", "type": "t", "length": 10}\n', 1, "field 'prompt' must be a non-empty string"),
    ('{"prompt": "p", "type": 3, "length": 10}\n', 1, "field 'type' must be a non-empty string"),
    ("[1, 2]\n", 1, "expected a JSON object, got list"),
])
def test_load_prompts_errors_name_file_line_and_field(tmp_path, text, line, message):
    path = _write(tmp_path, text)
    with pytest.raises(lbw.LongBenchWriteError) as info:
        lbw.load_prompts(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: ") and message in text and "\n" not in text


def test_load_prompts_file_errors(tmp_path):
    with pytest.raises(lbw.LongBenchWriteError, match="no items"):
        lbw.load_prompts(_write(tmp_path, "\n  \n"))
    with pytest.raises(lbw.LongBenchWriteError, match="cannot read the prompts file"):
        lbw.load_prompts(tmp_path / "absent.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(lbw.LongBenchWriteError, match=rf"^{path}:2: not UTF-8"):
        lbw.load_prompts(path)


# ------------------------------------------------------------------------------------- summarize


FIXTURE = [
    {"length": 300, "type": "News", "s_l": 100.0, "s_q": 50.0, "missing": []},
    {"length": 499, "type": "Poetry", "s_l": 80.0, "s_q": 70.0},
    {"length": 500, "type": "News", "s_l": 60.0, "s_q": 40.0, "missing": ["accuracy"]},
    {"length": 4000, "type": "Poetry", "s_l": 0.0, "s_q": 90.0},
    {"length": 20000, "type": "News", "s_l": 50.0, "s_q": 50.0},
]


def _expect(group, s_l, s_q, overall, count, with_missing=0):
    assert group["count"] == count and group["with_missing"] == with_missing
    for key, value in (("s_l", s_l), ("s_q", s_q), ("overall", overall)):
        assert group[key] == (None if value is None else pytest.approx(value)), key


def test_summarize_buckets_and_types():
    summary = lbw.summarize(FIXTURE)
    _expect(summary["overall"], 58.0, 60.0, 59.0, 5, 1)
    assert list(summary["by_length"]) == ["[0, 500)", "[500, 2k)", "[2k, 4k)", "[4k, 20k]"]
    _expect(summary["by_length"]["[0, 500)"], 90.0, 60.0, 75.0, 2)
    _expect(summary["by_length"]["[500, 2k)"], 60.0, 40.0, 50.0, 1, 1)
    _expect(summary["by_length"]["[2k, 4k)"], None, None, None, 0)
    _expect(summary["by_length"]["[4k, 20k]"], 25.0, 70.0, 47.5, 2)
    assert list(summary["by_type"]) == ["News", "Poetry"]
    _expect(summary["by_type"]["News"], 70.0, 140 / 3, 175 / 3, 3, 1)
    _expect(summary["by_type"]["Poetry"], 40.0, 80.0, 60.0, 2)
    json.dumps(summary)


def test_summarize_over_20k_and_bad_rows():
    summary = lbw.summarize(FIXTURE + [{"length": 30000, "type": "News", "s_l": 10.0, "s_q": 30.0}])
    assert list(summary["by_length"])[-1] == lbw.OVER_20K
    _expect(summary["by_length"][lbw.OVER_20K], 10.0, 30.0, 20.0, 1)
    assert lbw.length_bucket(1999) == "[500, 2k)" and lbw.length_bucket(2000) == "[2k, 4k)"
    with pytest.raises(lbw.LongBenchWriteError, match=r"^row 1: field 's_q' must be a score in 0-100"):
        lbw.summarize([FIXTURE[0], {"length": 300, "type": "News", "s_l": 10.0}])
    with pytest.raises(lbw.LongBenchWriteError, match=r"^row 0: field 'length' must be a positive int"):
        lbw.summarize([{"length": "300", "type": "News", "s_l": 10.0, "s_q": 10.0}])
    with pytest.raises(lbw.LongBenchWriteError, match=r"^row 0: field 's_l' must be a score in 0-100"):
        lbw.summarize([{"length": 300, "type": "News", "s_l": 120.0, "s_q": 10.0}])


def test_render_markdown():
    table = lbw.render_markdown(lbw.summarize(FIXTURE)).splitlines()
    assert table[0] == "| Group | Count | S_l | S_q | S | Missing dims |"
    assert table[2] == "| Overall | 5 | 58.0 | 60.0 | 59.0 | 1 |"
    assert "| Length [2k, 4k) | 0 | - | - | - | 0 |" in table
    assert "| Length [4k, 20k] | 2 | 25.0 | 70.0 | 47.5 | 0 |" in table
    assert "| News | 3 | 70.0 | 46.7 | 58.3 | 1 |" in table
    assert len(table) == 2 + 1 + 4 + 2


def test_score_item_end_to_end_with_the_judge():
    item = lbw.WritePrompt("Write ten words.", "Functional Writing", 10, "f.jsonl:1")
    response = "One two three, four five! 六七八九十"
    client = ScriptedClient(['{"Relevance": 5, "Accuracy": 5, "Coherence": 5, "Clarity": 5, '
                             '"Breadth and Depth": 5, "Reading Experience": 1}'])
    row = lbw.score_item(item, response, lbw.judge_quality(client, item.prompt, response))
    assert row["words"] == 10 and row["s_l"] == 100.0
    assert row["s_q"] == pytest.approx(500 / 6)          # five dims at 100, one at 0
    assert row["overall"] == pytest.approx((100 + 500 / 6) / 2)
    assert row["missing"] == [] and row["type"] == "Functional Writing" and row["length"] == 10
    summary = lbw.summarize([json.loads(json.dumps(row))])
    _expect(summary["by_length"]["[0, 500)"], 100.0, 500 / 6, (100 + 500 / 6) / 2, 1)
