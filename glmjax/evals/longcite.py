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

LongBench-Cite scoring (the official ``LongBench-Cite/auto_scorer.py`` and ``eval_correct.py``
rules; the job is :mod:`glmjax.evals.longbench_cite_jobs`). Items (:func:`load_cite_items`) hold
``idx, dataset, query, answer (references), few_shot_scores, context``. Each answer is judged:

* citations (:func:`judge_citations`), over its first :data:`MAX_JUDGED_STATEMENTS` statements:
  **recall** is the mean over statements of, for a cited one, the judge's rating of the text of
  its cited sentences (fully 1, partially 0.5, not 0 supporting), and for an uncited one 0 when
  the judge says it needs a citation, else 1 (0 without statements); **precision** is the mean
  over those statements' citations of the judge's relevant 1 / not 0 (0 without citations);
  **F1** = 2PR / (P + R), 0 when both are 0.
* **correctness** (:func:`judge_correctness`): the answer without citation markup against each
  reference (the best counts): QA datasets rated 1-3 -> (r - 1) / 2, ``gov_report`` 1-5 ->
  (r - 1) / 4, ``longbench-chat`` 1-10 with its rated example answers -> r / 10; a reference never
  rated readably counts 0.5.
* **citation length** (:func:`citation_token_counts`): tokens of a citation's text by a tokenizer
  the caller gives, pooled over every citation of the answers.

Judge replies are read tolerantly (:func:`parse_support`, :func:`parse_relevance`,
:func:`parse_need_citation`, :func:`parse_rating`: ``[[label]]``, ``[label]`` or the bare word);
an unreadable one is asked again at a higher temperature (:func:`ask_judge`). :func:`summarize`
averages per answer within each dataset and group (:data:`GROUPS`; MultiFieldQA en + zh pooled)
and over the groups. Judge prompts are ours (package files ``longcite_*.txt`` next to the answer
prompt), each replaceable through gin (:func:`load_judge_prompts`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
from nltk.tokenize.punkt import PunktSentenceTokenizer

from glmjax.evals.item_files import read_item_rows
from glmjax.inference.llm_client import LLMClient, SamplingParams, item_sampling
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



def cite_text(sentences: Sequence[str], start: int, end: int) -> str:
    """The text a span cites: sentences ``start..end`` (both included) concatenated, exactly as
    they stand in the context."""
    return "".join(sentences[start:end + 1])


def cited_statements(response: str, sentences: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`parse_cited_response` of ``response`` against ``sentences``, every span with its
    text: ``[{"statement", "citations": [{"start", "end", "cite"}, ...]}, ...]``."""
    return [{"statement": s["statement"],
             "citations": [{"start": a, "end": b, "cite": cite_text(sentences, a, b)} for a, b in s["citations"]]}
            for s in parse_cited_response(response, len(sentences))]


def strip_citations(response: str) -> str:
    """The answer without its citation markup: every ``<cite>...</cite>`` block removed, then the
    ``<statement>`` and ``</statement>`` tags (as the official scorers do before judging)."""
    return _CITE.sub("", response).replace(_OPEN, "").replace(_CLOSE, "")


# ------------------------------------------------------------------------- LongBench-Cite data


DATASETS = ("longbench-chat", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "dureader", "gov_report")
"""The datasets of LongBench-Cite (an item's ``dataset`` field)."""

GROUPS: dict[str, tuple[str, ...]] = {
    "longbench-chat": ("longbench-chat",),
    "multifieldqa": ("multifieldqa_en", "multifieldqa_zh"),
    "hotpotqa": ("hotpotqa",),
    "dureader": ("dureader",),
    "gov_report": ("gov_report",),
}
"""The five groups the benchmark reports and averages (MultiFieldQA's English and Chinese pooled)."""

CORRECTNESS_SCALES = {"longbench-chat": "fewshot", "gov_report": "summary", "multifieldqa_en": "qa",
                      "multifieldqa_zh": "qa", "hotpotqa": "qa", "dureader": "qa"}
"""The correctness judgement of each dataset (:data:`RATING_RANGES`)."""

RATING_RANGES = {"qa": (1, 3), "summary": (1, 5), "fewshot": (1, 10)}
"""The judge's integer rating range of each correctness scale."""

UNPARSED_CORRECTNESS = 0.5
"""The correctness of a reference the judge never rated readably (the official fallback)."""


class LongBenchCiteError(ValueError):
    """A malformed LongBench-Cite data file; the message names the file, the item and the field."""


@dataclasses.dataclass(frozen=True)
class CiteItem:
    """One LongBench-Cite question.

    Attributes:
      idx: the item's ``idx`` (an int or a non-empty string; unique in the file).
      dataset: one of :data:`DATASETS`.
      query: the question.
      answers: the reference answers (``answer``: a non-empty list of strings).
      few_shot: ``few_shot_scores`` as ``(answer, score)`` pairs: rated example answers the
        ``longbench-chat`` correctness judge is shown (required there, ignored elsewhere).
      context: the long document.
      location: ``"file: item N"`` or ``"file:line"``.
    """

    idx: int | str
    dataset: str
    query: str
    answers: tuple[str, ...]
    few_shot: tuple[tuple[str, float], ...]
    context: str
    location: str


def parse_cite_item(row: Any, location: str) -> CiteItem:
    """One item from its JSON object (fields ``idx, dataset, query, answer, few_shot_scores,
    context``; others are ignored).

    Raises:
      LongBenchCiteError: ``location (idx ...): field '...' ...`` for a missing or malformed field.
    """
    if not isinstance(row, dict):
        raise LongBenchCiteError(f"{location}: expected a JSON object, got {type(row).__name__}")
    idx = row.get("idx")
    where = location if idx is None else f"{location} (idx {idx!r})"

    def bad(field: str, problem: str) -> LongBenchCiteError:
        return LongBenchCiteError(f"{where}: field '{field}' {problem}")

    if isinstance(idx, bool) or not isinstance(idx, (int, str)) or idx == "":
        raise bad("idx", f"must be an integer or a non-empty string, got {idx!r}")
    dataset = row.get("dataset")
    if dataset not in DATASETS:
        raise bad("dataset", f"must be one of {', '.join(DATASETS)}, got {dataset!r}")
    for field in ("query", "context"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise bad(field, "must be a non-empty string")
    answers = row.get("answer")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise bad("answer", f"must be a non-empty list of non-empty strings, got {answers!r:.80}")
    few_shot: list[tuple[str, float]] = []
    if dataset == "longbench-chat":
        shots = row.get("few_shot_scores")
        if not isinstance(shots, list) or not shots:
            raise bad("few_shot_scores", "must be a non-empty list of {answer, score} (longbench-chat items)")
        low, high = RATING_RANGES["fewshot"]
        for number, shot in enumerate(shots):
            score = shot.get("score") if isinstance(shot, dict) else None
            if (not isinstance(shot, dict) or not isinstance(shot.get("answer"), str)
                    or isinstance(score, bool) or not isinstance(score, (int, float))
                    or not low <= score <= high):
                raise bad("few_shot_scores", f"entry {number} must be {{answer: string, score: {low}-{high}}}, "
                          f"got {shot!r:.80}")
            few_shot.append((shot["answer"], float(score)))
    return CiteItem(idx, dataset, row["query"], tuple(answers), tuple(few_shot), row["context"], location)


def load_cite_items(path: str | os.PathLike) -> list[CiteItem]:
    """The items of ``LongBench-Cite.json`` (a JSON list of objects), or of JSONL (one object a
    line, blank lines skipped) when the name ends in ``.jsonl``.

    Raises:
      LongBenchCiteError: unreadable JSON (file and line), a top level that is not a list, a
        malformed item (:func:`parse_cite_item`), two items with the same ``idx``, or no items.
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    items = [parse_cite_item(row, where) for row, where in read_item_rows(path, LongBenchCiteError)]
    if not items:
        raise LongBenchCiteError(f"{path}: no items")
    first: dict[int | str, str] = {}
    for item in items:
        if item.idx in first:
            raise LongBenchCiteError(f"{item.location} (idx {item.idx!r}): duplicate 'idx' (first at {first[item.idx]})")
        first[item.idx] = item.location
    return items


# ------------------------------------------------------------------------------ judge prompts


JUDGE_PROMPTS = {
    "support": ("longcite_support.txt", ("question", "statement", "snippet")),
    "need_citation": ("longcite_need_citation.txt", ("question", "response", "sentence")),
    "relevance": ("longcite_relevance.txt", ("question", "statement", "snippet")),
    "correct_qa": ("longcite_correct_qa.txt", ("question", "reference", "answer")),
    "correct_summary": ("longcite_correct_summary.txt", ("reference", "answer")),
    "correct_fewshot": ("longcite_correct_fewshot.txt", ("question", "reference", "examples", "answer")),
}
"""Judge prompt name -> (our package file under ``glmjax/pipelines/prompts/``, its placeholders)."""


@gin.configurable
def load_judge_prompts(support: str | os.PathLike | None = None, need_citation: str | os.PathLike | None = None,
                       relevance: str | os.PathLike | None = None, correct_qa: str | os.PathLike | None = None,
                       correct_summary: str | os.PathLike | None = None,
                       correct_fewshot: str | os.PathLike | None = None) -> dict[str, str]:
    """The judge prompt templates by name (:data:`JUDGE_PROMPTS`): ours, or the file given for a
    name (the same placeholders; gin: ``load_judge_prompts.support = "/path/to/prompt.txt"``).

    Raises:
      PromptError: a file that is missing or has other placeholders.
    """
    paths = {"support": support, "need_citation": need_citation, "relevance": relevance,
             "correct_qa": correct_qa, "correct_summary": correct_summary, "correct_fewshot": correct_fewshot}
    return {name: load_prompt(paths[name], default, fields) for name, (default, fields) in JUDGE_PROMPTS.items()}


# ------------------------------------------------------------------------------ reply parsers


_DOUBLE_BRACKETS = re.compile(r"\[\[([^\[\]]*)\]\]")
_SINGLE_BRACKETS = re.compile(r"(?<!\[)\[([A-Za-z][A-Za-z /]*)\](?!\])")
_NUMBER_IN = re.compile(r"\d+(?:\.\d+)?")
_SUPPORT_WORDS = re.compile(r"\b(fully|partially|partial|no support|not supported|unsupported)\b", re.IGNORECASE)
_RELEVANCE_WORDS = re.compile(r"\b(irrelevant|unrelevant|not relevant|relevant)\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_BARE_YES_NO = re.compile(r"(?:^\W*|need\s+citation\W*)(yes|no)\b", re.IGNORECASE)
_RATING_WORD = re.compile(r"rating\s*[:=]?\s*\[*\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def _labels(reply: str) -> list[str]:
    """The bracketed labels of a judge reply, ``[[...]]`` ones first, then ``[...]`` ones of
    letters, in reply order."""
    return _DOUBLE_BRACKETS.findall(reply) + _SINGLE_BRACKETS.findall(reply)


def _first_label(reply: str, words: re.Pattern, value_of: dict[str, Any], bare: re.Pattern | None = None) -> Any:
    """The value of the first bracketed label holding exactly one kind of ``words``; else of the
    first match of ``bare`` (default ``words``) in the reply; None when there is none."""
    for label in _labels(reply):
        kinds = {value_of[m.group(1).lower()] for m in words.finditer(label)}
        if len(kinds) == 1:
            return kinds.pop()
    match = (bare or words).search(reply)
    return None if match is None else value_of[match.group(1).lower()]


def parse_support(reply: str) -> float | None:
    """A support rating: ``[[Fully supported]]`` 1, ``[[Partially supported]]`` 0.5, ``[[No
    support]]`` 0 (the label may sit in single brackets or stand bare); None when unreadable."""
    return _first_label(reply, _SUPPORT_WORDS, {"fully": 1.0, "partially": 0.5, "partial": 0.5, "no support": 0.0,
                                                "not supported": 0.0, "unsupported": 0.0})


def parse_relevance(reply: str) -> int | None:
    """A relevance rating: ``[[Relevant]]`` 1, ``[[Irrelevant]]`` (or the official
    ``[[Unrelevant]]``, or "not relevant") 0; None when unreadable."""
    return _first_label(reply, _RELEVANCE_WORDS, {"relevant": 1, "irrelevant": 0, "unrelevant": 0,
                                                  "not relevant": 0})


def parse_need_citation(reply: str) -> bool | None:
    """Whether the judge says a sentence needs a citation: ``[[Yes]]`` True, ``[[No]]`` False (a
    label with both, like an echoed ``[[Yes/No]]``, is skipped); without a label, a yes or no
    opening the reply or right after "Need Citation"; None when unreadable."""
    return _first_label(reply, _YES_NO, {"yes": True, "no": False}, _BARE_YES_NO)


def parse_rating(reply: str, low: int, high: int) -> int | None:
    """An integer rating in ``[low, high]``: the first number of the last ``[[...]]`` holding one
    (as the official scorer reads it); without brackets, the number after "Rating", or a reply
    that is only a number. None when that is missing, not an integer or out of range."""
    candidates = [m.group(0) for label in _DOUBLE_BRACKETS.findall(reply)
                  if (m := _NUMBER_IN.search(label)) is not None]
    if candidates:
        text = candidates[-1]
    elif (word := _RATING_WORD.search(reply)) is not None:
        text = word.group(1)
    elif _NUMBER_IN.fullmatch(reply.strip().strip(".")):
        text = reply.strip().strip(".")
    else:
        return None
    value = float(text)
    return int(value) if value.is_integer() and low <= value <= high else None


# ------------------------------------------------------------------------------------ judging


MAX_JUDGED_STATEMENTS = 40
"""Statements of an answer the citation judge rates (the first ones), as the official scorer."""

DEFAULT_CITATION_JUDGE_SAMPLING = SamplingParams(max_tokens=10, temperature=0.0, stop=("Analysis:",))
"""The official citation judge settings: greedy, 10 tokens, cut at "Analysis:" (the rating
comes first)."""

DEFAULT_CORRECTNESS_JUDGE_SAMPLING = SamplingParams(max_tokens=128, temperature=0.0)
"""Greedy, as the official correctness judge; the rating is the reply's first words."""

RETRY_TEMPERATURE = 1.0
"""The temperature of a judge retry after an unreadable reply (the official scorer's)."""


class JudgeReplyError(RuntimeError):
    """A citation judgement no try of the judge answered readably (an item failure, retried by the
    next run, as the official scorer stops on it)."""


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def ask_judge(judge: LLMClient, asks: Sequence[tuple[str, Callable[[str], Any]]], sampling: SamplingParams,
              *, tries: int = 5, retry_temperature: float = RETRY_TEMPERATURE) -> list[tuple[Any, list[str]]]:
    """Asks ``judge`` every ``(prompt, parse)`` and reads each reply with its ``parse`` (which
    returns None for an unreadable reply).

    The first try of all prompts goes out as one batch (``sampling``, prompt ``i`` with seed
    ``seed + i``); a prompt whose reply is unreadable is asked again, up to ``tries`` calls, at
    ``max(sampling.temperature, retry_temperature)`` with seed ``seed + k * len(asks) + i`` for
    try ``k``.

    Returns:
      ``(value, replies)`` per prompt, in order: the parsed value (None when no try was
      readable) and every reply received.

    Raises:
      ValueError: ``tries < 1``.
      LLMClientError: a call failed (the client's own retries spent).
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    if not asks:
        return []
    replies = judge.complete_batch([_user(prompt) for prompt, _ in asks], sampling)
    results = [(parse(reply), [reply]) for (_, parse), reply in zip(asks, replies)]
    retry = dataclasses.replace(sampling, temperature=max(sampling.temperature, retry_temperature))
    for attempt in range(1, tries):
        for i, (prompt, parse) in enumerate(asks):
            value, seen = results[i]
            if value is None:
                reply = judge.complete(_user(prompt), item_sampling(retry, attempt * len(asks) + i))
                results[i] = (parse(reply), seen + [reply])
    return results


def _judged(kind: str, value: Any, replies: list[str], location: str) -> Any:
    if value is None:
        raise JudgeReplyError(f"the {kind} judge gave no readable rating for {location} in {len(replies)} "
                              f"tries; last reply: {replies[-1][:200]!r}")
    return value


def judge_citations(
    judge: LLMClient,
    query: str,
    response: str,
    sentences: Sequence[str],
    *,
    prompts: dict[str, str] | None = None,
    sampling: SamplingParams = DEFAULT_CITATION_JUDGE_SAMPLING,
    tries: int = 5,
    retry_temperature: float = RETRY_TEMPERATURE,
    max_statements: int = MAX_JUDGED_STATEMENTS,
) -> dict[str, Any]:
    """Citation recall, precision and F1 of one cited answer (section comment above).

    Every judgement of the answer is asked in one batch (:func:`ask_judge`): the support of each
    cited statement of the first ``max_statements`` (question, statement stripped, the texts of its
    spans joined by blank lines), the need of a citation of each uncited one (question, the whole
    answer without markup (:func:`strip_citations`), the sentence), the relevance of each span of
    the cited ones (question, statement, the span's text).

    Returns:
      ``{"citation_recall", "citation_precision", "citation_f1", "total_statements",
      "judged_statements", "statements"}``; ``statements`` holds the judged statements, each
      ``{"statement", "citations": [{"start", "end", "cite", "relevant", "replies"}], "support"
      (1 / 0.5 / 0; for an uncited statement 0 when it needs a citation, else 1), "needs_citation"
      (uncited only), "replies"}``.

    Raises:
      JudgeReplyError: a judgement no try answered readably.
      LLMClientError: a judge call failed.
    """
    prompts = load_judge_prompts() if prompts is None else prompts
    if max_statements < 1:
        raise ValueError(f"max_statements must be >= 1, got {max_statements}")
    statements = cited_statements(response, sentences)
    judged = [dict(s) for s in statements[:max_statements]]
    plain_answer = strip_citations(response).strip()
    asks: list[tuple[str, str, Any]] = []  # (kind, prompt, (statement index, citation index or None))
    for s_index, statement in enumerate(judged):
        text = statement["statement"].strip()
        if statement["citations"]:
            snippet = "\n\n".join(c["cite"] for c in statement["citations"]).strip()
            asks.append(("support", render(prompts["support"], question=query.strip(), statement=text,
                                           snippet=snippet), (s_index, None)))
            for c_index, citation in enumerate(statement["citations"]):
                asks.append(("relevance", render(prompts["relevance"], question=query.strip(), statement=text,
                                                 snippet=citation["cite"].strip()), (s_index, c_index)))
        else:
            asks.append(("need_citation", render(prompts["need_citation"], question=query.strip(),
                                                 response=plain_answer, sentence=text), (s_index, None)))
    parsers = {"support": parse_support, "relevance": parse_relevance, "need_citation": parse_need_citation}
    outcomes = ask_judge(judge, [(prompt, parsers[kind]) for kind, prompt, _ in asks], sampling, tries=tries,
                         retry_temperature=retry_temperature)
    for statement in judged:
        statement["citations"] = [dict(c) for c in statement["citations"]]
    for (kind, _, (s_index, c_index)), (value, seen) in zip(asks, outcomes):
        statement = judged[s_index]
        where = f"statement {s_index}" + ("" if c_index is None else f" citation {c_index}")
        value = _judged(kind, value, seen, where)
        if kind == "relevance":
            statement["citations"][c_index].update(relevant=value, replies=seen)
        elif kind == "support":
            statement.update(support=value, replies=seen)
        else:
            statement.update(support=0.0 if value else 1.0, needs_citation=value, replies=seen)
    recall = sum(s["support"] for s in judged) / len(judged) if judged else 0.0
    relevance = [c["relevant"] for s in judged for c in s["citations"]]
    precision = sum(relevance) / len(relevance) if relevance else 0.0
    f1 = 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)
    return {"citation_recall": recall, "citation_precision": precision, "citation_f1": f1,
            "total_statements": len(statements), "judged_statements": len(judged), "statements": judged}


def few_shot_examples(few_shot: Sequence[tuple[str, float]], seed: int) -> str:
    """The rated example answers of a ``longbench-chat`` correctness prompt, in an order shuffled
    by ``seed`` (the official scorer shuffles them at random), separated by blank lines."""
    shots = list(few_shot)
    random.Random(seed).shuffle(shots)
    return "\n\n".join(f"[Assistant's answer begins]\n{answer}\n[Assistant's answer ends]\n\nRating: [[{score:g}]]"
                       for answer, score in shots)


def correctness_value(scale: str, rating: int | None) -> float:
    """A rating on ``scale`` as a correctness in [0, 1]: qa ``(r - 1) / 2``, summary ``(r - 1) / 4``,
    fewshot ``r / 10``; :data:`UNPARSED_CORRECTNESS` for None."""
    if rating is None:
        return UNPARSED_CORRECTNESS
    if scale == "qa":
        return (rating - 1) / 2
    if scale == "summary":
        return (rating - 1) / 4
    if scale == "fewshot":
        return rating / 10
    raise ValueError(f"unknown correctness scale {scale!r}, expected one of {', '.join(RATING_RANGES)}")


def judge_correctness(
    judge: LLMClient,
    item: CiteItem,
    response: str,
    *,
    prompts: dict[str, str] | None = None,
    sampling: SamplingParams = DEFAULT_CORRECTNESS_JUDGE_SAMPLING,
    tries: int = 5,
    retry_temperature: float = RETRY_TEMPERATURE,
    seed: int = 0,
) -> dict[str, Any]:
    """The correctness of one answer: its text without citation markup (:func:`strip_citations`)
    rated against each reference answer on its dataset's scale (:data:`CORRECTNESS_SCALES`), the
    best reference counting. ``longbench-chat`` shows the item's rated examples (shuffled by
    ``seed``) and the answer on one line (newlines as spaces), as the official scorer does, and
    stops the judge at a blank line. A reference no try rated readably counts
    :data:`UNPARSED_CORRECTNESS`.

    Returns:
      ``{"correctness", "scale", "ratings": [int or None per reference], "unparsed": count,
      "replies": [[str, ...] per reference]}``.

    Raises:
      LLMClientError: a judge call failed.
    """
    prompts = load_judge_prompts() if prompts is None else prompts
    scale = CORRECTNESS_SCALES[item.dataset]
    low, high = RATING_RANGES[scale]
    answer = strip_citations(response)
    asks = []
    for reference in item.answers:
        if scale == "qa":
            prompt = render(prompts["correct_qa"], question=item.query, reference=reference, answer=answer)
        elif scale == "summary":
            prompt = render(prompts["correct_summary"], reference=reference, answer=answer)
        else:
            prompt = render(prompts["correct_fewshot"], question=item.query, reference=reference,
                            examples=few_shot_examples(item.few_shot, seed),
                            answer=answer.replace("\n", " ").strip())
        asks.append((prompt, lambda reply: parse_rating(reply, low, high)))
    if scale == "fewshot":
        sampling = dataclasses.replace(sampling, stop=tuple(dict.fromkeys((*sampling.stop, "\n\n"))))
    outcomes = ask_judge(judge, asks, sampling, tries=tries, retry_temperature=retry_temperature)
    ratings = [value for value, _ in outcomes]
    return {"correctness": max(correctness_value(scale, r) for r in ratings), "scale": scale, "ratings": ratings,
            "unparsed": sum(r is None for r in ratings), "replies": [seen for _, seen in outcomes]}


def citation_token_counts(response: str, sentences: Sequence[str], tokenizer: Any | None) -> tuple[int, int | None]:
    """``(citations, tokens)`` of one answer: its spans over every statement (all of them, not only
    the judged ones) and the tokens of their texts, ``len(tokenizer.encode(cite,
    add_special_tokens=False))`` summed (the official ``cnt_citation_len.py``); ``tokens`` is None
    without a tokenizer."""
    citations = [c["cite"] for s in cited_statements(response, sentences) for c in s["citations"]]
    if tokenizer is None:
        return len(citations), None
    return len(citations), sum(len(tokenizer.encode(c, add_special_tokens=False)) for c in citations)


# ------------------------------------------------------------------------------------ summary


METRICS = ("citation_recall", "citation_precision", "citation_f1", "correctness")
"""Per-answer scores in [0, 1] averaged per dataset and group."""


def _metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of :data:`METRICS` (None without rows) and the pooled citation length of ``rows``."""
    out: dict[str, Any] = {"count": len(rows)}
    for metric in METRICS:
        out[metric] = sum(r[metric] for r in rows) / len(rows) if rows else None
    counted = [r for r in rows if r.get("citation_tokens") is not None]
    citations = sum(r["citation_count"] for r in counted)
    out["citations"] = sum(r["citation_count"] for r in rows)
    out["citation_length"] = (sum(r["citation_tokens"] for r in counted) / citations
                              if counted and len(counted) == len(rows) and citations else None)
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report of scored answers, each row ``{"dataset", "citation_recall",
    "citation_precision", "citation_f1", "correctness", "citation_count", "citation_tokens" (None
    when not measured)}``.

    Returns:
      ``{"datasets": {dataset: metrics}, "groups": {group: metrics}, "average": {metric: mean over
      the groups with answers, "groups": those groups, "citation_length": pooled over every
      answer}}``; metrics are ``count``, the means of
      :data:`METRICS` (per answer, as the official scorer; None without answers), ``citations``
      and ``citation_length`` (tokens per citation pooled over the answers; None when not
      measured or without citations). Only datasets with rows are listed.
    """
    datasets = {d: _metrics([r for r in rows if r["dataset"] == d]) for d in DATASETS
                if any(r["dataset"] == d for r in rows)}
    groups = {g: _metrics([r for r in rows if r["dataset"] in members]) for g, members in GROUPS.items()}
    present = [g for g, m in groups.items() if m["count"]]
    average: dict[str, Any] = {"groups": present}
    for metric in METRICS:
        values = [groups[g][metric] for g in present]
        average[metric] = sum(values) / len(values) if values else None
    average["citation_length"] = _metrics(rows)["citation_length"]
    return {"datasets": datasets, "groups": groups, "average": average}


def _cell(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`summarize`: one row per group with answers and their average;
    recall, precision, F1 and correctness in percent, citation length in tokens."""
    lines = ["| Group | Answers | Recall | Precision | F1 | Correctness | Citation length |",
             "|---|---|---|---|---|---|---|"]
    for group, m in summary["groups"].items():
        if m["count"]:
            lines.append(f"| {group} | {m['count']} | {_cell(m['citation_recall'])} | {_cell(m['citation_precision'])} "
                         f"| {_cell(m['citation_f1'])} | {_cell(m['correctness'])} | {_cell(m['citation_length'], 1)} |")
    a = summary["average"]
    count = sum(summary["groups"][g]["count"] for g in a["groups"])
    lines.append(f"| Average | {count} | {_cell(a['citation_recall'])} | {_cell(a['citation_precision'])} "
                 f"| {_cell(a['citation_f1'])} | {_cell(a['correctness'])} | {_cell(a['citation_length'], 1)} |")
    return "\n".join(lines) + "\n"
