"""Rule-based correctness of a math answer: the response's final answer checked with math-verify.

:func:`extract_final_answer` finds the final answer of a response: the content of its last
``\\boxed{...}`` (or ``\\fbox{...}``), else its last answer line (``Answer: 32``, the built-in
task's format; ``Final Answer: ...``; ``The final answer is ...``). :func:`answers_match` checks
that answer against a gold answer with math-verify (symbolic and numeric equivalence: ``1/2`` and
``0.5``, ``2x+2`` and ``2(x+1)``, sets, intervals, ...).

Time limit, off the main thread too: math-verify's own timeout uses ``signal.alarm``, which only
works in the main thread, so it is switched off (``parsing_timeout=None``,
``timeout_seconds=None``) and the check runs in a small pool of persistent worker processes
instead. A worker is a fresh interpreter (``subprocess``: fork + exec, so it is safe next to JAX's
threads) that loads only this file and math-verify. A check that does not answer within
``timeout_s`` is abandoned: its worker is killed (the next check starts a new one) and the check
returns False. Workers also cap their address space (:data:`WORKER_MEMORY_LIMIT_BYTES`), so an
input that would build a huge number fails with a MemoryError (False) instead of exhausting the
host, and their CPU time per check (``RLIMIT_CPU``, about ``timeout_s`` + 2 s), so a worker
whose parent died mid-check does not keep computing.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time

DEFAULT_TIMEOUT_S = 5.0
"""Seconds a single gold-vs-answer check may take before it counts as not matching."""

MAX_WORKER_PROCESSES = 8
"""At most this many checks run at once (one worker process each); more callers wait."""

WORKER_START_TIMEOUT_S = 120.0
"""Seconds a new worker may take to import math-verify before it is an error."""

WORKER_MEMORY_LIMIT_BYTES = 4 << 30
"""Address-space limit (RLIMIT_AS) of a worker process."""

logger = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Answer lines, matched anywhere in a line (case-insensitive); the one that starts last wins.
_ANSWER_LINE_RES = (
    re.compile(r"\b(?:final\s+)?answer\s*(?:\*\*)?\s*:\s*(?:\*\*)?[ \t]*(?P<answer>[^\n]*)", re.I),
    re.compile(r"\b(?:the\s+)?final\s+answer\s+is\s*:?[ \t]*(?P<answer>[^\n]*)", re.I),
)
_HOPE_RE = re.compile(r"\.?\s*I hope it is correct\.?\s*$", re.I)
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _last_boxed(text: str) -> str | None:
    """Content of the last complete top-level ``\\boxed{...}``/``\\fbox{...}`` (None if none).

    Braces are balanced (``\\{`` and ``\\}`` are literal braces, not group delimiters); a box
    left open (a truncated response) is ignored.
    """
    found, position = None, 0
    while (match := _BOX_RE.search(text, position)) is not None:
        depth, index = 1, match.end()
        while index < len(text) and depth:
            char = text[index]
            if char == "\\":
                index += 2
                continue
            depth += {"{": 1, "}": -1}.get(char, 0)
            index += 1
        if depth:
            break
        found, position = text[match.end() : index - 1], index
    return found


def _last_answer_line(text: str) -> str | None:
    """The rest of the line after the last answer marker (None if none or nothing follows it)."""
    best = None
    for pattern in _ANSWER_LINE_RES:
        for match in pattern.finditer(text):
            if best is None or match.start() > best.start():
                best = match
    if best is None:
        return None
    answer = _HOPE_RE.sub("", best.group("answer")).strip()
    answer = answer.strip("*").strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer or None


def _strip_delimiters(answer: str) -> str:
    """``answer`` without enclosing math delimiters (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``)."""
    answer = answer.strip()
    for opening, closing in _DELIMITERS:
        if (
            len(answer) >= len(opening) + len(closing)
            and answer.startswith(opening)
            and answer.endswith(closing)
        ):
            return answer[len(opening) : len(answer) - len(closing)].strip()
    return answer


def extract_final_answer(text: str) -> str | None:
    """The final answer of a response, or None when it has none.

    Rules, in order: the content of the last complete ``\\boxed{...}`` or ``\\fbox{...}``
    (balanced braces, nesting allowed); else the rest of the last line holding ``Answer:``,
    ``Final Answer:`` or ``The final answer is`` (case-insensitive; markdown ``**`` around the
    marker, a trailing period and a trailing "I hope it is correct." are dropped). Enclosing
    ``$...$``-style delimiters are kept; :func:`answers_match` strips them.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return _last_answer_line(text)


def _as_math(answer: str) -> str:
    """An answer without enclosing delimiters as math-verify input: ``$answer$``.

    Text that still holds ``$`` (prose with inline math) is passed as it is, so math-verify
    extracts the math from it.
    """
    return answer if "$" in answer else f"${answer}$"


def _normalise_gold(gold: str) -> str:
    """The gold answer's expression: the content of its last box if it has one, delimiters off."""
    if not isinstance(gold, str):
        raise TypeError(f"gold answer must be a str, got {type(gold).__name__}")
    boxed = _last_boxed(gold)
    expression = _strip_delimiters(boxed if boxed is not None else gold)
    if not expression:
        raise ValueError(f"gold answer is empty: {gold!r}")
    return expression


def answers_match(
    response_text: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> bool:
    """Whether the final answer of ``response_text`` is equivalent to ``gold`` (math-verify).

    Safe to call from any thread, concurrently. Identical strings (after stripping delimiters)
    match without consulting math-verify.

    Args:
      response_text: a decoded response.
      gold: the reference answer: plain (``3/4``, ``0.75``, ``x^2+2x+1``), LaTeX
        (``$\\frac{3}{4}$``) or boxed (``\\boxed{3/4}``).
      timeout_s: seconds the check may take (waiting for a free worker and starting one are
        not counted); past it the check counts as not matching.

    Returns:
      False when the response has no final answer, the answers differ, or the check timed out
      or crashed (logged as a warning).

    Raises:
      ValueError: empty gold answer or ``timeout_s <= 0``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    expected = _normalise_gold(gold)
    answer = extract_final_answer(response_text)
    answer = None if answer is None else _strip_delimiters(answer)
    if not answer:
        return False
    if answer == expected:
        return True
    return _pool().check(_as_math(expected), _as_math(answer), timeout_s)


class _WorkerLost(Exception):
    """The worker did not answer in time, or died; it must be discarded."""


class _Worker:
    """One verifier process: a JSON line ``[gold, answer, timeout_s]`` in, ``1`` or ``0`` out."""

    def __init__(self) -> None:
        boot = (
            "import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('_glmjax_answer_worker', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "module._serve()\n"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", boot, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
        )
        self._buffer = b""
        try:
            ready = self._read_line(WORKER_START_TIMEOUT_S)
        except _WorkerLost as e:
            self.kill()
            raise RuntimeError(f"answer-check worker failed to start: {e}") from e
        if ready != "ready":
            self.kill()
            raise RuntimeError(f"answer-check worker sent {ready!r} instead of 'ready'")

    def _read_line(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WorkerLost(f"no answer within {timeout_s:g} s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise _WorkerLost(f"worker exited (code {self._process.poll()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8")

    def exited(self) -> bool:
        """Whether the process has ended (killed from outside, or crashed while idle)."""
        return self._process.poll() is not None

    def check(self, gold: str, answer: str, timeout_s: float) -> bool:
        """math-verify's verdict; raises _WorkerLost on a timeout or a dead worker."""
        request = memoryview((json.dumps([gold, answer, timeout_s]) + "\n").encode("utf-8"))
        try:
            while request:
                request = request[os.write(self._process.stdin.fileno(), request) :]
        except OSError as e:
            raise _WorkerLost(f"worker exited (code {self._process.poll()})") from e
        reply = self._read_line(timeout_s)
        if reply not in ("0", "1"):
            raise RuntimeError(f"answer-check worker sent {reply!r}")
        return reply == "1"

    def close(self) -> None:
        """Asks the worker to exit (end of input), killing it if it does not within a second."""
        try:
            self._process.stdin.close()
            self._process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        self._process.stdout.close()

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class _WorkerPool:
    """Idle workers, reused across calls; at most ``max_workers`` checks run at once."""

    def __init__(self, max_workers: int) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_workers)

    def check(self, gold: str, answer: str, timeout_s: float) -> bool:
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is not None and worker.exited():
                worker.kill()
                worker = None
            if worker is None:
                worker = _Worker()
            try:
                result = worker.check(gold, answer, timeout_s)
            except _WorkerLost as e:
                worker.kill()
                logger.warning("answer check counted as no match (%s): gold %.80r, answer %.80r",
                               e, gold, answer)
                return False
            except BaseException:
                worker.kill()  # a protocol error or an interrupt: do not reuse (or leak) it
                raise
            with self._lock:
                self._idle.append(worker)
            return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _WorkerPool(MAX_WORKER_PROCESSES)
            atexit.register(_POOL.close)
        return _POOL


def _serve() -> None:
    """Worker main loop (runs in the worker process): verdicts for JSON lines on stdin."""
    import functools
    import resource

    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything math-verify or sympy prints goes to stderr, not into the replies
    sys.stdout = sys.stderr
    # The built-in timeouts are off on purpose (the parent enforces one); silence their warning.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    @functools.lru_cache(maxsize=4096)
    def parsed(text: str) -> list:
        return parse(text, parsing_timeout=None)

    def cap(which: int, soft: int) -> None:
        _, hard = resource.getrlimit(which)
        resource.setrlimit(which, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))

    cap(resource.RLIMIT_AS, WORKER_MEMORY_LIMIT_BYTES)
    cap(resource.RLIMIT_CORE, 0)  # a CPU-limit kill leaves no core file
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        gold, answer, timeout_s = json.loads(line)
        # The parent kills a worker that overruns; this CPU limit (SIGXCPU, delivered by the
        # kernel even inside a long C call) also ends one whose parent died mid-check.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cap(resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime + timeout_s) + 1)
        ok = verify(parsed(gold), parsed(answer), timeout_seconds=None)
        replies.write("1\n" if ok else "0\n")
        replies.flush()
