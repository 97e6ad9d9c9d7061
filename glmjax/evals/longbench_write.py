"""LongBench-Write scoring: output length against the required length, and a judge's quality score.

LongBench-Write (LongWriter, arXiv 2408.07055) asks for writing of a required length (100 to 20,000
words) and scores each response twice, each on 0-100:

* **Length** ``S_l`` (:func:`length_score`): the produced length ``y`` (:func:`count_words`) against
  the required ``x``: ``100 * max(0, 1 - (y/x - 1)/3)`` when ``y > x``, else
  ``100 * max(0, 1 - (x/y - 1)/2)`` (100 on the mark; 0 beyond 4x or below x/3, and for an empty
  output).
* **Quality** ``S_q`` (:func:`judge_quality`): an LLM judge scores six dimensions (:data:`DIMENSIONS`)
  1-5, told to ignore length; each dimension maps to ``(score - 1) * 25`` and ``S_q`` is their mean.
  A malformed or incomplete judge reply is asked again (5 tries in all, as the official scorer); a
  dimension still missing after the last try counts as the middle score 3 and is reported.

An item's overall score is ``(S_l + S_q) / 2``; :func:`summarize` gives the means overall, by
required-length bucket (:data:`LENGTH_BUCKETS`) and by ``type``, and :func:`render_markdown` a table.
Because every mapping is linear, the mean of per-item scores equals the official scorer's score of
the mean (it averages the raw 1-5 scores per dimension first).

The prompts come from the official JSONL (``prompt``, ``type``, ``length``) at a path the user
gives (:func:`load_prompts`); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from glmjax.inference.llm_client import LLMClient, SamplingParams, item_sampling

DIMENSIONS = ("relevance", "accuracy", "coherence", "clarity", "breadth_and_depth", "reading_experience")
"""The judged dimensions, as keys of every scores dict (the judge's JSON names them in words)."""

DIMENSION_TITLES = {
    "relevance": "Relevance",
    "accuracy": "Accuracy",
    "coherence": "Coherence",
    "clarity": "Clarity",
    "breadth_and_depth": "Breadth and Depth",
    "reading_experience": "Reading Experience",
}
"""The key the judge is asked to use for each dimension."""

MIN_SCORE, MAX_SCORE, MIDDLE_SCORE = 1.0, 5.0, 3.0
"""The judge's scale; a dimension the judge never scored counts as ``MIDDLE_SCORE``."""

LENGTH_BUCKETS = (("[0, 500)", 0, 500), ("[500, 2k)", 500, 2000), ("[2k, 4k)", 2000, 4000),
                  ("[4k, 20k]", 4000, 20001))
"""(label, low, high): required lengths ``low <= x < high`` (words); the last bucket includes 20,000."""

OVER_20K = "(20k, inf)"
"""The bucket of required lengths above the benchmark's 20,000 (e.g. LongWrite-Ruler's 30,000); it
appears in a summary only when a row falls in it."""

PROMPT_FIELDS = ("prompt", "type", "length")

DEFAULT_JUDGE_SAMPLING = SamplingParams(max_tokens=1024, temperature=0.5)
"""The official scorer's judge temperature (0.5); 1,024 tokens leave room for the analysis."""

JUDGE_TEMPLATE = """\
You are an expert reviewer of long-form writing. Below is a writing instruction given to an AI \
assistant and the assistant's response. Rate the response on six dimensions, each with an integer \
from 1 (very poor) to 5 (excellent):

- Relevance: does the response address the instruction and stay on its topic and requirements?
- Accuracy: are its facts, reasoning and details correct, with nothing fabricated or contradictory?
- Coherence: is it logically organized, with ideas that follow from one another and no repetition?
- Clarity: is the language clear, precise and easy to follow?
- Breadth and Depth: does it cover the subject broadly and treat its points with insight and detail?
- Reading Experience: is it engaging and pleasant to read, in a style that suits the task?

Do not let the length of the response affect any score: a long response is not better for being \
long, nor a short one worse for being short. Judge only what is written.

Answer with one JSON object and nothing else, in this form:
{"Analysis": "<a few sentences on the strengths and weaknesses>", "Relevance": <1-5>, \
"Accuracy": <1-5>, "Coherence": <1-5>, "Clarity": <1-5>, "Breadth and Depth": <1-5>, \
"Reading Experience": <1-5>}

[Instruction begins]
{{instruction}}
[Instruction ends]

[Response begins]
{{response}}
[Response ends]
"""
"""The judge prompt (ours): ``{{instruction}}`` and ``{{response}}`` are filled in one pass."""

_CJK_CHAR = re.compile(r"[\u4e00-\u9fff]")
_ENGLISH_WORD = re.compile(r"\b[a-zA-Z]+\b")
_PLACEHOLDER = re.compile(r"\{\{(instruction|response)\}\}")
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


class LongBenchWriteError(ValueError):
    """Bad LongBench-Write input: a prompts file line (``file:line: field: problem``), a score row,
    a judge template or an argument out of range."""


# ---------------------------------------------------------------------------------------- length


def count_words(text: str) -> int:
    """The official length of ``text``: CJK ideographs (U+4E00-U+9FFF, one each) plus English words.

    An English word is a match of ``\\b[a-zA-Z]+\\b`` under Python's Unicode word boundaries, as in
    the official ``eval_length.py``: letters directly joined to digits, underscores or other word
    characters (``abc123``, ``hello世界``, ``café``) form no English word; an apostrophe splits
    (``don't`` is 2); digits and punctuation never count.
    """
    return len(_CJK_CHAR.findall(text)) + len(_ENGLISH_WORD.findall(text))


def length_score(required: int, produced: int) -> float:
    """``S_l`` in [0, 100] of an output of ``produced`` words where ``required`` were asked for.

    ``100 * max(0, 1 - (y/x - 1)/3)`` when ``y > x`` (0 from 4x), else
    ``100 * max(0, 1 - (x/y - 1)/2)`` (0 at or below x/3); 0 for an empty output (``y == 0``).

    Raises:
      LongBenchWriteError: ``required`` is not positive or ``produced`` is negative.
    """
    if required <= 0:
        raise LongBenchWriteError(f"required length must be > 0 words, got {required}")
    if produced < 0:
        raise LongBenchWriteError(f"produced length must be >= 0 words, got {produced}")
    if produced == 0:
        return 0.0
    x, y = float(required), float(produced)
    if y > x:
        return 100.0 * max(0.0, 1.0 - (y / x - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (x / y - 1.0) / 2.0)


# --------------------------------------------------------------------------------------- quality


def _dimension_of_key(key: str) -> str | None:
    """The dimension a judge's JSON key names ("Breadth and Depth", "breadth_&_depth", ...)."""
    normal = re.sub(r"[^a-z]", "", key.lower().replace("&", "and"))
    for dimension in DIMENSIONS:
        if normal == dimension.replace("_", ""):
            return dimension
    return None


def _score_value(value: Any) -> float | None:
    """A 1-5 score from a JSON value (a number or a string holding exactly one number), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) and MIN_SCORE <= number <= MAX_SCORE else None


def _json_objects(reply: str) -> Iterable[dict]:
    """Every JSON object the reply holds: fenced blocks first, then the whole reply, then each
    object starting at a ``{`` of the text (newlines inside strings are tolerated)."""
    decoder = json.JSONDecoder(strict=False)
    candidates = [match.group(1) for match in _FENCE.finditer(reply)] + [reply]
    for candidate in candidates:
        try:
            value = decoder.decode(candidate.strip())
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value
    for start in (match.start() for match in re.finditer(r"\{", reply)):
        try:
            value, _ = decoder.raw_decode(reply, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def _parse(reply: str) -> tuple[dict[str, float], list[str]]:
    """(valid scores, problems) of the first JSON object in ``reply`` that names any dimension.

    Raises:
      LongBenchWriteError: no JSON object naming a dimension is found.
    """
    for obj in _json_objects(reply):
        scores: dict[str, float] = {}
        rejected: dict[str, str] = {}
        for key, value in obj.items():
            dimension = _dimension_of_key(str(key))
            if dimension is None or dimension in scores:
                continue
            score = _score_value(value)
            if score is None:
                rejected[dimension] = f"{value!r} is not a score in {MIN_SCORE:g}-{MAX_SCORE:g}"
            else:
                scores[dimension] = score
                rejected.pop(dimension, None)
        if scores or rejected:
            problems = [f"{DIMENSION_TITLES[d]}: {rejected.get(d, 'missing')}" for d in DIMENSIONS
                        if d not in scores]
            return scores, problems
    excerpt = reply if len(reply) <= 200 else reply[:200] + "..."
    raise LongBenchWriteError(f"judge reply holds no JSON object with a score dimension: {excerpt!r}")


def parse_quality_scores(reply: str) -> dict[str, float]:
    """The 1-5 scores a judge reply gives, by dimension (keys of :data:`DIMENSIONS`).

    The reply's JSON object may sit in a Markdown code fence or among other text; keys are matched
    ignoring case, spaces, ``_`` and ``&``/``and``; a value may be a number or a string holding one.
    A dimension whose value is not a number in 1-5 is left out (like a missing one).

    Raises:
      LongBenchWriteError: the reply holds no JSON object that names any dimension.
    """
    return _parse(reply)[0]


@dataclasses.dataclass(frozen=True)
class QualityJudgement:
    """The judge's verdict on one response.

    Attributes:
      scores: the 1-5 score of every dimension (:data:`DIMENSIONS`), ``MIDDLE_SCORE`` for a missing one.
      missing: dimensions no try scored (counted as ``MIDDLE_SCORE``), in :data:`DIMENSIONS` order.
      tries: judge calls made (1 to ``tries``).
      problems: why each rejected try was rejected, ``"try N: ..."``.
      reply: the judge reply the scores come from (the last one when none could be used).
    """

    scores: dict[str, float]
    missing: list[str]
    tries: int
    problems: list[str]
    reply: str

    @property
    def dimension_scores(self) -> dict[str, float]:
        """Each dimension on 0-100: ``(score - 1) * 25``."""
        return {d: (self.scores[d] - MIN_SCORE) * 25.0 for d in DIMENSIONS}

    @property
    def s_q(self) -> float:
        """``S_q``: the mean of the six 0-100 dimension scores."""
        return sum(self.dimension_scores.values()) / len(DIMENSIONS)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with ``s_q`` and the 0-100 ``dimension_scores`` added."""
        return {"scores": dict(self.scores), "dimension_scores": self.dimension_scores, "s_q": self.s_q,
                "missing": list(self.missing), "tries": self.tries, "problems": list(self.problems),
                "reply": self.reply}


def judge_prompt(instruction: str, response: str, template: str = JUDGE_TEMPLATE) -> str:
    """``template`` with ``{{instruction}}`` and ``{{response}}`` filled in one pass (a placeholder
    inside the filled text is left alone).

    Raises:
      LongBenchWriteError: the template lacks one of the placeholders.
    """
    found = set(_PLACEHOLDER.findall(template))
    if found != {"instruction", "response"}:
        raise LongBenchWriteError("the judge template must contain {{instruction}} and {{response}}; "
                                  f"found {sorted(found)}")
    values = {"instruction": instruction, "response": response}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def judge_quality(
    client: LLMClient,
    instruction: str,
    response: str,
    *,
    tries: int = 5,
    sampling: SamplingParams | None = None,
    template: str = JUDGE_TEMPLATE,
) -> QualityJudgement:
    """Asks ``client`` to judge ``response`` to ``instruction`` on the six dimensions.

    A reply that holds no usable JSON, or that misses or mis-scores a dimension, is asked again, up
    to ``tries`` calls in all; try ``n`` (0-based) samples with ``sampling.seed + n`` when a seed is
    set, so that a seeded judge does not repeat its reply. When no try scores all six, the try that
    scored the most is used and its missing dimensions count as ``MIDDLE_SCORE`` (listed in
    ``missing``; all six when no reply could be parsed).

    Args:
      client: the judge (any :class:`LLMClient`).
      instruction: the writing prompt.
      response: the text to judge.
      tries: judge calls at most (>= 1).
      sampling: judge sampling (default :data:`DEFAULT_JUDGE_SAMPLING`).
      template: the judge prompt (:func:`judge_prompt`).

    Raises:
      LongBenchWriteError: ``tries < 1`` or a bad template.
      LLMClientError: the judge could not be reached (the client's own retries spent); that is an
        item failure to record, not a score.
    """
    if tries < 1:
        raise LongBenchWriteError(f"tries must be >= 1, got {tries}")
    sampling = sampling or DEFAULT_JUDGE_SAMPLING
    messages = [{"role": "user", "content": judge_prompt(instruction, response, template)}]
    best: dict[str, float] = {}
    best_reply = ""
    problems: list[str] = []
    reply = ""
    for attempt in range(tries):
        reply = client.complete(messages, item_sampling(sampling, attempt))
        try:
            scores, reasons = _parse(reply)
        except LongBenchWriteError as err:
            problems.append(f"try {attempt + 1}: {err}")
            continue
        if len(scores) > len(best) or not best_reply:
            best, best_reply = scores, reply
        if not reasons:
            return QualityJudgement(dict(scores), [], attempt + 1, problems, reply)
        problems.append(f"try {attempt + 1}: " + "; ".join(reasons))
    missing = [d for d in DIMENSIONS if d not in best]
    scores = {d: best.get(d, MIDDLE_SCORE) for d in DIMENSIONS}
    return QualityJudgement(scores, missing, tries, problems, best_reply or reply)


# ---------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class WritePrompt:
    """One LongBench-Write item.

    Attributes:
      prompt: the writing instruction.
      type: its category (e.g. "Academic and Monograph").
      length: the required length in words (:func:`count_words` units), > 0.
      location: ``"file:line"`` it was read from.
    """

    prompt: str
    type: str
    length: int
    location: str


def load_prompts(path: str | os.PathLike) -> list[WritePrompt]:
    """The items of a LongBench-Write JSONL file (official: ``longbench_write.jsonl``, 120 items),
    in file order; blank lines are skipped, other fields ignored.

    Raises:
      LongBenchWriteError: ``file:line: problem`` for the first bad line (not UTF-8, not a JSON
        object, a missing field, ``prompt``/``type`` not a non-empty string, ``length`` not a
        positive int), or ``file: ...`` when the file cannot be read or holds no item.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise LongBenchWriteError(f"{source}: cannot read the prompts file ({err.strerror})") from None
    items: list[WritePrompt] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{source}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LongBenchWriteError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise LongBenchWriteError(f"{where}: malformed JSON ({err})") from None
        if not isinstance(obj, dict):
            raise LongBenchWriteError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for field in PROMPT_FIELDS:
            if field not in obj:
                raise LongBenchWriteError(f"{where}: missing field {field!r}")
        for field in ("prompt", "type"):
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise LongBenchWriteError(f"{where}: field {field!r} must be a non-empty string, "
                                          f"got {obj[field]!r}")
        length = obj["length"]
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise LongBenchWriteError(f"{where}: field 'length' must be a positive int (words), "
                                      f"got {length!r}")
        items.append(WritePrompt(obj["prompt"], obj["type"], length, where))
    if not items:
        raise LongBenchWriteError(f"{source}: no items")
    return items


# --------------------------------------------------------------------------------------- results


def score_item(item: WritePrompt, response: str, judgement: QualityJudgement) -> dict[str, Any]:
    """One result row: the item, the response's length and ``s_l``, the judgement and ``s_q``, and
    ``overall = (s_l + s_q) / 2`` (what :func:`summarize` reads)."""
    words = count_words(response)
    s_l = length_score(item.length, words)
    return {"prompt": item.prompt, "type": item.type, "length": item.length, "response": response,
            "words": words, "s_l": s_l, **judgement.to_json(), "overall": (s_l + judgement.s_q) / 2}


def length_bucket(required: int) -> str:
    """The label of the :data:`LENGTH_BUCKETS` bucket of a required length (``OVER_20K`` above
    20,000).

    Raises:
      LongBenchWriteError: ``required`` is not positive.
    """
    if required <= 0:
        raise LongBenchWriteError(f"required length must be > 0 words, got {required}")
    for label, low, high in LENGTH_BUCKETS:
        if low <= required < high:
            return label
    return OVER_20K


def _group(rows: Sequence[tuple[float, float, bool]]) -> dict[str, Any]:
    """Means of (s_l, s_q) and of their average over ``rows``; None for an empty group."""
    count = len(rows)
    if not count:
        return {"s_l": None, "s_q": None, "overall": None, "count": 0, "with_missing": 0}
    s_l = sum(row[0] for row in rows) / count
    s_q = sum(row[1] for row in rows) / count
    return {"s_l": s_l, "s_q": s_q, "overall": (s_l + s_q) / 2, "count": count,
            "with_missing": sum(row[2] for row in rows)}


def _number(row: Mapping[str, Any], field: str, index: int) -> float:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise LongBenchWriteError(f"row {index}: field {field!r} must be a score in 0-100, got {value!r}")
    return float(value)


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Benchmark results from per-item rows (as :func:`score_item` makes them).

    Each row needs ``length`` (int, required words), ``type`` (str), ``s_l`` and ``s_q`` (0-100); a
    non-empty ``missing`` list marks a judgement with unscored dimensions.

    Returns:
      ``{"overall": G, "by_length": {bucket: G}, "by_type": {type: G}}``, each group
      ``G = {"s_l", "s_q", "overall", "count", "with_missing"}`` (means; None for an empty group).
      ``by_length`` lists the four :data:`LENGTH_BUCKETS` (``OVER_20K`` too when a row is in it),
      ``by_type`` the types in name order.

    Raises:
      LongBenchWriteError: a row without a valid field, named by its index.
    """
    everything: list[tuple[float, float, bool]] = []
    by_length: dict[str, list] = {label: [] for label, _, _ in LENGTH_BUCKETS}
    by_type: dict[str, list] = {}
    for index, row in enumerate(rows):
        length, kind = row.get("length"), row.get("type")
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise LongBenchWriteError(f"row {index}: field 'length' must be a positive int, got {length!r}")
        if not isinstance(kind, str):
            raise LongBenchWriteError(f"row {index}: field 'type' must be a string, got {kind!r}")
        entry = (_number(row, "s_l", index), _number(row, "s_q", index), bool(row.get("missing")))
        everything.append(entry)
        by_length.setdefault(length_bucket(length), []).append(entry)
        by_type.setdefault(kind, []).append(entry)
    return {"overall": _group(everything),
            "by_length": {label: _group(group) for label, group in by_length.items()},
            "by_type": {kind: _group(by_type[kind]) for kind in sorted(by_type)}}


def render_markdown(summary: Mapping[str, Any]) -> str:
    """A Markdown table of a :func:`summarize` result: one line overall, per length bucket and per
    type, with the count, ``S_l``, ``S_q`` and ``S`` (one decimal; "-" for an empty group) and the
    judgements with a missing dimension."""
    lines = ["| Group | Count | S_l | S_q | S | Missing dims |", "|---|---:|---:|---:|---:|---:|"]

    def line(name: str, group: Mapping[str, Any]) -> str:
        cells = ["-" if group[key] is None else f"{group[key]:.1f}" for key in ("s_l", "s_q", "overall")]
        return f"| {name} | {group['count']} | " + " | ".join(cells) + f" | {group['with_missing']} |"

    lines.append(line("Overall", summary["overall"]))
    lines += [line(f"Length {label}", group) for label, group in summary["by_length"].items()]
    lines += [line(kind.replace("|", "\\|"), group) for kind, group in summary["by_type"].items()]
    return "\n".join(lines) + "\n"
