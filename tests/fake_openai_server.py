"""A small scriptable OpenAI-compatible chat-completions server for tests.

It listens on 127.0.0.1 on an ephemeral port.  Each request to
``POST /v1/chat/completions`` takes the next scripted :class:`Behaviour` (a
normal reply once the script is used up), and every request is logged with
its parsed JSON body::

    with FakeOpenAIServer() as server:
        server.script(Behaviour.error(500), Behaviour.slow(2.0),
                      Behaviour.tool_calls(("add", {"a": 1, "b": 2})), Behaviour.answer("3"))
        client = OpenAIHTTPClient(server.base_url, "fake-model")
        ...
        assert len(server.requests) == 5
        assert server.requests[2].body["tools"] == ...

``POST /v1/embeddings`` answers ``{"input": [texts]}`` with one vector per text from the server's
``embed`` function (by default :func:`hashed_bag_of_words`: texts sharing words get similar
vectors); its own script (:meth:`FakeOpenAIServer.script_embeddings`) can make a request fail.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import json
import re
import threading
import time
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How to answer one request.

    ``body=None`` means a completion whose first choice holds ``message`` (by
    default an assistant message with the text of the server's ``reply``
    function) and ``finish_reason``; otherwise ``body`` is sent verbatim with
    ``status``.
    """

    status: int = 200
    body: str | None = None
    delay_s: float = 0.0
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    message: Mapping[str, Any] | None = None
    finish_reason: str = "stop"

    @classmethod
    def normal(cls) -> Behaviour:
        return cls()

    @classmethod
    def answer(cls, content: str, finish_reason: str = "stop") -> Behaviour:
        """A completion with the given text."""
        return cls(message={"role": "assistant", "content": content}, finish_reason=finish_reason)

    @classmethod
    def tool_calls(cls, *calls: tuple[str, Mapping[str, Any] | str],
                   content: str | None = None) -> Behaviour:
        """A completion calling tools: ``(name, arguments)`` pairs, where arguments given as a
        mapping are sent as their JSON text and a string is sent verbatim (e.g. broken JSON)."""
        return cls(finish_reason="tool_calls", message={
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {"id": f"server_call_{i}", "type": "function",
                 "function": {"name": name, "arguments": args if isinstance(args, str)
                              else json.dumps(args)}}
                for i, (name, args) in enumerate(calls)],
        })

    @classmethod
    def error(cls, status: int = 500, message: str = "internal error") -> Behaviour:
        return cls(status=status, body=json.dumps({"error": {"message": message}}))

    @classmethod
    def slow(cls, delay_s: float) -> Behaviour:
        """A normal reply sent only after ``delay_s`` seconds."""
        return cls(delay_s=delay_s)

    @classmethod
    def malformed(cls, body: str = "<html>this is not json</html>") -> Behaviour:
        return cls(body=body)

    @classmethod
    def missing_choices(cls) -> Behaviour:
        return cls(body=json.dumps({"id": "x", "object": "chat.completion", "choices": []}))

    @classmethod
    def rate_limited(cls, retry_after_s: float = 0.0) -> Behaviour:
        return cls(status=429, body=json.dumps({"error": {"message": "rate limited"}}),
                   headers={"Retry-After": f"{retry_after_s:g}"})


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as received: path, headers, parsed JSON body, arrival time."""

    path: str
    headers: dict[str, str]
    body: Any
    time: float


def echo_reply(request: Mapping[str, Any]) -> str:
    """Default reply: ``"echo: "`` + the last message's content."""
    return "echo: " + str(request["messages"][-1]["content"])


def hashed_bag_of_words(text: str, dim: int = 64) -> list[float]:
    """A deterministic embedding: the counts of ``text``'s lower-cased words (and CJK characters),
    each hashed (SHA-256) to one of ``dim`` dimensions."""
    vector = [0.0] * dim
    for word in re.findall(r"[\u4e00-\u9fff]|[^\W_]+", text.lower()):
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dim] += 1.0
    return vector


class FakeOpenAIServer:
    """Threaded HTTP server answering chat completions as scripted (see module doc).

    Args:
      reply: maps the request JSON to the completion text of normal replies.
    """

    def __init__(self, reply: Callable[[Mapping[str, Any]], str] = echo_reply,
                 embed: Callable[[str], list[float]] = hashed_bag_of_words) -> None:
        self.reply = reply
        self.embed = embed
        self._embeddings_script: collections.deque[Behaviour] = collections.deque()
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._script: collections.deque[Behaviour] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        """API root to give a client, e.g. ``http://127.0.0.1:54321/v1``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        with self._lock:
            self._script.extend(behaviours)

    def script_embeddings(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next ``/v1/embeddings`` requests (a normal reply once used up;
        ``Behaviour.slow``, ``.error``, ``.malformed`` and ``.rate_limited`` apply as for chat)."""
        with self._lock:
            self._embeddings_script.extend(behaviours)

    def _embeddings(self, request: Any) -> str:
        texts = request["input"] if isinstance(request.get("input"), list) else [request["input"]]
        return json.dumps({
            "object": "list", "model": request.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": self.embed(text)}
                     for i, text in enumerate(texts)],
            "usage": {"prompt_tokens": sum(len(text.split()) for text in texts),
                      "total_tokens": sum(len(text.split()) for text in texts)},
        })

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; pending slow replies are abandoned."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _next_behaviour(self, request: RecordedRequest) -> Behaviour:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return self._script.popleft() if self._script else Behaviour.normal()

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _completion(self, request: Any, behaviour: Behaviour) -> str:
        message = behaviour.message or {"role": "assistant", "content": self.reply(request)}
        return json.dumps({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": request.get("model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": behaviour.finish_reason}],
        })

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                request = RecordedRequest(self.path, dict(self.headers), body, time.monotonic())
                if self.path == "/v1/embeddings":
                    self._answer_embeddings(request)
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}))
                    return
                behaviour = server._next_behaviour(request)
                try:
                    if behaviour.delay_s and server._stopping.wait(behaviour.delay_s):
                        return
                    text = behaviour.body if behaviour.body is not None else (
                        server._completion(body, behaviour))
                finally:
                    # Counted out before answering: once the client has the reply it may send
                    # its next request, which must not overlap this one in the count.
                    server._finished()
                try:
                    self._send(behaviour.status, text, behaviour.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # The client gave up (timeout); nothing to answer.

            def _answer_embeddings(self, request: RecordedRequest) -> None:
                with server._lock:
                    server.requests.append(request)
                    behaviour = (server._embeddings_script.popleft() if server._embeddings_script
                                 else Behaviour.normal())
                if behaviour.delay_s and server._stopping.wait(behaviour.delay_s):
                    return
                try:
                    text = behaviour.body if behaviour.body is not None else server._embeddings(request.body)
                except (KeyError, TypeError, AttributeError) as err:
                    behaviour, text = Behaviour(status=400), json.dumps({"error": {"message": f"bad request: {err!r}"}})
                try:
                    self._send(behaviour.status, text, behaviour.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status: int, text: str,
                      headers: Mapping[str, str] | None = None) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # Keep test output quiet.

        return Handler
