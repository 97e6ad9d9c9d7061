"""The scripted model and judge of the LongBench-Cite CLI tests (tests/longcite_fixture.json), the
scores they must give (computed by hand), and how the tests run ``launch.evaluate``.

The model answers each fixture question with a fixed cited response; the judge rates each support,
relevance, need-of-citation and correctness prompt by the statement, passage, sentence or reference
it holds. Both read an OpenAI chat-completions request body (tests/fake_openai_server.py).
"""

from __future__ import annotations

import json
import os

import pytest

from glmjax.data.tokenizer import default_tokenizer, save_tokenizer
from glmjax.evals import longcite as lc

FIXTURE = os.path.join(os.path.dirname(__file__), "longcite_fixture.json")

RESPONSES = {  # question -> the model's answer
    "Where were Alice Smith and Bob Jones born?":
        "<statement>Alice Smith was born in Leeds.<cite>[0-0]</cite></statement>"
        "<statement>Bob Jones was born in York.<cite>[2-2][3-3]</cite></statement>",
    "What does the pump in the manual do?":
        "<statement>The pump moves coolant.<cite>[2-2]</cite></statement>"
        "<statement>It runs at 3000 rpm.<cite></cite></statement>",
    "中国的首都是哪里？": "<statement>中国的首都是北京。<cite>[0-0]</cite></statement>",
    "Summarize the report.":
        "<statement>The agency cut costs by 10 percent and hired 50 inspectors.<cite>[0-1]</cite></statement>"
        "<statement>In short, the report is about savings.<cite>[9-12]</cite></statement>",
    "Why do cats in the story sleep so much?": "The cats sleep a lot because they are lazy.",
    "长城有多长？": "<statement>长城全长两万多公里。<cite>[1-1]</cite></statement>",
}

SUPPORT = {  # statement -> reply
    "Alice Smith was born in Leeds.": "Rating: [[Fully supported]]",
    "Bob Jones was born in York.": "Rating: [[Fully supported]]",
    "The pump moves coolant.": "Rating: [[Partially supported]]",
    "中国的首都是北京。": "Rating: [[Fully supported]]",
    "The agency cut costs by 10 percent and hired 50 inspectors.": "Rating: [[Fully supported]]",
    "长城全长两万多公里。": "Rating: [Partially supported]",  # single brackets: read tolerantly
}
IRRELEVANT = {"The pump moves coolant."}  # its one citation (the filter sentence) is not relevant
NEEDS_CITATION = {  # uncited sentence -> does it need one
    "It runs at 3000 rpm.": True,
    "In short, the report is about savings.": False,   # its only span [9-12] is past the context: dropped
    "The cats sleep a lot because they are lazy.": True,
}
CORRECTNESS = {  # a reference answer -> the judge's rating reply
    "Leeds and York": "[[3]]",
    "It moves coolant through the engine.": "[[2]]",
    "北京": "[[3]]",
    "The agency cut costs by 10% and hired 50 inspectors.": "Rating: [[4]]",
    "Because the nights in the story are long and cold.": "[[6]]",
    "两万多公里": "[[3]]",   # but its first (greedy) reply is unreadable: see judge_reply
}

# Hand-computed scores per idx: (recall, precision, f1, correctness).
#  0 hotpotqa: both statements fully supported, [0-0] and the merged [2-3] relevant -> 1, 1, 1; [[3]] of 1-3 -> 1.
#  1 multifieldqa_en: partially 0.5 and "needs a citation" 0 -> R 0.25; its one citation not relevant -> P 0;
#    F1 0; [[2]] -> 0.5.
#  2 multifieldqa_zh: 1, 1, 1; [[3]] -> 1.
#  3 gov_report: fully 1 and "needs none" 1 -> R 1; [0-1] relevant -> P 1; F1 1; [[4]] of 1-5 -> 0.75.
#  4 longbench-chat: one uncited statement that needs a citation -> R 0, P 0 (no citation), F1 0;
#    [[6]] of 1-10 -> 0.6.
#  5 dureader: partially 0.5, relevant 1 -> F1 2 * 0.5 / 1.5 = 2/3; unreadable, then [[3]] -> 1.
EXPECTED = {0: (1.0, 1.0, 1.0, 1.0), 1: (0.25, 0.0, 0.0, 0.5), 2: (1.0, 1.0, 1.0, 1.0),
            3: (1.0, 1.0, 1.0, 0.75), 4: (0.0, 0.0, 0.0, 0.6), 5: (0.5, 1.0, 2 / 3, 1.0)}
# Groups (multifieldqa pools idx 1 and 2): recall chat 0, mfqa 0.625, hotpotqa 1, dureader 0.5, gov 1.
EXPECTED_GROUPS = {
    "longbench-chat": (0.0, 0.0, 0.0, 0.6),
    "multifieldqa": (0.625, 0.5, 0.5, 0.75),
    "hotpotqa": (1.0, 1.0, 1.0, 1.0),
    "dureader": (0.5, 1.0, 2 / 3, 1.0),
    "gov_report": (1.0, 1.0, 1.0, 0.75),
}
EXPECTED_AVERAGE = (3.125 / 5, 3.5 / 5, (0.5 + 1 + 2 / 3 + 1) / 5, 4.1 / 5)

CITED_TEXTS = {  # idx -> the text of every citation (all statements), for the citation length
    0: ["Alice Smith was born in Leeds in 1970. ",
        "Bob Jones was born in York. He left York for London in 1990 and became a painter."],
    1: ["The filter must be changed every year.\n\n"],
    2: ["北京是中国的首都。"],
    3: ["The agency cut its costs by 10 percent in 2020. It used the savings to hire 50 new inspectors. "],
    4: [],
    5: ["长城全长两万多公里。"],
}

# Judge calls of a full run: support/need per statement (2+2+1+2+1+1 = 9), relevance per citation
# (2+1+1+1+0+1 = 6), correctness per reference (6) and the one retry of idx 5's correctness.
JUDGE_CALLS = 9 + 6 + 6 + 1


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def model_reply(body) -> str:
    """The scripted model: the fixed answer to the question the prompt ends with."""
    prompt = body["messages"][-1]["content"]
    return next(answer for question, answer in RESPONSES.items() if prompt.endswith(question))


def judge_reply(body) -> str:
    """The scripted judge: by the kind of prompt and what it holds."""
    prompt = body["messages"][-1]["content"]
    if "how well the passage supports" in prompt:
        return SUPPORT[_between(prompt, "<statement>\n", "\n</statement>")]
    if "holds key information" in prompt:
        statement = _between(prompt, "<statement>\n", "\n</statement>")
        return "Rating: [[Unrelevant]]" if statement in IRRELEVANT else "Rating: [[Relevant]]"
    if "<sentence>\n" in prompt:
        sentence = _between(prompt, "<sentence>\n", "\n</sentence>")
        return "Need Citation: [[Yes]]" if NEEDS_CITATION[sentence] else "Need Citation: [[No]]"
    reference = next(r for r in CORRECTNESS if f"\n{r}\n" in prompt)
    if reference == "两万多公里" and body["temperature"] == 0.0:
        return "good"
    return CORRECTNESS[reference]


def reply(body) -> str:
    """Model and judge behind one server: ``model`` names which."""
    return judge_reply(body) if body["model"] == "judge" else model_reply(body)


def load_fixture() -> list[dict]:
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------- running launch.evaluate

from evaluate_cli import ENV, REPO, evaluate_cli  # noqa: E402,F401  (the CLI tests use them from here)


def rows(path):
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def tokenizer_dir(root):
    """The default tokenizer saved under ``root / "tok"`` (built in ``root / "cache"``)."""
    save_tokenizer(default_tokenizer(root / "cache"), root / "tok")
    return root / "tok"


def check_report(report, tokenizer):
    summary = report["summary"]
    for group, expected in EXPECTED_GROUPS.items():
        metrics = summary["groups"][group]
        assert [metrics[m] for m in lc.METRICS] == pytest.approx(list(expected)), group
    assert [summary["average"][m] for m in lc.METRICS] == pytest.approx(list(EXPECTED_AVERAGE))
    texts = [text for texts in CITED_TEXTS.values() for text in texts]
    tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
    assert summary["average"]["citation_length"] == pytest.approx(tokens / len(texts))
    mfqa = CITED_TEXTS[1] + CITED_TEXTS[2]
    assert summary["groups"]["multifieldqa"]["citation_length"] == pytest.approx(
        sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in mfqa) / 2)
    assert summary["groups"]["longbench-chat"]["citation_length"] is None  # no citation


def cli_args(server, out, *extra):
    return ["longbench_cite", f"--data={FIXTURE}", f"--output_dir={out}", "--client=http",
            f"--base_url={server.base_url}", "--model=reader", f"--judge_base_url={server.base_url}",
            "--judge_model=judge", "--noprogress", *extra]
