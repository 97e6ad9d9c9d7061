"""One interface for text generation from chat messages, whatever serves the model.

:class:`LLMClient` is what judges, rollouts and agents program against:
``complete(messages, sampling) -> text``, its batched form, and
``assistant_turns(conversations, sampling, tools)`` for the tool-calling chat loop
(``glmjax.inference.chat``).  This module provides :class:`OpenAIHTTPClient` for
any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, hosted
APIs); the local JAX engine implements the same interface in ``local_client``.

Conversations are OpenAI-style messages (``glmjax.data.chat_format``): roles
``system``/``user``/``assistant``/``tool`` (GLM-4's ``observation`` is accepted as ``tool``), an
assistant tool call is an assistant message with ``tool_calls: [{"id"?, "function": {"name",
"arguments": dict | JSON str}}]`` answered by the ``tool`` messages that follow it (by
``tool_call_id``, else in order).  A generated turn comes back parsed
(:class:`AssistantTurn.reply`), so callers need no model-specific text convention.

The batch contract, for every client (``tests/test_llm_client_contract.py`` runs one suite against
the local engine and against ``launch.serve``):

* **per-item seeds**: with ``SamplingParams.seed = s``, item ``i`` of a batch samples with seed
  ``s + i`` (so K copies of a conversation give K different samples, reproducibly); with
  ``seed=None`` each call draws fresh randomness.
* **per-item results**: every item is attempted; when some fail, the call raises the failure of
  the lowest index (``batch_index`` set) and its ``results`` holds, in input order, the result of
  every item that succeeded and the :class:`LLMClientError` of every one that failed.
* **token usage**: every generation a client obtains is reported (:func:`report_usage`) to the
  meters of :func:`record_usage` active in the calling context, so a job can count the tokens
  of each item's calls (the pipeline runner does) whatever client serves them.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, TypeVar

from glmjax.data.chat_format import (
    ChatFormatError,
    Reply,
    ToolCall,
    function_tool,
    glm4_call_arguments,
    tool_calls_of,
)

Message = Mapping[str, Any]
"""A chat message: ``{"role": "system" | "user" | "assistant" | ..., "content": str}``."""

ToolSpecDict = Mapping[str, Any]
"""A tool spec as ``ToolRegistry.specs()`` gives it: ``{"type": "function", "function": {"name",
"description", "parameters"}}`` (the inner object alone is accepted too)."""

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample a completion.

    Attributes:
      max_tokens: maximum number of generated tokens.
      temperature: softmax temperature; 0 means greedy.
      top_p: nucleus sampling mass (1.0 disables it).
      top_k: keep the k most likely tokens (0 disables it).
      min_p: drop tokens below ``min_p`` times the top probability (0 disables it).
      seed: random seed, or ``None`` for a nondeterministic draw.
      stop: strings that end the completion (not included in the text).
    """

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")


@dataclasses.dataclass(frozen=True)
class AssistantTurn:
    """One generated assistant turn.

    Attributes:
      text: the generated text, without the stop token (a local model's raw turn text; a server's
        message content); ends before the first ``SamplingParams.stop`` string, if any occurs.
      tokens: generated ids, including a final stop token (not cut by stop strings); empty when
        the client does not see tokens (:class:`OpenAIHTTPClient`).
      logprobs: one per token (see ``glmjax.inference.sampling``); empty when ``tokens`` is.
      finish_reason: "stop" (stop token or stop string) or "length" (``max_tokens`` reached).
      reply: the turn parsed: its content and tool calls (``Reply.to_message()`` is the assistant
        message for the next turn); ``Reply(text)`` when it could not be parsed.
      error: why the turn could not be parsed (a malformed tool call), else None.
    """

    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    reply: Reply
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenUsage:
    """Tokens of a set of generations.

    Attributes:
      calls: generations (one per conversation answered; retries that failed are not counted).
      prompt_tokens, completion_tokens: tokens in and out, as the model's tokenizer counts them
        (a server's ``usage``; the local engine's ids).
      unreported: generations whose server sent no ``usage`` (their tokens are not in the sums).
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unreported: int = 0

    def __add__(self, other: "TokenUsage") -> "TokenUsage":
        return TokenUsage(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class UsageMeter:
    """The summed :class:`TokenUsage` of the generations reported while it is active (thread-safe:
    a client may report from its worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = TokenUsage()

    def add(self, usage: TokenUsage) -> None:
        with self._lock:
            self._total = self._total + usage

    @property
    def total(self) -> TokenUsage:
        with self._lock:
            return self._total


_ACTIVE_METERS: contextvars.ContextVar[tuple[UsageMeter, ...]] = contextvars.ContextVar(
    "glmjax_usage_meters", default=())


@contextlib.contextmanager
def record_usage() -> Iterator[UsageMeter]:
    """A meter of the token usage of every generation reported in this context (this thread, and
    the worker threads clients start from it) until the block ends; meters nest (each active one
    counts)."""
    meter = UsageMeter()
    token = _ACTIVE_METERS.set(_ACTIVE_METERS.get() + (meter,))
    try:
        yield meter
    finally:
        _ACTIVE_METERS.reset(token)


def report_usage(prompt_tokens: int | None, completion_tokens: int | None) -> None:
    """Adds one generation to the active meters; None counts (a server without ``usage``) add
    the generation as ``unreported``."""
    if prompt_tokens is None or completion_tokens is None:
        usage = TokenUsage(calls=1, unreported=1)
    else:
        usage = TokenUsage(1, int(prompt_tokens), int(completion_tokens))
    for meter in _ACTIVE_METERS.get():
        meter.add(usage)


class LLMClient(abc.ABC):
    """Generates assistant text for chat conversations (batch contract: module docstring)."""

    @abc.abstractmethod
    def complete(self, messages: Sequence[Message], sampling: SamplingParams | None = None) -> str:
        """Return the assistant's reply to ``messages``."""

    @abc.abstractmethod
    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Return one reply per conversation, in the order given; item ``i`` samples with
        ``seed + i``.

        Raises:
          LLMClientError: the lowest-index failure, with ``batch_index`` and ``results`` (every
            item's reply or error) set.
        """

    @abc.abstractmethod
    def assistant_turns(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingParams | None = None,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> list[AssistantTurn]:
        """Return the next assistant turn of each conversation, in the order given.

        Args:
          conversations: message lists (module docstring), each ending where the assistant should
            speak.
          sampling: generation settings (default ``SamplingParams()``).
          tools: tool specs offered to the model (``ToolRegistry.specs()``); None or empty offers
            none.

        Returns:
          One :class:`AssistantTurn` per conversation, with its parsed reply; conversation ``i``
          samples with ``sampling.seed + i``.

        Raises:
          LLMClientError: a turn could not be generated: the lowest-index failure, with
            ``batch_index`` and ``results`` (every conversation's turn or error) set; or a failure
            of the whole call (e.g. tools a format cannot parse), without them.
        """


class LLMClientError(RuntimeError):
    """A completion could not be obtained.

    Attributes:
      status: HTTP status of the failing reply, if there was one.
      retryable: whether another attempt might succeed.
      retry_after_s: the server's ``Retry-After`` hint, in seconds.
      batch_index: for a batch call, the failing conversation.
      results: for a batch call, every item's outcome in input order: its result, or its
        :class:`LLMClientError` (this one at ``batch_index``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.batch_index: int | None = None
        self.results: list[Any] | None = None


class LLMHTTPError(LLMClientError):
    """The server answered with an error status."""


class LLMConnectionError(LLMClientError):
    """The server could not be reached, dropped the connection or timed out."""


class LLMResponseError(LLMClientError):
    """The server answered 200 with a body that is not a usable completion."""


def item_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """The sampling of batch item ``index``: seed ``seed + index`` (unchanged without a seed)."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + index)


def raise_item_failures(outcomes: list[Any]) -> None:
    """Raises the lowest-index :class:`LLMClientError` of a batch's ``outcomes`` (results and
    errors in input order), with ``batch_index`` and ``results`` set; returns when none failed."""
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, LLMClientError):
            for position, other in enumerate(outcomes):
                if isinstance(other, LLMClientError):
                    other.batch_index = position
            outcome.results = outcomes
            raise outcome


class _RetryBudget:
    """Retries one batch call may still spend, over all its items (None: unlimited)."""

    def __init__(self, retries: int | None) -> None:
        self._left = retries
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Spends one retry; False when none is left."""
        with self._lock:
            if self._left is None:
                return True
            if self._left <= 0:
                return False
            self._left -= 1
            return True


class OpenAIHTTPClient(LLMClient):
    """Client for an OpenAI-compatible chat-completions endpoint (standard library only).

    Tool calling (:meth:`assistant_turns`) uses the endpoint's native ``tools`` /
    ``tool_calls`` fields, so the server must parse tool calls for the model (e.g. vLLM
    ``--enable-auto-tool-choice --tool-call-parser ...``).

    Args:
      base_url: API root including the version, as in the OpenAI SDK, e.g.
        ``http://localhost:8000/v1``; requests go to ``{base_url}/chat/completions``.
      model: model name sent with each request.
      api_key: bearer token; takes precedence over ``api_key_env``.
      api_key_env: name of an environment variable holding the token (it must
        be set if given).  Without either, no ``Authorization`` header is sent.
      timeout_s: socket timeout for connecting and for each read of one attempt.
      max_retries: extra attempts per request after a connection error, timeout, 408, 429, 5xx
        or malformed reply; other 4xx replies fail at once.
      backoff_base_s, backoff_max_s: retry ``n`` waits a random time between
        half and all of ``min(backoff_max_s, backoff_base_s * 2**(n-1))``, and
        at least the server's ``Retry-After``, honoured up to ``max_retry_after_s``.
      max_retry_after_s: the longest ``Retry-After`` wait honoured (longer hints wait this long).
      deadline_s: per-request deadline over all its attempts and waits (None: none); an attempt
        reads with at most the time left, and a retry whose wait would end past the deadline is
        not made (the last failure is raised, saying so).
      retry_budget: retries one call may spend over all its items together (None: only
        ``max_retries`` per item), so that a failing server is not sent ``items * max_retries``
        extra requests.
      max_concurrency: requests in flight at once in :meth:`complete_batch` and
        :meth:`assistant_turns`.
      use_env_proxy: honour ``http_proxy``/``https_proxy``/``no_proxy``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 60.0,
        deadline_s: float | None = None,
        retry_budget: int | None = None,
        max_concurrency: int = 16,
        use_env_proxy: bool = True,
    ) -> None:
        if (timeout_s <= 0 or max_retries < 0 or backoff_base_s < 0 or max_retry_after_s < 0
                or max_concurrency < 1 or (deadline_s is not None and deadline_s <= 0)
                or (retry_budget is not None and retry_budget < 0)):
            raise ValueError("timeout_s and deadline_s must be > 0; max_retries, backoff_base_s, "
                             "max_retry_after_s and retry_budget >= 0; max_concurrency >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.deadline_s = deadline_s
        self.retry_budget = retry_budget
        self.max_concurrency = max_concurrency
        self._headers = json_headers(api_key, api_key_env, "API key")
        self._opener = make_opener(use_env_proxy)
        self._random = random.Random()

    def complete(self, messages: Sequence[Message], sampling: SamplingParams | None = None) -> str:
        """Return the reply text to ``messages`` (sent as :func:`to_openai_messages` converts them),
        retrying transient failures; raise :class:`LLMClientError`."""
        return self._post(self._payload(messages, sampling or SamplingParams()), _reply_text,
                          _RetryBudget(self.retry_budget))

    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Complete each conversation concurrently (at most ``max_concurrency`` at once).

        Results keep the input order; conversation ``i`` is sent with seed ``seed + i``.  Every
        conversation is attempted (with its own retries, all within ``retry_budget``); if any
        fails, the failure of the lowest index is raised with ``batch_index`` set and
        ``results`` holding every conversation's reply or error.
        """
        sampling = sampling or SamplingParams()
        budget = _RetryBudget(self.retry_budget)
        return self._map_concurrently(
            lambda index, messages: self._post(self._payload(messages, item_sampling(sampling, index)),
                                               _reply_text, budget),
            conversations)

    def assistant_turns(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingParams | None = None,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> list[AssistantTurn]:
        """The next assistant turn of each conversation, requested concurrently.

        Requests go out, are seeded and fail as in :meth:`complete_batch`.  Each conversation is sent in the
        OpenAI format (:func:`to_openai_messages`) with ``tools`` as the request's ``"tools"``
        (only when given, each in the OpenAI function form: a GLM-4 All Tools built-in such as
        ``python`` is sent as the function it is registered as); the server applies the chat
        template, the tool-call parser and the ``stop`` strings.  The first choice becomes the
        turn: its ``content`` (``""`` when null) and every one of its ``tool_calls``, in order,
        with their ids.  Arguments that are not a JSON object are model output, not a transport
        failure: the turn comes back with ``error`` set (the chat loop's "format_error").

        ``finish_reason`` is "length" when the server reports "length", else "stop".  ``tokens``
        and ``logprobs`` are empty lists (the server does not return token ids).

        Raises:
          LLMClientError: as :meth:`complete_batch`; also :class:`LLMResponseError` (retried) for
            a reply with neither text nor ``tool_calls``, or with ``tool_calls`` that are not a
            list of ``{"function": {"name": non-empty str, ...}}`` objects, and a non-retryable
            :class:`LLMClientError` for a conversation or tool spec that cannot be converted.
        """
        sampling = sampling or SamplingParams()
        try:
            specs = [function_tool(tool, index) for index, tool in enumerate(tools or [])]
        except ChatFormatError as err:
            raise LLMClientError(str(err)) from err
        budget = _RetryBudget(self.retry_budget)
        return self._map_concurrently(
            lambda index, messages: self._post(self._payload(messages, item_sampling(sampling, index), specs),
                                               _reply_turn, budget),
            conversations)

    def _map_concurrently(self, function: Callable[[int, _T], _R], items: Sequence[_T]) -> list[_R]:
        """``[function(index, item) for index, item in enumerate(items)]``, concurrently; failures
        are collected and raised as :meth:`complete_batch` describes (an exception that is not an
        :class:`LLMClientError` is a bug and is raised as is)."""
        if not items:
            return []
        workers = min(self.max_concurrency, len(items))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="llm-client") as executor:
            # Each request runs in a copy of the caller's context: its usage reaches the caller's meters.
            futures = [executor.submit(contextvars.copy_context().run, function, index, item)
                       for index, item in enumerate(items)]
        outcomes: list[Any] = []
        for future in futures:
            error = future.exception()
            if error is not None and not isinstance(error, LLMClientError):
                raise error
            outcomes.append(future.result() if error is None else error)
        raise_item_failures(outcomes)
        return outcomes

    def _payload(
        self,
        messages: Sequence[Message],
        sampling: SamplingParams,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(messages),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        # Optional fields are sent only when set: hosted APIs reject unknown ones
        # (top_k and min_p are vLLM / SGLang extensions).
        if sampling.top_k:
            payload["top_k"] = sampling.top_k
        if sampling.min_p:
            payload["min_p"] = sampling.min_p
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if tools:
            payload["tools"] = [dict(tool) if "function" in tool
                                else {"type": "function", "function": dict(tool)}
                                for tool in tools]
        return payload

    def _post(self, payload: Mapping[str, Any], parse: Callable[[bytes, str], _T], budget: _RetryBudget) -> _T:
        """POST ``payload`` and ``parse(body, url)`` the reply, retrying transient failures within
        ``max_retries``, ``budget`` and ``deadline_s``."""
        body = json.dumps(payload).encode()
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        attempt = 1
        while True:
            try:
                timeout = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
                if timeout <= 0:
                    raise LLMConnectionError(f"POST {self.url}: the deadline of {self.deadline_s:g} s passed")
                raw = self._attempt(body, timeout)
                result = parse(raw, self.url)
                report_usage(*_reply_usage(raw))
                return result
            except LLMClientError as error:
                wait = self._backoff_s(attempt, error.retry_after_s)
                reason = None
                if not error.retryable or attempt > self.max_retries:
                    reason = "gave up"
                elif deadline is not None and time.monotonic() + wait >= deadline:
                    reason = f"deadline of {self.deadline_s:g} s reached"
                elif not budget.take():
                    reason = "retry budget spent"
                if reason is not None:
                    if attempt > 1 or reason != "gave up":
                        error.args = (f"{error.args[0]} ({reason} after {attempt} attempts)",)
                    raise
                time.sleep(wait)
                attempt += 1

    def _backoff_s(self, retry: int, retry_after_s: float | None) -> float:
        return backoff_s(retry, self._random, base_s=self.backoff_base_s, max_s=self.backoff_max_s,
                         retry_after_s=retry_after_s, max_retry_after_s=self.max_retry_after_s)

    def _attempt(self, body: bytes, timeout_s: float) -> bytes:
        return post_json(self._opener, self.url, body, self._headers, timeout_s)


def json_headers(api_key: str | None, api_key_env: str | None, what: str) -> dict[str, str]:
    """JSON request headers, with ``Authorization: Bearer`` for ``api_key`` (or the value of the
    environment variable ``api_key_env``; ``what`` names the key in the error).

    Raises:
      ValueError: ``api_key_env`` names a variable that is not set.
    """
    if api_key is None and api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {api_key_env} ({what}) is not set")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def make_opener(use_env_proxy: bool) -> urllib.request.OpenerDirector:
    """A urllib opener; ``use_env_proxy=False`` ignores ``*_proxy`` variables (loopback servers)."""
    return urllib.request.build_opener(*([] if use_env_proxy else [urllib.request.ProxyHandler({})]))


def backoff_s(retry: int, rng: random.Random, *, base_s: float, max_s: float, retry_after_s: float | None,
              max_retry_after_s: float) -> float:
    """Seconds to wait before retry ``retry`` (1-based): uniform in [c/2, c] for
    ``c = min(max_s, base_s * 2 ** (retry - 1))``, and at least the server's ``retry_after_s``
    hint, honoured up to ``max_retry_after_s``."""
    ceiling = min(max_s, base_s * 2 ** (retry - 1))
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_retry_after_s))
    return delay


def post_json(opener: urllib.request.OpenerDirector, url: str, body: bytes, headers: Mapping[str, str],
              timeout_s: float) -> bytes:
    """One POST of a JSON ``body`` to ``url``, returning the reply body.

    Raises:
      LLMHTTPError: an HTTP error status (retryable for 408, 429 and 5xx, with the server's
        ``Retry-After``); LLMConnectionError: no reply (refused, reset, timed out; retryable).
    """
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        status = error.code
        detail = _read_error_body(error)
        retryable = status in (408, 429) or status >= 500
        raise LLMHTTPError(
            f"POST {url} returned HTTP {status}: {detail}",
            status=status,
            retryable=retryable,
            retry_after_s=_retry_after_s(error.headers.get("Retry-After")),
        ) from None
    except urllib.error.URLError as error:
        raise LLMConnectionError(f"POST {url} failed: {error.reason}", retryable=True) from None
    except (TimeoutError, http.client.HTTPException, OSError) as error:
        reason = "timed out" if isinstance(error, TimeoutError) else repr(error)
        raise LLMConnectionError(f"POST {url} failed: {reason}", retryable=True) from None


def to_openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Converts a conversation (module docstring) to OpenAI chat messages.

    * An assistant message with ``tool_calls`` becomes ``{"role": "assistant", "content": str or
      None, "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON
      str}}]}``; a call without an id gets ``"call_<n>"``, ``n`` counting the calls of the
      conversation from 0.  A GLM-4 native call (an assistant message whose ``metadata`` names the
      tool and whose content is the call) is converted the same way.
    * An ``observation`` (or ``tool``) message becomes ``{"role": "tool", "tool_call_id": ...,
      "content": ...}`` answering the call its ``tool_call_id`` names, else the oldest call not yet
      answered.
    * Every other message is copied as is.

    Raises:
      LLMClientError: (not retryable) a tool call without a non-empty string ``name`` or with
        arguments that are not a JSON object, or a tool message that answers no call; the
        message index is named.
    """
    converted: list[dict[str, Any]] = []
    unanswered: list[str] = []
    calls_seen = 0
    for index, message in enumerate(messages):
        role = message.get("role")
        native_call = role == "assistant" and message.get("metadata") and not message.get("tool_calls")
        if role == "assistant" and (message.get("tool_calls") or native_call):
            try:
                calls = ([ToolCall(message["metadata"],
                                   glm4_call_arguments(message["metadata"], message.get("content") or ""))]
                         if native_call else tool_calls_of(message, index))
            except ChatFormatError as err:
                raise LLMClientError(f"message {index}: {err}" if native_call else str(err)) from err
            entries = []
            for call in calls:
                call_id = call.id or f"call_{calls_seen}"
                calls_seen += 1
                unanswered.append(call_id)
                entries.append({"id": call_id, "type": "function", "function": {
                    "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}})
            rest = {key: value for key, value in message.items() if key != "metadata"}
            content = None if native_call else message.get("content") or None
            converted.append({**rest, "content": content, "tool_calls": entries})
        elif role in ("observation", "tool"):
            call_id = message.get("tool_call_id")
            if call_id is None and not unanswered:
                raise LLMClientError(f"message {index}: {role!r} message answers no tool call "
                                     "(no unanswered assistant tool_calls before it)")
            call_id = call_id if call_id is not None else unanswered[0]
            if call_id in unanswered:
                unanswered.remove(call_id)
            converted.append({"role": "tool", "tool_call_id": call_id, "content": message.get("content")})
        else:
            converted.append(dict(message))
    return converted


def _first_message(raw: bytes, url: str) -> tuple[Mapping[str, Any], Any]:
    """The first choice's ``message`` object and ``finish_reason`` from a reply body."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise LLMResponseError(f"reply from {url} is not JSON: {_excerpt(raw)}",
                               retryable=True) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise LLMResponseError(f"reply from {url} has no choices: {_excerpt(raw)}", retryable=True)
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise LLMResponseError(f"reply from {url} has no message in its first choice: "
                               f"{_excerpt(raw)}", retryable=True)
    return message, first.get("finish_reason")


def _message_text(message: Mapping[str, Any], raw: bytes, url: str) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise LLMResponseError(f"reply from {url} has no message text in its first choice: "
                               f"{_excerpt(raw)}", retryable=True)
    return content


def _reply_usage(raw: bytes) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` of a reply's ``usage``, (None, None) without one."""
    try:
        usage = json.loads(raw).get("usage")
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    except (ValueError, AttributeError, KeyError, TypeError):
        return None, None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (prompt, completion)):
        return None, None
    return prompt, completion


def _reply_text(raw: bytes, url: str) -> str:
    """The first choice's message text from a chat-completions reply body."""
    return _message_text(_first_message(raw, url)[0], raw, url)


def _reply_turn(raw: bytes, url: str) -> AssistantTurn:
    """The first choice as an :class:`AssistantTurn` (:meth:`OpenAIHTTPClient.assistant_turns`)."""
    message, finish_reason = _first_message(raw, url)
    finish = "length" if finish_reason == "length" else "stop"
    entries = message.get("tool_calls")
    if not entries:
        content = _message_text(message, raw, url)
        return AssistantTurn(content, [], [], finish, Reply(content))
    functions = [entry.get("function") if isinstance(entry, dict) else None
                 for entry in (entries if isinstance(entries, list) else [None])]
    if not all(isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] for f in functions):
        raise LLMResponseError(f"reply from {url} has malformed tool_calls (expected "
                               f"[{{'function': {{'name': str, 'arguments': str}}}}]): "
                               f"{_excerpt(raw)}", retryable=True)
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    try:
        calls = tool_calls_of({"tool_calls": entries}, 0)
    except ChatFormatError as err:
        error = str(err).removeprefix("message 0: ")
        return AssistantTurn(content, [], [], finish, Reply(content), error)
    return AssistantTurn(content, [], [], finish, Reply(content, calls))


def _read_error_body(error: urllib.error.HTTPError) -> str:
    """The reply's OpenAI-style ``error.message`` when it has one, else an excerpt of the body."""
    try:
        raw = error.read()
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, TypeError, KeyError):
            return _excerpt(raw)
        return message if isinstance(message, str) else _excerpt(raw)
    except (OSError, http.client.HTTPException) as read_error:
        return f"(body unreadable: {read_error!r})"
    finally:
        error.close()


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the HTTP-date form is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _excerpt(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")
