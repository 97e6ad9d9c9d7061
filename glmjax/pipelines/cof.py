r"""CoF, LongCite's coarse-to-fine pipeline (Zhang et al., 2024): long-context QA SFT data with
sentence-level citations, made by an off-the-shelf LLM.

Three resumable LLM stages, each with its own append-only file under ``output_dir`` (rows keyed by
document id; :mod:`glmjax.pipelines.runner`), then a fourth, deterministic one:

1. ``qa.jsonl`` (question and answer): the LLM proposes ``num_questions`` questions about the
   document of one kind drawn per document (:data:`QUESTION_TYPES`: multi-hop, summary, general,
   information-seeking; the reference meant four kinds at 25 % each, a bug there drops one), in
   Chinese for a Chinese document and for an English one with probability ``zh_question_prob``
   (the reference: 0.5) (:func:`document_language`); :func:`parse_questions` reads ``1: ...``
   lines tolerantly; one question is drawn and answered from the document. An input row that
   brings its own ``query`` (and ``answer``) skips those calls. Row: ``{"id", "context_sha",
   "language", "question_language", "question_type", "questions", "query", "answer"}``.
2. ``chunk_cites.jsonl`` (chunk-level citations): the context in chunks of ``chunk_tokens`` tokens
   (:func:`glmjax.pipelines.retrieval.chunk_spans`, 128 as the reference), the answer in
   statements (its sentences, ``glmjax.evals.longcite.split_sentences``); for each statement the
   retriever's top ``k = min(top_k, ceil(max_retrieved / #statements))`` chunks (the reference:
   10 and 40), their union in document order shown as ``Snippet [1]``, ``Snippet [2]``, ...; the
   LLM rewrites the answer as ``<statement>S<cite>[i][j]</cite></statement>``
   (:func:`parse_chunk_citations`, at most ``max_chunks_per_statement`` = 5 chunks each). Row:
   ``{"id", "context_sha", "chunk_spans": [[start, end], ...], "snippets": [chunk ids],
   "statements": [{"gap", "statement", "chunks": [chunk ids]}], "tail", "reply"}`` (``gap``: the
   text before the statement, e.g. a paragraph break; ``tail``: after the last one). When no
   chunk matches the answer at all (lexical retrieval), no call is made and every statement is
   uncited (stage 4 drops the document).
3. ``sentence_cites.jsonl`` (sentence-level citations): for each cited statement, the chunks it
   cites with ``neighbours`` (1) chunks on each side, overlapping or touching windows merged
   (:func:`chunk_windows`); the sentences overlapping each window, numbered locally ``<C0>``,
   ``<C1>``, ... across the windows (:func:`local_passage`); the LLM answers ``[a-b]`` lines or
   "No relevant information". Row: ``{"id", "context_sha", "statements": [{"sentences": [global
   sentence id of each local number], "reply": str | None}]}`` (one per stage-2 statement; None:
   no chunk cited, no call).
4. ``sft.jsonl`` / ``rejected.jsonl``, rewritten whole from the three stage files on every run
   (:func:`export_records`): local spans mapped to global sentence ids (:func:`global_spans`: at
   most ``max_citations`` = 3 per statement), the cited answer
   ``<statement>S<cite>[a-b]...</cite></statement>`` assembled; a document is **rejected** when
   no statement is cited, or when it has at least ``min_statements`` (5) statements and fewer than
   ``min_cited_fraction`` (0.2) of them are cited (the reference's filter). Kept: ``{"id",
   "messages": [{"role": "user", "content": the LongCite prompt with the sentence-numbered context
   and the question (glmjax.evals.longcite.build_cite_prompt)}, {"role": "assistant", "content":
   the cited answer}]}``, which ``lm_data(data_format="chat")`` trains on as is; rejected: ``{"id",
   "reason", "statements", "cited"}``.

An item whose calls fail goes to ``<stage>.errors.jsonl`` and is retried by the next run; a later
stage sees only documents the earlier ones finished. Each row carries ``context_sha`` (a digest
of the document), so rows of an edited document are refused instead of mixed. Removing a stage's
file (and those after it) reruns that stage alone. Prompts are ours, package files
``glmjax/pipelines/prompts/cof_{questions,answer,chunk_cite,sentence_cite}.txt`` with ``{{name}}``
placeholders; any can be replaced by a file with the same placeholders (gin:
``cof_pipeline.chunk_cite_prompt = "/path/to/prompt.txt"``); the SFT user turn uses
``glmjax.evals.longcite.load_cite_prompt``'s template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from glmjax.evals.longcite import build_cite_prompt, load_cite_prompt, number_sentences, sentence_spans, split_sentences
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.pipelines.retrieval import BM25Retriever, Retriever, chunk_spans, sentences_of_chunks
from glmjax.pipelines.runner import Item, ItemId, finished_rows, read_items, run_stage, write_jsonl_atomic
from glmjax.pipelines.t1_cot import item_seed, load_prompt, render

STAGES = ("qa", "chunk_cites", "sentence_cites")
"""The LLM stages, in order; each writes ``output_dir/<stage>.jsonl``."""

QUESTION_TYPES = {
    "multi_hop": "questions that need multi-hop reasoning, each connecting facts stated in different "
                 "parts of the document",
    "summary": "questions whose answers need information integrated or summarised from several parts "
               "of the document",
    "general": "questions of any kind about the document",
    "information_seeking": "information-seeking questions, each asking for specific facts the document states",
}
"""The question kinds of stage 1, by name: what the question prompt asks for."""

LANGUAGES = {"en": "English", "zh": "Chinese"}

QUESTION_FIELDS = ("context", "kind", "language", "count")
ANSWER_FIELDS = ("context", "question")
CHUNK_CITE_FIELDS = ("snippets", "question", "answer")
SENTENCE_CITE_FIELDS = ("passage", "question", "statement")

RetrieverFactory = Callable[[list[str]], Retriever]
"""``factory(chunk_texts) -> retriever`` (``glmjax.pipelines.retrieval``)."""

_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")
_QUESTION_LINE = re.compile(r"^\s*[*#>-]*\s*(?:Q(?:uestion)?\s*)?(\d{1,2})\s*[*]*\s*[:：.、)）]\s*(.*?)\s*$",
                            re.IGNORECASE)
_SNIPPET_NUMBER = re.compile(r"\[(\d+)\]")
_SENTENCE_SPAN = re.compile(r"\[\s*(\d+)\s*(?:[-–~]\s*(\d+)\s*)?\]")
_ANSWER_MARK = "[Answer with Citations]"
_OPEN, _CLOSE, _CITE = "<statement>", "</statement>", "<cite>"
_TAG_FIXES = ((re.compile(r"<\s*(/?)\s*(statement|cite)\s*>"), r"<\1\2>"),  # spaces inside a tag
              (re.compile(r"<statement[ ,]"), "<statement>"),  # a tag left open
              (re.compile(r"(?:<statement>){2,}"), "<statement>"), (re.compile(r"(?:</statement>){2,}"), "</statement>"))
_MIN_UNTAGGED_CHARS = 6  # text outside the tags becomes a statement with more than 5 characters


class CitationFormatError(ValueError):
    """An LLM reply that is not what its stage asked for (the message says why)."""


def context_sha(context: str) -> str:
    """A digest of a document: ties the stage rows to the document they were made from."""
    return hashlib.sha256(context.encode("utf-8")).hexdigest()[:16]


def document_language(text: str) -> str:
    """``"en"`` when the Latin letters of ``text`` outnumber four times its Han characters, else
    ``"zh"`` (the reference's rule)."""
    return "en" if len(_LATIN.findall(text)) > 4 * len(_HAN.findall(text)) else "zh"


def parse_questions(reply: str, count: int) -> list[str]:
    """The numbered questions of a reply, in number order: lines ``N: question`` (also ``N.``,
    ``N)``, ``N、``, ``QN:``, markdown emphasis around the number), ``1 <= N <= count``, the first
    line of each number; empty questions are skipped."""
    found: dict[int, str] = {}
    for line in reply.splitlines():
        match = _QUESTION_LINE.match(line)
        if match is None:
            continue
        number, question = int(match.group(1)), match.group(2).strip().strip("*").strip()
        if 1 <= number <= count and question and number not in found:
            found[number] = question
    return [found[number] for number in sorted(found)]


def answer_statements(answer: str) -> list[str]:
    """The statements retrieval works with: the answer's sentences (``split_sentences``), stripped."""
    return [sentence.strip() for sentence in split_sentences(answer) if sentence.strip()]


def retrieval_k(num_statements: int, top_k: int = 10, max_retrieved: int = 40) -> int:
    """Chunks retrieved per statement: ``min(top_k, ceil(max_retrieved / num_statements))``."""
    return min(top_k, -(-max_retrieved // max(num_statements, 1)))


def format_snippets(texts: Sequence[str]) -> str:
    """The retrieved chunks as the chunk-citation prompt shows them: ``Snippet [i]`` (from 1) and
    the stripped text, blocks separated by blank lines."""
    return "\n\n".join(f"Snippet [{number}]\n{text.strip()}" for number, text in enumerate(texts, start=1))


def parse_chunk_citations(reply: str, snippets: Sequence[int], max_chunks: int = 5
                          ) -> tuple[list[dict[str, Any]], str]:
    """The statements of a chunk-cited answer and the text after the last one.

    The answer is the text after the last ``[Answer with Citations]`` line when there is one
    (common tag slips such as ``<statement >``, ``< cite>``, ``<statement,`` or a doubled tag are
    repaired first). Inside each
    ``<statement>...</statement>``: the statement is the stripped text before ``<cite>``; its
    chunks are the ``[n]`` numbers after it naming a shown snippet (``1 <= n <= len(snippets)``,
    mapped to ``snippets[n - 1]``), repeats dropped, the first ``max_chunks`` kept. Text between
    statements with more than 5 characters (stripped) is a statement without chunks; shorter text
    is kept as the ``gap`` before the next statement (or the returned tail). A ``<statement>``
    without its ``</statement>`` ends the answer (the rest is dropped).

    Returns:
      ``([{"gap": str, "statement": str, "chunks": [chunk id, ...]}, ...], tail)``.

    Raises:
      CitationFormatError: no complete ``<statement>...</statement>`` in the reply.
    """
    text = reply.rsplit(_ANSWER_MARK, 1)[-1].lstrip("\n")
    if text.startswith("statement>"):
        text = "<" + text
    for wrong, right in _TAG_FIXES:
        text = wrong.sub(right, text)
    statements: list[dict[str, Any]] = []
    gap, position, tagged = "", 0, False
    while True:
        opening = text.find(_OPEN, position)
        between = text[position:] if opening == -1 else text[position:opening]
        if len(between.strip()) >= _MIN_UNTAGGED_CHARS:
            lead = between[: len(between) - len(between.lstrip())]
            statements.append({"gap": gap + lead, "statement": between.strip(), "chunks": []})
            gap = between[len(between.rstrip()):]
        else:
            gap += between
        closing = -1 if opening == -1 else text.find(_CLOSE, opening)
        if closing == -1:
            break
        tagged = True
        body = text[opening + len(_OPEN):closing]
        cite_at = body.find(_CITE)
        statement = (body if cite_at == -1 else body[:cite_at]).strip()
        chunks: list[int] = []
        for number in _SNIPPET_NUMBER.findall("" if cite_at == -1 else body[cite_at:]):
            index = int(number) - 1
            if 0 <= index < len(snippets) and snippets[index] not in chunks and len(chunks) < max_chunks:
                chunks.append(snippets[index])
        if statement:
            statements.append({"gap": gap, "statement": statement, "chunks": chunks})
            gap = ""
        position = closing + len(_CLOSE)
    if not tagged:
        raise CitationFormatError("the chunk-citation reply has no <statement>...</statement>")
    return statements, gap if opening == -1 else ""


def chunk_windows(chunks: Sequence[int], num_chunks: int, neighbours: int = 1) -> list[tuple[int, int]]:
    """The chunk ranges ``[first, last + 1)`` a statement's sentence citations are chosen from: each
    cited chunk with ``neighbours`` chunks on each side (clipped to ``[0, num_chunks)``), in
    document order, overlapping or touching ranges merged."""
    windows: list[tuple[int, int]] = []
    for chunk in sorted(set(chunks)):
        start, end = max(0, chunk - neighbours), min(num_chunks, chunk + neighbours + 1)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(end, windows[-1][1]))
        else:
            windows.append((start, end))
    return windows


def local_passage(windows: Sequence[tuple[int, int]], spans_of_chunks: Sequence[Sequence[int]],
                  spans_of_sentences: Sequence[tuple[int, int]], sentences: Sequence[str]) -> tuple[str, list[int]]:
    """The passage of stage 3 and the global sentence id of each local number.

    For each window (:func:`chunk_windows`), the sentences overlapping its characters (from the
    first chunk's start to the last chunk's end), numbered on from the previous window's
    (``<C0>``, ``<C1>``, ...: ``glmjax.evals.longcite.number_sentences``); the windows' texts are
    stripped at the end and joined by blank lines.
    """
    pieces, ids = [], []
    for first, last in windows:
        span = (spans_of_chunks[first][0], spans_of_chunks[last - 1][1])
        inside = sentences_of_chunks([span], spans_of_sentences)[0]
        pieces.append(number_sentences([sentences[i] for i in inside], start=len(ids)).rstrip())
        ids.extend(inside)
    return "\n\n".join(pieces), ids


def parse_sentence_citations(reply: str, num_local: int) -> list[tuple[int, int]]:
    """The local sentence spans of a stage-3 reply, in order: every ``[a-b]`` (also ``[k]`` for one
    sentence), clipped to ``[0, num_local - 1]``, dropped when empty after clipping; ``[]`` for
    "No relevant information" or a reply without spans."""
    spans = []
    for first, last in _SENTENCE_SPAN.findall(reply):
        start, end = max(0, int(first)), min(int(last or first), num_local - 1)
        if start <= end:
            spans.append((start, end))
    return spans


def global_spans(local: Sequence[tuple[int, int]], ids: Sequence[int], max_citations: int = 3) -> list[tuple[int, int]]:
    """Local spans mapped to global sentence ids (``(ids[a], ids[b])``), in order; a span that
    overlaps or directly follows the previous kept one (``start <= previous_end + 1``, ``end >=
    previous_start``) is merged into it; the first ``max_citations`` kept."""
    merged: list[tuple[int, int]] = []
    for first, last in local:
        start, end = ids[first], ids[last]
        if start > end:  # a sentence repeated across windows: never out of order, but be safe
            start, end = end, start
        if merged and merged[-1][0] <= end and start <= merged[-1][1] + 1:
            merged[-1] = (min(start, merged[-1][0]), max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged[:max_citations]


def cited_answer(statements: Sequence[Mapping[str, Any]], citations: Sequence[Sequence[tuple[int, int]]],
                 tail: str = "") -> str:
    """The SFT answer: each statement's gap, then ``<statement>S<cite>[a-b]...</cite></statement>``,
    then ``tail``."""
    parts = [f"{s['gap']}<statement>{s['statement']}<cite>{''.join(f'[{a}-{b}]' for a, b in spans)}</cite>"
             "</statement>" for s, spans in zip(statements, citations)]
    return "".join(parts) + tail


def rejection(num_statements: int, num_cited: int, min_statements: int = 5, min_cited_fraction: float = 0.2) -> str | None:
    """Why a cited answer is dropped (None: kept): no statement cited, or at least
    ``min_statements`` statements of which fewer than ``min_cited_fraction`` are cited."""
    if num_cited == 0:
        return "no statement is cited"
    if num_statements >= min_statements and num_cited / num_statements < min_cited_fraction:
        return f"only {num_cited} of {num_statements} statements are cited (fewer than {min_cited_fraction:g})"
    return None


def validate_document(row: dict[str, Any]) -> None:
    """Checks an input row ``{"id"?, "context": str, "query"?: str, "answer"?: str}`` (an
    ``answer`` needs its ``query``).

    Raises:
      ValueError: naming the missing or malformed field.
    """
    if not isinstance(row.get("context"), str) or not row["context"].strip():
        raise ValueError("field 'context' must be a non-empty string")
    for field in ("query", "answer"):
        if field in row and (not isinstance(row[field], str) or not row[field].strip()):
            raise ValueError(f"field {field!r} must be a non-empty string when given")
    if "answer" in row and "query" not in row:
        raise ValueError("field 'answer' needs the field 'query' it answers")


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@dataclasses.dataclass
class _Settings:
    num_questions: int
    question_types: Sequence[str]
    zh_question_prob: float
    chunk_tokens: int
    top_k: int
    max_retrieved: int
    max_chunks_per_statement: int
    neighbours: int
    seed: int


class _CoFJob:
    """The three LLM stages' work functions over shared settings (see :func:`cof_pipeline`)."""

    def __init__(self, client: LLMClient, prompts: Mapping[str, str], sampling: Mapping[str, SamplingParams],
                 retriever_factory: RetrieverFactory, tokenizer: Any | None, settings: _Settings) -> None:
        self.client = client
        self.prompts = prompts
        self.sampling = sampling
        self.retriever_factory = retriever_factory
        self.tokenizer = tokenizer
        self.settings = settings

    def _params(self, kind: str, item: Item) -> SamplingParams:
        return dataclasses.replace(self.sampling[kind], seed=item_seed(self.settings.seed, kind, 0, item.id))

    def qa(self, item: Item) -> dict[str, Any]:
        context, settings = item.row["context"], self.settings
        language = document_language(context)
        choice = random.Random(item_seed(settings.seed, "qa_choice", 0, item.id))
        row: dict[str, Any] = {"context_sha": context_sha(context), "language": language}
        if "query" in item.row:
            query = item.row["query"]
            row.update(question_language=None, question_type="given", questions=[query])
        else:
            kind = choice.choice(list(settings.question_types))
            question_language = "zh" if language == "zh" or choice.random() < settings.zh_question_prob else "en"
            prompt = render(self.prompts["questions"], context=context, kind=QUESTION_TYPES[kind],
                            language=LANGUAGES[question_language], count=str(settings.num_questions))
            reply = self.client.complete(_user(prompt), self._params("questions", item))
            questions = parse_questions(reply, settings.num_questions)
            if not questions:
                raise CitationFormatError(f"no numbered question in the reply {reply[:120]!r}")
            query = choice.choice(questions)
            row.update(question_language=question_language, question_type=kind, questions=questions)
        answer = item.row.get("answer")
        if answer is None:
            answer = self.client.complete(_user(render(self.prompts["answer"], context=context, question=query)),
                                          self._params("answer", item))
        if not answer.strip():
            raise CitationFormatError("the answer is empty")
        return {**row, "query": query, "answer": answer}

    def chunk_cites(self, item: Item) -> dict[str, Any]:
        context, query, answer = item.row["context"], item.row["query"], item.row["answer"]
        spans = chunk_spans(context, self.settings.chunk_tokens, self.tokenizer)
        chunks = [context[start:end] for start, end in spans]
        statements = answer_statements(answer)
        if not statements:
            raise CitationFormatError("the answer has no sentence to cite")
        retriever = self.retriever_factory(chunks)
        k = retrieval_k(len(statements), self.settings.top_k, self.settings.max_retrieved)
        shown = sorted({chunk for hits in retriever.search_batch(statements, k) for chunk in hits})
        row = {"context_sha": context_sha(context), "chunk_spans": [list(span) for span in spans], "snippets": shown}
        if not shown:  # nothing in the document matches the answer: nothing to cite
            uncited = [{"gap": "" if i == 0 else " ", "statement": s, "chunks": []} for i, s in enumerate(statements)]
            return {**row, "statements": uncited, "tail": "", "reply": None}
        prompt = render(self.prompts["chunk_cite"], snippets=format_snippets([chunks[i] for i in shown]),
                        question=query, answer=answer.strip())
        reply = self.client.complete(_user(prompt), self._params("chunk_cite", item))
        cited, tail = parse_chunk_citations(reply, shown, self.settings.max_chunks_per_statement)
        return {**row, "statements": cited, "tail": tail, "reply": reply}

    def sentence_cites(self, item: Item) -> dict[str, Any]:
        context, query = item.row["context"], item.row["query"]
        sentences, spans = split_sentences(context), sentence_spans(context)
        chunk_spans_ = item.row["chunk_spans"]
        locals_: list[list[int]] = []
        conversations = []
        for statement in item.row["statements"]:
            if not statement["chunks"]:
                locals_.append([])
                continue
            windows = chunk_windows(statement["chunks"], len(chunk_spans_), self.settings.neighbours)
            passage, ids = local_passage(windows, chunk_spans_, spans, sentences)
            locals_.append(ids)
            conversations.append(_user(render(self.prompts["sentence_cite"], passage=passage, question=query,
                                              statement=statement["statement"])))
        replies = iter(self.client.complete_batch(conversations, self._params("sentence_cite", item))
                       if conversations else [])
        rows = [{"sentences": ids, "reply": next(replies) if statement["chunks"] else None}
                for statement, ids in zip(item.row["statements"], locals_)]
        return {"context_sha": context_sha(context), "statements": rows}


def _stage_items(stage: str, documents: Sequence[Item], rows: Mapping[str, Mapping[ItemId, dict]],
                 files: Mapping[str, str]) -> list[Item]:
    """The documents ``stage`` can work on: those every earlier stage finished, with the earlier
    rows' fields added (checked to be of the same document)."""
    earlier = STAGES[:STAGES.index(stage)]
    items = []
    for document in documents:
        found = [rows[name].get(document.id) for name in earlier]
        if any(row is None for row in found):
            continue
        fields = dict(document.row)
        for name, row in zip(earlier, found):
            _check_sha(row, document, files[name])
            fields.update({k: v for k, v in row.items() if k not in ("id", "usage")})
        items.append(Item(document.id, fields, document.location))
    return items


def _check_sha(row: Mapping[str, Any], document: Item, path: str) -> None:
    if row.get("context_sha") != context_sha(document.row["context"]):
        raise ValueError(f"{path}: the row of id {document.id!r} was made from another context than "
                         f"{document.location} holds; remove the stage files from {Path(path).name} on to "
                         "rebuild them")


def export_records(documents: Sequence[Item], rows: Mapping[str, Mapping[ItemId, dict]], files: Mapping[str, str], *,
                   max_citations: int = 3, min_statements: int = 5, min_cited_fraction: float = 0.2,
                   cite_prompt: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stage 4 (module docstring): the SFT records and the rejected documents, in input order, of
    the documents all three stages finished."""
    template = load_cite_prompt() if cite_prompt is None else cite_prompt
    records, rejected = [], []
    for document in documents:
        found = [rows[name].get(document.id) for name in STAGES]
        if any(row is None for row in found):
            continue
        for name, row in zip(STAGES, found):
            _check_sha(row, document, files[name])
        qa, chunk_row, sentence_row = found
        statements = chunk_row["statements"]
        if len(sentence_row["statements"]) != len(statements):
            raise ValueError(f"{files['sentence_cites']}: id {document.id!r} has {len(sentence_row['statements'])} "
                             f"statements, {files['chunk_cites']} {len(statements)}; remove sentence_cites.jsonl")
        citations = [global_spans(parse_sentence_citations(s["reply"], len(s["sentences"])), s["sentences"],
                                  max_citations) if s["reply"] is not None else []
                     for s in sentence_row["statements"]]
        cited = sum(1 for spans in citations if spans)
        reason = rejection(len(statements), cited, min_statements, min_cited_fraction)
        if reason is not None:
            rejected.append({"id": document.id, "reason": reason, "statements": len(statements), "cited": cited})
            continue
        context = document.row["context"]
        prompt = build_cite_prompt(split_sentences(context), qa["query"], template)
        records.append({"id": document.id, "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": cited_answer(statements, citations, chunk_row["tail"])}]})
    return records, rejected


def check_files(input: str | os.PathLike, output_dir: str | os.PathLike) -> list[Item]:  # noqa: A002
    """The documents of ``input``, after checking every line and every stage file already in
    ``output_dir`` (so that a command line can refuse bad files before it loads a model).

    Raises:
      InputError: a malformed input line; OutputFileError: a stage file that is not the runner's.
    """
    documents = read_items(input, validate_document)
    for name in STAGES:
        finished_rows(Path(output_dir) / f"{name}.jsonl")
    return documents


@gin.configurable
def cof_pipeline(
    input: str | os.PathLike,  # noqa: A002 - the documented name
    output_dir: str | os.PathLike,
    client: LLMClient,
    *,
    retriever_factory: RetrieverFactory | None = None,
    tokenizer: Any | None = None,
    concurrency: int = 4,
    num_questions: int = 5,
    question_types: Sequence[str] = tuple(QUESTION_TYPES),
    zh_question_prob: float = 0.5,
    chunk_tokens: int = 128,
    top_k: int = 10,
    max_retrieved: int = 40,
    max_chunks_per_statement: int = 5,
    neighbours: int = 1,
    max_citations: int = 3,
    min_statements: int = 5,
    min_cited_fraction: float = 0.2,
    questions_prompt: str | None = None,
    answer_prompt: str | None = None,
    chunk_cite_prompt: str | None = None,
    sentence_cite_prompt: str | None = None,
    temperature: float = 1.0,
    max_tokens: int = 2048,
    sentence_cite_max_tokens: int = 128,
    seed: int = 0,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs CoF (module docstring) on the documents of ``input``.

    Args:
      input: JSONL of ``{"id"?, "context": str, "query"?: str, "answer"?: str}`` (an id is derived
        from the line when missing: ``glmjax.pipelines.runner``).
      output_dir: where the stage files, ``sft.jsonl`` and ``rejected.jsonl`` go (created).
      client: the LLM of every stage (the reference: GLM-4 at temperature 1).
      retriever_factory: builds a retriever over a document's chunk texts (default
        :class:`~glmjax.pipelines.retrieval.BM25Retriever`; dense: ``lambda chunks:
        EmbeddingRetriever(chunks, embedder)``).
      tokenizer: a Hugging Face fast tokenizer whose tokens the chunks count (None: the word/CJK
        character count of ``glmjax.pipelines.retrieval``).
      concurrency: documents worked on at once per stage.
      num_questions: questions proposed per document (the reference: 5).
      question_types: the kinds drawn from (names of :data:`QUESTION_TYPES`), uniformly.
      zh_question_prob: probability of Chinese questions about an English document.
      chunk_tokens: tokens per chunk (the reference: 128).
      top_k, max_retrieved: chunks retrieved per statement, ``min(top_k, ceil(max_retrieved /
        #statements))`` (the reference: 10, 40).
      max_chunks_per_statement: chunk citations kept per statement (the reference: 5).
      neighbours: chunks on each side of a cited chunk whose sentences stage 3 shows (1).
      max_citations: sentence spans kept per statement (3, as LongCite's parser).
      min_statements, min_cited_fraction: the stage-4 filter (5, 0.2).
      questions_prompt, answer_prompt, chunk_cite_prompt, sentence_cite_prompt: prompt files
        (placeholders :data:`QUESTION_FIELDS`, :data:`ANSWER_FIELDS`, :data:`CHUNK_CITE_FIELDS`,
        :data:`SENTENCE_CITE_FIELDS`); None uses ours.
      temperature: sampling temperature of every call.
      max_tokens: generation budget of the question, answer and chunk-citation calls (tokens).
      sentence_cite_max_tokens: that of a sentence-citation call (the reference: 128).
      seed: base of every call's seed and of the per-document draws (question kind, language,
        question): ``item_seed(seed, kind, 0, id)``.
      stages: the LLM stages to run this time (a subset of :data:`STAGES`); the others' files are
        read; stage 4 always runs.
      progress: progress bars on stderr.

    Returns:
      ``{"stages": {name: StageResult.as_dict()}, "documents", "answered", "sft_records",
      "rejected", "unfinished" (documents neither exported nor rejected), "failed" (item failures
      this run), "files": {name: path}}``.

    Raises:
      InputError: a malformed input line (``file:line: problem``), before any call.
      OutputFileError: a stage file that is not the runner's or is being written elsewhere.
      PromptError: a prompt file without the right placeholders.
      ValueError: bad knobs, or stage rows of another version of a document.
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}")
    bad_types = [kind for kind in question_types if kind not in QUESTION_TYPES]
    if bad_types or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {tuple(QUESTION_TYPES)}, got "
                         f"{tuple(question_types)}")
    if (num_questions < 1 or not 0 <= zh_question_prob <= 1 or chunk_tokens < 1 or top_k < 1 or max_retrieved < 1
            or max_chunks_per_statement < 1 or neighbours < 0 or max_citations < 1 or min_statements < 1
            or not 0 <= min_cited_fraction <= 1):
        raise ValueError("need num_questions, chunk_tokens, top_k, max_retrieved, max_chunks_per_statement, "
                         "max_citations, min_statements >= 1, neighbours >= 0 and zh_question_prob, "
                         "min_cited_fraction in [0, 1]")
    prompts = {"questions": load_prompt(questions_prompt, "cof_questions.txt", QUESTION_FIELDS),
               "answer": load_prompt(answer_prompt, "cof_answer.txt", ANSWER_FIELDS),
               "chunk_cite": load_prompt(chunk_cite_prompt, "cof_chunk_cite.txt", CHUNK_CITE_FIELDS),
               "sentence_cite": load_prompt(sentence_cite_prompt, "cof_sentence_cite.txt", SENTENCE_CITE_FIELDS)}
    cite_template = load_cite_prompt()
    full = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    sampling = {"questions": full, "answer": full, "chunk_cite": full,
                "sentence_cite": dataclasses.replace(full, max_tokens=sentence_cite_max_tokens)}
    documents = check_files(input, output_dir)
    settings = _Settings(num_questions, tuple(question_types), zh_question_prob, chunk_tokens, top_k,
                         max_retrieved, max_chunks_per_statement, neighbours, seed)
    job = _CoFJob(client, prompts, sampling, retriever_factory or BM25Retriever, tokenizer, settings)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {stage: str(out / f"{stage}.jsonl") for stage in STAGES}
    rows: dict[str, dict[ItemId, dict]] = {}
    results = {}
    for stage in STAGES:
        if stage in stages:
            items = documents if stage == "qa" else _stage_items(stage, documents, rows, files)
            results[stage] = run_stage(stage, items, getattr(job, stage), files[stage], concurrency=concurrency,
                                       progress=progress).as_dict()
        rows[stage] = finished_rows(files[stage])
    records, rejected = export_records(documents, rows, files, max_citations=max_citations,
                                       min_statements=min_statements, min_cited_fraction=min_cited_fraction,
                                       cite_prompt=cite_template)
    files["sft"], files["rejected"] = str(out / "sft.jsonl"), str(out / "rejected.jsonl")
    write_jsonl_atomic(files["sft"], records)
    write_jsonl_atomic(files["rejected"], rejected)
    return {"stages": results, "documents": len(documents),
            "answered": sum(1 for d in documents if d.id in rows["qa"]), "sft_records": len(records),
            "rejected": len(rejected), "unfinished": len(documents) - len(records) - len(rejected),
            "failed": sum(result["failed"] for result in results.values()), "files": files}
