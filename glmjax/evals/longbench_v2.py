"""LongBench v2: 503 long-context multiple-choice questions, answered through any LLM client.

The protocol (THUDM/LongBench, arXiv 2412.15204), reproduced here:

* **Data**: the official ``data.json`` (a JSON list; JSONL is accepted too) of objects with
  ``_id, domain, sub_domain, difficulty ("easy" | "hard"), length ("short" | "medium" | "long"),
  question, choice_A..choice_D, answer ("A".."D"), context`` (:func:`load_items`). The file is
  read from a path the user gives; nothing is downloaded.
* **Prompts** (:func:`build_prompt`, wording ours, in :data:`PROMPTS`): ``"zero_shot"`` (document,
  question, choices), ``"cot"`` (the same, asking for step-by-step reasoning; a second pass,
  :func:`build_cot_answer_prompt`, gives the question, the choices and that reasoning with the
  document omitted and asks for the answer), ``"no_context"`` (question and choices only) and
  ``"rag"`` (retrieved chunks, ``"Retrieved chunk i: ..."``, in place of the document: the item's
  ``retrieved_context``, or chunks of its context that :func:`retrieve_context` retrieves). Every
  prompt asks for ``The correct answer is (X)``. The document, question and choices are stripped
  of surrounding whitespace, as the reference does.
* **Truncation** (:func:`truncate_prompt`): a whole prompt longer than the budget (default
  120,000 tokens, the reference's length for every model but Claude) is tokenized and cut in the
  middle: the first ``budget // 2`` tokens and the last ``budget - budget // 2`` are kept (the
  reference's ``ids[:n // 2] + ids[-n // 2:]``; Python's ``-n // 2`` rounds down, so the odd
  token goes to the end).
* **Decoding** (:data:`DIRECT_SAMPLING`, :data:`COT_SAMPLING`): temperature 0.1, at most 128 new
  tokens for an answer, 1,024 for a chain of thought.
* **Extraction** (:func:`extract_answer`): ``*`` removed, then the first
  ``The correct answer is (X)``, else the first ``The correct answer is X`` (case-sensitive,
  X in A-D); no match is None, which counts as wrong.
* **Results** (:func:`score`, :func:`markdown_table`): accuracy in percent overall and by
  difficulty (easy, hard) and length (short, medium, long), with the counts behind each.

:func:`evaluate` runs a list of items through an :class:`~glmjax.inference.llm_client.LLMClient`
and returns one row per item; on a one-item list it is the per-item work of a resumable
pipeline stage (``glmjax.pipelines.runner``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from glmjax.evals.item_files import read_item_rows
from glmjax.inference.llm_client import LLMClient, LLMClientError, SamplingParams
from glmjax.pipelines.retrieval import Retriever, chunk_text

CHOICES = ("A", "B", "C", "D")
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
MODES = ("zero_shot", "cot", "no_context", "rag")
CATEGORIES = ("overall",) + DIFFICULTIES + LENGTHS
"""The result categories, in the reference's column order (Overall, Easy, Hard, Short, Medium, Long)."""

DEFAULT_BUDGET = 120_000
"""Prompt tokens kept by middle truncation (the reference's ``model2maxlen`` for all but Claude)."""

DIRECT_SAMPLING = SamplingParams(max_tokens=128, temperature=0.1)
"""An answer: the zero-shot, no-context and RAG prompts and the chain of thought's second pass."""

COT_SAMPLING = SamplingParams(max_tokens=1024, temperature=0.1)
"""The chain of thought's first pass (the reasoning)."""

_REQUIRED_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
                    "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")

_ANSWER_FORMAT = 'Give your answer in exactly this form: "The correct answer is (X)", where X is A, B, C or D.'

_QUESTION_BLOCK = """Question: {question}

Options:
(A) {choice_A}
(B) {choice_B}
(C) {choice_C}
(D) {choice_D}"""

PROMPTS: dict[str, str] = {
    "zero_shot": (
        "Read the document below, then answer the multiple-choice question that follows it.\n\n"
        "<document>\n{document}\n</document>\n\n" + _QUESTION_BLOCK + "\n\n"
        "Pick the single best option. " + _ANSWER_FORMAT),
    "cot": (
        "Read the document below, then work out the answer to the multiple-choice question that "
        "follows it.\n\n"
        "<document>\n{document}\n</document>\n\n" + _QUESTION_BLOCK + "\n\n"
        "Reason it through step by step, citing what the document says, before you decide.\n\n"
        "Step-by-step reasoning:"),
    "cot_answer": (
        "A long document was given with the multiple-choice question below; it is too long to "
        "repeat and is omitted here.\n\n" + _QUESTION_BLOCK + "\n\n"
        "Step-by-step reasoning about the document and the question:\n{reasoning}\n\n"
        "From this reasoning, which one option is the most likely answer? " + _ANSWER_FORMAT),
    "no_context": (
        "Answer the multiple-choice question below.\n\n" + _QUESTION_BLOCK + "\n\n"
        "Pick the single best option. " + _ANSWER_FORMAT),
    "rag": (
        "Below are passages retrieved from a long document. Use them to answer the "
        "multiple-choice question that follows.\n\n"
        "<passages>\n{document}\n</passages>\n\n" + _QUESTION_BLOCK + "\n\n"
        "Pick the single best option. " + _ANSWER_FORMAT),
}
"""Prompt templates (``str.format``): ``{document}`` (the context, or for ``"rag"`` the numbered
retrieved chunks), ``{question}``, ``{choice_A}``..``{choice_D}`` and, for ``"cot_answer"``,
``{reasoning}``. Pass a mapping with other text under the same keys to use other prompts."""


class LongBenchV2FormatError(ValueError):
    """A malformed data file; the message names the file, the item (``_id`` or index) and the field."""


@dataclasses.dataclass(frozen=True)
class LongBenchV2Item:
    """One question.

    Attributes:
      id: the ``_id`` field.
      domain, sub_domain: task family (e.g. "Single-Document QA") and its sub-task.
      difficulty: "easy" or "hard".
      length: "short" (< 32k words), "medium" (32k-128k) or "long" (> 128k).
      question, choices: the question and its four options ``(A, B, C, D)``.
      answer: the correct option, "A".."D".
      context: the long document.
      retrieved: chunks retrieved for the question (the optional ``retrieved_context`` field:
        ``[{"c_idx": int, "content": str}, ...]`` ranked best first), for the ``"rag"`` mode.
    """

    id: str
    domain: str
    sub_domain: str
    difficulty: str
    length: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    context: str
    retrieved: tuple[tuple[int, str], ...] = ()


def parse_item(row: Any, where: str) -> LongBenchV2Item:
    """Validates one data object; ``where`` (``"file: item 3"``) prefixes every error message.

    Raises:
      LongBenchV2FormatError: not an object, a missing or non-string field, an answer not in
        A-D, a difficulty not easy/hard, a length not short/medium/long, a malformed
        ``retrieved_context``.
    """
    if not isinstance(row, Mapping):
        raise LongBenchV2FormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("_id"), str) and row["_id"]:
        where = f"{where} (_id {row['_id']})"
    for field in _REQUIRED_FIELDS:
        if field not in row:
            raise LongBenchV2FormatError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise LongBenchV2FormatError(
                f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    if not row["_id"]:
        raise LongBenchV2FormatError(f"{where}: field '_id' is empty")
    for field, allowed in (("answer", CHOICES), ("difficulty", DIFFICULTIES), ("length", LENGTHS)):
        if row[field] not in allowed:
            raise LongBenchV2FormatError(
                f"{where}: field '{field}' is {row[field]!r}, expected one of {', '.join(allowed)}")
    retrieved = []
    for k, chunk in enumerate(row.get("retrieved_context") or ()):
        if not (isinstance(chunk, Mapping) and isinstance(chunk.get("c_idx"), int)
                and isinstance(chunk.get("content"), str)):
            raise LongBenchV2FormatError(
                f"{where}: field 'retrieved_context'[{k}] must be an object with an integer "
                "'c_idx' and a string 'content'")
        retrieved.append((chunk["c_idx"], chunk["content"]))
    return LongBenchV2Item(
        id=row["_id"], domain=row["domain"], sub_domain=row["sub_domain"],
        difficulty=row["difficulty"], length=row["length"], question=row["question"],
        choices=(row["choice_A"], row["choice_B"], row["choice_C"], row["choice_D"]),
        answer=row["answer"], context=row["context"], retrieved=tuple(retrieved))


def load_items(path: str | os.PathLike) -> list[LongBenchV2Item]:
    """Reads the official ``data.json`` (a JSON list of objects), or JSONL (one object a line,
    blank lines skipped) when the name ends in ``.jsonl``.

    Raises:
      LongBenchV2FormatError: unreadable JSON (file and line), a top level that is not a list,
        a malformed item (:func:`parse_item`; the item is named by index or line and ``_id``),
        or two items with the same ``_id``.
    """
    path = os.fspath(path)
    items = [parse_item(row, where) for row, where in read_item_rows(path, LongBenchV2FormatError)]
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.id in seen:
            raise LongBenchV2FormatError(f"{path}: item {index} (_id {item.id}): duplicate '_id'")
        seen.add(item.id)
    return items


def _fields(item: LongBenchV2Item) -> dict[str, str]:
    return {"question": item.question.strip(),
            **{f"choice_{letter}": choice.strip() for letter, choice in zip(CHOICES, item.choices)}}


def format_retrieved(chunks: Sequence[str]) -> str:
    """Retrieved chunks as the RAG prompt shows them: ``"Retrieved chunk i: ..."`` (1-based, in the
    order given), separated by blank lines."""
    return "\n\n".join(f"Retrieved chunk {i}: {chunk}" for i, chunk in enumerate(chunks, start=1))


def retrieved_chunks(item: LongBenchV2Item, top_k: int | None = None) -> list[str]:
    """The item's ``top_k`` best retrieved chunks (all when None), put back in document order
    (by ``c_idx``), as the reference does before prompting.

    Raises:
      ValueError: the item has no retrieved chunks, or ``top_k < 1``.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not item.retrieved:
        raise ValueError(f"item {item.id}: no 'retrieved_context' for the 'rag' mode")
    best = item.retrieved[:top_k] if top_k is not None else item.retrieved
    return [content for _, content in sorted(best, key=lambda chunk: chunk[0])]


RAG_CHUNK_TOKENS = 512
"""Tokens per context chunk when :func:`retrieve_context` cuts a document (LongBench v2's RAG
experiments retrieve 512-token chunks)."""


def retrieval_query(item: LongBenchV2Item) -> str:
    """What :func:`retrieve_context` searches the document for: the question and its four choices,
    one per line (ours: the choices name what the answer must tell apart)."""
    fields = _fields(item)
    return "\n".join([fields["question"], *(fields[f"choice_{letter}"] for letter in CHOICES)])


def retrieve_context(item: LongBenchV2Item, make_retriever: Callable[[Sequence[str]], Retriever], *,
                     chunk_tokens: int = RAG_CHUNK_TOKENS, tokenizer: Any | None = None,
                     top_k: int | None = None) -> LongBenchV2Item:
    """``item`` with ``retrieved`` computed from its own context, for the ``"rag"`` mode of data
    that has no ``retrieved_context``.

    The context is cut into chunks of ``chunk_tokens`` tokens
    (:func:`glmjax.pipelines.retrieval.chunk_text`, with ``tokenizer`` when given: a Hugging Face
    fast tokenizer), a retriever is built over them and searched for :func:`retrieval_query`;
    ``retrieved`` holds the ``top_k`` best (all that match when None) as ``(chunk index, text)``,
    best first, like the official field.

    Args:
      make_retriever: ``chunks -> retriever`` (e.g. ``BM25Retriever``, or
        ``lambda chunks: EmbeddingRetriever(chunks, embed)``).

    Raises:
      ValueError: an empty context, a retriever that matches no chunk, or ``top_k < 1``.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    chunks = chunk_text(item.context, chunk_tokens, tokenizer)
    if not chunks:
        raise ValueError(f"item {item.id}: an empty context has nothing to retrieve")
    best = make_retriever(chunks).search(retrieval_query(item), top_k or len(chunks))
    if not best:
        raise ValueError(f"item {item.id}: no chunk of the context matches the question")
    return dataclasses.replace(item, retrieved=tuple((index, chunks[index]) for index in best))


def build_prompt(item: LongBenchV2Item, mode: str, *, retrieved: Sequence[str] | None = None,
                 prompts: Mapping[str, str] = PROMPTS) -> str:
    """The prompt of ``item`` in ``mode`` (one of :data:`MODES`; for ``"cot"``, its first pass).

    Args:
      item: the question.
      mode: "zero_shot" and "cot" show the whole context; "no_context" none of it; "rag" the
        ``retrieved`` chunks (required, at least one) in its place.
      retrieved: chunk texts for "rag", in the order to show them; refused in other modes.
      prompts: templates (keys as :data:`PROMPTS`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {', '.join(MODES)}")
    if (mode == "rag") != (retrieved is not None):
        raise ValueError("retrieved chunks are given with mode='rag' and only with it")
    if mode == "rag":
        if not retrieved:
            raise ValueError(f"item {item.id}: mode 'rag' needs at least one retrieved chunk")
        document = format_retrieved([chunk.strip() for chunk in retrieved])
    else:
        document = item.context.strip()
    return prompts[mode].format(document=document, **_fields(item))


def build_cot_answer_prompt(item: LongBenchV2Item, reasoning: str, *,
                            prompts: Mapping[str, str] = PROMPTS) -> str:
    """The chain of thought's second pass: question, choices and the first pass's ``reasoning``
    (stripped), the document omitted, asking for the answer."""
    return prompts["cot_answer"].format(reasoning=reasoning.strip(), **_fields(item))


class TokenizerLike(Protocol):
    """What :func:`truncate_prompt` needs of a tokenizer (a Hugging Face tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def truncate_middle(ids: list[int], budget: int) -> list[int]:
    """``ids`` cut to ``budget`` tokens by dropping the middle: the first ``budget // 2`` and the
    last ``budget - budget // 2`` are kept; a list that fits is returned unchanged."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    if len(ids) <= budget:
        return list(ids)
    head = budget // 2
    return list(ids[:head]) + list(ids[len(ids) - (budget - head):])


def truncate_prompt(text: str, tokenizer: TokenizerLike, budget: int = DEFAULT_BUDGET) -> str:
    """``text`` itself when it is at most ``budget`` tokens (no special tokens added), else the
    decoding (special tokens skipped) of its :func:`truncate_middle` ids."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) <= budget:
        return text
    return tokenizer.decode(truncate_middle(ids, budget), skip_special_tokens=True)


_ANSWER_PARENS = re.compile(r"The correct answer is \(([A-D])\)")
_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_answer(response: str) -> str | None:
    """The chosen option, "A".."D", or None: ``*`` removed, the first
    ``The correct answer is (X)``, else the first ``The correct answer is X`` (case-sensitive)."""
    text = response.replace("*", "")
    for pattern in (_ANSWER_PARENS, _ANSWER_BARE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def score(items: Sequence[LongBenchV2Item],
          predictions: Sequence[str | None] | Mapping[str, str | None]) -> dict[str, Any]:
    """Accuracy of ``predictions`` overall and per category.

    Args:
      items: the questions scored.
      predictions: one option (or None) per item, in the same order, or a mapping from item id;
        None, and an item the mapping lacks, count as wrong.

    Returns:
      ``{category: {"accuracy": percent or None (no items), "correct": int, "count": int}}`` for
      each of :data:`CATEGORIES`, plus ``"no_answer"``: items without a prediction.
    """
    if isinstance(predictions, Mapping):
        known = {item.id for item in items}
        unknown = [key for key in predictions if key not in known]
        if unknown:
            raise ValueError(f"predictions for ids that are not among the items: {unknown[:5]}")
        predicted = [predictions.get(item.id) for item in items]
    else:
        if len(predictions) != len(items):
            raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
        predicted = list(predictions)
    tally = {category: [0, 0] for category in CATEGORIES}
    for item, prediction in zip(items, predicted):
        correct = int(prediction is not None and prediction == item.answer)
        for category in ("overall", item.difficulty, item.length):
            tally[category][0] += correct
            tally[category][1] += 1
    result: dict[str, Any] = {
        category: {"accuracy": 100.0 * correct / count if count else None, "correct": correct, "count": count}
        for category, (correct, count) in tally.items()}
    result["no_answer"] = sum(prediction is None for prediction in predicted)
    return result


def markdown_table(result: Mapping[str, Any], name: str = "model") -> str:
    """One row of a Markdown table of :func:`score`'s result: accuracy (%, 1 decimal) per
    category, ``-`` for a category without items, and the item counts as a second row."""
    header = "| | " + " | ".join(category.capitalize() for category in CATEGORIES) + " |"
    rule = "|---|" + "---:|" * len(CATEGORIES)
    accuracy = [result[c]["accuracy"] for c in CATEGORIES]
    cells = ["-" if value is None else f"{value:.1f}" for value in accuracy]
    counts = [str(result[c]["count"]) for c in CATEGORIES]
    return "\n".join([header, rule, f"| {name} | " + " | ".join(cells) + " |",
                      "| items | " + " | ".join(counts) + " |"])


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _complete(client: LLMClient, prompts: Sequence[str], indices: Sequence[int], sampling: SamplingParams,
              batch_size: int) -> list[str | LLMClientError]:
    """Every prompt's reply or error, in order. ``prompts[k]`` is item ``indices[k]`` (increasing)
    and samples with ``seed + indices[k]``: a batch holds at most ``batch_size`` consecutive
    items. A failure of a whole call (no per-item results) propagates."""
    outcomes: list[str | LLMClientError] = []
    start = 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and end - start < batch_size and indices[end] == indices[end - 1] + 1:
            end += 1
        params = sampling if sampling.seed is None else dataclasses.replace(
            sampling, seed=sampling.seed + indices[start])
        try:
            outcomes.extend(client.complete_batch([_user(p) for p in prompts[start:end]], params))
        except LLMClientError as error:
            if error.results is None:
                raise
            outcomes.extend(error.results)
        start = end
    return outcomes


def evaluate(items: Sequence[LongBenchV2Item], client: LLMClient, *, mode: str,
             sampling: SamplingParams | None = None, tokenizer: TokenizerLike | None = None,
             budget: int = DEFAULT_BUDGET, answer_sampling: SamplingParams | None = None,
             rag_top_k: int | None = None, prompts: Mapping[str, str] = PROMPTS,
             batch_size: int = 8) -> list[dict[str, Any]]:
    """Asks ``client`` every question in ``mode`` and grades the replies.

    Each prompt is sent as one user message; with a ``tokenizer`` it is first cut to ``budget``
    tokens (:func:`truncate_prompt`). ``"cot"`` makes two calls per item: the reasoning
    (``sampling``), then :func:`build_cot_answer_prompt` (``answer_sampling``), whose reply is
    graded. ``"rag"`` shows each item's :func:`retrieved_chunks` (``rag_top_k`` of them).

    Args:
      items: the questions.
      client: any LLM client; conversations go in batches of up to ``batch_size``; item ``i`` (of
        ``items``) samples with ``seed + i`` in each pass.
      mode: one of :data:`MODES`.
      sampling: the (first) pass; default :data:`COT_SAMPLING` for "cot", else
        :data:`DIRECT_SAMPLING`.
      tokenizer, budget: middle truncation of every prompt (none without a tokenizer).
      answer_sampling: the cot answer pass; default :data:`DIRECT_SAMPLING`.
      rag_top_k: retrieved chunks shown in "rag" mode (None: all the item has).
      prompts: templates (keys as :data:`PROMPTS`).
      batch_size: conversations per client call.

    Returns:
      One row per item, in order: ``id, mode, difficulty, length, answer``, ``truncated``
      (whether a prompt was cut), ``response`` (the graded reply, None if its call failed),
      ``reasoning`` ("cot" only: the first pass's reply, None if it failed), ``prediction``
      (:func:`extract_answer` of the stripped response), ``correct`` and ``error`` (which call
      failed and why, else None; a failed item counts as wrong).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampling = sampling or (COT_SAMPLING if mode == "cot" else DIRECT_SAMPLING)
    answer_sampling = answer_sampling or DIRECT_SAMPLING
    rows = [{"id": item.id, "mode": mode, "difficulty": item.difficulty, "length": item.length,
             "answer": item.answer, "truncated": False, "response": None, "error": None} for item in items]

    def fit(prompt: str, row: dict[str, Any]) -> str:
        if tokenizer is None:
            return prompt
        cut = truncate_prompt(prompt, tokenizer, budget)
        row["truncated"] = row["truncated"] or cut != prompt
        return cut

    first = [fit(build_prompt(item, mode, prompts=prompts,
                              retrieved=retrieved_chunks(item, rag_top_k) if mode == "rag" else None), row)
             for item, row in zip(items, rows)]
    replies = _complete(client, first, range(len(items)), sampling, batch_size)
    stage = "reasoning" if mode == "cot" else "answer"
    for row, reply in zip(rows, replies):
        if isinstance(reply, LLMClientError):
            row["error"] = f"{stage} call: {reply}"
        else:
            row["response"] = reply
    if mode == "cot":
        for row in rows:
            row["reasoning"], row["response"] = row["response"], None
        pending = [i for i, row in enumerate(rows) if row["error"] is None]
        second = [fit(build_cot_answer_prompt(items[i], rows[i]["reasoning"], prompts=prompts), rows[i])
                  for i in pending]
        for i, answer in zip(pending, _complete(client, second, pending, answer_sampling, batch_size)):
            if isinstance(answer, LLMClientError):
                rows[i]["error"] = f"answer call: {answer}"
            else:
                rows[i]["response"] = answer
    for row in rows:
        row["prediction"] = None if row["response"] is None else extract_answer(row["response"].strip())
        row["correct"] = row["prediction"] is not None and row["prediction"] == row["answer"]
    return rows
