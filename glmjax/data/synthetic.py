"""The embedded default task: multi-step integer arithmetic with worked, self-checking solutions.

A problem is a left-to-right chain such as ``Compute (7+5)*3-4.``. Its solution works one
operation per step, checks every step with the inverse operation, sometimes makes a mistake first
(the check catches it, and the step is redone), and ends with an ``Answer:`` line::

    Step 1: 7+5=12. Check: 12-5=7, ok.
    Step 2: 12*3=35. Check: 35/3!=12, wrong. Redo: 12*3=36. Check: 36/3=12, ok.
    Step 3: 36-4=32. Check: 32+4=36, ok.
    Answer: 32

Numbers and operators are written without spaces, which keeps examples short: with the default
config and tokenizer (digits are single tokens) a whole chat is 65-210 tokens, about 105 on average.

Held-out problems: a problem belongs to the eval split when a hash of its expression falls below
``eval_fraction``, so train and eval never share an expression, whatever the seeds and sizes.
Generation uses :class:`random.Random`, so a (seed, config, split, count) always gives the same
problems.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from glmjax.data.chat_template import GMASK, SOP, TokenizerLike, encode_chat
from glmjax.data.sources import DataFormatError, JsonlSource

Split = Literal["train", "eval"]
RecordFormat = Literal["chat", "text"]

_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
_INVERSE = {"+": "-", "-": "+", "*": "/"}


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty of the synthetic problems.

    Attributes:
      min_ops, max_ops: number of operations per problem (inclusive range).
      max_operand: operands of ``+`` and ``-`` (and the first number) are drawn from
        ``[1, max_operand]``.
      max_factor: the right operand of ``*`` is drawn from ``[2, max_factor]``.
      max_value: no intermediate or final value exceeds this; values never go below 0.
      error_rate: probability that a step's first attempt is wrong (then caught and redone).
      eval_fraction: share of the expression space reserved for the eval split.
    """

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 20
    max_factor: int = 9
    max_value: int = 200
    error_rate: float = 0.25
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.max_operand < 1 or self.max_factor < 2 or self.max_value < self.max_operand:
            raise ValueError(
                "need max_operand >= 1, max_factor >= 2 and max_value >= max_operand, got "
                f"{self.max_operand}, {self.max_factor}, {self.max_value}"
            )
        if not 0.0 <= self.error_rate <= 1.0 or not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(
                f"need error_rate in [0, 1] and eval_fraction in (0, 1), got {self.error_rate}, "
                f"{self.eval_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: ``question`` for the user turn, ``solution`` for the assistant turn."""

    expression: str
    question: str
    solution: str
    answer: int

    def messages(self) -> list[dict[str, str]]:
        """The problem as a chat: a user question and the assistant's worked solution."""
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.solution},
        ]


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _split_of(expression: str, eval_fraction: float) -> Split:
    digest = hashlib.sha256(expression.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction else "train"


def _sample_chain(
    rng: random.Random, config: ArithmeticConfig
) -> tuple[int, list[tuple[str, int]]]:
    """Samples a start value and ``[(op, operand), ...]`` keeping values in ``[0, max_value]``."""
    value = start = rng.randint(1, config.max_operand)
    steps: list[tuple[str, int]] = []
    for _ in range(rng.randint(config.min_ops, config.max_ops)):
        choices = [
            op
            for op, allowed in (
                ("+", value < config.max_value),
                ("-", value > 0),
                ("*", 0 < value <= config.max_value // 2),
            )
            if allowed
        ]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, min(config.max_operand, config.max_value - value))
        elif op == "-":
            b = rng.randint(1, min(config.max_operand, value))
        else:
            b = rng.randint(2, min(config.max_factor, config.max_value // value))
        steps.append((op, b))
        value = _apply(op, value, b)
    return start, steps


def _expression(start: int, steps: Sequence[tuple[str, int]]) -> str:
    text, previous = str(start), None
    for op, b in steps:
        if op == "*" and previous in ("+", "-"):
            text = f"({text})"
        text, previous = f"{text}{op}{b}", op
    return text


def _check(op: str, a: int, b: int, result: int) -> str:
    """The inverse-operation check of ``a op b = result``, ending in ``ok.`` or ``wrong.``."""
    inverse = _INVERSE[op]
    if op == "*" and result % b:
        return f"Check: {result}/{b}!={a}, wrong."
    back = result // b if op == "*" else _apply(inverse, result, b)
    if back == a:
        return f"Check: {result}{inverse}{b}={back}, ok."
    return f"Check: {result}{inverse}{b}={back}!={a}, wrong."


def _wrong_result(rng: random.Random, correct: int) -> int:
    deltas = [d for d in (-3, -2, -1, 1, 2, 3) if correct + d >= 0]
    return correct + rng.choice(deltas)


def _solution(
    rng: random.Random, start: int, steps: Sequence[tuple[str, int]], error_rate: float
) -> tuple[str, int]:
    lines, value = [], start
    for number, (op, b) in enumerate(steps, start=1):
        correct = _apply(op, value, b)
        line = f"Step {number}: "
        if rng.random() < error_rate:
            wrong = _wrong_result(rng, correct)
            line += f"{value}{op}{b}={wrong}. {_check(op, value, b, wrong)} Redo: "
        line += f"{value}{op}{b}={correct}. {_check(op, value, b, correct)}"
        lines.append(line)
        value = correct
    lines.append(f"Answer: {value}")
    return "\n".join(lines), value


def generate_problems(
    num_problems: int, *, seed: int, split: Split, config: ArithmeticConfig = ArithmeticConfig()
) -> list[Problem]:
    """Generates ``num_problems`` problems of one split, deterministically.

    Eval problems are distinct from each other (so accuracy counts each once); train problems may
    repeat. Neither split ever contains an expression of the other.

    Raises:
      ValueError: an unknown split, or the eval split's expression space is too small for
        ``num_problems`` distinct problems.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < num_problems:
        attempts += 1
        if attempts > 1000 * (num_problems + 10):
            raise ValueError(
                f"could only generate {len(problems)} of {num_problems} distinct {split} problems "
                f"with {config}; raise eval_fraction or the operand ranges"
            )
        start, steps = _sample_chain(rng, config)
        expression = _expression(start, steps)
        if _split_of(expression, config.eval_fraction) != split:
            continue
        if split == "eval" and expression in seen:
            continue
        seen.add(expression)
        solution, answer = _solution(rng, start, steps, config.error_rate)
        problems.append(Problem(expression, f"Compute {expression}.", solution, answer))
    return problems


def problem_split(expression: str, config: ArithmeticConfig = ArithmeticConfig()) -> Split:
    """The split (``"train"`` or ``"eval"``) an expression belongs to under ``config``."""
    return _split_of(expression, config.eval_fraction)


def extract_answer(text: str) -> int | None:
    """The integer on the last ``Answer: N`` line of a generated solution, or None if there is none."""
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1]) if matches else None


def is_correct(text: str, answer: int) -> bool:
    """Exact match: the extracted answer equals ``answer``."""
    return extract_answer(text) == answer


def exact_match_accuracy(outputs: Sequence[str], answers: Sequence[int]) -> float:
    """Fraction of ``outputs`` whose extracted answer equals the matching entry of ``answers``."""
    if len(outputs) != len(answers) or not answers:
        raise ValueError(
            f"need equally many outputs and answers (at least one), got {len(outputs)} and {len(answers)}"
        )
    return sum(is_correct(o, a) for o, a in zip(outputs, answers)) / len(answers)


def problem_record(problem: Problem, fmt: RecordFormat) -> dict[str, object]:
    """A JSONL record: ``{"messages": [...], "answer": N}`` (chat) or ``{"text", "answer"}`` (text).

    The text format is ``question + "\\n" + solution``.
    """
    if fmt == "chat":
        return {"messages": problem.messages(), "answer": problem.answer}
    if fmt == "text":
        return {"text": f"{problem.question}\n{problem.solution}", "answer": problem.answer}
    raise ValueError(f"record format must be 'chat' or 'text', got {fmt!r}")


def write_arithmetic_jsonl(
    out_dir: str | Path,
    *,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    config: ArithmeticConfig = ArithmeticConfig(),
    fmt: RecordFormat = "chat",
) -> dict[str, Path]:
    """Writes ``train.jsonl`` and ``eval.jsonl`` under ``out_dir`` (records: :func:`problem_record`).

    Returns:
      ``{"train": path, "eval": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", num_train), ("eval", num_eval)):
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for problem in generate_problems(count, seed=seed, split=split, config=config):
                f.write(json.dumps(problem_record(problem, fmt), ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt for generation: int32 ``input_ids [n]`` and the expected ``answer``."""

    input_ids: np.ndarray
    answer: int


def load_eval_prompts(path: str | Path, tokenizer: TokenizerLike) -> list[EvalPrompt]:
    """Prompts of a file written by :func:`write_arithmetic_jsonl`, ready for greedy decoding.

    Chat records become the conversation without its final assistant turn plus the generation
    prompt ``<|assistant|>``; text records become ``[gMASK]<sop>{question}\n``. Generate until a
    stop token (:func:`glmjax.data.chat_template.stop_token_ids`), decode, and score the texts with
    :func:`exact_match_accuracy`.
    """
    source = JsonlSource(path, required_fields=["answer"])
    prompts = []
    for index in range(len(source)):
        record = source[index]
        if "messages" in record:
            ids = encode_chat(
                tokenizer, record["messages"][:-1], add_generation_prompt=True
            ).input_ids
        elif "text" in record:
            question = record["text"].split("\n", 1)[0]
            prefix = [tokenizer.convert_tokens_to_ids(t) for t in (GMASK, SOP)]
            text_ids = tokenizer.encode(f"{question}\n", add_special_tokens=False)
            ids = np.asarray(prefix + text_ids, np.int32)
        else:
            raise DataFormatError(
                f"{source.location(index)}: record has neither 'messages' nor 'text'"
            )
        prompts.append(EvalPrompt(ids, int(record["answer"])))
    return prompts
