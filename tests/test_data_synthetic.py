"""The synthetic arithmetic task: determinism, correctness, held-out split, scoring, files."""

import json
import re

import numpy as np
import pytest

from glmjax.data.chat_template import encode_chat, render_messages
from glmjax.data.sources import JsonlSource
from glmjax.data.synthetic import (
    ArithmeticConfig,
    exact_match_accuracy,
    extract_answer,
    generate_problems,
    is_correct,
    load_eval_prompts,
    problem_split,
    write_arithmetic_jsonl,
)
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer

_STEP = re.compile(
    r"(\d+)([-+*])(\d+)=(\d+)\. Check: (\d+)([-+/])(\d+)(?:=(\d+))?(?:!=(\d+))?, (ok|wrong)\."
)


def test_generation_is_deterministic():
    a = generate_problems(50, seed=3, split="train")
    assert a == generate_problems(50, seed=3, split="train")
    assert a != generate_problems(50, seed=4, split="train")
    assert generate_problems(20, seed=3, split="train") == a[:20]


def test_train_and_eval_never_share_a_problem():
    train = generate_problems(3000, seed=0, split="train")
    held_out = generate_problems(300, seed=0, split="eval")
    eval_expressions = [p.expression for p in held_out]
    assert len(set(eval_expressions)) == len(eval_expressions)
    assert not {p.expression for p in train} & set(eval_expressions)
    assert all(problem_split(e) == "eval" for e in eval_expressions)
    assert all(problem_split(p.expression) == "train" for p in train[:100])


def test_solutions_are_correct_and_checks_are_honest():
    config = ArithmeticConfig()
    problems = generate_problems(400, seed=1, split="train", config=config)
    wrong_steps = 0
    for problem in problems:
        assert problem.question == f"Compute {problem.expression}."
        assert problem.answer == eval(problem.expression)  # noqa: S307 - our own digits and +-*()
        assert 0 <= problem.answer <= config.max_value
        lines = problem.solution.split("\n")
        assert lines[-1] == f"Answer: {problem.answer}"
        assert config.min_ops <= len(lines) - 1 <= config.max_ops
        for line in lines[:-1]:
            attempts = _STEP.findall(line)
            assert attempts, line
            assert [a[-1] for a in attempts] == ["wrong"] * (len(attempts) - 1) + ["ok"]
            wrong_steps += len(attempts) - 1
            for a, op, b, result, checked, inverse, b2, back, claimed, verdict in attempts:
                true = eval(f"{a}{op}{b}")  # noqa: S307
                assert (int(result) == true) == (verdict == "ok"), line
                assert (checked, b2) == (result, b), line
                if back:  # the check's own arithmetic is right, and compared with the operand
                    assert int(back) == eval(f"{result}{inverse}{b}"), line  # noqa: S307
                    assert (int(back) == int(a)) == (verdict == "ok"), line
                if verdict == "wrong":
                    assert claimed == a, line
    assert 0.1 < wrong_steps / sum(p.solution.count("Step") for p in problems) < 0.4


def test_error_rate_and_operation_count_are_configurable():
    never = generate_problems(50, seed=0, split="train", config=ArithmeticConfig(error_rate=0.0))
    assert not any("wrong" in p.solution for p in never)
    always = ArithmeticConfig(min_ops=1, max_ops=1, error_rate=1.0)
    for p in generate_problems(50, seed=0, split="train", config=always):
        first, answer = p.solution.split("\n")
        assert first.count("wrong") == 1 and "Redo: " in first and answer == f"Answer: {p.answer}"
    with pytest.raises(ValueError, match="min_ops <= max_ops"):
        ArithmeticConfig(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="distinct eval problems"):
        generate_problems(
            100,
            seed=0,
            split="eval",
            config=ArithmeticConfig(min_ops=1, max_ops=1, max_operand=3, max_value=3, max_factor=2),
        )


def test_answer_extraction_and_exact_match():
    assert extract_answer("Step 1: ...\nAnswer: 12\nAnswer: -3") == -3
    assert extract_answer("no final line") is None
    assert is_correct("Answer: 42", 42) and not is_correct("Answer: 421", 42)
    assert exact_match_accuracy(["Answer: 1", "Answer: 3", "junk"], [1, 2, 3]) == pytest.approx(
        1 / 3
    )
    with pytest.raises(ValueError, match="equally many"):
        exact_match_accuracy(["Answer: 1"], [1, 2])


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_written_files(tmp_path, fmt):
    paths = write_arithmetic_jsonl(tmp_path, num_train=30, num_eval=10, seed=5, fmt=fmt)
    field = "messages" if fmt == "chat" else "text"
    train = JsonlSource(paths["train"], required_fields=[field, "answer"])
    held_out = JsonlSource(paths["eval"], required_fields=[field, "answer"])
    assert (len(train), len(held_out)) == (30, 10)
    problems = generate_problems(10, seed=5, split="eval")
    for index, problem in enumerate(problems):
        record = held_out[index]
        assert record["answer"] == problem.answer
        if fmt == "chat":
            assert record["messages"] == problem.messages()
        else:
            assert record["text"] == f"{problem.question}\n{problem.solution}"
    assert json.loads(paths["train"].read_text().splitlines()[0])["answer"] == train[0]["answer"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_default_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_eval_prompts(tmp_path, tokenizer, fmt):
    paths = write_arithmetic_jsonl(tmp_path, num_train=1, num_eval=5, seed=2, fmt=fmt)
    prompts = load_eval_prompts(paths["eval"], tokenizer)
    problems = generate_problems(5, seed=2, split="eval")
    assert [p.answer for p in prompts] == [p.answer for p in problems]
    for prompt, problem in zip(prompts, problems):
        assert prompt.input_ids.dtype == np.int32
        text = tokenizer.decode(prompt.input_ids.tolist())
        if fmt == "chat":
            user = problem.messages()[:1]
            assert text == render_messages(user, add_generation_prompt=True)
        else:
            assert text == f"[gMASK]<sop>{problem.question}\n"


def test_default_problems_fit_in_256_tokens(tokenizer):
    lengths = [
        len(encode_chat(tokenizer, p.messages()).input_ids)
        for p in generate_problems(300, seed=0, split="train")
    ]
    assert max(lengths) <= 256 and 60 <= np.mean(lengths) <= 160
