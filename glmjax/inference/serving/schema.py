"""OpenAI API shapes: request models (validated with pydantic) and the response objects built from
generated completions.

Requests follow the published ``/v1/completions`` and ``/v1/chat/completions`` bodies, with the
vLLM extensions ``top_k``, ``min_p`` and ``ignore_eos``; fields the server cannot honour are refused
with a 400 naming them (``frequency_penalty``, ``presence_penalty``, ``logit_bias``,
``response_format`` other than text, ``tool_choice`` "required" or a named function, ``echo``,
``suffix``, ``best_of`` > 1), unknown fields are ignored. Errors are
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from glmjax.data.chat_format import Reply, ToolCall
from glmjax.inference.serving.scheduler import ChoiceResult

TokenText = Callable[[int], str]
"""A token id -> its text (``tokenizer.decode([id])``)."""


class APIError(Exception):
    """A request refused with an OpenAI-style error body.

    Attributes:
      status: HTTP status (400, 404, 429, 503, ...).
      message: one line for the client.
      type: OpenAI error type ("invalid_request_error", "not_found_error", ...).
      param: the request field at fault, if any.
      code: a machine-readable code (e.g. "context_length_exceeded"), if any.
      headers: extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not stop for stop in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return tuple(stops)

    def check_supported(self) -> None:
        """Refuses fields this server does not implement when they ask for a change."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")

    def base_seed(self) -> int:
        """The request's seed, or a fresh random one; choice ``i`` samples with ``seed + i``."""
        return secrets.randbits(31) if self.seed is None else self.seed

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_GenerationFields):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tool_choice is not None and self.tool_choice not in ("none", "auto"):
            raise APIError(400, "tool_choice must be 'auto' or 'none' on this server (it cannot force "
                           "a tool call)", param="tool_choice")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported by this server",
                           param="response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools rendered into the prompt: none with ``tool_choice="none"``."""
        return None if self.tool_choice == "none" or not self.tools else self.tools

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages with content-part lists joined into text.

        Raises:
          APIError: a content part that is not text.
        """
        messages = []
        for index, message in enumerate(self.messages):
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages[{index}].content: only text parts are supported",
                                       param="messages")
                    texts.append(part["text"])
                message = {**message, "content": "".join(texts)}
            messages.append(message)
        return messages


class CompletionRequest(_GenerationFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.best_of not in (None, 1, self.n):
            raise APIError(400, "best_of is not supported by this server", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return list(prompt)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def body_tokens(result: ChoiceResult, stop_ids: frozenset[int]) -> int:
    """Tokens of ``result`` that its text covers (all but a final stop id)."""
    count = len(result.tokens)
    return count - 1 if result.finish_reason == "stop" and count and result.tokens[-1] in stop_ids else count


def chat_logprobs(tokens: Sequence[int], logprobs: Sequence[float],
                  top: Sequence[Sequence[tuple[int, float]]], token_text: TokenText) -> dict[str, Any]:
    """Chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(i, v) for i, v in alternatives]}
                        for token, logprob, alternatives in zip(tokens, logprobs, top or [[]] * len(tokens))]}


def completion_logprobs(tokens: Sequence[int], logprobs: Sequence[float],
                        top: Sequence[Sequence[tuple[int, float]]], token_text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """Completions ``logprobs``: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``;
    ``top_logprobs`` is a list of ``{token text: logprob}`` per token (None when not asked)."""
    texts = [token_text(token) for token in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": list(logprobs),
        "top_logprobs": [{token_text(i): v for i, v in alternatives} for alternatives in top] if top else None,
        "text_offset": offsets,
    }


def tool_call_entries(calls: Sequence[ToolCall], streaming: bool = False) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` (arguments as a JSON string; an id made up when the model gave none);
    ``streaming`` adds each entry's ``index``."""
    entries = []
    for index, call in enumerate(calls):
        entry = {"id": call.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        entries.append({"index": index, **entry} if streaming else entry)
    return entries


def chat_message(reply: Reply) -> dict[str, Any]:
    """The assistant message of a parsed reply: ``content`` (None when the turn is only tool
    calls) and ``tool_calls`` when there are some."""
    if not reply.tool_calls:
        return {"role": "assistant", "content": reply.content}
    return {"role": "assistant", "content": reply.content or None, "tool_calls": tool_call_entries(reply.tool_calls)}


def chat_finish_reason(result: ChoiceResult, reply: Reply) -> str:
    """"tool_calls" for a turn that stopped with tool calls, else the completion's reason."""
    return "tool_calls" if reply.tool_calls and result.finish_reason == "stop" else result.finish_reason


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
