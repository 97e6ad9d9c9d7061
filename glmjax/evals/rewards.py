"""Rule-based rewards of RL rollouts: correctness plus penalties (T1's recipe).

A response earns ``correct_reward`` (1) when its final answer matches the gold answer, else
``incorrect_reward`` (0). Penalties are detected by rule, each with its own value (T1: -1; a value
of 0 switches the rule off):

- ``truncated``: the engine stopped at the generation budget (``finish_reason == "length"``).
  A truncated response is never correct (``truncated_is_incorrect``): the answer it holds was not
  its final word.
- ``overlong``: more than ``max_response_tokens`` generated tokens (a soft limit below the
  budget; off when None).
- ``repetition``: in the response's n-gram sequence (:func:`repeated_ngram_fraction`), more than
  ``repetition_threshold`` of the n-grams repeat an earlier one.
- ``garbled``: any rule of :func:`garbled_reason` fires (decode errors, control characters, long
  runs of one character or of symbols).

How they combine (``penalty_combine``): ``"min"`` (default) adds only the most negative detected
penalty, T1's "r -= 1 if the output is truncated or repetitive/garbled", so a looping response
that also hits the budget gets -1, not -2; ``"sum"`` adds them all. ``Reward.penalties`` names
every detected penalty either way.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import gin

from glmjax.data import synthetic
from glmjax.evals.math import DEFAULT_TIMEOUT_S, answers_match

FINISH_REASONS = ("stop", "length")
CHECKERS = ("math", "arithmetic")
PENALTY_COMBINES = ("min", "sum")

# A CJK ideograph, kana or hangul syllable is a token of its own; other tokens are maximal runs
# of non-space characters of any other kind.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_ALLOWED_CONTROL = frozenset("\t\n\r")
_BAD_CATEGORIES = frozenset(("Cc", "Cs", "Co", "Cn"))


@dataclasses.dataclass(frozen=True)
class Response:
    """One sampled completion.

    Attributes:
      text: the decoded completion (special tokens skipped).
      num_tokens: generated tokens, including a final stop token.
      finish_reason: "stop" or "length" (the engine's ``GenerationResult.finish_reason``).
    """

    text: str
    num_tokens: int
    finish_reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Response.text must be a str, got {type(self.text).__name__}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise ValueError(f"Response.num_tokens must be an int >= 0, got {self.num_tokens!r}")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Response.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}"
            )


@dataclasses.dataclass(frozen=True)
class Reward:
    """The reward of one response.

    Attributes:
      value: the total reward used by RL (correctness reward plus the combined penalties).
      correct: whether the final answer matched (always False for a truncated response when
        ``truncated_is_incorrect``).
      penalties: names of the detected penalties, in the order truncated, overlong, repetition,
        garbled.
    """

    value: float
    correct: bool
    penalties: tuple[str, ...]


def tokenize_for_repetition(text: str) -> list[str]:
    """Whitespace-separated words; each CJK ideograph, kana or hangul character is its own token."""
    return _TOKEN_RE.findall(text)


def repeated_ngram_fraction(tokens: Sequence[str], n: int) -> float:
    """Share of the ``len(tokens) - n + 1`` n-grams that repeat an earlier one (0 if there are none).

    A loop of a p-token phrase (p >= n) repeated R times scores about ``1 - 1/R``; text without a
    repeated n-gram scores 0.
    """
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(tokens[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


def garbled_reason(text: str, max_run: int) -> str | None:
    """Why ``text`` counts as garbled output, or None when it does not.

    Rules, checked in order:
      1. it holds U+FFFD (a decode of invalid UTF-8 bytes);
      2. it holds a control character other than tab, newline and carriage return, a lone
         surrogate, a private-use or an unassigned code point (Unicode categories Cc, Cs, Co, Cn);
      3. one non-space character repeats more than ``max_run`` times in a row ("!!!!...");
      4. more than ``max_run`` consecutive non-space characters hold no letter or digit
         ("}{)(*&^%...").
    """
    if "\ufffd" in text:
        return "replacement character U+FFFD"
    for char in text:
        if char not in _ALLOWED_CONTROL and unicodedata.category(char) in _BAD_CATEGORIES:
            return f"code point U+{ord(char):04X} (category {unicodedata.category(char)})"
    run = re.search(rf"(\S)\1{{{max_run},}}", text)
    if run is not None:
        return f"{len(run.group(0))} repeats of {run.group(1)!r}"
    junk = re.search(rf"[^\w\s]{{{max_run + 1},}}", text)
    if junk is not None:
        return f"{len(junk.group(0))} symbols without a letter or digit"
    return None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RuleReward:
    """``reward_fn(gold, response) -> Reward``: correctness by rule plus penalties (module doc).

    Attributes:
      checker: "math" (:func:`glmjax.evals.math.answers_match`, gold any math answer) or
        "arithmetic" (the built-in task's exact match, :func:`glmjax.data.synthetic.is_correct`,
        gold an integer string).
      correct_reward, incorrect_reward: the correctness reward (T1: 1 and 0).
      truncation_penalty: added when ``finish_reason == "length"`` (T1: -1).
      truncated_is_incorrect: a truncated response is never correct.
      max_response_tokens: responses with more generated tokens are over-long (None: no limit).
      overlong_penalty: added to over-long responses (T1: -1).
      repetition_penalty: added to repetitive responses (T1: -1).
      repetition_ngram: n of the n-grams, in :func:`tokenize_for_repetition` tokens.
      repetition_threshold: repetitive when :func:`repeated_ngram_fraction` exceeds it.
      garbled_penalty: added to garbled responses (T1: -1).
      garbled_max_run: the run length of :func:`garbled_reason`'s rules 3 and 4, in characters.
      penalty_combine: "min" adds the most negative detected penalty, "sum" adds them all.
      answer_timeout_s: time limit of one ``answers_match`` check (checker "math").
    """

    checker: str = "math"
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    truncation_penalty: float = -1.0
    truncated_is_incorrect: bool = True
    max_response_tokens: int | None = None
    overlong_penalty: float = -1.0
    repetition_penalty: float = -1.0
    repetition_ngram: int = 4
    repetition_threshold: float = 0.5
    garbled_penalty: float = -1.0
    garbled_max_run: int = 64
    penalty_combine: str = "min"
    answer_timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        def fail(field: str, requirement: str) -> None:
            raise ValueError(
                f"RuleReward.{field} must be {requirement}, got {getattr(self, field)!r}"
            )

        if self.checker not in CHECKERS:
            fail("checker", f"one of {CHECKERS}")
        for field in ("correct_reward", "incorrect_reward"):
            if not math.isfinite(getattr(self, field)):
                fail(field, "finite")
        if not self.correct_reward > self.incorrect_reward:
            fail("correct_reward", f"> incorrect_reward ({self.incorrect_reward!r})")
        for field in ("truncation_penalty", "overlong_penalty", "repetition_penalty",
                      "garbled_penalty"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value <= 0):
                fail(field, "finite and <= 0 (0 disables it)")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            fail("max_response_tokens", "None or >= 1")
        if self.repetition_ngram < 1:
            fail("repetition_ngram", ">= 1")
        if not 0.0 <= self.repetition_threshold < 1.0:
            fail("repetition_threshold", "in [0, 1)")
        if self.garbled_max_run < 2:
            fail("garbled_max_run", ">= 2")
        if self.penalty_combine not in PENALTY_COMBINES:
            fail("penalty_combine", f"one of {PENALTY_COMBINES}")
        if not self.answer_timeout_s > 0:
            fail("answer_timeout_s", "> 0")

    def is_correct(self, gold: str, text: str) -> bool:
        """The checker's verdict on ``text`` against ``gold`` (no penalties)."""
        if self.checker == "arithmetic":
            try:
                expected = int(gold)
            except (TypeError, ValueError):
                raise ValueError(
                    f"checker 'arithmetic' needs an integer gold answer, got {gold!r}"
                ) from None
            return synthetic.is_correct(text, expected)
        return answers_match(text, gold, timeout_s=self.answer_timeout_s)

    def detect_penalties(self, response: Response) -> list[tuple[str, float]]:
        """``[(name, value), ...]`` of the enabled penalties that ``response`` triggers."""
        found = []
        if self.truncation_penalty and response.finish_reason == "length":
            found.append(("truncated", self.truncation_penalty))
        if (self.overlong_penalty and self.max_response_tokens is not None
                and response.num_tokens > self.max_response_tokens):
            found.append(("overlong", self.overlong_penalty))
        if self.repetition_penalty:
            tokens = tokenize_for_repetition(response.text)
            if repeated_ngram_fraction(tokens, self.repetition_ngram) > self.repetition_threshold:
                found.append(("repetition", self.repetition_penalty))
        if self.garbled_penalty and garbled_reason(response.text, self.garbled_max_run):
            found.append(("garbled", self.garbled_penalty))
        return found

    def __call__(self, gold: str, response: Response) -> Reward:
        if self.truncated_is_incorrect and response.finish_reason == "length":
            correct = False
        else:
            correct = self.is_correct(gold, response.text)
        value = self.correct_reward if correct else self.incorrect_reward
        found = self.detect_penalties(response)
        if found:
            values = [penalty for _, penalty in found]
            value += min(values) if self.penalty_combine == "min" else sum(values)
        return Reward(float(value), correct, tuple(name for name, _ in found))


def score_responses(
    reward_fn: Callable[[str, Response], Reward],
    golds: Sequence[str],
    responses: Sequence[Response],
    max_workers: int = 4,
) -> list[Reward]:
    """``reward_fn(golds[i], responses[i])`` for every i, on a thread pool; order kept.

    Raises:
      ValueError: ``golds`` and ``responses`` differ in length, or ``max_workers < 1``.
    """
    if len(golds) != len(responses):
        raise ValueError(
            f"need one gold answer per response, got {len(golds)} golds and {len(responses)} responses"
        )
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if not responses:
        return []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(responses))) as pool:
        return list(pool.map(reward_fn, golds, responses))
