"""LongCite sentences, numbering, prompt and cited-answer parser against hand-written cases."""

from __future__ import annotations

import pytest

from glmjax.evals import longcite as lc
from glmjax.pipelines.t1_cot import PromptError

# ------------------------------------------------------------------------------------ splitting


def test_punkt_sentences_keep_their_trailing_whitespace():
    text = "  Hello world. This is Dr. Smith!  Next one?\n\nLast line  "
    assert lc.split_sentences(text) == ["Hello world. ", "This is Dr. ", "Smith!  ", "Next one?\n\n",
                                        "Last line  "]


def test_chinese_marks_cut_again_and_stay_with_their_sentence():
    text = "New para 你好。我很好；谢谢！你呢？ OK."
    assert lc.split_sentences(text) == ["New para 你好。", "我很好；", "谢谢！", "你呢？ ", "OK."]


def test_marks_in_a_row_make_no_empty_sentence():
    # "。。" cuts twice: the second piece is the mark alone, which is kept (it is not empty).
    assert lc.split_sentences("好。。对！") == ["好。", "。", "对！"]


def test_one_piece_falls_back_to_blank_lines():
    text = "no full stop here\n\nsecond paragraph\n\n\n\nthird"
    # "\n\n\n\n" is two blank-line cuts: the empty piece between them is dropped.
    assert lc.split_sentences(text) == ["no full stop here\n\n", "second paragraph\n\n\n\n", "third"]
    assert lc.split_sentences("one line only") == ["one line only"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\n"])
def test_whitespace_has_no_sentences(text):
    assert lc.split_sentences(text) == []
    assert lc.sentence_spans(text) == []


@pytest.mark.parametrize("text", [
    "  Hello world. This is Dr. Smith!  Next one?\n\nLast line  ",
    "甲。乙；丙！丁？ end. More text here.\n",
    "a\n\nb\n\n",
    "Mr. Brown met Ms. Green at 3 p.m. on Jan. 5. They talked. 然后他们走了。",
])
def test_sentences_concatenate_back_and_spans_slice_the_text(text):
    sentences = lc.split_sentences(text)
    assert "".join(sentences) == text.lstrip()
    spans = lc.sentence_spans(text)
    assert [text[a:b] for a, b in spans] == sentences
    assert all(not s[0].isspace() for s in sentences)
    assert spans[-1][1] == len(text)


def test_number_sentences():
    assert lc.number_sentences(["A. ", "B.\n", "C"]) == "<C0>A. <C1>B.\n<C2>C"
    assert lc.number_sentences(["x ", "y"], start=7) == "<C7>x <C8>y"
    assert lc.number_sentences([]) == ""


# -------------------------------------------------------------------------------------- prompt


def test_cite_prompt_holds_the_numbered_context_and_question():
    prompt = lc.build_cite_prompt(["First one. ", "Second {{question}}."], "Who?")
    assert "[Document Start]\n<C0>First one. <C1>Second {{question}}.\n[Document End]\n\nWho?" in prompt
    assert prompt.endswith("Who?")
    assert "<statement>{S}<cite>[{s1}-{e1}][{s2}-{e2}]...</cite></statement>" in prompt


def test_cite_prompt_file_replaces_ours(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Q={{question}} C={{context}}", encoding="utf-8")
    template = lc.load_cite_prompt(path)
    assert lc.build_cite_prompt(["a. ", "b."], "q", template) == "Q=q C=<C0>a. <C1>b."
    bad = tmp_path / "bad.txt"
    bad.write_text("{{context}} only", encoding="utf-8")
    with pytest.raises(PromptError, match="bad.txt.*missing: \\['question'\\]"):
        lc.load_cite_prompt(bad)


def test_cite_prompt_selected_by_gin(tmp_path):
    import gin

    path = tmp_path / "p.txt"
    path.write_text("{{context}}|{{question}}", encoding="utf-8")
    with gin.unlock_config():
        gin.bind_parameter("load_cite_prompt.path", str(path))
    try:
        assert lc.build_cite_prompt(["s."], "q") == "<C0>s.|q"
    finally:
        gin.clear_config()


# -------------------------------------------------------------------------------------- parser


def test_parse_spans_drop_clip_merge_and_keep_three():
    text = "<statement>X<cite>[0-1][2-3][9-9][5-4][12-14][6-6][8-20]</cite></statement>"
    # [0-1] then [2-3] starts at 1+1: merged to (0, 3); [5-4] (b < a) and [12-14] (a > 9) dropped;
    # [8-20] clipped to (8, 9); three kept of (0,3), (9,9), (6,6), (8,9).
    assert lc.parse_cited_response(text, 10) == [{"statement": "X", "citations": [(0, 3), (9, 9), (6, 6)]}]


def test_parse_merge_is_with_the_previous_kept_span_only():
    text = "<statement>S<cite>[3-4][9-9][5-6]</cite></statement>"
    assert lc.parse_cited_response(text, 10)[0]["citations"] == [(3, 4), (9, 9), (5, 6)]
    text = "<statement>S<cite>[3-4][40-41][5-6][7-7]</cite></statement>"
    # the dropped [40-41] does not break the chain: (3,4)+(5,6)+(7,7) -> (3,7)
    assert lc.parse_cited_response(text, 10)[0]["citations"] == [(3, 7)]
    text = "<statement>S<cite>[3-12][10-11]</cite></statement>"
    # clipped to (3, 9); (10, 11) starts after the last sentence: dropped
    assert lc.parse_cited_response(text, 10)[0]["citations"] == [(3, 9)]


def test_parse_single_numbers_and_other_forms_are_no_spans():
    text = "<statement>S<cite>[4][1 - 2][1-2-3][a-b]</cite></statement>"
    # "[1-2-3]" holds no "[a-b]" (the "]" must follow "2"); "[4]" alone is not a span
    assert lc.parse_cited_response(text, 10) == [{"statement": "S", "citations": []}]


def test_parse_statement_text_without_tags_and_several_cite_blocks():
    text = "<statement> The sky <cite>[1-1]</cite>is blue.<cite>[2-2]</cite></statement>"
    assert lc.parse_cited_response(text, 5) == [{"statement": " The sky is blue.", "citations": [(1, 2)]}]


def test_parse_text_between_statements():
    text = ("Intro!\n<statement>A<cite>[0-0]</cite></statement>\n\nok. \n<statement>B<cite></cite>"
            "</statement>  \n<statement>  </statement>Closing words")
    # "Intro!" is 6 characters (> 5): a statement; "ok." is 3: dropped; the blank statement dropped
    assert lc.parse_cited_response(text, 3) == [
        {"statement": "Intro!\n", "citations": []},
        {"statement": "A", "citations": [(0, 0)]},
        {"statement": "B", "citations": []},
        {"statement": "Closing words", "citations": []},
    ]
    assert lc.parse_cited_response("12345", 3) == []
    assert lc.parse_cited_response("123456", 3) == [{"statement": "123456", "citations": []}]


def test_parse_unclosed_statement_ends_the_answer():
    text = "Before the tags.<statement>A<cite>[0-0]</cite></statement><statement>cut off<cite>[1-1]"
    assert lc.parse_cited_response(text, 3) == [
        {"statement": "Before the tags.", "citations": []},
        {"statement": "A", "citations": [(0, 0)]},
    ]


def test_parse_no_sentences_and_bad_count():
    assert lc.parse_cited_response("<statement>A<cite>[0-0]</cite></statement>", 0) == [
        {"statement": "A", "citations": []}]
    with pytest.raises(ValueError, match="num_sentences"):
        lc.parse_cited_response("x", -1)
