r"""LongReward (Zhang et al., 2024): AI-feedback rewards for long-context answers, and DPO pairs.

An off-the-shelf LLM (the *judge*) scores a long-context answer on four dimensions, 0-10 each;
the reward is their mean:

* **helpfulness** and **logicality**: from the query and the answer only (no context): the judge
  writes an analysis, then ``Rating: [[score]]`` (:func:`parse_score` reads it tolerantly);
* **faithfulness**: the judge lists the answer's factual statements (:func:`parse_statements`);
  for each, the ``top_k_chunks`` context chunks of ``chunk_tokens`` tokens that BM25 ranks
  highest for it (``glmjax.pipelines.retrieval``) are shown to the judge, which grades the
  statement fully / partially / not supported = 1 / 0.5 / 0 (:func:`parse_support`); the score is
  10 x the mean grade. An answer with no factual statement (a refusal, a question back) scores
  ``no_statement_score`` (default 10: it claims nothing unsupported; helpfulness and completeness
  are what judge such an answer), and its row says ``"statements": []``. At most
  ``max_statements`` statements (the first ones) are graded;
* **completeness**: the judge extracts the query-relevant information of each coarse context chunk
  (``completeness_chunk_tokens`` tokens; :func:`parse_relevant`: ``[[None]]`` for a chunk without
  any), once per prompt; then it rates how fully the answer covers the collected information, as
  for helpfulness. When no chunk holds relevant information the judge is still asked, told so.

A judge reply that cannot be parsed is asked again, up to ``tries`` calls per question: the first
at ``judge_temperature`` (default 0), the retries at ``retry_temperature`` (default 1, so that a
greedy judge does not repeat itself), every call with its own seed. When no try parses, the
response's scoring fails (a :class:`JudgeParseError`, an item error retried by the next run);
no default score is ever substituted.

The pipeline (:func:`longreward_pipeline`): three resumable stages on the runner, each with its
own append-only file under ``output_dir`` (:mod:`glmjax.pipelines.runner`):

1. ``responses.jsonl``: ``num_samples`` responses per prompt ``{id, context, query}`` from the
   policy, the user turn ``policy_template.format(context=, query=)`` (by default
   ``glmjax.data.pairs.LONG_REWARD_TEMPLATE``, the turn ``pair_data`` trains on; keep the two
   equal), seeds ``item_seed(seed, "responses", 0, id) + k``. Row ``{"id", "responses",
   "seeds"}``.
2. ``relevant.jsonl``: the completeness dimension's per-chunk information, per prompt (shared
   by its responses). Row ``{"id", "information": [str | None per chunk], "retries"}``.
3. ``scores.jsonl``: one row per (prompt, response), id ``json.dumps([prompt id, k])``:
   ``{"id", "prompt_id", "index", "response_sha", "scores": {dimension: 0-10}, "reward",
   "statements": [{"statement", "chunks", "support"}], "replies": {dimension: judge reply},
   "retries"}``. Responses are scored one per item, so a judge failure repeats only that
   response's calls.

Then every run rewrites (atomically), in input order, from the prompts whose responses are all
scored:

* ``pairs.jsonl``: the highest- and the lowest-rewarded response of each prompt (the first one
  on a tie for either place) in ``pair_data``'s LongReward format ``{"context", "query",
  "win_response", "lose_response"}`` plus ``"id"``, ``"win_reward"``, ``"lose_reward"``,
  ``"win_scores"``, ``"lose_scores"``, ``"rewards"`` (``glmjax.data.pairs`` reads the four named
  fields and ignores the rest). A prompt whose responses all have the same reward gives no pair
  (nothing to prefer), nor one whose best and worst responses are the same text (counted as
  ``ties`` and ``identical``).

Prompts are ours, package files ``glmjax/pipelines/prompts/longreward_*.txt`` with ``{{name}}``
placeholders; each can be replaced by a file of the same placeholders (gin:
``longreward_pipeline.support_prompt = "/path/to/prompt.txt"``; :data:`PROMPT_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from glmjax.data.pairs import LONG_REWARD_TEMPLATE
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.pipelines.retrieval import BM25Retriever, Retriever, chunk_text
from glmjax.pipelines.runner import Item, ItemId, finished_rows, read_items, run_stage, write_jsonl_atomic
from glmjax.pipelines.t1_cot import item_seed, load_prompt, render

DIMENSIONS = ("helpfulness", "logicality", "faithfulness", "completeness")
"""The four scored dimensions, each 0-10; the reward is their mean."""

STAGES = ("responses", "relevant", "scores")
"""The stages, in order; each writes ``output_dir/<stage>.jsonl``."""

PROMPT_FIELDS = {
    "helpfulness": ("query", "response"),
    "logicality": ("query", "response"),
    "statements": ("query", "response"),
    "support": ("chunks", "statement"),
    "relevant": ("query", "chunk"),
    "completeness": ("query", "information", "response"),
}
"""Each judge prompt's placeholders (the package file is ``longreward_<name>.txt``)."""

SUPPORT_GRADES = {"fully": 1.0, "partially": 0.5, "not": 0.0}
"""Faithfulness grade of a statement by the judge's verdict."""

NO_INFORMATION = "(No part of the document holds information relevant to the question.)"
NO_PASSAGE = "(No passage of the document shares a word with the statement.)"

RetrieverFactory = Callable[[Sequence[str]], Retriever]
"""``factory(chunks) -> retriever`` (``glmjax.pipelines.retrieval``: BM25 or embeddings)."""


class JudgeParseError(ValueError):
    """A judge reply that holds no usable answer (the message says what was expected)."""


# ----------------------------------------------------------------------------------- parsing

_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE_PATTERNS = (
    re.compile(r"\[\[\s*" + _NUMBER + r"\s*(?:/\s*10\s*)?\]\]"),  # [[7]], [[7/10]]
    re.compile(r"(?:rating|score)\s*[:：=]?\s*\**\s*\[?\s*" + _NUMBER, re.IGNORECASE),  # Rating: 7, Score: [7]
    re.compile(_NUMBER + r"\s*/\s*10\b"),  # 7/10, 7 / 10
)


def parse_score(text: str) -> float:
    """The 0-10 score of a judge reply: the last ``[[x]]`` (also ``[[x/10]]``); without one, the
    last ``Rating: x`` / ``Score: x``; without one, the last ``x/10``. Markdown emphasis is
    ignored; ``x`` may have decimals.

    Raises:
      JudgeParseError: no score, or one outside [0, 10].
    """
    text = text.replace("*", "")
    for pattern in _SCORE_PATTERNS:
        found = pattern.findall(text)
        if found:
            score = float(found[-1])
            if not 0.0 <= score <= 10.0:
                raise JudgeParseError(f"score {found[-1]} is outside [0, 10]")
            return score
    raise JudgeParseError("no score in the reply (expected 'Rating: [[score]]')")


_NONE_REPLY = re.compile(r"^\W*(?:\[\[\s*none\s*\]\]|none|no factual statements?|n/a)\W*$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s+(.*\S)\s*$")


def parse_statements(text: str) -> list[str]:
    """The factual statements of a judge reply: the lines starting with a bullet (``-``, ``*``,
    ``•``) or a list number (``1.``, ``2)``, ``(3)``), without it; a reply without such lines gives
    its non-empty lines. ``[[None]]`` (anywhere, or a reply that is just ``None`` / ``No factual
    statements``) gives ``[]``.

    Raises:
      JudgeParseError: an empty reply.
    """
    if not text.strip():
        raise JudgeParseError("empty reply (expected '- statement' lines or [[None]])")
    if re.search(r"\[\[\s*none\s*\]\]", text, re.IGNORECASE) or _NONE_REPLY.match(text.strip()):
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    bulleted = [match.group(1).strip() for match in map(_BULLET.match, lines) if match]
    statements = bulleted or [line.strip() for line in lines if not line.strip().endswith(":")]
    statements = [s for s in statements if s]
    if not statements:
        raise JudgeParseError("no statement line in the reply (expected '- statement' lines or [[None]])")
    return statements


_VERDICT_BRACKET = re.compile(r"\[\[\s*(fully|partially|partial|not|no|un)\w*[^\]]*\]\]", re.IGNORECASE)
_VERDICT_WORDS = re.compile(r"\b(not\s+(?:at\s+all\s+)?supported|no\s+support|unsupported|partially|partial|"
                            r"fully)\b", re.IGNORECASE)


def _grade_word(word: str) -> str:
    word = word.lower()
    if word.startswith("fully"):
        return "fully"
    if word.startswith("partial"):
        return "partially"
    return "not"


def parse_support(text: str) -> str:
    """The verdict of a support reply: ``"fully"``, ``"partially"`` or ``"not"`` (keys of
    :data:`SUPPORT_GRADES`). The last ``[[...]]`` verdict wins (``[[Fully supported]]``,
    ``[[Partially]]``, ``[[Not supported]]``, ``[[No support]]``, ``[[Unsupported]]``); without
    one, the last verdict phrase of the reply (``not supported`` / ``no support`` /
    ``unsupported`` / ``partially`` / ``fully``, where ``not fully supported`` reads as partial).

    Raises:
      JudgeParseError: no verdict.
    """
    text = text.replace("*", "")
    bracketed = _VERDICT_BRACKET.findall(text)
    if bracketed:
        return _grade_word(bracketed[-1])
    words = list(_VERDICT_WORDS.finditer(text))
    if not words:
        raise JudgeParseError("no verdict in the reply (expected [[Fully supported]], [[Partially "
                              "supported]] or [[Not supported]])")
    last = words[-1]
    if last.group(1).lower() == "fully" and re.search(r"\bnot\s+$", text[:last.start()], re.IGNORECASE):
        return "partially"  # "not fully supported"
    return _grade_word(last.group(1))


def parse_relevant(text: str) -> str | None:
    """The relevant information of a chunk reply, stripped; None when the reply holds ``[[None]]``
    anywhere (or is just ``None``), as for :func:`parse_statements`.

    Raises:
      JudgeParseError: an empty reply.
    """
    stripped = text.strip()
    if not stripped:
        raise JudgeParseError("empty reply (expected the relevant information or [[None]])")
    if re.search(r"\[\[\s*none\s*\]\]", stripped, re.IGNORECASE) or re.fullmatch(r"\W*none\W*", stripped,
                                                                                   re.IGNORECASE):
        return None
    return stripped


# ------------------------------------------------------------------------------------- judge


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def response_sha(response: str) -> str:
    """A digest of a response text: ties a score row to the response it scores."""
    return hashlib.sha256(response.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ResponseScores:
    """A response's LongReward scores.

    Attributes:
      scores: ``{dimension: 0-10}`` over :data:`DIMENSIONS`.
      reward: their mean.
      statements: the faithfulness statements, each ``{"statement", "chunks" (retrieved chunk
        indices, best first), "support" ("fully" | "partially" | "not")}``; ``[]`` when the answer
        makes none.
      replies: the judge's parsed replies by dimension (analyses and the statement list).
      retries: judge calls that repeated a question whose reply did not parse.
    """

    scores: dict[str, float]
    reward: float
    statements: list[dict[str, Any]]
    replies: dict[str, str]
    retries: int

    def as_row(self) -> dict[str, Any]:
        return {"scores": self.scores, "reward": self.reward, "statements": self.statements,
                "replies": self.replies, "retries": self.retries}


class LongRewardJudge:
    """Scores long-context answers on the four dimensions with an LLM judge (module docstring).

    Args:
      client: the judge.
      prompts: ``{name: template}`` over :data:`PROMPT_FIELDS` (default: the package files).
      tries: judge calls per question at most (>= 1).
      judge_temperature, retry_temperature: sampling of the first call and of the retries.
      max_tokens: the judge's generation budget per call.
      top_k_chunks: chunks retrieved per faithfulness statement.
      chunk_tokens: faithfulness chunk size (tokens of ``tokenizer``, else
        ``glmjax.pipelines.retrieval.count_tokens``'s).
      completeness_chunk_tokens: completeness chunk size (ours: 4096 tokens, coarse pieces that a
        judge reads whole).
      max_statements: faithfulness statements graded at most (the first ones).
      no_statement_score: faithfulness of an answer without factual statements.
      tokenizer: a fast Hugging Face tokenizer that counts chunk tokens, or None.
      retriever_factory: builds the faithfulness retriever on a context's chunks (default BM25).
      seed: base of every judge call's seed.
    """

    def __init__(self, client: LLMClient, *, prompts: Mapping[str, str] | None = None, tries: int = 3,
                 judge_temperature: float = 0.0, retry_temperature: float = 1.0, max_tokens: int = 1024,
                 top_k_chunks: int = 5, chunk_tokens: int = 128, completeness_chunk_tokens: int = 4096,
                 max_statements: int = 40, no_statement_score: float = 10.0, tokenizer: Any | None = None,
                 retriever_factory: RetrieverFactory = BM25Retriever, seed: int = 0) -> None:
        if tries < 1 or top_k_chunks < 1 or max_statements < 1:
            raise ValueError(f"need tries, top_k_chunks and max_statements >= 1, got {tries}, "
                             f"{top_k_chunks}, {max_statements}")
        if not 0.0 <= no_statement_score <= 10.0:
            raise ValueError(f"no_statement_score must be in [0, 10], got {no_statement_score}")
        self.client = client
        self.prompts = dict(prompts) if prompts is not None else load_prompts()
        missing = sorted(set(PROMPT_FIELDS) - set(self.prompts))
        if missing:
            raise ValueError(f"prompts lacks the templates {missing}")
        self.tries = tries
        self.first = SamplingParams(max_tokens=max_tokens, temperature=judge_temperature)
        self.retry = SamplingParams(max_tokens=max_tokens, temperature=retry_temperature)
        self.top_k_chunks = top_k_chunks
        self.chunk_tokens = chunk_tokens
        self.completeness_chunk_tokens = completeness_chunk_tokens
        self.max_statements = max_statements
        self.no_statement_score = no_statement_score
        self.tokenizer = tokenizer
        self.retriever_factory = retriever_factory
        self.seed = seed
        self._retrievers: dict[str, tuple[list[str], Retriever]] = {}
        self._lock = threading.Lock()

    def ask(self, name: str, prompts: Sequence[str], parse: Callable[[str], Any],
            key: ItemId) -> tuple[list[Any], list[str], int]:
        """Asks the judge each of ``prompts`` (one batch), re-asking those whose reply ``parse``
        rejects, up to ``tries`` calls each.

        Seeds: ``item_seed(seed, name, attempt, key) + i`` for prompt ``i`` on call ``attempt``.

        Returns:
          (parsed values, the replies they came from, how many calls were retries).

        Raises:
          JudgeParseError: a prompt with no parsable reply after ``tries`` calls (the message
            names ``name`` and the last problem).
        """
        values: list[Any] = [None] * len(prompts)
        replies = [""] * len(prompts)
        done = [False] * len(prompts)
        problems: dict[int, str] = {}
        retries = 0
        for attempt in range(self.tries):
            pending = [i for i in range(len(prompts)) if not done[i]]
            if not pending:
                break
            base = self.first if attempt == 0 else self.retry
            params = dataclasses.replace(base, seed=item_seed(self.seed, name, attempt, key))
            # Each prompt keeps its batch index, so that its seed does not depend on which others retry.
            answers = self.client.complete_batch([_user(prompts[i]) for i in pending], params) if attempt == 0 \
                else [self.client.complete(_user(prompts[i]), dataclasses.replace(params, seed=params.seed + i))
                      for i in pending]
            if attempt > 0:
                retries += len(pending)
            for i, reply in zip(pending, answers):
                try:
                    values[i] = parse(reply)
                except JudgeParseError as err:
                    problems[i] = str(err)
                    continue
                replies[i], done[i] = reply, True
        failed = [i for i in range(len(prompts)) if not done[i]]
        if failed:
            raise JudgeParseError(f"{name}: no usable judge reply in {self.tries} tries for {len(failed)} of "
                                  f"{len(prompts)} questions (last problem: {problems[failed[0]]})")
        return values, replies, retries

    def _rated(self, name: str, key: ItemId, **fields: str) -> tuple[float, str, int]:
        (score,), (reply,), retries = self.ask(name, [render(self.prompts[name], **fields)], parse_score, key)
        return score, reply, retries

    def _retriever(self, context: str) -> tuple[list[str], Retriever]:
        """The context's faithfulness chunks and their retriever (kept per context text: a prompt's
        responses share them)."""
        digest = hashlib.sha256(context.encode("utf-8")).hexdigest()
        with self._lock:
            cached = self._retrievers.get(digest)
        if cached is None:
            chunks = chunk_text(context, self.chunk_tokens, self.tokenizer)
            if not chunks:
                raise ValueError("the context has no text to retrieve from")
            cached = (chunks, self.retriever_factory(chunks))
            with self._lock:
                if len(self._retrievers) > 64:
                    self._retrievers.clear()
                self._retrievers[digest] = cached
        return cached

    def faithfulness(self, context: str, query: str, response: str, key: ItemId) -> tuple[float, list[dict], str, int]:
        """(score, statements, the statement-list reply, retries) of ``response``."""
        (statements,), (listed,), retries = self.ask(
            "statements", [render(self.prompts["statements"], query=query, response=response)],
            parse_statements, key)
        statements = statements[: self.max_statements]
        if not statements:
            return self.no_statement_score, [], listed, retries
        chunks, retriever = self._retriever(context)
        found = retriever.search_batch(statements, self.top_k_chunks)
        prompts = []
        for statement, indices in zip(statements, found):
            passages = "\n\n".join(f"[Passage {i + 1}]\n{chunks[i].strip()}" for i in sorted(indices))
            prompts.append(render(self.prompts["support"], chunks=passages or NO_PASSAGE, statement=statement))
        verdicts, _, more = self.ask("support", prompts, parse_support, key)
        rows = [{"statement": s, "chunks": list(indices), "support": v}
                for s, indices, v in zip(statements, found, verdicts)]
        score = 10.0 * sum(SUPPORT_GRADES[v] for v in verdicts) / len(verdicts)
        return score, rows, listed, retries + more

    def relevant_information(self, context: str, query: str, key: ItemId) -> tuple[list[str | None], int]:
        """(the query-relevant information of each completeness chunk of ``context``, None where
        a chunk holds none; retries)."""
        chunks = chunk_text(context, self.completeness_chunk_tokens, self.tokenizer)
        if not chunks:
            raise ValueError("the context has no text to extract information from")
        prompts = [render(self.prompts["relevant"], query=query, chunk=chunk.strip()) for chunk in chunks]
        information, _, retries = self.ask("relevant", prompts, parse_relevant, key)
        return information, retries

    def score(self, context: str, query: str, response: str, *, information: Sequence[str | None] | None = None,
              key: ItemId = "") -> ResponseScores:
        """The four scores of ``response`` (``information``: :meth:`relevant_information` of the
        context, computed here when None; ``key`` distinguishes the seeds of different items)."""
        retries = 0
        if information is None:
            information, retries = self.relevant_information(context, query, key)
        helpfulness, help_reply, more = self._rated("helpfulness", key, query=query, response=response)
        retries += more
        logicality, logic_reply, more = self._rated("logicality", key, query=query, response=response)
        retries += more
        faithfulness, statements, listed, more = self.faithfulness(context, query, response, key)
        retries += more
        parts = [f"[Part {i + 1}]\n{info}" for i, info in enumerate(information) if info is not None]
        completeness, complete_reply, more = self._rated(
            "completeness", key, query=query, information="\n\n".join(parts) or NO_INFORMATION, response=response)
        retries += more
        scores = {"helpfulness": helpfulness, "logicality": logicality, "faithfulness": faithfulness,
                  "completeness": completeness}
        return ResponseScores(scores, sum(scores.values()) / len(scores), statements,
                              {"helpfulness": help_reply, "logicality": logic_reply, "statements": listed,
                               "completeness": complete_reply}, retries)


def load_prompts(paths: Mapping[str, str | os.PathLike | None] | None = None) -> dict[str, str]:
    """The judge prompts: ``paths[name]`` where given (not None), else the package's
    ``longreward_<name>.txt``, each checked to hold exactly its :data:`PROMPT_FIELDS`.

    Raises:
      PromptError (``glmjax.pipelines.t1_cot``): a missing file or wrong placeholders.
      ValueError: an unknown prompt name.
    """
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(PROMPT_FIELDS))
    if unknown:
        raise ValueError(f"unknown LongReward prompts {unknown}; known: {sorted(PROMPT_FIELDS)}")
    return {name: load_prompt(paths.get(name), f"longreward_{name}.txt", fields)
            for name, fields in PROMPT_FIELDS.items()}


# --------------------------------------------------------------------------------- pairs


def select_pair(rewards: Sequence[float]) -> tuple[int, int] | None:
    """(index of the highest reward, index of the lowest), the first one on a tie for either
    place; None when every reward is the same (or fewer than two)."""
    if len(rewards) < 2 or max(rewards) == min(rewards):
        return None
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i)), min(range(len(rewards)), key=lambda i: (rewards[i], i))


def validate_prompt(row: dict[str, Any]) -> None:
    """Checks an input row ``{"id"?, "context": str, "query": str}`` (both non-empty).

    Raises:
      ValueError: naming the missing or malformed field.
    """
    for field in ("context", "query"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field {field!r} must be a non-empty string")


def score_key(prompt_id: ItemId, index: int) -> str:
    """The ``scores.jsonl`` id of response ``index`` (from 0) of a prompt."""
    return json.dumps([prompt_id, index])


class _LongRewardJob:
    """The stages' work functions over shared settings (see :func:`longreward_pipeline`)."""

    def __init__(self, policy: LLMClient, judge: LongRewardJudge, template: str, sampling: SamplingParams,
                 num_samples: int, seed: int) -> None:
        self.policy = policy
        self.judge = judge
        self.template = template
        self.sampling = sampling
        self.num_samples = num_samples
        self.seed = seed

    def responses(self, item: Item) -> dict[str, Any]:
        prompt = self.template.format(context=item.row["context"], query=item.row["query"])
        params = dataclasses.replace(self.sampling, seed=item_seed(self.seed, "responses", 0, item.id))
        texts = self.policy.complete_batch([_user(prompt)] * self.num_samples, params)
        return {"responses": texts, "seeds": [params.seed + k for k in range(self.num_samples)]}

    def relevant(self, item: Item) -> dict[str, Any]:
        information, retries = self.judge.relevant_information(item.row["context"], item.row["query"], item.id)
        return {"information": information, "retries": retries}

    def scores(self, item: Item) -> dict[str, Any]:
        row = item.row
        scored = self.judge.score(row["context"], row["query"], row["response"], information=row["information"],
                                  key=item.id)
        return {"prompt_id": row["prompt_id"], "index": row["index"], "response_sha": response_sha(row["response"]),
                **scored.as_row()}


def check_files(input: str | os.PathLike, output_dir: str | os.PathLike) -> list[Item]:  # noqa: A002
    """The prompts of ``input``, after checking every line and every stage file already in
    ``output_dir`` (so that a command line can refuse bad files before it loads a model).

    Raises:
      InputError: a malformed input line; OutputFileError: a stage file that is not the runner's.
    """
    prompts = read_items(input, validate_prompt)
    for stage in STAGES:
        finished_rows(Path(output_dir) / f"{stage}.jsonl")
    return prompts


def _score_items(prompts: Sequence[Item], responses: Mapping[ItemId, dict], relevant: Mapping[ItemId, dict]) -> list[Item]:
    """One item per response of every prompt whose responses and information are finished."""
    items = []
    for prompt in prompts:
        if prompt.id not in responses or prompt.id not in relevant:
            continue
        for index, response in enumerate(responses[prompt.id]["responses"]):
            items.append(Item(score_key(prompt.id, index), {
                **prompt.row, "prompt_id": prompt.id, "index": index, "response": response,
                "information": relevant[prompt.id]["information"]}, prompt.location))
    return items


def _pairs(prompts: Sequence[Item], responses: Mapping[ItemId, dict], scores: Mapping[ItemId, dict],
           files: Mapping[str, str]) -> tuple[list[dict[str, Any]], int, int, int]:
    """(pair rows, prompts fully scored, ties, identical) from the finished rows (module docstring).

    Raises:
      ValueError: a score row of another response text than ``responses.jsonl`` holds.
    """
    pairs, complete, ties, identical = [], 0, 0, 0
    for prompt in prompts:
        if prompt.id not in responses:
            continue
        texts = responses[prompt.id]["responses"]
        rows = [scores.get(score_key(prompt.id, k)) for k in range(len(texts))]
        if any(row is None for row in rows):
            continue
        for k, row in enumerate(rows):
            if row.get("response_sha") != response_sha(texts[k]):
                raise ValueError(f"{files['scores']}: the score of response {k} of id {prompt.id!r} is of another "
                                 f"text than {files['responses']} holds (was the responses stage rerun?); remove "
                                 "scores.jsonl to score them again")
        complete += 1
        rewards = [row["reward"] for row in rows]
        chosen = select_pair(rewards)
        if chosen is None:
            ties += 1
            continue
        win, lose = chosen
        if texts[win] == texts[lose]:
            identical += 1
            continue
        pairs.append({"id": prompt.id, "context": prompt.row["context"], "query": prompt.row["query"],
                      "win_response": texts[win], "lose_response": texts[lose],
                      "win_reward": rewards[win], "lose_reward": rewards[lose],
                      "win_scores": rows[win]["scores"], "lose_scores": rows[lose]["scores"], "rewards": rewards})
    return pairs, complete, ties, identical


@gin.configurable
def longreward_pipeline(
    input: str | os.PathLike,  # noqa: A002 - the documented name
    output_dir: str | os.PathLike,
    policy: LLMClient,
    judge: LLMClient,
    num_samples: int = 5,
    *,
    policy_template: str = LONG_REWARD_TEMPLATE,
    policy_temperature: float = 1.0,
    policy_top_p: float = 1.0,
    policy_max_tokens: int = 1024,
    helpfulness_prompt: str | None = None,
    logicality_prompt: str | None = None,
    statements_prompt: str | None = None,
    support_prompt: str | None = None,
    relevant_prompt: str | None = None,
    completeness_prompt: str | None = None,
    judge_tries: int = 3,
    judge_temperature: float = 0.0,
    retry_temperature: float = 1.0,
    judge_max_tokens: int = 1024,
    top_k_chunks: int = 5,
    chunk_tokens: int = 128,
    completeness_chunk_tokens: int = 4096,
    max_statements: int = 40,
    no_statement_score: float = 10.0,
    tokenizer: Any | None = None,
    retriever_factory: RetrieverFactory = BM25Retriever,
    seed: int = 0,
    concurrency: int = 4,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs LongReward (module docstring) on the prompts of ``input``.

    Args:
      input: JSONL of ``{"id"?, "context": str, "query": str}`` (an id is derived from the line
        when missing: ``glmjax.pipelines.runner``).
      output_dir: where the stage files and ``pairs.jsonl`` go (created).
      policy: samples the responses; judge: scores them (may be the same client).
      num_samples: responses per prompt (the paper samples at least 5; >= 2).
      policy_template: the policy's user turn, a ``str.format`` template of ``{context}`` and
        ``{query}`` (keep it equal to ``pair_data.prompt_template``).
      policy_temperature, policy_top_p, policy_max_tokens: the policy's sampling.
      helpfulness_prompt, logicality_prompt, statements_prompt, support_prompt, relevant_prompt,
        completeness_prompt: judge prompt files (placeholders :data:`PROMPT_FIELDS`); None uses
        the package's ``longreward_<name>.txt``.
      judge_tries, judge_temperature, retry_temperature, judge_max_tokens, top_k_chunks,
        chunk_tokens, completeness_chunk_tokens, max_statements, no_statement_score, tokenizer,
        retriever_factory: :class:`LongRewardJudge`'s.
      seed: base of every call's seed.
      concurrency: items worked on at once per stage.
      stages: the stages to run this time (a subset of :data:`STAGES`); the others' files are read.
      progress: progress bars on stderr.

    Returns:
      ``{"stages": {name: StageResult.as_dict()}, "prompts", "scored_prompts" (every response
      scored), "pairs", "ties", "identical", "mean_reward" (over the scored responses, None
      without any), "unfinished" (prompts not fully scored), "failed" (item failures this run),
      "files": {name: path}}``.

    Raises:
      InputError: a malformed input line (``file:line: problem``), before any call.
      OutputFileError: a stage file that is not the runner's or is being written elsewhere.
      PromptError: a prompt file without the right placeholders.
      ValueError: bad knobs, or scores of other responses than ``responses.jsonl`` holds.
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a pair needs two responses), got {num_samples}")
    try:
        policy_template.format(context="", query="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"policy_template must be a format string of {{context}} and {{query}}: {err!r}") from None
    prompts = load_prompts({"helpfulness": helpfulness_prompt, "logicality": logicality_prompt,
                            "statements": statements_prompt, "support": support_prompt,
                            "relevant": relevant_prompt, "completeness": completeness_prompt})
    scorer = LongRewardJudge(judge, prompts=prompts, tries=judge_tries, judge_temperature=judge_temperature,
                             retry_temperature=retry_temperature, max_tokens=judge_max_tokens,
                             top_k_chunks=top_k_chunks, chunk_tokens=chunk_tokens,
                             completeness_chunk_tokens=completeness_chunk_tokens, max_statements=max_statements,
                             no_statement_score=no_statement_score, tokenizer=tokenizer,
                             retriever_factory=retriever_factory, seed=seed)
    sampling = SamplingParams(max_tokens=policy_max_tokens, temperature=policy_temperature, top_p=policy_top_p)
    items = check_files(input, output_dir)
    job = _LongRewardJob(policy, scorer, policy_template, sampling, num_samples, seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {stage: str(out / f"{stage}.jsonl") for stage in STAGES}
    results = {}
    for stage in ("responses", "relevant"):
        if stage in stages:
            results[stage] = run_stage(stage, items, getattr(job, stage), files[stage], concurrency=concurrency,
                                       progress=progress).as_dict()
    responses, relevant = finished_rows(files["responses"]), finished_rows(files["relevant"])
    if "scores" in stages:
        results["scores"] = run_stage("scores", _score_items(items, responses, relevant), job.scores,
                                      files["scores"], concurrency=concurrency, progress=progress).as_dict()
    scores = finished_rows(files["scores"])
    pairs, complete, ties, identical = _pairs(items, responses, scores, files)
    files["pairs"] = str(out / "pairs.jsonl")
    write_jsonl_atomic(files["pairs"], pairs)
    rewards = [row["reward"] for row in scores.values()]
    return {"stages": results, "prompts": len(items), "scored_prompts": complete, "pairs": len(pairs),
            "ties": ties, "identical": identical,
            "mean_reward": math.fsum(rewards) / len(rewards) if rewards else None,
            "unfinished": len(items) - complete,
            "failed": sum(result["failed"] for result in results.values()), "files": files}
