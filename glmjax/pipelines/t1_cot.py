r"""T1 SFT-initialisation data: long chains of thought with trial and error and self-verification.

T1 (Hou et al., 2025) initialises RL from SFT on synthesised reasoning that "integrates
trial-and-error and self-verification", built from diverse attempts by several LLMs. This
pipeline does that in three resumable stages, each with its own append-only file under
``output_dir`` (rows keyed by problem id; :mod:`glmjax.pipelines.runner`):

1. ``attempts.jsonl``: ``num_attempts`` sampled solutions per problem from each attempt client
   (problem ``id``, client ``c``: seeds ``item_seed(seed, "attempts", c, id) + k``), each marked
   ``correct`` by the checker against the gold answer. Row: ``{"id", "attempts": [{"client",
   "seed", "text", "correct"}, ...]}``.
2. ``critiques.jsonl``: the critic reviews each attempt, knowing the reference answer and the
   checker's verdict (where a wrong one first goes wrong; an independent check of a right one).
   Row: ``{"id", "critiques": [str, ...], "attempts_sha"}`` (one critique per attempt, in order;
   ``attempts_sha`` ties them to the attempts they review).
3. ``rewrites.jsonl``: the writer merges the attempts and critiques into ONE worked solution that
   tries, catches its errors, corrects them and verifies the result, ending in ``\boxed{}``; up to
   ``num_rewrites`` samples, the first that passes the check is kept. Row: ``{"id", "verified":
   true, "messages", "answer"}`` or ``{"id", "verified": false, "reason", "answer",
   "solutions"}``.

Then, from ``rewrites.jsonl`` and in input order, every run rewrites (atomically):

* ``sft.jsonl``: ``{"id", "messages": [{"role": "user", "content": problem}, {"role": "assistant",
  "content": solution}], "answer": gold}`` for verified rewrites; ``lm_data(data_format="chat")``
  trains on it as is;
* ``rejected.jsonl``: ``{"id", "reason"}`` for problems without a verified rewrite.

An item whose calls fail (after the client's own retries) goes to ``<stage>.errors.jsonl`` and is
retried by the next run; a later stage only sees items the earlier ones finished. Removing a
stage's file (and those after it) reruns that stage alone. Prompts are ours, package files under
``glmjax/pipelines/prompts/`` with ``{{name}}`` placeholders; any of them can be replaced by a
file of the same placeholders (gin: ``t1_cot_pipeline.rewrite_prompt = "/path/to/prompt.txt"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from glmjax.data.synthetic import ArithmeticConfig, Split, generate_problems
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.pipelines.runner import Item, ItemId, finished_rows, read_items, run_stage, write_jsonl_atomic

Checker = Callable[[str, str], bool]
"""``checker(response_text, gold) -> bool``: does the response's final answer equal the gold one."""

STAGES = ("attempts", "critiques", "rewrites")
"""The stages, in order; each writes ``output_dir/<stage>.jsonl``."""

ATTEMPT_FIELDS = ("problem",)
CRITIQUE_FIELDS = ("problem", "answer", "attempt", "verdict")
REWRITE_FIELDS = ("problem", "attempts")

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class PromptError(ValueError):
    """A prompt file that cannot be used (missing, or with the wrong placeholders)."""


def load_prompt(path: str | os.PathLike | None, default: str, fields: Sequence[str]) -> str:
    """A prompt template: the file ``path``, or the package's ``prompts/<default>`` when None.

    Raises:
      PromptError: the file is missing, or its ``{{name}}`` placeholders are not exactly ``fields``
        (the message names the file and the missing or unknown names).
    """
    if path is None:
        resource = importlib.resources.files("glmjax.pipelines") / "prompts" / default
        source, text = f"glmjax/pipelines/prompts/{default}", resource.read_text(encoding="utf-8")
    else:
        source = os.fspath(path)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as err:
            raise PromptError(f"{source}: cannot read the prompt ({err.strerror})") from None
    found = set(_PLACEHOLDER.findall(text))
    missing, unknown = sorted(set(fields) - found), sorted(found - set(fields))
    if missing or unknown:
        raise PromptError(f"{source}: the prompt must use the placeholders {sorted(fields)} "
                          f"(missing: {missing}, unknown: {unknown})")
    return text


def render(template: str, **fields: str) -> str:
    """``template`` with each ``{{name}}`` replaced by ``fields[name]`` in one pass (values are not
    searched for placeholders again)."""
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], template)


def validate_problem(row: dict[str, Any]) -> None:
    """Checks an input row ``{"id"?, "problem": str, "answer": str | number}`` and stores a numeric
    answer as its string (``7`` -> ``"7"``).

    Raises:
      ValueError: naming the missing or malformed field.
    """
    problem, answer = row.get("problem"), row.get("answer")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("field 'problem' must be a non-empty string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        row["answer"] = answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("field 'answer' must be a non-empty string (or a number)")


def item_seed(seed: int, stage: str, index: int, item_id: ItemId) -> int:
    """The base sampling seed of one item's calls in a stage (``index``: the client's position),
    independent of the order items run in; below 2**30, so that ``seed + k`` stays in int32."""
    key = json.dumps([seed, stage, index, item_id]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 2**30


def attempts_sha(attempts: Sequence[Mapping[str, Any]]) -> str:
    """A digest of attempt texts: ties a critique row to the attempts it reviewed."""
    return hashlib.sha256(json.dumps([a["text"] for a in attempts]).encode("utf-8")).hexdigest()[:16]


def has_boxed_answer(text: str) -> bool:
    r"""Whether ``text`` contains a ``\boxed{...}`` (a closed brace after ``\boxed{``)."""
    start = text.rfind("\\boxed{")
    return start >= 0 and "}" in text[start + len("\\boxed{"):]


def _default_checker() -> Checker:
    from glmjax.evals.math import answers_match  # imported on use: math-verify loads only here

    return answers_match


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _attempts_block(attempts: Sequence[Mapping[str, Any]], critiques: Sequence[str]) -> str:
    """The attempts and their critiques as the rewrite prompt shows them."""
    parts = []
    for number, (attempt, critique) in enumerate(zip(attempts, critiques), start=1):
        verdict = "right" if attempt["correct"] else "wrong"
        parts.append(f"### Attempt {number} (its final answer is {verdict})\n{attempt['text'].strip()}\n\n"
                     f"### Critique of attempt {number}\n{critique.strip()}")
    return "\n\n".join(parts)


class _T1Job:
    """The three stages' work functions over shared settings (see :func:`t1_cot_pipeline`)."""

    def __init__(self, attempt_clients: Sequence[LLMClient], critic_client: LLMClient,
                 writer_client: LLMClient, checker: Checker, prompts: Mapping[str, str],
                 sampling: Mapping[str, SamplingParams], num_attempts: int, num_rewrites: int,
                 require_boxed: bool, seed: int) -> None:
        self.attempt_clients = list(attempt_clients)
        self.critic_client = critic_client
        self.writer_client = writer_client
        self.checker = checker
        self.prompts = prompts
        self.sampling = sampling
        self.num_attempts = num_attempts
        self.num_rewrites = num_rewrites
        self.require_boxed = require_boxed
        self.seed = seed

    def _params(self, stage: str, index: int, item: Item) -> SamplingParams:
        return dataclasses.replace(self.sampling[stage], seed=item_seed(self.seed, stage, index, item.id))

    def attempts(self, item: Item) -> dict[str, Any]:
        prompt = _user(render(self.prompts["attempts"], problem=item.row["problem"]))
        attempts = []
        for index, client in enumerate(self.attempt_clients):
            params = self._params("attempts", index, item)
            texts = client.complete_batch([prompt] * self.num_attempts, params)
            attempts += [{"client": index, "seed": params.seed + k, "text": text,
                          "correct": bool(self.checker(text, item.row["answer"]))}
                         for k, text in enumerate(texts)]
        return {"attempts": attempts}

    def critiques(self, item: Item) -> dict[str, Any]:
        attempts = item.row["attempts"]
        conversations = [_user(render(
            self.prompts["critiques"], problem=item.row["problem"], answer=item.row["answer"],
            attempt=attempt["text"],
            verdict=("correct: it matches the reference answer" if attempt["correct"]
                     else "wrong: it does not match the reference answer")))
            for attempt in attempts]
        critiques = self.critic_client.complete_batch(conversations, self._params("critiques", 0, item))
        return {"critiques": critiques, "attempts_sha": attempts_sha(attempts)}

    def rewrites(self, item: Item) -> dict[str, Any]:
        problem, gold = item.row["problem"], item.row["answer"]
        prompt = _user(render(self.prompts["rewrites"], problem=problem,
                              attempts=_attempts_block(item.row["attempts"], item.row["critiques"])))
        solutions = self.writer_client.complete_batch([prompt] * self.num_rewrites,
                                                      self._params("rewrites", 0, item))
        reasons = []
        for solution in solutions:
            if not solution.strip():
                reasons.append("empty rewrite")
            elif self.require_boxed and not has_boxed_answer(solution):
                reasons.append("no \\boxed{} final answer")
            elif not self.checker(solution, gold):
                reasons.append("final answer does not match the gold answer")
            else:
                return {"verified": True, "answer": gold, "messages": [
                    {"role": "user", "content": problem}, {"role": "assistant", "content": solution}]}
        return {"verified": False, "answer": gold, "solutions": solutions,
                "reason": f"no verified rewrite in {len(solutions)}: " + "; ".join(
                    f"{reason} (x{reasons.count(reason)})" for reason in dict.fromkeys(reasons))}


def _stage_items(stage: str, problems: Sequence[Item], rows: Mapping[str, Mapping[ItemId, dict]],
                 files: Mapping[str, str]) -> list[Item]:
    """The items ``stage`` can work on: the problems every earlier stage finished, with their rows."""
    items = []
    for problem in problems:
        row = dict(problem.row)
        if stage in ("critiques", "rewrites"):
            if problem.id not in rows["attempts"]:
                continue
            row["attempts"] = rows["attempts"][problem.id]["attempts"]
        if stage == "rewrites":
            critique = rows["critiques"].get(problem.id)
            if critique is None:
                continue
            if critique.get("attempts_sha") != attempts_sha(row["attempts"]) or (
                    len(critique.get("critiques", ())) != len(row["attempts"])):
                raise ValueError(f"{files['critiques']}: the critiques of id {problem.id!r} review other "
                                 f"attempts than {files['attempts']} holds (was the attempts stage rerun?); "
                                 "remove critiques.jsonl and rewrites.jsonl to redo them")
            row["critiques"] = critique["critiques"]
        items.append(Item(problem.id, row, problem.location))
    return items


def check_files(input: str | os.PathLike, output_dir: str | os.PathLike) -> list[Item]:  # noqa: A002
    """The problems of ``input``, after checking every line and every stage file already in
    ``output_dir`` (so that a command line can refuse bad files before it loads a model).

    Raises:
      InputError: a malformed input line; OutputFileError: a stage file that is not the runner's.
    """
    problems = read_items(input, validate_problem)
    for stage in STAGES:
        finished_rows(Path(output_dir) / f"{stage}.jsonl")
    return problems


@gin.configurable
def t1_cot_pipeline(
    input: str | os.PathLike,  # noqa: A002 - the documented name
    output_dir: str | os.PathLike,
    attempt_clients: Sequence[LLMClient],
    critic_client: LLMClient,
    writer_client: LLMClient,
    num_attempts: int = 4,
    *,
    checker: Checker | None = None,
    attempt_prompt: str | None = None,
    critique_prompt: str | None = None,
    rewrite_prompt: str | None = None,
    attempt_temperature: float = 1.0,
    attempt_max_tokens: int = 2048,
    critic_temperature: float = 0.7,
    critic_max_tokens: int = 1024,
    writer_temperature: float = 0.7,
    writer_max_tokens: int = 4096,
    num_rewrites: int = 2,
    require_boxed: bool = True,
    seed: int = 0,
    concurrency: int = 4,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Runs the T1 CoT synthesis (module docstring) on the problems of ``input``.

    Args:
      input: JSONL of ``{"id"?, "problem": str, "answer": str | number}`` (an id is derived from
        the line when missing: ``glmjax.pipelines.runner``).
      output_dir: where the stage files and ``sft.jsonl`` / ``rejected.jsonl`` go (created).
      attempt_clients: one or more clients sampling the attempts (several models diversify them).
      critic_client: reviews each attempt.
      writer_client: writes the merged solution.
      num_attempts: attempts per problem from EACH attempt client.
      checker: ``(response_text, gold) -> bool``; default ``glmjax.evals.math.answers_match``.
      attempt_prompt, critique_prompt, rewrite_prompt: prompt files (placeholders
        ``{{problem}}``; ``{{problem}} {{answer}} {{attempt}} {{verdict}}``; ``{{problem}}
        {{attempts}}``); None uses the package's ``t1_attempt.txt``, ``t1_critique.txt``,
        ``t1_rewrite.txt`` (``t1_attempt_plain.txt``, the bare problem, suits models trained on
        the built-in task).
      attempt_temperature, critic_temperature, writer_temperature: sampling temperatures.
      attempt_max_tokens, critic_max_tokens, writer_max_tokens: generation budgets (tokens).
      num_rewrites: writer samples per problem; the first that passes the check is kept.
      require_boxed: a rewrite must contain a ``\boxed{}`` answer to be kept.
      seed: base of every per-item seed (:func:`item_seed`).
      concurrency: problems worked on at once per stage.
      stages: the stages to run this time (a subset of :data:`STAGES`); the others' files are read.
      progress: progress bars on stderr.

    Returns:
      ``{"stages": {name: StageResult.as_dict()}, "problems", "sft_records", "rejected",
      "unfinished" (problems without a rewrite row yet), "failed" (item failures this run),
      "files": {name: path}}``.

    Raises:
      InputError: a malformed input line (``file:line: problem``), before any call.
      OutputFileError: a stage file that is not the runner's or is being written elsewhere.
      PromptError: a prompt file without the right placeholders.
      ValueError: bad knobs, or critiques that review other attempts than the attempts file holds.
    """
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}")
    if not attempt_clients:
        raise ValueError("attempt_clients needs at least one client")
    if num_attempts < 1 or num_rewrites < 1:
        raise ValueError(f"num_attempts and num_rewrites must be >= 1, got {num_attempts}, {num_rewrites}")
    prompts = {
        "attempts": load_prompt(attempt_prompt, "t1_attempt.txt", ATTEMPT_FIELDS),
        "critiques": load_prompt(critique_prompt, "t1_critique.txt", CRITIQUE_FIELDS),
        "rewrites": load_prompt(rewrite_prompt, "t1_rewrite.txt", REWRITE_FIELDS),
    }
    sampling = {
        "attempts": SamplingParams(max_tokens=attempt_max_tokens, temperature=attempt_temperature),
        "critiques": SamplingParams(max_tokens=critic_max_tokens, temperature=critic_temperature),
        "rewrites": SamplingParams(max_tokens=writer_max_tokens, temperature=writer_temperature),
    }
    problems = check_files(input, output_dir)
    job = _T1Job(attempt_clients, critic_client, writer_client, checker or _default_checker(), prompts,
                 sampling, num_attempts, num_rewrites, require_boxed, seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {stage: str(out / f"{stage}.jsonl") for stage in STAGES}
    results = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        rows = {name: finished_rows(files[name]) for name in STAGES[: STAGES.index(stage)]}
        items = _stage_items(stage, problems, rows, files)
        results[stage] = run_stage(stage, items, getattr(job, stage), files[stage],
                                   concurrency=concurrency, progress=progress).as_dict()
    rewrites = finished_rows(files["rewrites"])
    done = [rewrites[p.id] for p in problems if p.id in rewrites]
    files["sft"], files["rejected"] = str(out / "sft.jsonl"), str(out / "rejected.jsonl")
    sft = write_jsonl_atomic(files["sft"], ({"id": r["id"], "messages": r["messages"], "answer": r["answer"]}
                                            for r in done if r["verified"]))
    rejected = write_jsonl_atomic(files["rejected"], ({"id": r["id"], "reason": r["reason"]}
                                                      for r in done if not r["verified"]))
    return {"stages": results, "problems": len(problems), "sft_records": sft, "rejected": rejected,
            "unfinished": len(problems) - len(done),
            "failed": sum(result["failed"] for result in results.values()), "files": files}


def write_builtin_problems(path: str | os.PathLike, num_problems: int, *, split: Split = "eval",
                           seed: int = 0, config: ArithmeticConfig = ArithmeticConfig()) -> int:
    """Writes problems of the built-in arithmetic task as ``{"id", "problem", "answer"}`` rows
    (``id`` ``"arith-<split>-<n>"``, problem = the question, answer = the integer as a string),
    the input :func:`t1_cot_pipeline` reads. Returns the number of rows."""
    return write_jsonl_atomic(path, (
        {"id": f"arith-{split}-{index}", "problem": problem.question, "answer": str(problem.answer)}
        for index, problem in enumerate(generate_problems(num_problems, seed=seed, split=split,
                                                          config=config))))
