r"""The truncation probe of T1: accuracy as a function of the reasoning-token budget.

For every checkpoint, ``num_samples`` responses are sampled per problem (one prefill per prompt
through the local ``GenerationEngine``, or through any ``LLMClient``). For every budget ``B`` each
response is cut to its first ``B`` generated tokens (a trailing stop token is dropped first; a
response of at most ``B`` tokens is kept whole) and a *summariser* gives the final answer from the
problem and the cut trace; a *checker* scores that answer against the gold one. The reported
accuracy at ``B`` is pass@1: the mean over problems of the fraction of a problem's samples that the
summariser answered correctly.

By default every budget is scored the same way, through the summariser, even where the response
fits whole and ends in its own answer: the curve then measures what a reader of the first ``B``
tokens can conclude, not whether the response happened to stop by itself. With
``finished_responses="own_answer"`` (budget forcing's rule) a response that stopped by itself
within the budget keeps its own answer there. The responses' own final answers
(the whole, uncut text, checked directly) are reported next to the curve as ``full_response``.

Summarisers (:class:`Summarizer`):

* :class:`ContinuationSummarizer`, for a local engine: the prompt ids, the cut trace and a forced
  answer prefix (``"\nAnswer:"`` for the built-in task, ``"\n\nFinal answer: \boxed{"`` for math)
  are fed as one prompt and a few tokens are decoded greedily; the answer text is the prefix plus
  that continuation.
* :class:`ClientSummarizer`, for any ``LLMClient`` (the same model or another one): a prompt (a
  gin-settable template or a file) gives the problem and the cut reasoning and asks for the final
  answer only, in the checker's format.

A summariser is assumed deterministic (greedy): it is asked once per distinct cut trace, so a
response shorter than several budgets is summarised once for all of them.

Problems (:class:`ScalingProblem`) come from the built-in task's eval JSONL
(:func:`load_arithmetic_problems`) or from a math JSONL of ``{"id"?, "problem", "answer"}``
(:func:`load_math_problems`). :func:`write_scaling_report` writes the report as JSON, a Markdown
table and a PNG plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import gin
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from glmjax.checkpoints import paths
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.training_runs import load_trained_model
from glmjax.data.chat_template import encode_chat, stop_token_ids
from glmjax.data.sources import DataFormatError, JsonlSource
from glmjax.data.synthetic import is_correct, load_eval_prompts
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.inference.sampling import SamplingConfig
from glmjax.models.decoder import Decoder

ProblemFormat = Literal["arithmetic", "math"]
FinishedResponses = Literal["summarise", "own_answer"]
"""How a response that ended by itself within a budget is answered at that budget: through the
summariser like every cut trace, or by its own final answer (budget forcing's rule)."""
Checker = Callable[[str, str], bool]
"""``(answer_text, gold) -> correct``."""

ANSWER_PREFIXES: dict[str, str] = {"arithmetic": "\nAnswer:", "math": "\n\nFinal answer: \\boxed{"}
"""The forced answer prefix of :class:`ContinuationSummarizer`, per checker."""

ANSWER_FORMATS: dict[str, str] = {
    "arithmetic": 'Reply with one line of the form "Answer: <integer>" and nothing else.',
    "math": "Reply with the final answer only, written as \\boxed{<answer>}.",
}
"""The answer-format line of :class:`ClientSummarizer`'s prompt, per checker."""

ANSWER_TOKENS: dict[str, int] = {"arithmetic": 8, "math": 32}
"""Tokens the default summarisers give an answer, per checker."""

MATH_INSTRUCTION = "Work through the problem step by step, then give the final answer as \\boxed{<answer>}."
"""Appended (after a blank line) to every math problem's user turn."""

DEFAULT_SUMMARY_TEMPLATE = """\
Below is a problem and the beginning of an attempt to solve it. The attempt may stop in the \
middle of a step. Using the reasoning shown (and your own judgement where it stops short), \
state the final answer to the problem.

Problem:
{problem}

Reasoning so far:
{reasoning}

{answer_format}"""
"""The default prompt of :class:`ClientSummarizer`: fields ``{problem}``, ``{reasoning}`` and
``{answer_format}``."""


# -- problems ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScalingProblem:
    """One problem of the probe.

    Attributes:
      id: a name for reports (the record's ``id``, else its 0-based index in the file).
      prompt_ids: the prompt as the model was trained to see it, ready for generation; None to
        build it from ``messages`` with the tokenizer's chat format.
      messages: the conversation up to the assistant's turn (the last one is the user's problem).
      gold: the reference answer, as text.
    """

    id: str
    prompt_ids: list[int] | None
    messages: list[dict]
    gold: str

    @property
    def question(self) -> str:
        """The content of the last user message."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return str(message.get("content", ""))
        raise ValueError(f"problem {self.id}: no user message")

    def prompt(self, tokenizer: Any) -> list[int]:
        """``prompt_ids``, else ``messages`` in the tokenizer's chat format with the generation
        prompt."""
        if self.prompt_ids is not None:
            return list(self.prompt_ids)
        return encode_chat(tokenizer, self.messages, add_generation_prompt=True).input_ids.tolist()


def load_arithmetic_problems(path: str | Path, tokenizer: Any) -> list[ScalingProblem]:
    """The built-in task's eval JSONL (``glmjax.data.synthetic.write_arithmetic_jsonl``: records
    of ``messages`` + ``answer`` or ``text`` + ``answer``), with the prompts of
    :func:`glmjax.data.synthetic.load_eval_prompts`.

    Raises:
      DataFormatError: naming the file and line of a malformed record.
    """
    prompts = load_eval_prompts(path, tokenizer)
    source = JsonlSource(path, required_fields=["answer"])
    problems = []
    for index, prompt in enumerate(prompts):
        record = source[index]
        if "messages" in record:
            messages = [dict(m) for m in record["messages"][:-1]]
        else:
            messages = [{"role": "user", "content": record["text"].split("\n", 1)[0]}]
        problems.append(ScalingProblem(str(record.get("id", index)), prompt.input_ids.tolist(), messages,
                                       str(prompt.answer)))
    return problems


def load_math_problems(path: str | Path, instruction: str = MATH_INSTRUCTION) -> list[ScalingProblem]:
    """A JSONL of ``{"id"?, "problem": str, "answer": str | number}``; the user turn is the problem,
    a blank line and ``instruction`` (nothing when it is empty).

    Raises:
      DataFormatError: naming the file and line of a record without a non-empty string
        ``problem``, with an ``answer`` that is not a string or number, or with a repeated id.
    """
    source = JsonlSource(path, required_fields=["problem", "answer"])
    problems, seen = [], set()
    for index in range(len(source)):
        record = source[index]
        problem, answer = record["problem"], record["answer"]
        if not isinstance(problem, str) or not problem.strip():
            raise DataFormatError(f"{source.location(index)}: field 'problem' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
            raise DataFormatError(f"{source.location(index)}: field 'answer' must be a non-empty string or "
                                  f"a number, got {answer!r}")
        problem_id = str(record.get("id", index))
        if problem_id in seen:
            raise DataFormatError(f"{source.location(index)}: id {problem_id!r} repeats an earlier record's")
        seen.add(problem_id)
        content = f"{problem}\n\n{instruction}" if instruction else problem
        problems.append(ScalingProblem(problem_id, None, [{"role": "user", "content": content}], str(answer)))
    return problems


def detect_problem_format(path: str | Path) -> ProblemFormat:
    """"math" when the first record has a ``problem`` field, "arithmetic" when it has
    ``messages`` or ``text`` (the built-in task's layouts).

    Raises:
      DataFormatError: the first record has none of these fields.
    """
    source = JsonlSource(path)
    record = source[0]
    if "problem" in record:
        return "math"
    if "messages" in record or "text" in record:
        return "arithmetic"
    raise DataFormatError(f"{source.location(0)}: record has none of 'problem' (math), 'messages' or "
                          f"'text' (the built-in task); its fields are {sorted(record)}")


def load_scaling_problems(path: str | Path, tokenizer: Any, problem_format: ProblemFormat | None = None,
                          max_problems: int | None = None) -> list[ScalingProblem]:
    """Problems of ``path`` in ``problem_format`` (default: :func:`detect_problem_format`), the
    first ``max_problems`` of them (all when None)."""
    problem_format = problem_format or detect_problem_format(path)
    if problem_format == "arithmetic":
        problems = load_arithmetic_problems(path, tokenizer)
    elif problem_format == "math":
        problems = load_math_problems(path)
    else:
        raise ValueError(f"problem format must be 'arithmetic' or 'math', got {problem_format!r}")
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be >= 1, got {max_problems}")
    return problems[:max_problems]


# -- checkers ------------------------------------------------------------------------------------


def arithmetic_checker(answer_text: str, gold: str) -> bool:
    """The built-in task's exact match: the last ``Answer: N`` line of the text equals ``gold``."""
    return is_correct(answer_text, int(gold))


def math_checker(answer_text: str, gold: str) -> bool:
    """math-verify equivalence of the text's final answer (its last ``\\boxed{}``) and ``gold``
    (``glmjax.evals.math.answers_match``)."""
    from glmjax.evals.math import answers_match  # imported on use: math-verify loads slowly

    return answers_match(answer_text, gold)


CHECKERS: dict[str, Checker] = {"arithmetic": arithmetic_checker, "math": math_checker}


# -- responses and truncation --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Response:
    """One sampled response.

    Attributes:
      tokens: the generated ids without a trailing stop token (the reasoning trace).
      text: the whole response's text.
      finish_reason: "stop" (the model ended it) or "length" (cut at the largest budget).
    """

    tokens: list[int]
    text: str
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class TruncatedTrace:
    """A response cut to a budget: the first ``len(tokens)`` ids and their text; ``truncated``
    when the response was longer than the budget."""

    tokens: list[int]
    text: str
    truncated: bool


def truncate_response(tokens: Sequence[int], budget: int,
                      stop_ids: Sequence[int] = ()) -> tuple[list[int], bool]:
    """The first ``budget`` generated tokens of a response.

    Args:
      tokens: the generated ids; a last id in ``stop_ids`` (the token that ended the turn) is
        dropped before counting, so it neither uses budget nor reaches the summariser.
      budget: tokens to keep, >= 1.
      stop_ids: the stop token ids of the chat format.

    Returns:
      (kept ids, whether the response was longer than ``budget``); a response of at most
      ``budget`` tokens is kept whole.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    body = list(tokens)
    if body and body[-1] in set(stop_ids):
        body = body[:-1]
    return body[:budget], len(body) > budget


def sample_with_engine(engine: GenerationEngine, tokenizer: Any, problems: Sequence[ScalingProblem],
                       num_samples: int, temperature: float, max_new_tokens: int, *, seed: int = 0,
                       batch_size: int = 32, progress: bool = False,
                       desc: str = "sampling") -> list[list[Response]]:
    """``num_samples`` responses per problem from the engine's current model: each prompt is
    prefilled once and decoded ``num_samples`` times; sample ``j`` of problem ``i`` draws with seed
    ``seed + i * num_samples + j`` (the same draws for every checkpoint).

    Returns:
      [problems][num_samples] responses.
    """
    stops = stop_token_ids(tokenizer)
    prompts = [problem.prompt(tokenizer) for problem in problems]
    per_call = max(1, batch_size // num_samples)
    responses: list[list[Response]] = []
    with tqdm(total=len(prompts), desc=desc, unit="problem", disable=not progress) as bar:
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            seeds = [seed + (start + i) * num_samples + j for i in range(len(chunk)) for j in range(num_samples)]
            results = engine.generate(chunk, SamplingConfig(temperature=temperature), max_new_tokens=max_new_tokens,
                                      stop_token_ids=stops, seed=seeds, num_samples=num_samples)
            for i in range(len(chunk)):
                row = []
                for result in results[i * num_samples:(i + 1) * num_samples]:
                    body, _ = truncate_response(result.tokens, max_new_tokens, stops)
                    row.append(Response(body, tokenizer.decode(body, skip_special_tokens=True),
                                        result.finish_reason))
                responses.append(row)
            bar.update(len(chunk))
    return responses


def sample_with_client(client: LLMClient, tokenizer: Any, problems: Sequence[ScalingProblem],
                       num_samples: int, temperature: float, max_new_tokens: int, *, seed: int = 0,
                       batch_size: int = 32, progress: bool = False,
                       desc: str = "sampling") -> list[list[Response]]:
    """``num_samples`` responses per problem from an ``LLMClient`` (conversation ``i * N + j`` of
    the whole request samples with seed ``seed + i * N + j``). Budgets count ``tokenizer``'s tokens
    of the reply text, so give the served model's tokenizer.

    Returns:
      [problems][num_samples] responses.
    """
    per_call = max(1, batch_size // num_samples)
    responses: list[list[Response]] = []
    with tqdm(total=len(problems), desc=desc, unit="problem", disable=not progress) as bar:
        for start in range(0, len(problems), per_call):
            chunk = problems[start:start + per_call]
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed + start * num_samples)
            turns = client.assistant_turns([p.messages for p in chunk for _ in range(num_samples)], params)
            for i in range(len(chunk)):
                responses.append([
                    Response(tokenizer.encode(turn.text, add_special_tokens=False), turn.text, turn.finish_reason)
                    for turn in turns[i * num_samples:(i + 1) * num_samples]])
            bar.update(len(chunk))
    return responses


# -- summarisers ---------------------------------------------------------------------------------


class Summarizer(Protocol):
    """Gives the final answer of each (problem, truncated trace) pair, as text for the checker."""

    def answers(self, problems: Sequence[ScalingProblem],
                truncated_traces: Sequence[TruncatedTrace]) -> list[str]:
        """One answer text per pair (``problems[i]`` is the problem of ``truncated_traces[i]``)."""


@gin.configurable
class ContinuationSummarizer:
    """Forces the answer out of a local model: prompt ids + trace ids + ``answer_prefix``, then
    ``max_answer_tokens`` greedy tokens (or fewer, to a stop token). Prompts are batched by
    length (``batch_size`` rows per engine call).

    Args:
      engine: the engine of the summarising model (its current parameters are used).
      tokenizer: that model's tokenizer.
      answer_prefix: the forced text (``ANSWER_PREFIXES``).
      max_answer_tokens: greedy tokens decoded after the prefix.
      batch_size: prompts per engine call.
      progress: show a progress bar.

    The answer text is ``answer_prefix`` + the decoded continuation (special tokens skipped).
    """

    def __init__(self, engine: GenerationEngine, tokenizer: Any, answer_prefix: str = ANSWER_PREFIXES["arithmetic"],
                 max_answer_tokens: int = 8, batch_size: int = 32, progress: bool = False) -> None:
        if not answer_prefix:
            raise ValueError("answer_prefix must be non-empty (it is what makes the model answer)")
        if max_answer_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_answer_tokens and batch_size must be >= 1, got {max_answer_tokens}, {batch_size}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.answer_prefix = answer_prefix
        self.prefix_ids = tokenizer.encode(answer_prefix, add_special_tokens=False)
        self.max_answer_tokens = max_answer_tokens
        self.batch_size = batch_size
        self.progress = progress

    @property
    def description(self) -> str:
        return f"continuation after {self.answer_prefix!r}, {self.max_answer_tokens} greedy tokens"

    def answers(self, problems: Sequence[ScalingProblem],
                truncated_traces: Sequence[TruncatedTrace]) -> list[str]:
        _check_pairs(problems, truncated_traces)
        prompt_of: dict[int, list[int]] = {}
        prompts = []
        for problem, trace in zip(problems, truncated_traces):
            if id(problem) not in prompt_of:
                prompt_of[id(problem)] = problem.prompt(self.tokenizer)
            prompts.append(prompt_of[id(problem)] + list(trace.tokens) + self.prefix_ids)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        stops = stop_token_ids(self.tokenizer)
        texts: list[str] = [""] * len(prompts)
        with tqdm(total=len(prompts), desc="summarising", unit="trace", disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                results = self.engine.generate([prompts[i] for i in rows], SamplingConfig(temperature=0.0),
                                               max_new_tokens=self.max_answer_tokens, stop_token_ids=stops)
                for row, result in zip(rows, results):
                    body, _ = truncate_response(result.tokens, self.max_answer_tokens, stops)
                    texts[row] = self.answer_prefix + self.tokenizer.decode(body, skip_special_tokens=True)
                bar.update(len(rows))
        return texts


@gin.configurable
class ClientSummarizer:
    """Asks an ``LLMClient`` for the final answer given the problem and the truncated reasoning.

    Args:
      client: the summarising model (the evaluated one or another).
      template: the prompt, a ``str.format`` template with ``{problem}`` and ``{reasoning}`` and
        optionally ``{answer_format}`` (default :data:`DEFAULT_SUMMARY_TEMPLATE`).
      template_file: read the template from this file instead (UTF-8).
      answer_format: the text put in ``{answer_format}`` (``ANSWER_FORMATS``), which should ask
        for the answer in the checker's format.
      max_tokens: tokens of the reply at most.
      temperature: sampling temperature of the reply (0: greedy, as the probe assumes).
      seed: base seed; item ``i`` of a call samples with ``seed + i``.
      batch_size: conversations per client call.
      progress: show a progress bar.

    The answer text is the reply as the client returns it.

    Raises:
      ValueError: a template without ``{problem}`` or ``{reasoning}``, or with other fields.
    """

    def __init__(self, client: LLMClient, template: str = DEFAULT_SUMMARY_TEMPLATE,
                 template_file: str | None = None, answer_format: str = ANSWER_FORMATS["arithmetic"],
                 max_tokens: int = 64, temperature: float = 0.0, seed: int = 0, batch_size: int = 64,
                 progress: bool = False) -> None:
        if template_file is not None:
            template = Path(template_file).read_text(encoding="utf-8")
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        where = template_file or "the summary template"
        if not {"problem", "reasoning"} <= fields or fields - {"problem", "reasoning", "answer_format"}:
            raise ValueError(f"{where}: needs the fields {{problem}} and {{reasoning}} (and optionally "
                             f"{{answer_format}}), has {sorted(fields)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.client = client
        self.template = template
        self.answer_format = answer_format
        self.sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        self.batch_size = batch_size
        self.progress = progress

    @property
    def description(self) -> str:
        return f"{type(self.client).__name__} asked for the final answer ({self.sampling.max_tokens} tokens)"

    def prompt(self, problem: ScalingProblem, trace: TruncatedTrace) -> list[dict[str, str]]:
        """The summarising conversation of one pair (one user message)."""
        text = self.template.format(problem=problem.question, reasoning=trace.text,
                                    answer_format=self.answer_format)
        return [{"role": "user", "content": text}]

    def answers(self, problems: Sequence[ScalingProblem],
                truncated_traces: Sequence[TruncatedTrace]) -> list[str]:
        _check_pairs(problems, truncated_traces)
        conversations = [self.prompt(p, t) for p, t in zip(problems, truncated_traces)]
        replies: list[str] = []
        with tqdm(total=len(conversations), desc="summarising", unit="trace", disable=not self.progress) as bar:
            for start in range(0, len(conversations), self.batch_size):
                chunk = conversations[start:start + self.batch_size]
                sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + start)
                replies.extend(self.client.complete_batch(chunk, sampling))
                bar.update(len(chunk))
        return replies


def _check_pairs(problems: Sequence[ScalingProblem], traces: Sequence[TruncatedTrace]) -> None:
    if len(problems) != len(traces):
        raise ValueError(f"{len(problems)} problems for {len(traces)} truncated traces")


# -- the report ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BudgetAccuracy:
    """The accuracy of one checkpoint at one budget.

    Attributes:
      budget: reasoning tokens kept.
      accuracy: pass@1, the mean over problems of the fraction of samples answered correctly.
      stderr: the standard error of ``accuracy`` over problems (None for one problem).
      correct, total: correct answers and (problem, sample) pairs scored.
      truncated_fraction: share of responses longer than ``budget``.
      mean_trace_tokens: mean tokens the summariser saw per trace.
    """

    budget: int
    accuracy: float
    stderr: float | None
    correct: int
    total: int
    truncated_fraction: float
    mean_trace_tokens: float


@dataclasses.dataclass(frozen=True)
class CheckpointScaling:
    """One checkpoint's curve.

    Attributes:
      name: the checkpoint's name (e.g. ``"step 200"``).
      budgets: the accuracy at each budget, ascending.
      full_accuracy, full_correct, full_total: the whole responses' own final answers, checked
        directly (pass@1, count, pairs).
      mean_response_tokens: mean generated tokens per response (stop token excluded).
      length_fraction: share of responses cut at the largest budget (finish reason "length").
      sample_seconds, summarize_seconds: wall time of sampling and of summarising.
    """

    name: str
    budgets: tuple[BudgetAccuracy, ...]
    full_accuracy: float
    full_correct: int
    full_total: int
    mean_response_tokens: float
    length_fraction: float
    sample_seconds: float
    summarize_seconds: float


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One (checkpoint, problem, sample): its length, own-answer verdict and the summariser's
    answer and verdict at each budget."""

    checkpoint: str
    problem_id: str
    sample: int
    response_tokens: int
    finish_reason: str
    full_correct: bool
    answers: tuple[str, ...]
    correct: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class ScalingReport:
    """The probe's results: one :class:`CheckpointScaling` per checkpoint, in the order given."""

    budgets: tuple[int, ...]
    num_problems: int
    num_samples: int
    temperature: float
    seed: int
    checker: str
    summarizer: str
    checkpoints: tuple[CheckpointScaling, ...]
    samples: tuple[SampleRecord, ...] = ()

    def accuracy(self, checkpoint: str, budget: int) -> float:
        """pass@1 of ``checkpoint`` at ``budget``."""
        for entry in self.checkpoints:
            if entry.name == checkpoint:
                for cell in entry.budgets:
                    if cell.budget == budget:
                        return cell.accuracy
                raise KeyError(f"budget {budget} not in {self.budgets}")
        raise KeyError(f"checkpoint {checkpoint!r} not in {[c.name for c in self.checkpoints]}")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (without the per-sample records)."""
        data = dataclasses.asdict(self)
        del data["samples"]
        for entry in data["checkpoints"]:
            entry["full_response"] = {key: entry.pop(f"full_{key}") for key in ("accuracy", "correct", "total")}
        return {"evaluation": "inference_scaling", **data}

    def markdown(self) -> str:
        """A Markdown table: a row per checkpoint, a column per budget (pass@1 in %), and the
        whole responses' own answers last."""
        header = ["checkpoint", *(str(b) for b in self.budgets), "own answer (whole response)"]
        lines = [
            f"Inference scaling: pass@1 (%) over {self.num_problems} problems x {self.num_samples} samples "
            f"(temperature {self.temperature:g}) by reasoning budget in tokens; summariser: {self.summarizer}; "
            f"checker: {self.checker}.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        for entry in self.checkpoints:
            cells = [f"{100 * cell.accuracy:.1f}" for cell in entry.budgets]
            lines.append("| " + " | ".join([entry.name, *cells, f"{100 * entry.full_accuracy:.1f}"]) + " |")
        return "\n".join(lines) + "\n"


def write_scaling_report(report: ScalingReport, out_dir: str | Path) -> dict[str, Path]:
    """Writes ``inference_scaling.json``, ``inference_scaling.md``, ``inference_scaling.png`` (pass@1
    vs budget, log2 x axis, a line per checkpoint and its own-answer accuracy dashed) and, when the
    report has them, ``inference_scaling_samples.jsonl`` (one :class:`SampleRecord` per line)
    under ``out_dir``.

    Returns:
      {"json", "markdown", "png"[, "samples"]} -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "inference_scaling.json", "markdown": out / "inference_scaling.md",
               "png": out / "inference_scaling.png"}
    written["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    written["markdown"].write_text(report.markdown(), encoding="utf-8")
    _plot(report, written["png"])
    if report.samples:
        written["samples"] = out / "inference_scaling_samples.jsonl"
        with written["samples"].open("w", encoding="utf-8") as f:
            for record in report.samples:
                f.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
    return written


def _plot(report: ScalingReport, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state; PNGs render with Agg

    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    axes = figure.subplots()
    for index, entry in enumerate(report.checkpoints):
        color = f"C{index % 10}"
        axes.plot([c.budget for c in entry.budgets], [c.accuracy for c in entry.budgets], marker="o",
                  color=color, label=entry.name)
        axes.axhline(entry.full_accuracy, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(report.budgets), [str(b) for b in report.budgets])
    axes.minorticks_off()
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("reasoning budget (tokens, log2 scale)")
    axes.set_ylabel(f"pass@1 ({report.num_samples} samples/problem)")
    axes.set_title(f"Truncation probe, {report.num_problems} problems (dashed: own final answer)")
    axes.grid(True, alpha=0.3)
    axes.legend(title="checkpoint")
    figure.savefig(path, format="png")


# -- the evaluation ------------------------------------------------------------------------------


def evaluate_inference_scaling(
    checkpoints: Mapping[str, Decoder | LLMClient],
    tokenizer: Any,
    problems: Sequence[ScalingProblem],
    budgets: Sequence[int],
    num_samples: int,
    temperature: float,
    *,
    checker: str | Checker = "arithmetic",
    summarizer: Summarizer | None = None,
    answer_prefix: str | None = None,
    max_answer_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    engine: GenerationEngine | None = None,
    progress: bool = True,
    finished_responses: FinishedResponses = "summarise",
) -> ScalingReport:
    """Runs the truncation probe for every checkpoint (module docstring).

    Args:
      checkpoints: name -> a ``Decoder`` (sampled with the local engine) or an ``LLMClient``
        (sampled through it). Entries are read one at a time, in order, and not kept, so a lazy
        mapping (:class:`RunCheckpoints`) holds one model in memory at a time.
      tokenizer: the models' tokenizer (also what budgets count for a client's replies).
      problems: the problems; budgets: ascending token budgets (the largest is the sampling
        budget); num_samples: responses per problem (N); temperature: their temperature.
      checker: "arithmetic", "math" (``CHECKERS``) or a ``(answer_text, gold) -> bool`` (which
        needs an explicit ``summarizer``).
      summarizer: gives the answers for every checkpoint; default: each checkpoint summarises
        itself: a ``ContinuationSummarizer`` on its engine for a Decoder, a ``ClientSummarizer`` of
        its client for an LLMClient.
      answer_prefix: the default continuation summariser's prefix (default: the checker's
        ``ANSWER_PREFIXES`` entry).
      max_answer_tokens: tokens the default summarisers give an answer (default: the checker's
        ``ANSWER_TOKENS`` entry).
      seed: sample ``j`` of problem ``i`` uses seed ``seed + i * N + j`` for every checkpoint.
      batch_size: engine rows (and client conversations) per call.
      engine: reuse this engine for the Decoder checkpoints (``update_model``, no recompilation);
        default: one built from the first Decoder.
      progress: show progress bars.
      finished_responses: ``"summarise"`` (every budget through the summariser) or
        ``"own_answer"`` (a response that stopped by itself within a budget keeps its own answer
        there; the summariser answers only cut traces). Small models that never saw a second
        answer line after their own do better with ``"own_answer"``.

    Returns:
      The report, with one ``SampleRecord`` per (checkpoint, problem, sample).

    Raises:
      ValueError: no checkpoints or problems, budgets that are not ascending positive ints,
        ``num_samples < 1``, an unknown checker name, or a callable checker without a
        ``summarizer``.
    """
    budgets = _check_budgets(budgets)
    if not checkpoints:
        raise ValueError("no checkpoints to evaluate")
    if not problems:
        raise ValueError("no problems to evaluate")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if finished_responses not in ("summarise", "own_answer"):
        raise ValueError(f"finished_responses must be 'summarise' or 'own_answer', got {finished_responses!r}")
    if isinstance(checker, str):
        if checker not in CHECKERS:
            raise ValueError(f"checker must be one of {sorted(CHECKERS)} or a callable, got {checker!r}")
        checker_name, check = checker, CHECKERS[checker]
    elif summarizer is None:
        raise ValueError("a custom checker needs a summarizer that answers in its format")
    else:
        checker_name, check = getattr(checker, "__name__", type(checker).__name__), checker
    answer_prefix = ANSWER_PREFIXES.get(checker_name) if answer_prefix is None else answer_prefix
    client_answer_tokens = 64 if max_answer_tokens is None else max_answer_tokens
    max_answer_tokens = ANSWER_TOKENS.get(checker_name) if max_answer_tokens is None else max_answer_tokens
    entries, records, described = [], [], []
    for name in checkpoints:
        model = checkpoints[name]
        start = time.time()
        if isinstance(model, LLMClient):
            responses = sample_with_client(model, tokenizer, problems, num_samples, temperature, budgets[-1],
                                           seed=seed, batch_size=batch_size, progress=progress, desc=f"{name}: sampling")
            own = summarizer or ClientSummarizer(model, answer_format=ANSWER_FORMATS[checker_name],
                                                 max_tokens=client_answer_tokens, batch_size=batch_size,
                                                 progress=progress)
        else:
            if engine is None:
                engine = GenerationEngine(model, max_batch_size=batch_size)
            else:
                engine.update_model(model)
            del model
            if summarizer is None:
                _check_fits(engine, tokenizer, problems, budgets[-1], answer_prefix)
            responses = sample_with_engine(engine, tokenizer, problems, num_samples, temperature, budgets[-1],
                                           seed=seed, batch_size=batch_size, progress=progress, desc=f"{name}: sampling")
            own = summarizer or ContinuationSummarizer(engine, tokenizer, answer_prefix, max_answer_tokens,
                                                       batch_size=batch_size, progress=progress)
        sampled = time.time()
        answers = _summarise(problems, responses, budgets, own, tokenizer, finished_responses)
        summarised = time.time()
        description = getattr(own, "description", type(own).__name__)
        described += [] if description in described else [description]
        entry, entry_records = _score(name, problems, responses, budgets, answers, check)
        entries.append(dataclasses.replace(entry, sample_seconds=round(sampled - start, 3),
                                           summarize_seconds=round(summarised - sampled, 3)))
        records.extend(entry_records)
    return ScalingReport(tuple(budgets), len(problems), num_samples, float(temperature), seed, checker_name,
                         "; ".join(described), tuple(entries), tuple(records))


def _check_budgets(budgets: Sequence[int]) -> list[int]:
    budgets = list(budgets)
    if (not budgets or any(not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1 for b in budgets)
            or budgets != sorted(set(budgets))):
        raise ValueError(f"budgets must be ascending, distinct positive ints, got {budgets}")
    return [int(b) for b in budgets]


def _check_fits(engine: GenerationEngine, tokenizer: Any, problems: Sequence[ScalingProblem], budget: int,
                answer_prefix: str) -> None:
    """Refuses, before any sampling, a probe whose longest summariser prompt (prompt + ``budget``
    trace tokens + the answer prefix) exceeds the engine's largest length bucket."""
    prefix = len(tokenizer.encode(answer_prefix, add_special_tokens=False))
    longest = max(problems, key=lambda p: len(p.prompt(tokenizer)))
    need = len(longest.prompt(tokenizer)) + budget + prefix
    if need > engine.length_buckets[-1]:
        raise ValueError(f"problem {longest.id}: its prompt ({need - budget - prefix} tokens) + the largest budget "
                         f"({budget}) + the answer prefix ({prefix}) exceed the engine's longest prompt "
                         f"({engine.length_buckets[-1]} tokens, the model's max_position_embeddings by default)")


def _summarise(problems: Sequence[ScalingProblem], responses: list[list[Response]], budgets: list[int],
               summarizer: Summarizer, tokenizer: Any,
               finished: FinishedResponses = "summarise") -> list[list[list[str]]]:
    """The answer for every [problem][sample][budget]: the summariser's, asked once per distinct
    cut trace (a response shorter than several budgets is one trace for all of them), or with
    ``finished="own_answer"`` the response's own text where it ended by itself within the budget."""
    keys: dict[tuple[int, int, int], int] = {}
    pairs_problems, pairs_traces = [], []
    for i, row in enumerate(responses):
        for j, response in enumerate(row):
            for budget in budgets:
                kept, truncated = truncate_response(response.tokens, budget)
                if finished == "own_answer" and not truncated and response.finish_reason == "stop":
                    continue
                key = (i, j, len(kept))
                if key not in keys:
                    keys[key] = len(pairs_traces)
                    pairs_problems.append(problems[i])
                    pairs_traces.append(TruncatedTrace(kept, tokenizer.decode(kept, skip_special_tokens=True),
                                                       truncated))
    texts = summarizer.answers(pairs_problems, pairs_traces)
    if len(texts) != len(pairs_traces):
        raise ValueError(f"the summariser gave {len(texts)} answers for {len(pairs_traces)} traces")

    def answer(i: int, j: int, response: Response, budget: int) -> str:
        if finished == "own_answer" and len(response.tokens) <= budget and response.finish_reason == "stop":
            return response.text
        return texts[keys[(i, j, min(budget, len(response.tokens)))]]

    return [[[answer(i, j, response, budget) for budget in budgets]
             for j, response in enumerate(row)] for i, row in enumerate(responses)]


def _score(name: str, problems: Sequence[ScalingProblem], responses: list[list[Response]], budgets: list[int],
           answers: list[list[list[str]]], check: Checker) -> tuple[CheckpointScaling, list[SampleRecord]]:
    """Checks every answer; pass@1 is averaged over samples within a problem, then over problems."""
    num_problems, num_samples = len(responses), len(responses[0])
    correct = np.array([[[check(answers[i][j][b], problems[i].gold) for b in range(len(budgets))]
                         for j in range(num_samples)] for i in range(num_problems)], dtype=bool)  # [P, N, B]
    own = np.array([[check(r.text, problems[i].gold) for r in row] for i, row in enumerate(responses)], bool)
    lengths = np.array([[len(r.tokens) for r in row] for row in responses])  # [P, N]
    cells = []
    for b, budget in enumerate(budgets):
        per_problem = correct[:, :, b].mean(axis=1)
        stderr = float(per_problem.std(ddof=1) / math.sqrt(num_problems)) if num_problems > 1 else None
        cells.append(BudgetAccuracy(budget, float(per_problem.mean()), stderr, int(correct[:, :, b].sum()),
                                    int(correct[:, :, b].size), float((lengths > budget).mean()),
                                    float(np.minimum(lengths, budget).mean())))
    entry = CheckpointScaling(
        name, tuple(cells), float(own.mean(axis=1).mean()), int(own.sum()), int(own.size), float(lengths.mean()),
        float(np.mean([[r.finish_reason == "length" for r in row] for row in responses])), 0.0, 0.0)
    records = [SampleRecord(name, problems[i].id, j, int(lengths[i, j]), responses[i][j].finish_reason,
                            bool(own[i, j]), tuple(answers[i][j]), tuple(bool(x) for x in correct[i, j]))
               for i in range(num_problems) for j in range(num_samples)]
    return entry, records


# -- the checkpoints of a training run -----------------------------------------------------------


def run_checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The checkpoint steps of a ``launch.train`` MODEL_DIR, ascending.

    Raises:
      CheckpointError: the run has no checkpoints.
    """
    directory = paths.as_path(run_dir) / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []
    if not steps:
        raise CheckpointError(f"{directory}: no checkpoints (is {run_dir} a launch.train MODEL_DIR?)")
    return steps


class RunCheckpoints(Mapping[str, Decoder]):
    """Checkpoints of a training run by name (``"step 200"``), each loaded on access with
    ``load_trained_model`` (so iterating holds one model at a time).

    Raises:
      CheckpointError: (at construction) a step that is not a checkpoint of the run.
    """

    def __init__(self, run_dir: str | Path, steps: Sequence[int] | None = None, **overrides: Any) -> None:
        available = run_checkpoint_steps(run_dir)
        steps = available if steps is None else list(steps)
        missing = [s for s in steps if s not in available]
        if missing:
            raise CheckpointError(f"{run_dir}: no checkpoint at step(s) {', '.join(map(str, missing))} "
                                  f"(it has {', '.join(map(str, available))})")
        self.run_dir = run_dir
        self.steps = steps
        self.overrides = overrides
        self._names = {f"step {s}": s for s in steps}

    def __getitem__(self, name: str) -> Decoder:
        return load_trained_model(self.run_dir, self._names[name], **self.overrides)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
