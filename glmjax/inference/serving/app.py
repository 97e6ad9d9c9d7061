"""An OpenAI-compatible HTTP API (FastAPI) over a :class:`ContinuousScheduler`.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (request and response shapes in ``glmjax.inference.serving.schema``).

* **Chat** prompts come from the tokenizer's chat format (``glmjax.data.chat_format``): OpenAI
  messages (``tool_calls`` with JSON-string or object arguments, ``tool`` messages answering them
  by ``tool_call_id``) are rendered the model's way (GLM-4: each call as an assistant turn with
  ``metadata`` and an ``observation``); generation stops at the format's stop tokens; the turn is
  parsed back (``ChatFormat.parse_reply``) into ``content`` and OpenAI ``tool_calls`` (arguments
  a JSON string, ``finish_reason`` "tool_calls"). A turn that does not parse (a malformed call)
  comes back as its raw text; without tools offered a turn is always text.
* **Completions** take text (encoded with the tokenizer's special tokens, as
  ``launch.generate`` does) or token ids, one prompt or a list; generation stops at the
  tokenizer's eos token. Choice ``i * n + j`` is sample ``j`` of prompt ``i``.
* ``n`` samples of a prompt share one prefill; sample ``j`` draws with ``seed + j`` (chat) or
  ``seed + i * n + j`` (completions), so a seeded request is reproducible; without ``seed`` a
  random one is drawn per request. ``stop`` strings are cut from the text, ``logprobs`` /
  ``top_logprobs`` (chat) and ``logprobs=k`` (completions) report the scheduler's log-prob mode.
* **Streaming** (``stream=true``) sends ``data: {chunk}`` server-sent events, then
  ``data: [DONE]``; text is sent once no stop string can cut it. When tools are offered a chat turn
  is sent whole at its end (content and tool calls cannot be told apart before).
* **Errors** are OpenAI-style JSON: 400 for invalid or unsupported fields (the ``param`` named)
  and prompts beyond the context (``code`` "context_length_exceeded"), 404 for an unknown model
  or route, 405, 429 with ``Retry-After`` when the waiting queue is full, 503 when the scheduler
  has stopped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import ChatFormat, ChatFormatError, Reply, chat_format_for
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.inference.serving import schema
from glmjax.inference.serving.scheduler import (
    ChoiceDelta,
    ChoiceResult,
    ContinuousScheduler,
    GenerationRequest,
    RequestFailed,
    SchedulerBusy,
    SchedulerClosed,
)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 429: "rate_limit_error"}


class ServedModel:
    """A model behind the API: its name, tokenizer, chat format and scheduler.

    Args:
      name: the model id clients send (``model``) and ``/v1/models`` lists.
      engine: the generation engine holding the model.
      tokenizer: the model's tokenizer.
      scheduler_options: keyword arguments of :class:`ContinuousScheduler` (``max_slots``,
        ``max_len``, ``decode_chunk``, ``batching``, ...).

    The scheduler is started here; :meth:`close` stops it.
    """

    def __init__(self, name: str, engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase,
                 **scheduler_options: Any) -> None:
        self.name = name
        self.tokenizer = tokenizer
        # One lock for every tokenizer call: the scheduler thread decodes while request handlers
        # encode, and a fast tokenizer's settings are not safe to share between threads.
        self._tokenizer_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        try:
            self.chat_format: ChatFormat | None = chat_format_for(tokenizer)
            self.chat_format_error: str | None = None
        except ChatFormatError as err:
            self.chat_format, self.chat_format_error = None, str(err)
        self.eos_ids = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
        self.scheduler = ContinuousScheduler(engine, self.detokenize, **scheduler_options).start()
        self.created = int(time.time())

    def close(self) -> None:
        self.scheduler.close()

    def detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        """The text of one token (log-prob entries), cached."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.detokenize([token])
        return text

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer.encode(text))

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        with self._tokenizer_lock:
            return self.chat_format.prompt_ids(messages, tools)

    def parse(self, text: str, tools_offered: bool) -> Reply:
        """The turn's content and tool calls; the raw text when it does not parse, or when it
        holds tool calls that were not offered."""
        try:
            reply = self.chat_format.parse_reply(text)
        except ChatFormatError:
            return Reply(text)
        return reply if tools_offered or not reply.tool_calls else Reply(text)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "glmjax",
                "max_model_len": self.scheduler.max_len}


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI application serving ``served`` (module docstring)."""
    app = FastAPI(title="glmjax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(schema.APIError)
    async def api_error(_, error: schema.APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = location[0] if location else None
        where = ".".join(location) or "body"
        return JSONResponse(schema.error_body(f"{where}: {first.get('msg', 'invalid')}",
                                              "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(schema.error_body(str(error.detail), _ERROR_TYPES.get(error.status_code, "server_error")),
                            status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception) -> JSONResponse:
        return JSONResponse(schema.error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = served.scheduler.stats()
        if not stats["running"]:
            error = served.scheduler.error
            return JSONResponse({"status": "error", "error": None if error is None else str(error), **stats},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": served.name, **stats})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        _check_model(served, model)
        return served.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schema.ChatCompletionRequest):
        _check_model(served, body.model)
        body.check_supported()
        if served.chat_format is None:
            raise schema.APIError(400, f"this model has no chat format ({served.chat_format_error}); "
                                  "use /v1/completions", param="messages")
        tools = body.offered_tools()
        if tools and not served.chat_format.parses_tool_calls:
            raise schema.APIError(400, f"tools: {served.chat_format.source} has no tool-call convention "
                                  "this server parses (GLM-4 or <tool_call> JSON)", param="tools")
        messages = body.chat_messages()
        try:
            prompt = await run_in_threadpool(served.chat_prompt, messages, tools)
        except ChatFormatError as err:
            raise schema.APIError(400, str(err), param="messages") from None
        top = body.top_logprobs or 0
        stops = () if body.ignore_eos else served.chat_format.stop_token_ids
        request = _generation_request(served, body, prompt, body.token_budget(), body.base_seed(), stops,
                                      top, "messages")
        generation = _Generation(served.scheduler, [request])
        if body.stream:
            return _event_stream(_chat_chunks(served, body, generation, bool(tools), len(prompt)), generation)
        results = await generation.results()
        choices = []
        for index, result in enumerate(results):
            reply = served.parse(result.text, bool(tools))
            count = schema.body_tokens(result, frozenset(stops))
            choices.append({
                "index": index, "message": schema.chat_message(reply),
                "logprobs": schema.chat_logprobs(result.tokens[:count], result.logprobs[:count],
                                                 result.top_logprobs[:count] if top else [], served.token_text)
                if body.logprobs else None,
                "finish_reason": schema.chat_finish_reason(result, reply),
            })
        return {"id": schema.new_id("chatcmpl"), "object": "chat.completion", "created": schema.now(),
                "model": served.name, "choices": choices,
                "usage": schema.usage(len(prompt), sum(len(r.tokens) for r in results))}

    @app.post("/v1/completions")
    async def completions(body: schema.CompletionRequest):
        _check_model(served, body.model)
        body.check_supported()
        prompts = [p if isinstance(p, list) else await run_in_threadpool(served.encode, p) for p in body.prompts()]
        seed = body.base_seed()
        stops = () if body.ignore_eos else served.eos_ids
        top = body.logprobs or 0
        requests = [_generation_request(served, body, prompt, body.max_tokens, seed + index * body.n, stops, top,
                                        "prompt") for index, prompt in enumerate(prompts)]
        generation = _Generation(served.scheduler, requests)
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return _event_stream(_completion_chunks(served, body, generation, prompt_tokens, frozenset(stops)),
                                 generation)
        results = await generation.results()
        choices = []
        for index, result in enumerate(results):
            count = schema.body_tokens(result, frozenset(stops))
            choices.append({
                "index": index, "text": result.text,
                "logprobs": schema.completion_logprobs(result.tokens[:count], result.logprobs[:count],
                                                       result.top_logprobs[:count] if top else [], served.token_text)
                if body.logprobs is not None else None,
                "finish_reason": result.finish_reason,
            })
        return {"id": schema.new_id("cmpl"), "object": "text_completion", "created": schema.now(),
                "model": served.name, "choices": choices,
                "usage": schema.usage(prompt_tokens, sum(len(r.tokens) for r in results))}

    return app


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        raise schema.APIError(404, f"The model '{name}' does not exist (this server serves '{served.name}')",
                              param="model", code="model_not_found")


def _generation_request(served: ServedModel, body: schema.ChatCompletionRequest | schema.CompletionRequest,
                        prompt: list[int], budget: int | None, seed: int, stops: Sequence[int],
                        top_logprobs: int, prompt_param: str) -> GenerationRequest:
    """The scheduler request for one prompt of ``body``; choice ``j`` samples with ``seed + j``.

    Raises:
      APIError: a prompt or budget beyond the context, or settings the scheduler refuses.
    """
    max_len = served.scheduler.max_len
    room = max_len - len(prompt)
    if room < 1:
        raise schema.APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {max_len} "
                              "tokens", param=prompt_param, code="context_length_exceeded")
    max_tokens = room if budget is None else budget
    if max_tokens > room:
        raise schema.APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceed "
                              f"this model's context of {max_len} tokens", param="max_tokens",
                              code="context_length_exceeded")
    if body.n > served.scheduler.max_slots:
        raise schema.APIError(400, f"n must be at most {served.scheduler.max_slots} (the server's decode "
                              f"slots), got {body.n}", param="n")
    sampling = SamplingConfig(temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=max(0, body.top_k or 0), top_p=1.0 if body.top_p is None else body.top_p,
                              min_p=body.min_p or 0.0)
    request = GenerationRequest(prompt, max_tokens, sampling, seeds=[seed + j for j in range(body.n)],
                                stop_token_ids=tuple(stops), stop_strings=body.stop_strings(),
                                top_logprobs=top_logprobs, stream=body.stream)
    try:
        served.scheduler.check(request)
    except ValueError as err:
        raise schema.APIError(400, str(err)) from None
    return request


class _Generation:
    """The scheduler submissions of one HTTP request (one per prompt), their events bridged into
    the event loop. Choice ``k * n + j`` is completion ``j`` of prompt ``k``.

    Raises (constructor):
      APIError: 429 when the scheduler's queue is full, 503 when it is not running.
    """

    def __init__(self, scheduler: ContinuousScheduler, requests: list[GenerationRequest]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.n = requests[0].n
        self.total = len(requests) * self.n
        self._submissions = []
        try:
            for number, request in enumerate(requests):
                self._submissions.append(scheduler.submit(request, self._callback(number)))
        except SchedulerBusy as err:
            self.cancel()
            raise schema.APIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded",
                                  headers={"Retry-After": "1"}) from None
        except SchedulerClosed as err:
            self.cancel()
            raise schema.APIError(503, str(err), type="server_error") from None

    def _callback(self, number: int):
        def on_event(event: Any) -> None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (number, event))
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass
        return on_event

    def cancel(self) -> None:
        for submission in self._submissions:
            submission.cancel()

    async def events(self) -> AsyncIterator[tuple[int, ChoiceDelta | ChoiceResult]]:
        """(choice index, event) until every choice has its result.

        Raises:
          APIError: 503 when the scheduler stopped before finishing.
        """
        remaining = self.total
        while remaining:
            number, event = await self._queue.get()
            if isinstance(event, RequestFailed):
                raise schema.APIError(503, event.message, type="server_error")
            if isinstance(event, ChoiceResult):
                remaining -= 1
            yield number * self.n + event.index, event

    async def results(self) -> list[ChoiceResult]:
        results: dict[int, ChoiceResult] = {}
        try:
            async for index, event in self.events():
                if isinstance(event, ChoiceResult):
                    results[index] = event
        finally:
            self.cancel()
        return [results[index] for index in range(self.total)]


def _event_stream(chunks: AsyncIterator[str], generation: _Generation) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except schema.APIError as error:
            yield schema.sse(error.body())
        finally:
            generation.cancel()  # a client that went away frees its slots
        yield schema.sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(served: ServedModel, body: schema.ChatCompletionRequest, generation: _Generation,
                       tools_offered: bool, prompt_tokens: int) -> AsyncIterator[str]:
    """Chat chunks: a role delta per choice, content deltas as the parsed content grows (whole at
    the end when tools are offered), a last chunk with the finish reason (and tool calls)."""
    ident, created = schema.new_id("chatcmpl"), schema.now()
    usage = {"usage": None} if body.include_usage() else {}
    top = body.top_logprobs or 0

    def chunk(index: int, delta: dict[str, Any], entries: list | None = None, finish: str | None = None) -> str:
        logprobs = {"content": entries} if body.logprobs and entries is not None else None
        return schema.sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": served.name,
                           "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}], **usage})

    raw = [""] * generation.total
    shown = [""] * generation.total
    pending: list[list[dict[str, Any]]] = [[] for _ in range(generation.total)]
    completion_tokens = 0
    for index in range(generation.total):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for index, event in generation.events():
        if isinstance(event, ChoiceDelta):
            raw[index] += event.text
            if body.logprobs:
                pending[index] += schema.chat_logprobs(event.tokens, event.logprobs, event.top_logprobs if top else [],
                                                       served.token_text)["content"]
            content = served.parse(raw[index], False).content
            if tools_offered or not content.startswith(shown[index]) or (content == shown[index] and not pending[index]):
                continue
            yield chunk(index, {"content": content[len(shown[index]):]}, pending[index])
            shown[index], pending[index] = content, []
            continue
        completion_tokens += len(event.tokens)
        reply = served.parse(event.text, tools_offered)
        delta: dict[str, Any] = {}
        if reply.content.startswith(shown[index]) and reply.content != shown[index]:
            delta["content"] = reply.content[len(shown[index]):]
        if reply.tool_calls:
            delta["tool_calls"] = schema.tool_call_entries(reply.tool_calls, streaming=True)
        yield chunk(index, delta, pending[index], schema.chat_finish_reason(event, reply))
    if body.include_usage():
        yield schema.sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": served.name,
                          "choices": [], "usage": schema.usage(prompt_tokens, completion_tokens)})


async def _completion_chunks(served: ServedModel, body: schema.CompletionRequest, generation: _Generation,
                             prompt_tokens: int, stops: frozenset[int]) -> AsyncIterator[str]:
    """Completion chunks: text deltas as they are committed, then one with the finish reason."""
    ident, created = schema.new_id("cmpl"), schema.now()
    usage = {"usage": None} if body.include_usage() else {}
    top = body.logprobs or 0
    offsets = [0] * generation.total
    completion_tokens = 0

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> str:
        return schema.sse({"id": ident, "object": "text_completion", "created": created, "model": served.name,
                           "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish}], **usage})

    async for index, event in generation.events():
        if isinstance(event, ChoiceDelta):
            logprobs = None
            if body.logprobs is not None:
                logprobs = schema.completion_logprobs(event.tokens, event.logprobs, event.top_logprobs if top else [],
                                                      served.token_text, offsets[index])
            offsets[index] += len(event.text)
            yield chunk(index, event.text, logprobs, None)
        else:
            completion_tokens += len(event.tokens)
            yield chunk(index, "", None, event.finish_reason)
    if body.include_usage():
        yield schema.sse({"id": ident, "object": "text_completion", "created": created, "model": served.name,
                          "choices": [], "usage": schema.usage(prompt_tokens, completion_tokens)})


class BackgroundServer:
    """uvicorn serving ``app`` from a thread (tests, benchmarks): ``with BackgroundServer(app) as
    server: ... server.base_url``.

    Args:
      app: the ASGI application.
      host: interface to bind (loopback by default).
      port: port to bind; 0 picks a free one (``port`` holds it once started).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        """The API root, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Starts serving; returns once the socket listens.

        Raises:
          OSError: the server could not listen (e.g. the port is taken) within ``timeout_s``.
        """
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"could not listen on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
