"""The arithmetic long-context task and its rule judge for LongReward experiments.

``launch.longreward_experiment`` runs LongReward -> DPO with them on CPU. The context of a prompt
is a *fact sheet* (the true results of the problem's steps, ``Fact 3: 12*3=36.``, shuffled among
true facts of other chains), the query the bare question; :class:`ArithmeticRuleJudge` is an
:class:`~glmjax.inference.llm_client.LLMClient` that answers the pipeline's default judge prompts
by parsing them and checking the arithmetic (a RULE, not an LLM: the scores are deterministic):

* helpfulness: 10 if the final ``Answer: N`` is the problem's value, else 0;
* logicality: 10 x the fraction of sound parts (:func:`logicality`);
* statements: each step's last equation; support: ``fully`` when a retrieved passage states the
  equation, ``partially`` when it is arithmetically true but not in the passages, else ``not``;
* relevant information of a chunk: its facts on the problem's chain; completeness: 10 x the
  fraction of those equations that the answer writes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from glmjax.data.chat_format import Reply
from glmjax.data.synthetic import ArithmeticConfig, generate_problems
from glmjax.inference.llm_client import AssistantTurn, LLMClient
from glmjax.pipelines.runner import write_jsonl_atomic


TASK = ArithmeticConfig(min_ops=1, max_ops=2, max_operand=9, max_factor=5, max_value=60, error_rate=0.2)
"""The quickstart's difficulty (configs/arithmetic_sft.gin)."""

JUDGE_SETTINGS = dict(chunk_tokens=18, top_k_chunks=2, completeness_chunk_tokens=4096)
"""Each fact is 9 retrieval tokens, so an 18-token chunk holds two whole facts."""

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_EQUATION = r"(\d+)([+\-*])(\d+)=(-?\d+)"
_ATTEMPT = re.compile(_EQUATION + r"\.\s*(Check:[^,]*,\s*(ok|wrong)\.?)")
_INVERSE = {"+": "-", "-": "+", "*": "/"}
_FACT = re.compile(r"Fact \d+: " + _EQUATION + r"\.")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


# ------------------------------------------------------------------------------- the task

def chain_of(question: str) -> list[tuple[int, str, int, int]]:
    """The steps ``(a, op, b, a op b)`` of ``Compute <expression>.``, left to right."""
    tokens = re.findall(r"\d+|[+\-*]", question)
    value, steps = int(tokens[0]), []
    for op, b in zip(tokens[1::2], tokens[2::2]):
        result = _OPS[op](value, int(b))
        steps.append((value, op, int(b), result))
        value = result
    return steps


def equation(a: int, op: str, b: int, result: int) -> str:
    return f"{a}{op}{b}={result}"


def _states(text: str, eq: str) -> bool:
    """Whether ``text`` writes the equation ``eq`` (not as part of a longer number)."""
    return re.search(rf"(?<!\d){re.escape(eq)}(?!\d)", text) is not None


def fact_sheet(steps: Sequence[tuple[int, str, int, int]], rng: random.Random, distractors: int) -> str:
    """The chain's facts among ``distractors`` true facts of other random chains, shuffled, numbered."""
    facts = {equation(*step) for step in steps}
    others: list[str] = []
    while len(others) < distractors:
        (problem,) = generate_problems(1, seed=rng.randrange(2**31), split="train", config=TASK)
        for step in chain_of(problem.question):
            fact = equation(*step)
            if fact not in facts and fact not in others and len(others) < distractors:
                others.append(fact)
    lines = sorted(facts) + others
    rng.shuffle(lines)
    return "\n".join(f"Fact {i}: {fact}." for i, fact in enumerate(lines, start=1))


def write_prompts(path: Path, split: str, count: int, seed: int, distractors: int) -> int:
    """Writes ``count`` prompts ``{id, context, query, answer}`` of ``split`` (module docstring)."""
    rows = []
    for index, problem in enumerate(generate_problems(count, seed=seed, split=split, config=TASK)):
        rng = random.Random(f"longreward-{seed}-{split}-{index}")
        rows.append({"id": f"{split}-{index}", "context": fact_sheet(chain_of(problem.question), rng, distractors),
                     "query": problem.question, "answer": problem.answer})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl_atomic(path, rows)


# -------------------------------------------------------------------------------- the judge

def _section(prompt: str, name: str, end: str) -> str:
    match = re.search(rf"\[{re.escape(name)}\]\n(.*?)\n\[End of {re.escape(end)}\]", prompt, re.S)
    if match is None:
        raise ValueError(f"the judge prompt has no [{name}] section (the rule judge reads the default prompts)")
    return match.group(1)


def expected_check(a: int, op: str, b: int, result: int) -> str | None:
    """The right check of the attempt ``a op b = result``: the inverse operation and its verdict;
    None for ``a*0`` (the task never multiplies by 0: no check of it is right)."""
    inverse = _INVERSE[op]
    if op == "*" and b == 0:
        return None
    if op == "*" and result % b:
        return f"Check: {result}/{b}!={a}, wrong."
    back = result // b if op == "*" else _OPS[inverse](result, b)
    return f"Check: {result}{inverse}{b}={back}, ok." if back == a else f"Check: {result}{inverse}{b}={back}!={a}, wrong."


def _step_lines(answer: str) -> list[str]:
    return [line for line in answer.splitlines() if line.lstrip().startswith("Step")]


def logicality(query: str, answer: str) -> float:
    """The rule's logicality (module docstring), 0-10."""
    lines = _step_lines(answer)
    if not lines:
        return 0.0
    sound, previous = 0, chain_of(query)[0][0]
    for line in lines:
        attempts = _ATTEMPT.findall(line)
        checks_right = all(check.rstrip(".") + "." == expected_check(int(a), op, int(b), int(r))
                           for a, op, b, r, check, _ in attempts)
        if attempts:
            a, op, b, r, _, verdict = attempts[-1]
            if checks_right and verdict == "ok" and _OPS[op](int(a), int(b)) == int(r) and int(a) == previous:
                sound += 1
            previous = int(r)
    answers = _ANSWER.findall(answer)
    sound += bool(answers) and int(answers[-1]) == previous
    return 10.0 * sound / (len(lines) + 1)


def stated_equations(answer: str) -> list[str]:
    """Each step line's last attempted equation."""
    return [equation(int(a), op, int(b), int(r)) for line in _step_lines(answer)
            for a, op, b, r, _, _ in _ATTEMPT.findall(line)[-1:]]


class ArithmeticRuleJudge(LLMClient):
    """Answers LongReward's default judge prompts by rule (module docstring); deterministic, so
    the sampling settings are ignored."""

    def reply(self, prompt: str) -> str:
        if "whether a statement is supported" in prompt:
            statement = _section(prompt, "Statement", "statement").strip()
            passages = _section(prompt, "Passages", "passages")
            match = re.fullmatch(_EQUATION, statement)
            if match and _states(passages, statement):
                return "[[Fully supported]]"
            if match and _OPS[match.group(2)](int(match.group(1)), int(match.group(3))) == int(match.group(4)):
                return "True, but the passages do not state it: [[Partially supported]]"
            return "[[Not supported]]"
        query = _section(prompt, "Question", "question")
        chain = {equation(*step) for step in chain_of(query)}
        if "Extract from this part" in prompt:
            facts = [equation(int(a), op, int(b), int(r))
                     for a, op, b, r in _FACT.findall(_section(prompt, "Part of the document", "part"))]
            relevant = [fact for fact in facts if fact in chain]
            return "\n".join(f"- {fact}" for fact in relevant) if relevant else "[[None]]"
        answer = _section(prompt, "Answer", "answer")
        if "FACTUAL" in prompt:
            return "\n".join(f"- {eq}" for eq in stated_equations(answer)) or "[[None]]"
        if "how HELPFUL" in prompt:
            truth, given = chain_of(query)[-1][3], _ANSWER.findall(answer)
            right = bool(given) and int(given[-1]) == truth
            return f"The final answer is {'right' if right else 'missing or wrong'}.\nRating: [[{10 if right else 0}]]"
        if "the LOGICALITY" in prompt:
            return f"Rating: [[{logicality(query, answer):.4f}]]"
        if "the COMPLETENESS" in prompt:
            information = _section(prompt, "Relevant information from the document", "relevant information")
            needed = re.findall(r"^- (.+)$", information, re.M)
            covered = sum(_states(answer, eq) for eq in needed)
            return f"Rating: [[{10.0 * covered / len(needed) if needed else 0.0:.4f}]]"
        raise ValueError(f"not a LongReward judge prompt: {prompt[:80]!r}")

    def complete(self, messages, sampling=None) -> str:
        return self.reply(messages[-1]["content"])

    def complete_batch(self, conversations, sampling=None) -> list[str]:
        return [self.reply(messages[-1]["content"]) for messages in conversations]

    def assistant_turns(self, conversations, sampling=None, tools=None) -> list[AssistantTurn]:
        return [AssistantTurn(text, [], [], "stop", Reply(text)) for text in self.complete_batch(conversations)]
