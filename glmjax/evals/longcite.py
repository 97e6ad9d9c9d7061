r"""LongCite (Zhang et al., 2024): sentence-numbered contexts, cited answers and their parser.

LongCite answers a question about a long document with fine-grained citations. The document is
cut into sentences (:func:`split_sentences`), each shown after its 0-based number ``<C{i}>``
(:func:`number_sentences`); the model answers in statements, each followed by the sentence spans
it draws on: ``<statement>{S}<cite>[s1-e1][s2-e2]...</cite></statement>`` (a statement that
needs no citation has an empty ``<cite></cite>``). :func:`parse_cited_response` reads such an
answer back into statements and spans, with the rules of the official post-processing.

Sentence splitting follows the official ``text_split_by_punctuation``:

1. nltk's Punkt with its default (untrained) parameters: no model is downloaded;
2. each Punkt sentence is cut again after every Chinese sentence mark ``。；！？`` (the mark stays
   with the sentence it ends);
3. pieces with no non-whitespace character are dropped;
4. when only one piece is left, the text is cut at blank lines (``"\n\n"``) instead;
5. sentence ``i`` is the text from the first non-whitespace character of piece ``i`` up to that
   of piece ``i + 1`` (the last runs to the end of the text): whitespace after a sentence stays
   with it, so the sentences concatenate back to the text without its leading whitespace, and a
   span of sentences is an exact slice of the text.

The answer prompt (:func:`build_cite_prompt`) is ours, a package file
``glmjax/pipelines/prompts/longcite_answer.txt`` with the placeholders ``{{context}}`` and
``{{question}}``; another file with the same placeholders replaces it through gin
(``load_cite_prompt.path = "/path/to/prompt.txt"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import gin
from nltk.tokenize.punkt import PunktSentenceTokenizer

from glmjax.pipelines.t1_cot import load_prompt, render

ANSWER_PROMPT_FILE = "longcite_answer.txt"
ANSWER_FIELDS = ("context", "question")

MAX_CITATIONS = 3
"""Spans kept per statement (after merging), as the official parser."""

MIN_UNTAGGED_CHARS = 6
"""Text between statements becomes an uncited statement when it holds at least this many
characters after stripping (the official ``len(text.strip()) > 5``)."""

_CHINESE_STOPS = re.compile(r"[。；！？]")
_BLANK_LINE = re.compile(r"\n\n")
_SPAN = re.compile(r"\[([0-9]+)-([0-9]+)\]")
_CITE = re.compile(r"<cite>(.*?)</cite>", re.DOTALL)
_OPEN, _CLOSE = "<statement>", "</statement>"

_PUNKT = PunktSentenceTokenizer()


def _stripped(text: str, start: int, end: int) -> tuple[int, int] | None:
    """``(start', end')`` of ``text[start:end]`` without its surrounding whitespace; None when
    nothing but whitespace is there."""
    piece = text[start:end]
    core = piece.strip()
    if not core:
        return None
    first = start + (len(piece) - len(piece.lstrip()))
    return first, first + len(core)


def _pieces(text: str) -> list[tuple[int, int]]:
    """Steps 1-4 of the module docstring: the stripped pieces of ``text`` as character ranges."""
    cuts: list[tuple[int, int]] = []
    for start, end in _PUNKT.span_tokenize(text):
        cut = start
        for mark in _CHINESE_STOPS.finditer(text, start, end):
            cuts.append((cut, mark.end()))
            cut = mark.end()
        cuts.append((cut, end))
    pieces = [span for span in (_stripped(text, a, b) for a, b in cuts) if span is not None]
    if len(pieces) == 1:
        bounds = [0] + [m.end() for m in _BLANK_LINE.finditer(text)]
        ends = [m.start() for m in _BLANK_LINE.finditer(text)] + [len(text)]
        pieces = [span for span in (_stripped(text, a, b) for a, b in zip(bounds, ends)) if span is not None]
    return pieces


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """The character range ``[start, end)`` in ``text`` of every sentence of :func:`split_sentences`
    (step 5 of the module docstring): ``start`` is the sentence's first non-whitespace character,
    ``end`` the next sentence's ``start`` (``len(text)`` for the last). Empty for a text of only
    whitespace."""
    starts = [start for start, _ in _pieces(text)]
    return list(zip(starts, starts[1:] + [len(text)]))


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences as LongCite numbers them (module docstring): Punkt, then after
    ``。；！？``, blank lines when that leaves one piece; each sentence keeps the whitespace that
    follows it, so ``"".join(split_sentences(text)) == text.lstrip()``."""
    return [text[start:end] for start, end in sentence_spans(text)]


def number_sentences(sentences: Sequence[str], start: int = 0) -> str:
    """The sentences concatenated, each after its number: ``"<C{start}>s0<C{start+1}>s1..."`` (no
    separator is added: each sentence carries its own trailing whitespace)."""
    return "".join(f"<C{start + i}>{sentence}" for i, sentence in enumerate(sentences))


@gin.configurable
def load_cite_prompt(path: str | os.PathLike | None = None) -> str:
    """The answer prompt template: the file ``path`` (placeholders ``{{context}}`` and
    ``{{question}}``), or ours when None.

    Raises:
      PromptError: the file is missing or has other placeholders.
    """
    return load_prompt(path, ANSWER_PROMPT_FILE, ANSWER_FIELDS)


def build_cite_prompt(context_sentences: Sequence[str], question: str, template: str | None = None) -> str:
    """The LongCite prompt: ``template`` (default :func:`load_cite_prompt`) with the numbered
    sentences (:func:`number_sentences`, from 0) as ``{{context}}`` and ``question`` filled in."""
    template = load_cite_prompt() if template is None else template
    return render(template, context=number_sentences(context_sentences), question=question)


def _statement_citations(body: str, num_sentences: int) -> tuple[str, list[tuple[int, int]]]:
    """(the statement without its ``<cite>`` blocks, its spans) for the text inside one
    ``<statement>...</statement>`` (rules of :func:`parse_cited_response`)."""
    spans = [(int(a), int(b)) for block in _CITE.findall(body) for a, b in _SPAN.findall(block)]
    merged: list[tuple[int, int]] = []
    for first, last in spans:
        if first > num_sentences - 1 or last < first:
            continue
        last = min(last, num_sentences - 1)
        if merged and first == merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return _CITE.sub("", body), merged[:MAX_CITATIONS]


def parse_cited_response(text: str, num_sentences: int) -> list[dict[str, Any]]:
    """The statements of a cited answer, in order, as ``{"statement": str, "citations": [(start,
    end), ...]}`` (0-based sentence ids, both ends included).

    Rules (the official post-processing):

    * inside ``<statement>...</statement>``: every ``[a-b]`` of its ``<cite>...</cite>`` blocks is
      a span (``[a]`` alone is no span); a span with ``a > num_sentences - 1`` or ``b < a`` is
      dropped and the rest are clipped to end at the last sentence; a span starting right after
      the previous kept span's end (``a == previous_b + 1``) is merged into it; the first
      :data:`MAX_CITATIONS` spans are kept. ``statement`` is the text without the ``<cite>``
      blocks (not stripped); a statement of only whitespace is dropped.
    * text outside the tags that holds more than 5 characters after stripping is a statement
      without citations; shorter text is dropped.
    * a ``<statement>`` without its ``</statement>`` ends the answer: the text after it is
      dropped, as the official parser does.

    Args:
      text: the model's answer.
      num_sentences: sentences in the numbered context (>= 0).

    Raises:
      ValueError: ``num_sentences < 0``.
    """
    if num_sentences < 0:
        raise ValueError(f"num_sentences must be >= 0, got {num_sentences}")
    statements: list[dict[str, Any]] = []
    position = 0
    while True:
        opening = text.find(_OPEN, position)
        if opening == -1:
            opening = len(text)
        between = text[position:opening]
        if len(between.strip()) >= MIN_UNTAGGED_CHARS:
            statements.append({"statement": between, "citations": []})
        closing = text.find(_CLOSE, opening)
        if closing == -1:
            return statements
        body = text[opening + len(_OPEN):closing]
        if body.strip():
            statement, citations = _statement_citations(body, num_sentences)
            statements.append({"statement": statement, "citations": citations})
        position = closing + len(_CLOSE)
