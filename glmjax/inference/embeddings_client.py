"""A client of any OpenAI-compatible ``/v1/embeddings`` endpoint (vLLM, TEI, hosted APIs).

``EmbeddingsClient(base_url, model)(texts)`` is an embedder for
``glmjax.pipelines.retrieval.EmbeddingRetriever``: it sends ``{"model", "input": [texts],
"encoding_format": "float"}`` in batches of ``batch_size`` texts and returns the embeddings as a
``float32 [len(texts), dim]`` array, in input order (the reply's ``index`` fields place them).
Transient failures (connection errors, timeouts, HTTP 408/429/5xx, a 200 reply that is not a
usable embeddings body) are retried with jittered exponential backoff honouring ``Retry-After``,
as :class:`glmjax.inference.llm_client.OpenAIHTTPClient` does for chat; other HTTP errors are
raised at once. Failures are that module's :class:`LLMClientError` subclasses. Embedding calls
are not LLM generations: they are not reported to ``record_usage`` meters; :attr:`EmbeddingsClient.
prompt_tokens` sums the tokens the server reported.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Sequence

import numpy as np

from glmjax.inference.llm_client import (
    LLMClientError,
    LLMResponseError,
    backoff_s,
    json_headers,
    make_opener,
    post_json,
)


class EmbeddingsClient:
    """Embeds texts through ``{base_url}/embeddings``.

    Args:
      base_url: the API root, e.g. ``http://localhost:8000/v1``.
      model: the embedding model's name on the server.
      api_key: sent as ``Authorization: Bearer``; or ``api_key_env``: the variable holding it (it
        must be set when named).
      timeout_s: socket timeout of one request attempt.
      max_retries: retries of one batch after its first attempt.
      backoff_base_s, backoff_max_s: retry ``n`` waits a random time in ``[c/2, c]``, ``c =
        min(backoff_max_s, backoff_base_s * 2**(n-1))``, or the server's ``Retry-After`` if longer
        (capped at ``max_retry_after_s``).
      batch_size: texts per request.
      dimensions: when set, sent as the request's ``dimensions`` (models that can truncate).
      use_env_proxy: honour ``http_proxy``/``https_proxy``/``no_proxy``.

    Raises:
      ValueError: bad knobs, or ``api_key_env`` not set.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, max_retry_after_s: float = 60.0, batch_size: int = 64,
                 dimensions: int | None = None, use_env_proxy: bool = True) -> None:
        if (timeout_s <= 0 or max_retries < 0 or backoff_base_s < 0 or max_retry_after_s < 0
                or batch_size < 1 or (dimensions is not None and dimensions < 1)):
            raise ValueError("timeout_s must be > 0; max_retries, backoff_base_s, max_retry_after_s >= 0; "
                             "batch_size and dimensions >= 1")
        self.url = base_url.rstrip("/") + "/embeddings"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.batch_size = batch_size
        self.dimensions = dimensions
        self._headers = json_headers(api_key, api_key_env, "embeddings API key")
        self._opener = make_opener(use_env_proxy)
        self._random = random.Random()
        self._lock = threading.Lock()
        self.prompt_tokens = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """The embeddings of ``texts``: ``float32 [len(texts), dim]``, in order.

        Raises:
          LLMClientError: a batch that failed (after its retries), or replies of different
            dimensions.
        """
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise LLMClientError("texts to embed must be strings")
        rows: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            rows.append(self._embed_batch(texts[start:start + self.batch_size]))
        if not rows:
            return np.zeros((0, self.dimensions or 0), np.float32)
        if len({row.shape[1] for row in rows}) > 1:
            raise LLMResponseError(f"{self.url} returned embeddings of different dimensions "
                                   f"{sorted({row.shape[1] for row in rows})}")
        return np.concatenate(rows)

    embed = __call__

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        payload = {"model": self.model, "input": texts, "encoding_format": "float"}
        if self.dimensions is not None:
            payload["dimensions"] = self.dimensions
        body = json.dumps(payload).encode()
        attempt = 1
        while True:
            try:
                return self._parse(self._attempt(body), len(texts))
            except LLMClientError as error:
                if not error.retryable or attempt > self.max_retries:
                    if attempt > 1:
                        error.args = (f"{error.args[0]} (gave up after {attempt} attempts)",)
                    raise
                time.sleep(self._backoff_s(attempt, error.retry_after_s))
                attempt += 1

    def _backoff_s(self, retry: int, retry_after_s: float | None) -> float:
        with self._lock:  # the random generator is shared by the callers' threads
            return backoff_s(retry, self._random, base_s=self.backoff_base_s, max_s=self.backoff_max_s,
                             retry_after_s=retry_after_s, max_retry_after_s=self.max_retry_after_s)

    def _attempt(self, body: bytes) -> bytes:
        return post_json(self._opener, self.url, body, self._headers, self.timeout_s)

    def _parse(self, raw: bytes, count: int) -> np.ndarray:
        """The ``[count, dim]`` embeddings of a reply body (retryable :class:`LLMResponseError`
        when it is not one)."""
        excerpt = raw[:200].decode("utf-8", "replace")
        try:
            reply = json.loads(raw)
            data = reply["data"]
            if not isinstance(data, list) or len(data) != count:
                raise ValueError(f"{count} embeddings expected, got "
                                 f"{len(data) if isinstance(data, list) else type(data).__name__}")
            order = [entry.get("index", position) for position, entry in enumerate(data)]
            if sorted(order) != list(range(count)):
                raise ValueError(f"the indices {order} are not 0..{count - 1}")
            vectors = [None] * count
            for index, entry in zip(order, data):
                vectors[index] = entry["embedding"]
            matrix = np.asarray(vectors, np.float32)
            if matrix.ndim != 2 or matrix.shape[1] < 1 or not np.isfinite(matrix).all():
                raise ValueError("the embeddings are not equal-length lists of finite numbers")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LLMResponseError(f"reply from {self.url} is not an embeddings reply ({err}): {excerpt!r}",
                                   retryable=True) from None
        usage = reply.get("usage") if isinstance(reply, dict) else None
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            with self._lock:
                self.prompt_tokens += tokens
        return matrix
