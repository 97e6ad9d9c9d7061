"""The fixture documents of the CoF tests (tests/cof_documents.jsonl) and a scripted LLM that answers
every CoF prompt as a careful model would."""

import json
import re
from pathlib import Path

from glmjax.pipelines.cof import answer_statements

FIXTURE = Path(__file__).parent / "cof_documents.jsonl"
DOCUMENTS = {row["id"]: row for row in map(json.loads, FIXTURE.read_text(encoding="utf-8").splitlines())}
MARROW = DOCUMENTS["marrow"]["context"]

# It answers each stage's prompt (recognised by its opening words) as a careful model would: the
# chunk-citation reply cites the snippets that hold a statement's key words, the sentence-citation
# reply the numbered sentences that hold them.

QUESTIONS = {"marrow": "1: When was the lighthouse first lit?\n2. Who designed the tower?\n**3:** What is the festival?\n",
             "shiqiao": "1：石桥是哪一年建的？\n2：石桥什么时候被洪水损坏？"}
ANSWERS = {"marrow": "The lighthouse was first lit in 1872. It was designed by Elsa Brandt and restored in 1990. "
                     "The town also holds a herring festival in August. I hope this helps.",
           "shiqiao": "石桥建于1820年。它在1954年被洪水损坏。"}
KEYWORDS = ("1872", "Brandt", "1990", "herring", "1820", "1954", "1961", "road")


def document_of(prompt):
    return "marrow" if "Marrow Point" in prompt else "shiqiao"


def _keywords(text):
    return [word for word in KEYWORDS if word in text]


def cof_reply(prompt, params=None):
    if prompt.startswith("[Document Start]") and "questions about it" in prompt:
        return QUESTIONS[document_of(prompt)]
    if "Answer the following question using the document above." in prompt:
        return ANSWERS[document_of(prompt)]
    if prompt.startswith("You are given numbered snippets"):
        task = prompt.rsplit("Now the task.", 1)[1]
        snippets = dict(re.findall(r"Snippet \[(\d+)\]\n(.*?)(?=\n\nSnippet \[|\n\n\[Question\])", task, re.DOTALL))
        answer = task.rsplit("[Answer]\n", 1)[1].rsplit("\n\n[Answer with Citations]", 1)[0]
        parts = []
        for statement in answer_statements(answer):
            cites = [n for n, text in snippets.items() if any(word in text for word in _keywords(statement))]
            parts.append(f"<statement>{statement}<cite>{''.join(f'[{n}]' for n in cites)}</cite></statement>")
        return "[Answer with Citations]\n" + " ".join(parts)
    if prompt.startswith("You are given a passage whose sentences"):
        task = prompt.rsplit("Now the task.", 1)[1]
        passage = task.split("[Passage Start]\n", 1)[1].split("\n[Passage End]", 1)[0]
        statement = task.split("[Statement]\n", 1)[1].split("\n\n[Output]", 1)[0]
        found = [int(n) for n, text in re.findall(r"<C(\d+)>(.*?)(?=<C\d+>|$)", passage, re.DOTALL)
                 if any(word in text for word in _keywords(statement))]
        return "\n".join(f"[{n}-{n}]" for n in found) or "No relevant information"
    raise AssertionError(f"unexpected prompt {prompt[:80]!r}")


CITED = {
    "marrow": ("<statement>The lighthouse was first lit in 1872.<cite>[5-5]</cite></statement> "
               "<statement>It was designed by Elsa Brandt and restored in 1990.<cite>[7-8][16-16]</cite></statement> "
               "<statement>The town also holds a herring festival in August.<cite>[12-12]</cite></statement> "
               "<statement>I hope this helps.<cite></cite></statement>"),
    "shiqiao": ("<statement>石桥建于1820年。<cite>[1-1]</cite></statement> "
                "<statement>它在1954年被洪水损坏。<cite>[3-3]</cite></statement>"),
    "orrin": ("<statement>The railway closed in 1961.<cite>[2-2]</cite></statement> "
              "<statement>It closed because a new road had been built.<cite>[2-2]</cite></statement>"),
}


