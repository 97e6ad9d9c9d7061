"""Stored teacher distributions for offline distillation: the record format, shards and metadata.

A dump (``python -m launch.dump_logits``) is a directory::

    metadata.json                          settings, teacher, tokenizer and corpus (below)
    shard-00000-of-00004.array_record      records of documents [0, D), D = documents_per_shard
    shard-00000-of-00004.done.json         written after the shard file is complete
    ...

Record ``i`` of the shards (in shard order) belongs to document ``i`` of the corpus: it holds the
teacher's truncated next-token distribution at every position of the document that has a next
token. A shard counts only when its ``.done.json`` marker exists; a dump is complete when every
shard has one.

Record layout, format version 1 (little-endian; ``n`` = the document's token count, ``P = n - 1``
positions, ``B = ceil(log2(vocab_size))`` id bits, ``b = prob_bits``):

====================  ==========================================================================
bytes                 content
====================  ==========================================================================
1                     record version (1)
4                     uint32 ``n``
4                     uint32 CRC-32 of the document's token ids as little-endian int32
``P * c``             ``count[t]``, kept ids at position ``t`` (``c`` = 1 byte if ``top_k <=
                      255``, else 2; uint little-endian); 0: no distribution at ``t``
``P * 2``             uint16 ``round(tail[t] * 65535)``: the teacher's mass outside the kept ids
                      at temperature ``tau`` (0 when none; error <= 7.7e-6)
``ceil(N * B / 8)``   ids, ``N = sum(count)``: position 0's ids (descending probability), then
                      position 1's, ...; each id ``B`` bits, least significant bit first, bits
                      packed from the low bit of each byte; zero-padded to a whole byte
``ceil(M * b / 8)``   probability codes, ``M = sum(max(count - 1, 0))``: per position the codes of
                      its 2nd..last ids, same bit packing
====================  ==========================================================================

Probability code (fourth root of the ratio to the position's most probable id, ``L = 2**b - 1``):
for kept id ``j >= 1``, ``code_j = clip(round(L * (p_j / p_0) ** (1/4)), 1, L)``. Decoding sets
``r_0 = 1``, ``r_j = (code_j / L) ** 4`` and ``p_j = r_j / sum(r)``, so the kept probabilities sum
to 1. The fourth root spends the codes where the loss needs them: a uniform code on ``p`` loses
the tail, a log code is coarse on the large probabilities that dominate the loss error (measured
in ``tests/test_teacher_logits_format.py``: per-token KL / soft-CE error < 1e-3 at 12 bits).

Error bound: ``|(p_j/p_0)^(1/4) - r_j^(1/4)| <= 1 / (2L)``, hence ``|r_j - p_j/p_0| <= eps = 2 / L``
(4.9e-4 at 12 bits), and after renormalisation ``|decoded p_j - p_j| <= eps * (1 + (count - 1) *
p_j)``. Ratios below ``L ** -4`` (3.5e-15 at 12 bits) decode at that floor, never as 0. The codes
keep the rank order.

Size at vocabulary 151,552 (``B`` = 18) and top-k 50 with every slot used: 1 + 2 + 50 * 18 / 8
+ 49 * 12 / 8 = 189 bytes per position, 1/3207 of full-vocabulary fp32 logits (606,208 bytes);
top-p keeps fewer ids on sharp positions. Per document 9 bytes of header.

``metadata.json`` (``format`` = ``FORMAT_NAME``, ``format_version`` = ``FORMAT_VERSION``):
``vocab_size``, ``top_k``, ``top_p``, ``temperature``, ``prob_bits``, ``teacher`` (``source``:
hf / orbax / run, ``path``, ``step``, ``config_sha256``), ``tokenizer`` (``size`` and ``sha256`` of
its vocabulary and special tokens; null for token corpora), ``corpus`` (``paths``, ``data_format``, ``field``, ``num_documents``),
``documents_per_shard``, ``num_shards``, ``seq_len``, ``context``. Each ``.done.json``:
``shard``, ``first``, ``documents``, ``tokens``, ``positions``, ``kept``, ``bytes``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath
from grain.sources import ArrayRecordDataSource

from glmjax.data.sources import DataFormatError

FORMAT_NAME = "glmjax-teacher-logits"
FORMAT_VERSION = 1
RECORD_VERSION = 1
METADATA_FILE = "metadata.json"
_HEADER = 9  # version byte, uint32 n, uint32 crc
_TAIL_BYTES = 2
_TAIL_LEVELS = 65535


class TeacherLogitsError(DataFormatError):
    """Stored teacher logits that cannot be used (wrong dump for the corpus, incomplete, corrupt)."""


def tokens_crc(input_ids: np.ndarray) -> int:
    """CRC-32 of token ids as little-endian int32 (the record's document check)."""
    return zlib.crc32(np.asarray(input_ids, "<i4").tobytes())


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative ints ``[N]`` as ``bits``-bit fields, low bit first (module docstring)."""
    if not len(values):
        return b""
    planes = (values.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    """``count`` ``bits``-bit fields of the uint8 buffer ``data`` as int64 ``[count]``."""
    if not count:
        return np.zeros(0, np.int64)
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return planes.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class LogitsFormat:
    """How one dump encodes its records (module docstring).

    Attributes:
      vocab_size: the teacher's vocabulary; ids are ``ceil(log2(vocab_size))`` bits.
      top_k: slots per position (the decoded arrays' last dimension).
      prob_bits: bits per probability code.
    """

    vocab_size: int
    top_k: int
    prob_bits: int = 12

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or not 1 <= self.top_k <= min(self.vocab_size, 65535):
            raise ValueError(f"need vocab_size >= 2 and 1 <= top_k <= min(vocab_size, 65535), got "
                             f"{self.vocab_size}, {self.top_k}")
        if not 2 <= self.prob_bits <= 24:
            raise ValueError(f"need 2 <= prob_bits <= 24, got {self.prob_bits}")

    @property
    def id_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def count_bytes(self) -> int:
        return 1 if self.top_k <= 255 else 2

    @property
    def levels(self) -> int:
        """``L``, the largest probability code."""
        return 2**self.prob_bits - 1

    @property
    def ratio_error_bound(self) -> float:
        """``eps``: bound on the error of each decoded ``p_j / p_0`` (module docstring)."""
        return 2 / self.levels

    def prob_error_bound(self, probs: np.ndarray) -> np.ndarray:
        """Bound on ``|decoded - exact|`` for each exact probability of ``probs [..., top_k]``."""
        probs = np.asarray(probs, np.float64)
        counts = (probs > 0).sum(-1, keepdims=True)
        return np.where(probs > 0, self.ratio_error_bound * (1 + (counts - 1) * probs), 0.0)

    def bytes_per_position(self, kept: int | None = None) -> float:
        """Bytes of one position with ``kept`` ids (default ``top_k``), bit fields unrounded."""
        kept = self.top_k if kept is None else kept
        return self.count_bytes + _TAIL_BYTES + (kept * self.id_bits + max(kept - 1, 0) * self.prob_bits) / 8

    # -- records ----------------------------------------------------------------------------

    def pack(self, input_ids: np.ndarray, ids: np.ndarray, probs: np.ndarray,
             tail: np.ndarray | None = None) -> bytes:
        """The record of one document.

        Args:
          input_ids: int ``[n]``, the document's tokens.
          ids: int ``[n - 1, top_k]``: teacher ids at each position, by descending probability.
          probs: float ``[n - 1, top_k]``: their probabilities (kept ones > 0, summing to ~1),
            unused slots 0 after the used ones; an all-zero row is a position without one.
          tail: float ``[n - 1]`` in [0, 1], the teacher's mass outside the kept ids; None: 0.

        Raises:
          ValueError: shapes, ids out of the vocabulary, unsorted or non-prefix probabilities.
        """
        input_ids = np.asarray(input_ids)
        n = len(input_ids)
        ids, probs = np.asarray(ids), np.asarray(probs, np.float64)
        positions = max(n - 1, 0)
        if ids.shape != (positions, self.top_k) or probs.shape != ids.shape:
            raise ValueError(f"ids {list(ids.shape)} and probs {list(probs.shape)} must both be "
                             f"[{positions}, {self.top_k}] for a document of {n} tokens")
        kept = probs > 0
        counts = kept.sum(-1)
        if np.any(kept[:, 1:] & ~kept[:, :-1]) or not np.all(np.isfinite(probs)):
            raise ValueError("probabilities must be finite, the used slots first")
        if np.any(np.diff(probs, axis=-1)[kept[:, 1:]] > 0):
            raise ValueError("probabilities must be in descending order")
        kept_ids = ids[kept]
        if len(kept_ids) and (kept_ids.min() < 0 or kept_ids.max() >= self.vocab_size):
            raise ValueError(f"teacher ids outside the vocabulary [0, {self.vocab_size})")
        rows, slots = np.nonzero(kept & (np.arange(self.top_k) > 0))
        root = (probs[rows, slots] / probs[rows, 0]) ** 0.25
        codes = np.clip(np.rint(root * self.levels), 1, self.levels).astype(np.int64)
        count_dtype = "<u1" if self.count_bytes == 1 else "<u2"
        tail = np.zeros(positions) if tail is None else np.asarray(tail, np.float64)
        if tail.shape != (positions,) or not np.all((tail >= 0) & (tail <= 1)):
            raise ValueError(f"tail must be [{positions}] values in [0, 1]")
        tail_codes = np.rint(np.where(counts > 0, tail, 0.0) * _TAIL_LEVELS).astype("<u2")
        header = np.asarray([RECORD_VERSION], "<u1").tobytes() + np.asarray(
            [n, tokens_crc(input_ids)], "<u4").tobytes()
        return b"".join([header, counts.astype(count_dtype).tobytes(), tail_codes.tobytes(),
                         _pack_bits(kept_ids, self.id_bits), _pack_bits(codes, self.prob_bits)])

    def unpack(self, data: bytes, input_ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``(ids int32 [n - 1, top_k], probs float32 [n - 1, top_k], tail float32 [n - 1])``
        of a record (unused slots: id 0, probability 0; kept probabilities sum to 1).

        Args:
          input_ids: the document the caller expects; its length and CRC must match the record's.

        Raises:
          ValueError: a corrupt record, or one of another document than ``input_ids``.
        """
        n, crc = read_header(data)
        if input_ids is not None and (len(input_ids) != n or tokens_crc(input_ids) != crc):
            raise ValueError(
                f"the stored teacher logits belong to another document ({n} tokens, crc {crc:08x}; "
                f"this one has {len(input_ids)} tokens, crc {tokens_crc(input_ids):08x}): the "
                "dump was made from other data or another tokenizer")
        positions = max(n - 1, 0)
        buffer = np.frombuffer(data, np.uint8)
        count_end = _HEADER + positions * self.count_bytes
        counts = np.frombuffer(data[_HEADER:count_end], "<u1" if self.count_bytes == 1 else "<u2")
        counts = counts.astype(np.int64)
        total, tails = int(counts.sum()), int(np.maximum(counts - 1, 0).sum())
        tail_end = count_end + positions * _TAIL_BYTES
        ids_end = tail_end + math.ceil(total * self.id_bits / 8)
        expected = ids_end + math.ceil(tails * self.prob_bits / 8)
        if len(counts) != positions or counts.max(initial=0) > self.top_k or len(data) != expected:
            raise ValueError(f"corrupt teacher logits record ({len(data)} bytes; its counts need "
                             f"{expected} at top_k {self.top_k})")
        kept = np.arange(self.top_k) < counts[:, None]
        ids = np.zeros((positions, self.top_k), np.int32)
        ids[kept] = _unpack_bits(buffer[tail_end:ids_end], total, self.id_bits)
        weights = kept.astype(np.float64)
        weights[kept & (np.arange(self.top_k) > 0)] = (
            _unpack_bits(buffer[ids_end:], tails, self.prob_bits) / self.levels) ** 4
        probs = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)
        tail = np.frombuffer(data[count_end:tail_end], "<u2").astype(np.float32) / _TAIL_LEVELS
        return ids, probs.astype(np.float32), tail

    def kept_counts(self, data: bytes) -> np.ndarray:
        """int64 ``[n - 1]``: kept ids per position of a record."""
        n, _ = read_header(data)
        end = _HEADER + max(n - 1, 0) * self.count_bytes
        return np.frombuffer(data[_HEADER:end], "<u1" if self.count_bytes == 1 else "<u2").astype(np.int64)


def read_header(data: bytes) -> tuple[int, int]:
    """(token count ``n``, CRC-32 of the tokens) of a record."""
    if len(data) < _HEADER or data[0] != RECORD_VERSION:
        version = data[0] if data else None
        raise ValueError(f"not a teacher logits record of version {RECORD_VERSION} "
                         f"({len(data)} bytes, version byte {version})")
    n, crc = np.frombuffer(data[1:_HEADER], "<u4")
    return int(n), int(crc)


# -- the dump directory ---------------------------------------------------------------------


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.array_record"


def done_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.done.json"


def format_of(metadata: Mapping[str, Any]) -> LogitsFormat:
    return LogitsFormat(int(metadata["vocab_size"]), int(metadata["top_k"]), int(metadata["prob_bits"]))


def config_sha256(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (teacher configs, tokenizer vocabularies)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's encoding: its size and a hash of its vocabulary and special
    tokens."""
    return {"size": len(tokenizer), "sha256": config_sha256(
        [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])}


def read_metadata(logits_dir: str | os.PathLike) -> dict[str, Any]:
    """``logits_dir/metadata.json``, checked to be this format's.

    Raises:
      TeacherLogitsError: missing, not JSON, another format or version.
    """
    path = epath.Path(logits_dir) / METADATA_FILE
    if not path.is_file():
        raise TeacherLogitsError(f"{path}: missing; not a launch.dump_logits output directory")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TeacherLogitsError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if metadata.get("format") != FORMAT_NAME or metadata.get("format_version") != FORMAT_VERSION:
        raise TeacherLogitsError(
            f"{path}: format {metadata.get('format')!r} version {metadata.get('format_version')!r}; "
            f"this reader reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
    return metadata


def write_json_atomic(path: epath.Path, value: Any) -> None:
    """Writes JSON under a temporary name, then renames it into place."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    tmp.rename(path)


class ShardWriter:
    """Writes one shard: records go to ``<name>.tmp``; ``commit`` renames the file into place and
    then writes the done marker (so a killed writer leaves no file that counts as complete)."""

    def __init__(self, logits_dir: str | os.PathLike, shard: int, num_shards: int, first: int):
        directory = epath.Path(logits_dir)
        self.path = directory / shard_name(shard, num_shards)
        self.done_path = directory / done_name(shard, num_shards)
        self._tmp = directory / (self.path.name + ".tmp")
        self._info = {"shard": shard, "first": first, "documents": 0, "tokens": 0,
                      "positions": 0, "kept": 0, "bytes": 0}
        self._writer = ArrayRecordWriter(str(self._tmp), "group_size:1")

    def write(self, record: bytes, num_tokens: int, kept: int) -> None:
        self._writer.write(record)
        info = self._info
        info["documents"] += 1
        info["tokens"] += num_tokens
        info["positions"] += max(num_tokens - 1, 0)
        info["kept"] += kept
        info["bytes"] += len(record)

    def commit(self) -> dict[str, int]:
        """Closes the file, renames it into place and writes the marker; returns the marker."""
        self._writer.close()
        self._tmp.rename(self.path)
        write_json_atomic(self.done_path, self._info)
        return dict(self._info)


def shard_done(logits_dir: str | os.PathLike, shard: int, num_shards: int) -> dict[str, int] | None:
    """The done marker of a complete shard, or None."""
    directory = epath.Path(logits_dir)
    marker = directory / done_name(shard, num_shards)
    if not (marker.is_file() and (directory / shard_name(shard, num_shards)).is_file()):
        return None
    return json.loads(marker.read_text())


class TeacherLogitsReader:
    """Random access to the records of a complete dump: ``reader[i]`` is document ``i``'s record
    (bytes); ``reader.format.unpack(reader[i], input_ids)`` decodes it.

    Raises (at construction):
      TeacherLogitsError: bad metadata, a shard without its done marker, record counts that
        disagree with the metadata.
    """

    def __init__(self, logits_dir: str | os.PathLike):
        self.directory = epath.Path(logits_dir)
        self.metadata = read_metadata(logits_dir)
        self.format = format_of(self.metadata)
        num_shards = int(self.metadata["num_shards"])
        per_shard = int(self.metadata["documents_per_shard"])
        documents = int(self.metadata["corpus"]["num_documents"])
        self.markers = []
        for shard in range(num_shards):
            marker = shard_done(logits_dir, shard, num_shards)
            if marker is None:
                raise TeacherLogitsError(
                    f"{self.directory / shard_name(shard, num_shards)}: shard incomplete (no done "
                    "marker); finish the dump by rerunning launch.dump_logits with the same flags")
            expected = min(per_shard, documents - shard * per_shard)
            reader = ArrayRecordReader(str(self.directory / shard_name(shard, num_shards)))
            found = reader.num_records()
            reader.close()
            if found != expected or marker["documents"] != expected:
                raise TeacherLogitsError(
                    f"{self.directory / shard_name(shard, num_shards)}: {found} records, expected "
                    f"{expected}")
            self.markers.append(marker)
        self._source = ArrayRecordDataSource(
            [str(self.directory / shard_name(s, num_shards)) for s in range(num_shards)])

    def __len__(self) -> int:
        return int(self.metadata["corpus"]["num_documents"])

    def __getitem__(self, index: int) -> bytes:
        return self._source[int(index)]

    def totals(self) -> dict[str, int]:
        """Documents, tokens, positions, kept ids and record bytes over all shards."""
        keys = ("documents", "tokens", "positions", "kept", "bytes")
        return {key: sum(int(m[key]) for m in self.markers) for key in keys}

    def check_corpus(self, *, num_documents: int, data_format: str, field: str | None,
                     tokenizer: Any | None) -> None:
        """Refuses (one line) a corpus that is not the one the dump was made from.

        Raises:
          TeacherLogitsError: document count, data format, field or tokenizer differ.
        """
        corpus = self.metadata["corpus"]
        where = self.directory / METADATA_FILE
        if corpus["num_documents"] != num_documents:
            raise TeacherLogitsError(f"{where}: dumped for {corpus['num_documents']} documents, "
                                     f"the corpus has {num_documents}")
        if corpus["data_format"] != data_format or corpus.get("field") != field:
            raise TeacherLogitsError(
                f"{where}: dumped for data_format {corpus['data_format']!r} field "
                f"{corpus.get('field')!r}, reading {data_format!r} field {field!r}")
        stored = self.metadata.get("tokenizer")
        if data_format != "tokens" and tokenizer is not None and stored != tokenizer_fingerprint(tokenizer):
            raise TeacherLogitsError(f"{where}: dumped with another tokenizer ({stored}, this one "
                                     f"{tokenizer_fingerprint(tokenizer)})")


def metadata_for(
    fmt: LogitsFormat,
    *,
    top_p: float,
    temperature: float,
    teacher: Mapping[str, Any],
    tokenizer: Mapping[str, Any] | None,
    corpus_paths: Sequence[str],
    data_format: str,
    field: str | None,
    num_documents: int,
    documents_per_shard: int,
    seq_len: int,
    context: int,
) -> dict[str, Any]:
    """The ``metadata.json`` of a dump (module docstring)."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "vocab_size": fmt.vocab_size, "top_k": fmt.top_k, "top_p": float(top_p),
        "temperature": float(temperature), "prob_bits": fmt.prob_bits, "teacher": dict(teacher),
        "tokenizer": None if tokenizer is None else dict(tokenizer),
        "corpus": {"paths": [str(p) for p in corpus_paths], "data_format": data_format,
                   "field": field, "num_documents": int(num_documents)},
        "documents_per_shard": int(documents_per_shard),
        "num_shards": max(1, math.ceil(num_documents / documents_per_shard)),
        "seq_len": int(seq_len), "context": int(context),
    }
