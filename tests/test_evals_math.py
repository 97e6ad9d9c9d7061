"""Final-answer extraction and math-verify answer matching (glmjax.evals.math).

Every expected value below was worked out by hand: e.g. 1/2 = 0.5 exactly, 1/3 = 0.333... is
not 0.33, 2(x+1) expands to 2x+2, sqrt(4) = 2, [1,2) and (1,2] differ at both ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from glmjax.data.synthetic import generate_problems
from glmjax.evals import math as answer_math
from glmjax.evals.math import answers_match, extract_final_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the result is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{3}, on reflection \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are literal, not groups
        (r"\boxed{\boxed{5}+1}", r"\boxed{5}+1"),  # the last top-level box
        (r"done: \boxed{4} and then \boxed{9", "4"),  # an unclosed box is ignored
        ("Step 1: 2+3=5. Check: 5-3=2, ok.\nAnswer: 5", "5"),
        ("Answer: 3\nwait, no.\nAnswer: 4.", "4"),
        ("Final Answer: $x^2+1$", "$x^2+1$"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.",
         "$\\frac{3}{4}$"),
        ("**Answer:** -7", "-7"),
        ("the final answer is 12", "12"),
        (r"Answer: 5, so \boxed{6}", "6"),  # a box beats an answer line
        ("no conclusion here", None),
        ("Answer:", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_final_answer_on_the_builtin_task():
    problem = generate_problems(1, seed=0, split="train")[0]
    assert problem.solution.endswith("Answer: 32")  # worked by hand: 2-2=0, 0+18=18, 18+14=32
    assert extract_final_answer(problem.solution) == "32"
    assert answers_match(problem.solution, "32")
    assert not answers_match(problem.solution, "31")


@pytest.mark.parametrize(
    "response, gold",
    [
        (r"\boxed{1/2}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.75}", "3/4"),
        (r"\boxed{0.75}", r"$\frac{3}{4}$"),
        (r"\boxed{\frac{3}{4}}", r"\boxed{3/4}"),
        (r"\boxed{2(x+1)}", "2x+2"),
        (r"\boxed{(x+1)^2}", "x^2+2x+1"),
        (r"\boxed{\sqrt{4}}", "2"),
        (r"\boxed{\{2,1\}}", r"\{1,2\}"),
        (r"\boxed{[1,2)}", "[1,2)"),
        (r"\boxed{-3}", "-3"),
        (r"\boxed{x=2}", "2"),
        (r"\boxed{1,000}", "1000"),
        (r"first \boxed{7}, then \boxed{\frac{6}{3}}", "2"),
        ("Answer: 32", "32"),
        ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75"),
    ],
)
def test_equivalent_answers_match(response, gold):
    assert answers_match(response, gold)


@pytest.mark.parametrize(
    "response, gold",
    [
        (r"\boxed{0.33}", "1/3"),
        (r"\boxed{1/3}", "0.33"),
        (r"\boxed{2}", "3"),
        (r"\boxed{x+1}", "x-1"),
        (r"\boxed{3}", "-3"),
        (r"\boxed{(1,2]}", "[1,2)"),
        (r"\boxed{\{1,3\}}", r"\{1,2\}"),
        (r"first \boxed{2}, then \boxed{7}", "2"),  # the last box is the answer
        ("Answer: 31", "32"),
    ],
)
def test_different_answers_do_not_match(response, gold):
    assert not answers_match(response, gold)


def test_no_final_answer_is_false():
    assert not answers_match("I think it is 2.", "2")
    assert not answers_match(r"\boxed{}", "2")
    assert not answers_match("", "2")


def test_bad_arguments():
    with pytest.raises(ValueError, match="gold answer is empty"):
        answers_match(r"\boxed{2}", "  ")
    with pytest.raises(ValueError, match="gold answer is empty"):
        answers_match(r"\boxed{2}", r"$\boxed{}$")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        answers_match(r"\boxed{2}", "2", timeout_s=0)


CASES = [
    (r"\boxed{1/2}", "0.5", True),
    (r"\boxed{2(x+1)}", "2x+2", True),
    (r"\boxed{0.33}", "1/3", False),
    (r"\boxed{\sqrt{4}}", "2", True),
    (r"\boxed{x+1}", "x-1", False),
    ("Answer: 32", "32", True),
]


def test_works_in_a_thread():
    results = []
    thread = threading.Thread(
        target=lambda: results.extend(answers_match(r, g) for r, g, _ in CASES)
    )
    thread.start()
    thread.join(timeout=120)
    assert results == [expected for _, _, expected in CASES]


def test_works_in_a_thread_pool():
    cases = CASES * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: answers_match(case[0], case[1]), cases))
    assert results == [expected for _, _, expected in cases]


PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"  # 9^(9^387420489): sympy would try to evaluate it


def test_pathological_input_returns_false_within_the_bound():
    assert answers_match(r"\boxed{2}", "2.0")  # a warm worker, so the timing is the check's
    start = time.monotonic()
    assert not answers_match(PATHOLOGICAL, "3", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3.0, elapsed  # it ran into the limit, and the limit held
    assert answers_match(r"\boxed{2}", "2.0")  # the killed worker was replaced


def test_pathological_input_off_the_main_thread_does_not_block_others():
    cases = [(PATHOLOGICAL, "3", False)] + CASES
    with ThreadPoolExecutor(max_workers=3) as pool:
        start = time.monotonic()
        futures = [pool.submit(answers_match, r, g, timeout_s=1.5) for r, g, _ in cases]
        results = [f.result() for f in futures]
        elapsed = time.monotonic() - start
    assert results == [expected for _, _, expected in cases]
    assert elapsed < 15.0, elapsed  # includes starting the extra workers on a loaded machine


def test_a_worker_that_died_while_idle_is_replaced():
    assert answers_match(r"\boxed{1/2}", "0.5")
    pool = answer_math._pool()
    with pool._lock:
        idle = list(pool._idle)
    assert idle
    for worker in idle:
        worker._process.kill()
        worker._process.wait()
    assert answers_match(r"\boxed{1/2}", "0.5")


ORPHAN_SCRIPT = r"""
import importlib.util, os, sys, threading, time
# This module alone (as the workers load it): importing the glmjax.evals package imports JAX.
spec = importlib.util.spec_from_file_location("answer_math", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
answers_match = module.answers_match
assert answers_match(r"\boxed{2}", "2.0")  # one worker, started and idle
threading.Thread(target=answers_match, args=(sys.argv[1], "3"), kwargs={"timeout_s": 1.0},
                 daemon=True).start()
time.sleep(0.5)  # the check is running
children = [int(pid) for task in os.listdir("/proc/self/task")
            for pid in open(f"/proc/self/task/{task}/children").read().split()]
print(*children, flush=True)
os._exit(0)  # die mid-check: no atexit, no kill of the worker
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_a_worker_whose_parent_dies_mid_check_stops(tmp_path):
    # stderr to a file: the orphan inherits it, and a pipe would stay open until it ends.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        out = subprocess.run(
            [sys.executable, "-c", ORPHAN_SCRIPT, PATHOLOGICAL, answer_math.__file__],
            stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120,
        )
    assert out.returncode == 0, (tmp_path / "stderr.txt").read_text()
    (worker,) = map(int, out.stdout.split())
    assert _running(worker)
    deadline = time.monotonic() + 20  # CPU limit: about timeout_s + 2 s of CPU time
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(worker), f"worker {worker} still running after its parent died"
