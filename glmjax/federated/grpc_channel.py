"""gRPC transport between parties: a generic service ``glmjax.apfed.Passive`` whose unary methods
(Handshake, Step, Checkpoint, Finish) carry the ``channel`` byte encoding as raw request/response
bytes (no protobuf schema, no generated code).

Errors: the passive party answers a bad request with INVALID_ARGUMENT and the details
``"<ErrorType>: <message>"``; the client raises that type again (``REMOTE_ERRORS``). A party that
cannot be reached or does not answer within the deadline raises ``PassiveUnavailableError``.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import gin
import grpc

from glmjax.federated.channel import (METHODS, REMOTE_ERRORS, PassiveChannel, PassiveRejectedError, PassiveService,
                                      PassiveUnavailableError)

SERVICE = "glmjax.apfed.Passive"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class PassiveServer:
    """Serves one ``PassiveService`` (calls handled one at a time, in arrival order).

    Args:
      address: "host:port" to listen on; port 0 picks a free port (``self.address`` has it).
    """

    def __init__(self, service: PassiveService, address: str = "127.0.0.1:0"):
        self._service = service
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=_OPTIONS)
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._handler(name)) for name in METHODS}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host = address.rsplit(":", 1)[0]
        port = self._server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{host}:{port}"
        self._done = threading.Event()
        self._last_call = time.monotonic()
        self.outcome: str | None = None   # "finished" | "rejected" | "idle" | "terminated"
        self.error: Exception | None = None

    def _handler(self, method: str):
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._last_call = time.monotonic()
            try:
                reply = self._service.handle(method, request)
            except tuple(REMOTE_ERRORS.values()) as err:
                if method == "Handshake":  # the parties cannot work together: this one stops
                    self.error, self.outcome = err, "rejected"
                    self._done.set()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(err).__name__}: {err}")
            if method == "Finish":
                self.outcome = "finished"
                self._done.set()
            return reply
        return handle

    def start(self) -> "PassiveServer":
        self._server.start()
        return self

    def wait(self, idle_timeout_s: float | None = None) -> str:
        """Blocks until Finish, a rejected handshake, ``request_stop`` or ``idle_timeout_s`` seconds
        without a call; returns ``outcome``."""
        while not self._done.wait(1.0):
            if idle_timeout_s is not None and time.monotonic() - self._last_call > idle_timeout_s:
                self.outcome = "idle"
                break
        return self.outcome

    def request_stop(self) -> None:
        """Ends ``wait`` with outcome "terminated" (e.g. from a SIGTERM handler)."""
        self.outcome = self.outcome or "terminated"
        self._done.set()

    def stop(self, grace_s: float = 2.0) -> None:
        """Stops serving; calls in flight get ``grace_s`` seconds to finish (replies are sent)."""
        self._server.stop(grace_s).wait()


@gin.configurable
class GrpcPassiveChannel(PassiveChannel):
    """The active party's gRPC client for one passive party.

    Args:
      name: the passive party's name (must match what it answers at the handshake).
      address: "host:port".
      timeout_s: deadline of every Step/Checkpoint/Finish call.
      connect_timeout_s: how long the Handshake waits for the passive party to come up.
    """

    def __init__(self, name: str, address: str, timeout_s: float = 30.0, connect_timeout_s: float = 60.0):
        self.name = name
        self.address = address
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._calls = {method: self._channel.unary_unary(f"/{SERVICE}/{method}") for method in METHODS}

    def call(self, method: str, payload: bytes) -> bytes:
        first = method == "Handshake"
        try:
            return self._calls[method](payload, timeout=self.connect_timeout_s if first else self.timeout_s,
                                       wait_for_ready=first)
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            if code in _UNAVAILABLE:
                raise PassiveUnavailableError(self.name, f"{code.name} at {self.address}: {details}") from None
            kind, _, message = details.partition(": ")
            if code == grpc.StatusCode.INVALID_ARGUMENT and kind in REMOTE_ERRORS:
                raise REMOTE_ERRORS[kind](message) from None
            raise PassiveRejectedError(f"passive party {self.name!r} at {self.address}: {method} failed with "
                                       f"{code.name}: {details}") from None

    def close(self) -> None:
        self._channel.close()
