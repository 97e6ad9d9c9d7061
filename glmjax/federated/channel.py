"""What crosses between the active party and a passive party, and the in-process channel.

Four calls, each a request message from the active party and a reply from the passive one:

  Handshake   (variant, sent_dim, ids, resume_step)   -> (party, restored_step)
  Step        (step, index, sent)                      -> (grad, loss)
  Checkpoint  (step)                                   -> (step)
  Finish      (step)                                   -> (step)

``ids`` are the active party's sample ids (the shared alignment key); ``index`` (B,) picks the
batch rows in the order of those ids; ``sent`` (B, d) is z = f_A(x_A) (APFed-R) or g_A(z)
(APFed-C); ``grad`` (B, d) is dL_p/d(sent) of the passive party's loss L_p (unscaled: the active
party applies lambda_p). No raw view, label or parameter of either party is in any message.

Messages travel as bytes (``encode``/``decode``): a 4-byte little-endian header length, a JSON
header (scalars, and name/dtype/shape/size per array), then the arrays' raw C-order bytes.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import struct
from typing import Any, Callable

import numpy as np

from glmjax.federated.data import IdMismatchError


class PassiveUnavailableError(RuntimeError):
    """A passive party cannot be reached (gone, refused, deadline passed)."""

    def __init__(self, party: str, detail: str):
        super().__init__(f"passive party {party!r} unavailable: {detail}")
        self.party = party


class PartyConfigError(ValueError):
    """The two parties' configs disagree (variant, dims) or a checkpoint does not fit."""


class PassiveRejectedError(RuntimeError):
    """The passive party answered a call with an error (its type and message are kept)."""


# Errors a passive party reports by type name; the active side raises the same type.
REMOTE_ERRORS: dict[str, type[Exception]] = {
    "IdMismatchError": IdMismatchError,
    "PartyConfigError": PartyConfigError,
}


# ----------------------------------------------------------------------------- codec

_HEADER = struct.Struct("<I")


def encode(fields: dict[str, Any]) -> bytes:
    """Serialises scalars (int, float, str, bool) and numpy arrays (numeric or unicode) to bytes."""
    scalars, arrays, blobs = {}, [], []
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biufU":
                raise TypeError(f"field {name!r}: dtype {value.dtype} cannot be sent")
            data = np.ascontiguousarray(value).tobytes()
            arrays.append([name, value.dtype.str, list(value.shape), len(data)])
            blobs.append(data)
        elif isinstance(value, (bool, int, float, str)):
            scalars[name] = value
        else:
            raise TypeError(f"field {name!r}: {type(value).__name__} cannot be sent")
    header = json.dumps({"s": scalars, "a": arrays}, separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(len(header)), header, *blobs])


def decode(payload: bytes) -> dict[str, Any]:
    """Inverse of ``encode``; arrays are fresh (writable) numpy arrays."""
    (size,) = _HEADER.unpack_from(payload, 0)
    header = json.loads(payload[_HEADER.size:_HEADER.size + size])
    fields = dict(header["s"])
    offset = _HEADER.size + size
    for name, dtype, shape, nbytes in header["a"]:
        fields[name] = np.frombuffer(payload, np.dtype(dtype), count=int(np.prod(shape)) if shape else 1,
                                     offset=offset).reshape(shape).copy()
        offset += nbytes
    if offset != len(payload):
        raise ValueError(f"message of {len(payload)} bytes, header accounts for {offset}")
    return fields


# ----------------------------------------------------------------------------- messages

@dataclasses.dataclass(frozen=True)
class _Message:
    def to_bytes(self) -> bytes:
        return encode(dataclasses.asdict(self))

    @classmethod
    def from_bytes(cls, payload: bytes):
        fields = decode(payload)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(fields) != names:
            raise ValueError(f"{cls.__name__}: fields {sorted(fields)}, expected {sorted(names)}")
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class HandshakeRequest(_Message):
    variant: str          # "R" or "C"
    sent_dim: int         # d of the tensors Step will send
    ids: np.ndarray       # (N,) unicode: the active party's sample ids, in its row order
    resume_step: int      # the active party's restored step (0: fresh run)


@dataclasses.dataclass(frozen=True)
class HandshakeReply(_Message):
    party: str
    restored_step: int    # the passive party's restored checkpoint step (0: fresh modules)


@dataclasses.dataclass(frozen=True)
class StepRequest(_Message):
    step: int
    index: np.ndarray     # (B,) int32 rows, in the order of the handshake ids
    sent: np.ndarray      # (B, d) float32: z (APFed-R) or g_A(z) (APFed-C)


@dataclasses.dataclass(frozen=True)
class StepReply(_Message):
    grad: np.ndarray      # (B, d) float32 dL_p/d(sent)
    loss: float           # L_p on this batch (logging only)


@dataclasses.dataclass(frozen=True)
class StepNumber(_Message):
    step: int


METHODS: dict[str, tuple[type[_Message], type[_Message]]] = {
    "Handshake": (HandshakeRequest, HandshakeReply),
    "Step": (StepRequest, StepReply),
    "Checkpoint": (StepNumber, StepNumber),
    "Finish": (StepNumber, StepNumber),
}


class PassiveService(abc.ABC):
    """The passive party's side: one method per call in ``METHODS``."""

    @abc.abstractmethod
    def handshake(self, request: HandshakeRequest) -> HandshakeReply: ...

    @abc.abstractmethod
    def step(self, request: StepRequest) -> StepReply: ...

    @abc.abstractmethod
    def checkpoint(self, request: StepNumber) -> StepNumber: ...

    @abc.abstractmethod
    def finish(self, request: StepNumber) -> StepNumber: ...

    def handle(self, method: str, payload: bytes) -> bytes:
        """Decodes a request for ``method``, runs it, encodes the reply."""
        request_type, _ = METHODS[method]
        handler = {"Handshake": self.handshake, "Step": self.step, "Checkpoint": self.checkpoint,
                   "Finish": self.finish}[method]
        return handler(request_type.from_bytes(payload)).to_bytes()


# ----------------------------------------------------------------------------- channels

class PassiveChannel(abc.ABC):
    """The active party's handle on one passive party."""

    name: str

    @abc.abstractmethod
    def call(self, method: str, payload: bytes) -> bytes:
        """Sends one encoded request, returns the encoded reply.

        Raises:
          PassiveUnavailableError: the passive party is gone or did not answer in time.
          IdMismatchError, PartyConfigError, PassiveRejectedError: it answered with an error.
        """

    def close(self) -> None:
        """Releases the transport (the passive party is not told anything)."""

    def _typed(self, method: str, request: _Message) -> _Message:
        return METHODS[method][1].from_bytes(self.call(method, request.to_bytes()))

    def handshake(self, request: HandshakeRequest) -> HandshakeReply:
        return self._typed("Handshake", request)

    def step(self, request: StepRequest) -> StepReply:
        return self._typed("Step", request)

    def checkpoint(self, step: int) -> int:
        return self._typed("Checkpoint", StepNumber(step)).step

    def finish(self, step: int) -> int:
        return self._typed("Finish", StepNumber(step)).step


class InProcessChannel(PassiveChannel):
    """Calls a ``PassiveService`` in this process, through the same byte encoding as gRPC.

    ``record``: called with (method, request bytes, reply bytes) for every call (tests inspect
    what crosses). ``disconnect()`` makes every later call fail as a lost party would.
    """

    def __init__(self, name: str, service: PassiveService,
                 record: Callable[[str, bytes, bytes], None] | None = None):
        self.name = name
        self._service = service
        self._record = record
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False

    def call(self, method: str, payload: bytes) -> bytes:
        if not self._connected:
            raise PassiveUnavailableError(self.name, "disconnected")
        reply = self._service.handle(method, payload)
        if self._record is not None:
            self._record(method, payload, reply)
        return reply
