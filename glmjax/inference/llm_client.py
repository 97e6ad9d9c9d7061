"""One interface for text generation from chat messages, whatever serves the model.

:class:`LLMClient` is what judges, rollouts and agents program against:
``complete(messages, sampling) -> text`` and its batched form.  This module
provides :class:`OpenAIHTTPClient` for any OpenAI-compatible
``/v1/chat/completions`` endpoint (vLLM, SGLang, hosted APIs); the local JAX
engine implements the same interface elsewhere.
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
from typing import Any, Mapping, Sequence

Message = Mapping[str, Any]
"""A chat message: ``{"role": "system" | "user" | "assistant" | ..., "content": str}``."""


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
      max_concurrency: requests in flight at once in :meth:`complete_batch`.
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
        """Return the reply text, retrying transient failures; raise :class:`LLMClientError`."""
        body = json.dumps(self._payload(messages, sampling or SamplingParams())).encode()
        attempt = 1
        while True:
            try:
                return self._attempt(body)
            except LLMClientError as error:
                if not error.retryable or attempt > self.max_retries:
                    if attempt > 1:
                        error.args = (f"{error.args[0]} (gave up after {attempt} attempts)",)
                    raise
                time.sleep(self._backoff_s(attempt, error.retry_after_s))
                attempt += 1

    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Complete each conversation concurrently (at most ``max_concurrency`` at once).

        Results keep the input order.  If any conversation fails, requests not yet
        started are cancelled and the failure of the lowest index is raised, with
        its ``batch_index`` set.
        """
        if not conversations:
            return []
        workers = min(self.max_concurrency, len(conversations))
        failed = threading.Event()

        def run(conversation: Sequence[Message]) -> str:
            # Requests are started in index order, so every one skipped here has a higher
            # index than the failure that set the event.
            if failed.is_set():
                raise _Skipped()
            try:
                return self.complete(conversation, sampling)
            except BaseException:
                failed.set()
                raise

        executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="llm-client")
        try:
            futures = [executor.submit(run, c) for c in conversations]
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

    def _payload(self, messages: Sequence[Message], sampling: SamplingParams) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
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
        return payload

    def _backoff_s(self, retry: int, retry_after_s: float | None) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1))
        delay = self._random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.backoff_max_s))
        return delay

    def _attempt(self, body: bytes) -> str:
        """One POST; classify every failure as a (non-)retryable :class:`LLMClientError`."""
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
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
        return _parse_completion(raw, self.url)


def _parse_completion(raw: bytes, url: str) -> str:
    """The first choice's message text from a chat-completions reply body."""
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
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise LLMResponseError(f"reply from {url} has no message text in its first choice: "
                               f"{_excerpt(raw)}", retryable=True)
    return content


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
