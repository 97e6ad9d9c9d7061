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
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar

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


class LLMClient(abc.ABC):
    """Generates assistant text for chat conversations."""

    @abc.abstractmethod
    def complete(self, messages: Sequence[Message], sampling: SamplingParams | None = None) -> str:
        """Return the assistant's reply to ``messages``."""

    @abc.abstractmethod
    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Return one reply per conversation, in the order given."""

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
          One :class:`AssistantTurn` per conversation, with its parsed reply.

        Raises:
          LLMClientError: a turn could not be generated (``batch_index`` names the conversation
            where the implementation knows it).
        """


class LLMClientError(RuntimeError):
    """A completion could not be obtained.

    Attributes:
      status: HTTP status of the failing reply, if there was one.
      retryable: whether another attempt might succeed.
      retry_after_s: the server's ``Retry-After`` hint, in seconds.
      batch_index: for :meth:`LLMClient.complete_batch`, the failing conversation.
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


class LLMHTTPError(LLMClientError):
    """The server answered with an error status."""


class LLMConnectionError(LLMClientError):
    """The server could not be reached, dropped the connection or timed out."""


class LLMResponseError(LLMClientError):
    """The server answered 200 with a body that is not a usable completion."""


class _Skipped(Exception):
    """A batch request not started because an earlier one failed."""


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
      max_retries: extra attempts after a connection error, timeout, 429, 5xx
        or malformed reply; other 4xx replies fail at once.
      backoff_base_s, backoff_max_s: retry ``n`` waits a random time between
        half and all of ``min(backoff_max_s, backoff_base_s * 2**(n-1))``, and
        at least the server's ``Retry-After`` (capped at ``backoff_max_s``).
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
        max_concurrency: int = 16,
        use_env_proxy: bool = True,
    ) -> None:
        if timeout_s <= 0 or max_retries < 0 or backoff_base_s < 0 or max_concurrency < 1:
            raise ValueError("timeout_s must be > 0, max_retries and backoff_base_s >= 0, "
                             "max_concurrency >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_concurrency = max_concurrency
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"environment variable {api_key_env} (API key) is not set")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)
        self._random = random.Random()

    def complete(self, messages: Sequence[Message], sampling: SamplingParams | None = None) -> str:
        """Return the reply text to ``messages`` (sent as :func:`to_openai_messages` converts them),
        retrying transient failures; raise :class:`LLMClientError`."""
        return self._post(self._payload(messages, sampling or SamplingParams()), _reply_text)

    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Complete each conversation concurrently (at most ``max_concurrency`` at once).

        Results keep the input order.  If any conversation fails, requests not yet
        started are cancelled and the failure of the lowest index is raised, with
        its ``batch_index`` set.
        """
        return self._map_concurrently(lambda messages: self.complete(messages, sampling),
                                      conversations)

    def assistant_turns(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingParams | None = None,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> list[AssistantTurn]:
        """The next assistant turn of each conversation, requested concurrently.

        Requests go out and fail as in :meth:`complete_batch`.  Each conversation is sent in the
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
        return self._map_concurrently(
            lambda messages: self._post(self._payload(messages, sampling, specs), _reply_turn),
            conversations)

    def _map_concurrently(self, function: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``[function(item) for item in items]``, run as :meth:`complete_batch` describes."""
        if not items:
            return []
        workers = min(self.max_concurrency, len(items))
        failed = threading.Event()

        def run(item: _T) -> _R:
            # Items are started in index order, so every one skipped here has a higher index
            # than the failure that set the event.
            if failed.is_set():
                raise _Skipped()
            try:
                return function(item)
            except BaseException:
                failed.set()
                raise

        executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="llm-client")
        try:
            futures = [executor.submit(run, item) for item in items]
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        for index, future in enumerate(futures):
            error = None if future.cancelled() else future.exception()
            if error is not None and not isinstance(error, _Skipped):
                if isinstance(error, LLMClientError):
                    error.batch_index = index
                raise error
        return [future.result() for future in futures]

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

    def _post(self, payload: Mapping[str, Any], parse: Callable[[bytes, str], _T]) -> _T:
        """POST ``payload`` and ``parse(body, url)`` the reply, retrying transient failures."""
        body = json.dumps(payload).encode()
        attempt = 1
        while True:
            try:
                return parse(self._attempt(body), self.url)
            except LLMClientError as error:
                if not error.retryable or attempt > self.max_retries:
                    if attempt > 1:
                        error.args = (f"{error.args[0]} (gave up after {attempt} attempts)",)
                    raise
                time.sleep(self._backoff_s(attempt, error.retry_after_s))
                attempt += 1

    def _backoff_s(self, retry: int, retry_after_s: float | None) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1))
        delay = self._random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.backoff_max_s))
        return delay

    def _attempt(self, body: bytes) -> bytes:
        """One POST returning the reply body; every failure is a (non-)retryable error."""
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            status = error.code
            detail = _read_error_body(error)
            retryable = status == 429 or status >= 500
            raise LLMHTTPError(
                f"POST {self.url} returned HTTP {status}: {detail}",
                status=status,
                retryable=retryable,
                retry_after_s=_retry_after_s(error.headers.get("Retry-After")),
            ) from None
        except urllib.error.URLError as error:
            raise LLMConnectionError(f"POST {self.url} failed: {error.reason}",
                                     retryable=True) from None
        except (TimeoutError, http.client.HTTPException, OSError) as error:
            reason = "timed out" if isinstance(error, TimeoutError) else repr(error)
            raise LLMConnectionError(f"POST {self.url} failed: {reason}", retryable=True) from None


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
    try:
        return _excerpt(error.read())
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
