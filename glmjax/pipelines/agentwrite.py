"""AgentWrite (LongWriter, Bai et al., 2024): long responses written paragraph by paragraph from a plan.

An off-the-shelf LLM writes outputs far longer than it can in one reply by planning first and then
writing each planned paragraph in turn. Two resumable stages, each with its own append-only file
under ``output_dir`` (rows keyed by instruction id; :mod:`glmjax.pipelines.runner`):

1. ``plans.jsonl``: the planner breaks the instruction into paragraphs, one line each,
   ``Paragraph N - Main Point: ... - Word Count: ...`` (:func:`parse_plan` reads the reply
   tolerantly). Row: ``{"id", "instruction", "steps": [{"main_point", "words"}, ...], "plan":
   the reply}``. A plan of more than ``max_steps`` paragraphs is skipped (as the paper does with
   more than 50): row ``{"id", "instruction", "skipped": reason, "plan"}``, finished and not
   retried. A reply that is not a plan (no paragraph line, a line without a main point or word
   count, paragraphs out of order, a word count outside ``[min_words, max_words]``) is the item's
   error (``plans.errors.jsonl``, with the reason) and is retried by the next run.
2. ``writes.jsonl``: for every planned (not skipped) instruction, the writer writes the
   paragraphs in order; the prompt of paragraph ``k`` holds the instruction, the whole plan
   (:func:`format_plan`) and paragraphs ``1..k-1`` joined by blank lines. Row: ``{"id",
   "paragraphs": [str, ...], "words": count_words(response), "plan_sha"}`` (``plan_sha`` ties
   the paragraphs to the plan they follow). Each paragraph is also appended to
   ``paragraphs.jsonl`` as it is written, so an item whose later paragraph fails resumes after
   its last written one on the next run (rows ``{"id": "[item id, plan_sha, k]", "paragraph"}``;
   the file keeps only unfinished items' paragraphs after each run).

Then, from ``writes.jsonl`` in input order, every run rewrites (atomically) ``sft.jsonl``:
``{"id", "messages": [{"role": "user", "content": instruction}, {"role": "assistant",
"content": response}]}`` with the response the paragraphs joined by ``"\\n\\n"``;
``lm_data(data_format="chat")`` trains on it as is.

A later stage only sees items the earlier one finished; removing ``writes.jsonl`` reruns the
write stage alone on the kept plans. Prompts are ours, package files
``glmjax/pipelines/prompts/agentwrite_{plan,write}.txt`` with ``{{name}}`` placeholders; either
can be replaced by a file with the same placeholders (gin:
``agentwrite_pipeline.write_prompt = "/path/to/prompt.txt"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import threading

import gin

from glmjax.evals.longbench_write import count_words
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.pipelines.runner import (
    Item,
    ItemId,
    JsonlAppender,
    finished_rows,
    read_items,
    run_stage,
    write_jsonl_atomic,
)
from glmjax.pipelines.t1_cot import item_seed, load_prompt, render

STAGES = ("plans", "writes")
"""The stages, in order; each writes ``output_dir/<stage>.jsonl``."""

PLAN_FIELDS = ("instruction",)
WRITE_FIELDS = ("instruction", "plan", "text", "step")


class PlanError(ValueError):
    """A planner reply that is not a usable plan (the message says which line and why)."""


class PlanTooLong(PlanError):
    """A plan of more paragraphs than allowed (skipped, not retried)."""


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One planned paragraph: what it covers and how many words it should have."""

    main_point: str
    words: int

    def line(self, number: int) -> str:
        """The step as the write prompt shows it (``number`` counts from 1)."""
        return f"Paragraph {number} - Main Point: {self.main_point} - Word Count: {self.words} words"


_MARKUP = re.compile(r"[*#`]+")
_STEP_START = re.compile(r"^\s*(?:[-+•]\s*|\d+[.)]\s*)?(?:paragraph|section|part)\s*(\d+)\b\s*[-–—:.)]*\s*(.*)$",
                         re.IGNORECASE)
_MAIN_POINT = re.compile(r"^main\s*point\s*[:：]\s*(.*?)\s*[-–—,;|]*\s*word\s*count\s*[:：]\s*(.*)$",
                         re.IGNORECASE)
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")


def _word_count(field: str) -> int | None:
    """The word count of a ``Word Count:`` field (``400 words``, ``[e.g., 1,200 words]``, ``about
    500``); a range ``400-600`` gives its middle; None without a number."""
    numbers = [int(n.replace(",", "")) for n in _NUMBER.findall(field)]
    if not numbers:
        return None
    if len(numbers) >= 2 and re.search(r"\d\s*(?:-|–|—|to)\s*\d", field):
        return (numbers[0] + numbers[1]) // 2
    return numbers[0]


def parse_plan(text: str, *, min_words: int = 200, max_words: int = 1000,
               max_steps: int | None = None) -> list[PlanStep]:
    """The paragraphs of a planner reply.

    A step is a line starting ``Paragraph N`` (also ``Section N``/``Part N``, after a bullet or
    list number, markdown emphasis ignored) followed by ``Main Point: ...`` and ``Word Count:
    ...``, the separators between them any dashes or punctuation. Other lines (a title, a
    preamble) are ignored.

    Args:
      text: the reply.
      min_words, max_words: the allowed word count of a paragraph (inclusive).
      max_steps: when given, a plan with more steps raises :class:`PlanTooLong` before the word
        counts are checked.

    Raises:
      PlanTooLong: more than ``max_steps`` steps.
      PlanError: no step line; a step line without a main point or a word count; steps not
        numbered 1, 2, ...; a word count outside ``[min_words, max_words]``.
    """
    found: list[tuple[int, int, str, str]] = []  # (line number, paragraph number, main point, count field)
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = _MARKUP.sub("", raw).strip()
        start = _STEP_START.match(line)
        if start is None:
            continue
        fields = _MAIN_POINT.match(start.group(2).strip())
        if fields is None:
            raise PlanError(f"plan line {line_number} ({line[:80]!r}): expected "
                            "'Main Point: ... - Word Count: ...' after the paragraph number")
        main_point = fields.group(1).strip()
        if main_point.startswith("[") and main_point.endswith("]"):  # the template's brackets, filled in
            main_point = main_point[1:-1].strip()
        if not main_point:
            raise PlanError(f"plan line {line_number}: empty main point")
        found.append((line_number, int(start.group(1)), main_point, fields.group(2)))
    if not found:
        raise PlanError("no 'Paragraph N - Main Point: ... - Word Count: ...' line in the plan")
    if max_steps is not None and len(found) > max_steps:
        raise PlanTooLong(f"the plan has {len(found)} paragraphs, more than max_steps={max_steps}")
    steps = []
    for expected, (line_number, number, main_point, count_field) in enumerate(found, start=1):
        if number != expected:
            raise PlanError(f"plan line {line_number}: paragraph {number} where paragraph {expected} was expected")
        words = _word_count(count_field)
        if words is None:
            raise PlanError(f"plan line {line_number}: no number in the word count {count_field.strip()!r}")
        if not min_words <= words <= max_words:
            raise PlanError(f"plan line {line_number}: word count {words} outside [{min_words}, {max_words}]")
        steps.append(PlanStep(main_point, words))
    return steps


def format_plan(steps: Sequence[PlanStep]) -> str:
    """The plan as the write prompt shows it: one :meth:`PlanStep.line` per step."""
    return "\n".join(step.line(number) for number, step in enumerate(steps, start=1))


def plan_sha(steps: Sequence[Mapping[str, Any]]) -> str:
    """A digest of a plan's steps: ties a writes row to the plan it follows."""
    return hashlib.sha256(json.dumps([[s["main_point"], s["words"]] for s in steps]).encode("utf-8")).hexdigest()[:16]


def join_paragraphs(paragraphs: Sequence[str]) -> str:
    """The response: the paragraphs, stripped, joined by blank lines."""
    return "\n\n".join(paragraph.strip() for paragraph in paragraphs)


def validate_instruction(row: dict[str, Any]) -> None:
    """Checks an input row ``{"id"?, "instruction": str}``.

    Raises:
      ValueError: naming the missing or malformed field.
    """
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("field 'instruction' must be a non-empty string")


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


class _AgentWriteJob:
    """The two stages' work functions over shared settings (see :func:`agentwrite_pipeline`)."""

    def __init__(self, planner: LLMClient, writer: LLMClient, prompts: Mapping[str, str],
                 sampling: Mapping[str, SamplingParams], min_words: int, max_words: int, max_steps: int,
                 seed: int) -> None:
        self.planner = planner
        self.writer = writer
        self.prompts = prompts
        self.sampling = sampling
        self.min_words = min_words
        self.max_words = max_words
        self.max_steps = max_steps
        self.seed = seed
        self.cache: JsonlAppender | None = None  # paragraphs.jsonl while the write stage runs
        self._cache_lock = threading.Lock()

    def _params(self, stage: str, index: int, item: Item) -> SamplingParams:
        return dataclasses.replace(self.sampling[stage], seed=item_seed(self.seed, stage, index, item.id))

    def plans(self, item: Item) -> dict[str, Any]:
        instruction = item.row["instruction"]
        reply = self.planner.complete(_user(render(self.prompts["plans"], instruction=instruction)),
                                      self._params("plans", 0, item))
        try:
            steps = parse_plan(reply, min_words=self.min_words, max_words=self.max_words,
                               max_steps=self.max_steps)
        except PlanTooLong as err:
            return {"instruction": instruction, "skipped": str(err), "plan": reply}
        return {"instruction": instruction, "steps": [dataclasses.asdict(step) for step in steps], "plan": reply}

    def writes(self, item: Item) -> dict[str, Any]:
        instruction = item.row["instruction"]
        steps = [PlanStep(s["main_point"], s["words"]) for s in item.row["steps"]]
        plan, sha = format_plan(steps), plan_sha(item.row["steps"])
        paragraphs: list[str] = []
        for index, step in enumerate(steps):
            key = paragraph_key(item.id, sha, index)
            cached = self.cache.rows.get(key) if self.cache is not None else None
            if cached is not None:
                paragraphs.append(cached["paragraph"])
                continue
            prompt = render(self.prompts["writes"], instruction=instruction, plan=plan,
                            text=join_paragraphs(paragraphs), step=step.line(index + 1))
            paragraph = self.writer.complete(_user(prompt), self._params("writes", index, item)).strip()
            if not paragraph:
                raise ValueError(f"the writer returned an empty paragraph {index + 1} of {len(steps)}")
            paragraphs.append(paragraph)
            if self.cache is not None:
                with self._cache_lock:
                    self.cache.append({"id": key, "paragraph": paragraph})
        return {"paragraphs": paragraphs, "words": count_words(join_paragraphs(paragraphs)), "plan_sha": sha}


def paragraph_key(item_id: ItemId, sha: str, index: int) -> str:
    """The ``paragraphs.jsonl`` id of paragraph ``index`` (from 0) of an item following plan ``sha``."""
    return json.dumps([item_id, sha, index])


def _write_items(instructions: Sequence[Item], plans: Mapping[ItemId, dict]) -> list[Item]:
    """The items the write stage can work on: instructions with a finished, not skipped plan."""
    items = []
    for instruction in instructions:
        plan = plans.get(instruction.id)
        if plan is None or "skipped" in plan:
            continue
        items.append(Item(instruction.id, {**instruction.row, "steps": plan["steps"]}, instruction.location))
    return items


def check_files(input: str | os.PathLike, output_dir: str | os.PathLike) -> list[Item]:  # noqa: A002
    """The instructions of ``input``, after checking every line and every stage file already in
    ``output_dir`` (so that a command line can refuse bad files before it loads a model).

    Raises:
      InputError: a malformed input line; OutputFileError: a stage file that is not the runner's.
    """
    instructions = read_items(input, validate_instruction)
    for name in (*STAGES, "paragraphs"):
        finished_rows(Path(output_dir) / f"{name}.jsonl")
    return instructions


@gin.configurable
def agentwrite_pipeline(
    input: str | os.PathLike,  # noqa: A002 - the documented name
    output_dir: str | os.PathLike,
    planner: LLMClient,
    writer: LLMClient,
    *,
    concurrency: int = 4,
    max_steps: int = 50,
    min_words: int = 200,
    max_words: int = 1000,
    plan_prompt: str | None = None,
    write_prompt: str | None = None,
    planner_temperature: float = 1.0,
    planner_max_tokens: int = 4096,
    writer_temperature: float = 1.0,
    writer_max_tokens: int = 4096,
    seed: int = 0,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs AgentWrite (module docstring) on the instructions of ``input``.

    Args:
      input: JSONL of ``{"id"?, "instruction": str}`` (an id is derived from the line when
        missing: ``glmjax.pipelines.runner``).
      output_dir: where ``plans.jsonl``, ``writes.jsonl``, ``paragraphs.jsonl`` and ``sft.jsonl``
        go (created).
      planner: writes the plans; writer: writes the paragraphs (may be the same client).
      concurrency: instructions worked on at once per stage (each instruction's paragraphs are
        written one after another: each needs the ones before it).
      max_steps: plans with more paragraphs are skipped (the paper: 50).
      min_words, max_words: the word count each planned paragraph must have (the paper: 200-1000).
      plan_prompt, write_prompt: prompt files (placeholders ``{{instruction}}``; ``{{instruction}}
        {{plan}} {{text}} {{step}}``); None uses ``agentwrite_plan.txt``, ``agentwrite_write.txt``.
      planner_temperature, writer_temperature: sampling temperatures (the paper: GPT-4o at 1.0).
      planner_max_tokens, writer_max_tokens: generation budget of one call (tokens).
      seed: base of every call's seed (paragraph ``k`` of item ``id``: ``item_seed(seed,
        "writes", k, id)``).
      stages: the stages to run this time (a subset of :data:`STAGES`); the others' files are read.
      progress: progress bars on stderr.

    Returns:
      ``{"stages": {name: StageResult.as_dict()}, "instructions", "planned", "skipped",
      "sft_records", "words" (total words of the SFT responses), "unfinished" (instructions
      neither written nor skipped), "failed" (item failures this run), "files": {name: path}}``.

    Raises:
      InputError: a malformed input line (``file:line: problem``), before any call.
      OutputFileError: a stage file that is not the runner's or is being written elsewhere.
      PromptError: a prompt file without the right placeholders.
      ValueError: bad knobs, or writes that follow another plan than ``plans.jsonl`` holds.
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}")
    if max_steps < 1 or not 1 <= min_words <= max_words:
        raise ValueError(f"need max_steps >= 1 and 1 <= min_words <= max_words, got {max_steps}, "
                         f"{min_words}, {max_words}")
    prompts = {"plans": load_prompt(plan_prompt, "agentwrite_plan.txt", PLAN_FIELDS),
               "writes": load_prompt(write_prompt, "agentwrite_write.txt", WRITE_FIELDS)}
    sampling = {"plans": SamplingParams(max_tokens=planner_max_tokens, temperature=planner_temperature),
                "writes": SamplingParams(max_tokens=writer_max_tokens, temperature=writer_temperature)}
    instructions = check_files(input, output_dir)
    job = _AgentWriteJob(planner, writer, prompts, sampling, min_words, max_words, max_steps, seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {stage: str(out / f"{stage}.jsonl") for stage in STAGES}
    results = {}
    if "plans" in stages:
        results["plans"] = run_stage("plans", instructions, job.plans, files["plans"],
                                     concurrency=concurrency, progress=progress).as_dict()
    plans = finished_rows(files["plans"])
    files["paragraphs"] = str(out / "paragraphs.jsonl")
    if "writes" in stages:
        with JsonlAppender(files["paragraphs"], unique=False) as job.cache:
            results["writes"] = run_stage("writes", _write_items(instructions, plans), job.writes,
                                          files["writes"], concurrency=concurrency, progress=progress).as_dict()
        job.cache = None
    writes = finished_rows(files["writes"])
    if "writes" in stages:  # paragraphs of finished items are in writes.jsonl: drop them here
        with JsonlAppender(files["paragraphs"], unique=False) as cache:
            cached = list(cache.rows.values())
        write_jsonl_atomic(files["paragraphs"], (row for row in cached if json.loads(row["id"])[0] not in writes))
    records = []
    for instruction in instructions:
        row = writes.get(instruction.id)
        if row is None:
            continue
        plan = plans.get(instruction.id)
        if plan is None or "skipped" in plan or row.get("plan_sha") != plan_sha(plan["steps"]):
            raise ValueError(f"{files['writes']}: the paragraphs of id {instruction.id!r} follow another plan "
                             f"than {files['plans']} holds (was the plan stage rerun?); remove writes.jsonl "
                             "to write them again")
        records.append({"id": instruction.id, "messages": [
            {"role": "user", "content": instruction.row["instruction"]},
            {"role": "assistant", "content": join_paragraphs(row["paragraphs"])}]})
    files["sft"] = str(out / "sft.jsonl")
    write_jsonl_atomic(files["sft"], records)
    skipped = sum(1 for i in instructions if "skipped" in plans.get(i.id, {}))
    return {"stages": results, "instructions": len(instructions),
            "planned": sum(1 for i in instructions if i.id in plans) - skipped, "skipped": skipped,
            "sft_records": len(records), "words": sum(writes[r["id"]]["words"] for r in records),
            "unfinished": len(instructions) - len(records) - skipped,
            "failed": sum(result["failed"] for result in results.values()), "files": files}
