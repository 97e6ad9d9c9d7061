"""Rule-based RL rewards (glmjax.evals.rewards): correctness, penalties and how they combine.

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import gin
import pytest

from glmjax.data.synthetic import generate_problems
from glmjax.evals.rewards import (
    Response,
    Reward,
    RuleReward,
    garbled_reason,
    repeated_ngram_fraction,
    score_responses,
    tokenize_for_repetition,
)

LOOP = "Step 3: 5+1=6. " * 20 + "Answer: 6"

# A self-verifying chain of thought of the kind T1 trains on: it re-checks cases and repeats
# phrases ("let me double check", "divisible"), and must not count as repetitive.
COT = r"""Let me work through this. We need the positive integers $n \le 100$ with $5 \mid n^2+1$.
Consider $n \bmod 5$. If $n \equiv 0$, then $n^2+1 \equiv 1$. If $n \equiv 1$, then $n^2+1 \equiv 2$.
If $n \equiv 2$, then $n^2+1 \equiv 5 \equiv 0$. If $n \equiv 3$, then $n^2+1 \equiv 10 \equiv 0$.
If $n \equiv 4$, then $n^2+1 \equiv 17 \equiv 2$. Wait, let me double check the case $n \equiv 4$:
$16+1=17$ and $17 \bmod 5 = 2$. Yes. So we need $n \equiv 2$ or $n \equiv 3 \pmod 5$: 20 numbers
each, 40 in all. Let me verify small cases: $n=2$ gives 5, divisible; $n=3$ gives 10, divisible;
$n=4$ gives 17, not divisible. Let me double check the count: $2, 7, \dots, 97$ is
$(97-2)/5+1 = 20$ numbers. Therefore the answer is $\boxed{40}$."""


def stop(text: str, num_tokens: int = 50) -> Response:
    return Response(text, num_tokens, "stop")


# ---------------------------------------------------------------- building blocks


def test_tokenize_for_repetition():
    assert tokenize_for_repetition("Step 1: 7+5=12.\nCheck:  ok.") == [
        "Step", "1:", "7+5=12.", "Check:", "ok."]
    assert tokenize_for_repetition("答案是12。ok") == ["答", "案", "是", "12。ok"]


def test_repeated_ngram_fraction_by_hand():
    # "a b a b a b", n=2: bigrams ab ba ab ba ab -> 5, distinct 2 -> 1 - 2/5.
    assert repeated_ngram_fraction("a b a b a b".split(), 2) == pytest.approx(0.6)
    assert repeated_ngram_fraction("a b c d".split(), 2) == 0.0
    assert repeated_ngram_fraction("a b".split(), 3) == 0.0  # no trigram at all
    # LOOP: 60 looping tokens + "Answer:" "6" = 62 tokens, 59 4-grams; distinct: 3 inside the
    # loop + 2 that reach into the answer line -> 1 - 5/59.
    assert repeated_ngram_fraction(tokenize_for_repetition(LOOP), 4) == pytest.approx(54 / 59)
    # "我们" x 40: 80 one-character tokens, 77 4-grams, 2 distinct (我们我们, 们我们我).
    assert repeated_ngram_fraction(tokenize_for_repetition("我们" * 40), 4) == pytest.approx(75 / 77)


def test_cot_is_not_repetitive():
    assert repeated_ngram_fraction(tokenize_for_repetition(COT), 4) < 0.15


@pytest.mark.parametrize(
    "text, reason",
    [
        ("abc\ufffddef", "U+FFFD"),
        ("abc\x07def", "U+0007"),
        ("abc\ue000def", "U+E000 (category Co)"),
        ("x" + "!" * 65, "65 repeats of '!'"),
        ("see " + "}{)(*&^%" * 8 + "] end", "65 symbols without a letter or digit"),
    ],
)
def test_garbled_rules(text, reason):
    assert reason in garbled_reason(text, max_run=64)


@pytest.mark.parametrize(
    "text",
    [
        "tabs\tand\r\nnewlines are fine",
        "x" + "!" * 64,  # a run of exactly max_run is allowed
        "a markdown rule\n" + "-" * 40 + "\nand text",
        r"$\left(\frac{1}{2}\right)^{2}$ and (((1+2))) and 0.333333333333",
        "答案是十二。",
        COT,
    ],
)
def test_not_garbled(text):
    assert garbled_reason(text, max_run=64) is None


# ---------------------------------------------------------------- RuleReward


def test_response_validation():
    with pytest.raises(ValueError, match="Response.finish_reason"):
        Response("x", 3, "eos")
    with pytest.raises(ValueError, match="Response.num_tokens"):
        Response("x", -1, "stop")
    with pytest.raises(TypeError, match="Response.text"):
        Response(None, 1, "stop")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"checker": "regex"}, "checker"),
        ({"correct_reward": float("nan")}, "correct_reward"),
        ({"correct_reward": 0.0}, "correct_reward"),
        ({"truncation_penalty": 1.0}, "truncation_penalty"),
        ({"overlong_penalty": 0.5}, "overlong_penalty"),
        ({"repetition_penalty": float("-inf")}, "repetition_penalty"),
        ({"garbled_penalty": 2.0}, "garbled_penalty"),
        ({"max_response_tokens": 0}, "max_response_tokens"),
        ({"repetition_ngram": 0}, "repetition_ngram"),
        ({"repetition_threshold": 1.0}, "repetition_threshold"),
        ({"garbled_max_run": 1}, "garbled_max_run"),
        ({"penalty_combine": "max"}, "penalty_combine"),
        ({"answer_timeout_s": 0.0}, "answer_timeout_s"),
    ],
)
def test_rule_reward_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^RuleReward\.{field} must be"):
        RuleReward(**kwargs)


def test_correctness_rewards():
    math_reward = RuleReward()
    assert math_reward("0.5", stop(r"so \boxed{\frac{1}{2}}")) == Reward(1.0, True, ())
    assert math_reward("0.5", stop(r"so \boxed{\frac{1}{3}}")) == Reward(0.0, False, ())
    assert math_reward("0.5", stop("no answer")) == Reward(0.0, False, ())
    arithmetic = RuleReward(checker="arithmetic", correct_reward=2.0, incorrect_reward=-0.5)
    assert arithmetic("32", stop("Step 1: 30+2=32.\nAnswer: 32")) == Reward(2.0, True, ())
    assert arithmetic("32", stop("Answer: 33")) == Reward(-0.5, False, ())
    with pytest.raises(ValueError, match="integer gold answer, got '3/4'"):
        arithmetic("3/4", stop("Answer: 1"))


def test_truncation():
    text = r"\boxed{2} and I keep going"
    assert RuleReward()("2", Response(text, 100, "length")) == Reward(-1.0, False, ("truncated",))
    lenient = RuleReward(truncated_is_incorrect=False)  # 1 + (-1) = 0
    assert lenient("2", Response(text, 100, "length")) == Reward(0.0, True, ("truncated",))
    off = RuleReward(truncation_penalty=0.0)  # disabled: not detected, still not correct
    assert off("2", Response(text, 100, "length")) == Reward(0.0, False, ())


def test_overlong():
    reward = RuleReward(max_response_tokens=10, overlong_penalty=-0.25)
    assert reward("2", stop(r"\boxed{2}", 10)) == Reward(1.0, True, ())
    assert reward("2", stop(r"\boxed{2}", 11)) == Reward(0.75, True, ("overlong",))
    assert RuleReward()("2", stop(r"\boxed{2}", 10**6)) == Reward(1.0, True, ())  # no limit


def test_repetition_penalty():
    reward = RuleReward(checker="arithmetic")
    assert reward("6", stop(LOOP)) == Reward(0.0, True, ("repetition",))  # 1 + (-1)
    assert reward("6", stop("the " * 50 + "Answer: 6")) == Reward(0.0, True, ("repetition",))
    # A phrase said twice is not a loop: "a b c d a b c d Answer: 6" has 10 tokens, 7 4-grams
    # (abcd bcda cdab dabc abcd bcdA cdA6), 6 distinct -> fraction 1/7 = 0.143.
    assert reward("6", stop("a b c d a b c d Answer: 6")) == Reward(1.0, True, ())
    strict = RuleReward(checker="arithmetic", repetition_threshold=0.1)
    assert strict("6", stop("a b c d a b c d Answer: 6")).penalties == ("repetition",)
    assert RuleReward()("40", stop(COT)) == Reward(1.0, True, ())
    off = RuleReward(checker="arithmetic", repetition_penalty=0.0)
    assert off("6", stop(LOOP)) == Reward(1.0, True, ())


def test_garbled_penalty():
    reward = RuleReward(checker="arithmetic", garbled_penalty=-0.5)
    assert reward("6", stop("Answer: 6 \ufffd")) == Reward(0.5, True, ("garbled",))
    assert reward("6", stop("#" * 70 + "\nAnswer: 7")) == Reward(-0.5, False, ("garbled",))
    shorter = RuleReward(checker="arithmetic", garbled_max_run=5)
    assert shorter("6", stop("?!?!?! Answer: 6")).penalties == ("garbled",)


def test_penalties_combine():
    # A loop of "!!..." that also hits the budget: truncated, repetition and garbled.
    text = "! " * 10 + "!" * 80
    response = Response(text, 500, "length")
    assert RuleReward()("6", response) == Reward(-1.0, False, ("truncated", "repetition", "garbled"))
    summed = RuleReward(penalty_combine="sum")
    assert summed("6", response) == Reward(-3.0, False, ("truncated", "repetition", "garbled"))
    mixed = RuleReward(truncation_penalty=-0.5, garbled_penalty=-2.0, repetition_penalty=-0.25)
    assert mixed("6", response).value == -2.0  # the most negative one
    mixed_sum = RuleReward(truncation_penalty=-0.5, garbled_penalty=-2.0,
                           repetition_penalty=-0.25, penalty_combine="sum")
    assert mixed_sum("6", response).value == -2.75


@pytest.mark.parametrize("checker", ["arithmetic", "math"])
def test_genuine_synthetic_solutions_are_correct_and_unpenalised(checker):
    problems = generate_problems(200, seed=0, split="train")
    reward = RuleReward(checker=checker)
    golds = [str(p.answer) for p in problems]
    responses = [stop(p.solution, 120) for p in problems]
    rewards = score_responses(reward, golds, responses)
    assert rewards == [Reward(1.0, True, ())] * 200
    # Shifted golds: every answer is wrong, still no penalty.
    wrong = score_responses(reward, [str(p.answer + 1) for p in problems], responses)
    assert wrong == [Reward(0.0, False, ())] * 200


def test_score_responses_keeps_order():
    reward = RuleReward()
    golds = ["0.5", "2x+2", "3", "7"] * 3
    texts = [r"\boxed{1/2}", r"\boxed{2(x+1)}", r"\boxed{4}", "Answer: 7"] * 3
    responses = [stop(t) for t in texts]
    expected = [reward(g, r) for g, r in zip(golds, responses)]
    assert [r.correct for r in expected] == [True, True, False, True] * 3
    assert score_responses(reward, golds, responses, max_workers=4) == expected
    assert score_responses(reward, [], []) == []
    with pytest.raises(ValueError, match="one gold answer per response"):
        score_responses(reward, golds[:2], responses)
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        score_responses(reward, golds, responses, max_workers=0)


def test_gin_configurable():
    gin.clear_config()
    try:
        gin.parse_config(
            "RuleReward.checker = 'arithmetic'\n"
            "RuleReward.truncation_penalty = -0.5\n"
            "RuleReward.max_response_tokens = 64\n"
        )
        reward = RuleReward()
        assert (reward.checker, reward.truncation_penalty, reward.max_response_tokens) == (
            "arithmetic", -0.5, 64)
    finally:
        gin.clear_config()
