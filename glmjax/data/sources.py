"""Random-access record sources for grain: JSONL files and array_record files of token ids.

(TFDS datasets: :mod:`glmjax.data.tfds_source`.)

Both implement grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``) and can be
pickled (open file handles are dropped and reopened lazily), so they work in grain worker processes.

* :class:`JsonlSource`: one JSON object per line, blank lines skipped. An index of line offsets
  is built once when the source is created; records are parsed only when read. A malformed line
  raises :class:`DataFormatError` naming the file and the 1-based line number, as does a record that
  lacks a required field (the field is named too).
* :class:`TokenRecordSource`: array_record files written by :func:`write_token_records`. A record
  is either

  - plain token ids: little-endian int32 (``np.asarray(ids, "<i4").tobytes()``), read as
    ``{"input_ids": int32 [n]}``; or
  - named arrays: the 4 bytes ``b"GLMA"`` followed by
    ``flax.serialization.msgpack_serialize({name: np.ndarray})`` (a msgpack map; each array is its
    shape, dtype name and raw bytes, ~20 bytes of overhead per array), read as that dict of numpy
    arrays; it always has ``"input_ids"`` (int32 ``[n]``), e.g. next to ``"teacher_ids"`` int32
    ``[n, K]`` and ``"teacher_probs"`` float32 ``[n, K]``.

  The prefix read as an int32 token id is 1095584839, which no vocabulary has; the writer refuses
  plain id records starting with it, so the two kinds never mix up and may share a file.

Both raise :class:`EmptyDatasetError` when the files hold no records at all.

Paths are ``etils.epath`` paths: local files or URLs such as ``gs://bucket/data.jsonl`` (the URL
is kept as is, never turned into a local path); messages name them as given.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath
from flax import serialization
from grain.sources import ArrayRecordDataSource

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]
TokenRecord = Sequence[int] | np.ndarray | Mapping[str, Any]
NAMED_RECORD_MAGIC = b"GLMA"
"""First bytes of a named-arrays record of :func:`write_token_records`."""
_MAGIC_ID = int(np.frombuffer(NAMED_RECORD_MAGIC, "<i4")[0])


class DataFormatError(ValueError):
    """A record that cannot be used; the message names the file and line (or record index)."""


class EmptyDatasetError(ValueError):
    """A data source with no records."""


def _as_paths(paths: PathsLike) -> list[epath.Path]:
    """``paths`` as existing ``epath`` files (URLs stay URLs)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result = [epath.Path(p) for p in paths]
    if not result:
        raise EmptyDatasetError("no data files given")
    for path in result:
        if not path.exists() or path.is_dir():
            raise FileNotFoundError(f"{path}: data file not found")
    return result


def _index_lines(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers (int64 ``[num_records]``) of the non-blank lines."""
    offsets, line_numbers = [], []
    offset = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(offset)
                line_numbers.append(number)
            offset += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(line_numbers, dtype=np.int64)


class JsonlSource:
    """Records of one or more JSONL files, in file order, read lazily by index.

    Args:
      paths: a file or a list of files.
      required_fields: top-level keys every record must have; checked when a record is read.
    """

    def __init__(self, paths: PathsLike, required_fields: Sequence[str] = ()):
        self._paths = _as_paths(paths)
        self._required_fields = tuple(required_fields)
        offsets, line_numbers, file_ids = [], [], []
        for file_id, path in enumerate(self._paths):
            file_offsets, file_lines = _index_lines(path)
            offsets.append(file_offsets)
            line_numbers.append(file_lines)
            file_ids.append(np.full(len(file_offsets), file_id, dtype=np.int32))
        self._offsets = np.concatenate(offsets)
        self._line_numbers = np.concatenate(line_numbers)
        self._file_ids = np.concatenate(file_ids)
        if not len(self._offsets):
            raise EmptyDatasetError(f"no records in {', '.join(map(str, self._paths))}")
        self._files: dict[int, BinaryIO] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, index: int) -> str:
        """``"path:line"`` of record ``index`` (1-based line), for messages."""
        return f"{self._paths[self._file_ids[index]]}:{self._line_numbers[index]}"

    def _read_line(self, index: int) -> bytes:
        file_id = int(self._file_ids[index])
        with self._lock:
            f = self._files.get(file_id)
            if f is None:
                f = self._files[file_id] = self._paths[file_id].open("rb")
            f.seek(int(self._offsets[index]))
            return f.readline()

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Record ``index`` (negative indices count from the end) as a parsed JSON object."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        line = self._read_line(index).rstrip(b"\r\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{self.location(index)}: malformed JSON ({err.msg} at column {err.colno})"
            ) from err
        except UnicodeDecodeError as err:
            raise DataFormatError(
                f"{self.location(index)}: not UTF-8 ({err.reason} at byte {err.start})"
            ) from err
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{self.location(index)}: expected a JSON object, got {type(record).__name__}"
            )
        for field in self._required_fields:
            if field not in record:
                raise DataFormatError(f"{self.location(index)}: missing required field {field!r}")
        return record

    def validate(self) -> None:
        """Parses every record once, raising the first :class:`DataFormatError`."""
        for index in range(len(self)):
            self[index]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_files"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._files = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JsonlSource({[str(p) for p in self._paths]}, records={len(self)})"


def _token_ids(what: str, sequence: Any) -> np.ndarray:
    """A 1-D sequence of token ids as little-endian int32."""
    array = np.asarray(sequence)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what}: expected a 1-D integer array, got {array.dtype} {array.shape}")
    int32 = np.iinfo(np.int32)
    if array.size and (array.min() < int32.min or array.max() > int32.max):
        raise ValueError(f"{what}: token ids do not fit in int32")
    return array.astype("<i4")


def _named_record(what: str, record: Mapping[str, Any]) -> bytes:
    """The bytes of a named-arrays record (see the module docstring)."""
    if "input_ids" not in record:
        raise ValueError(f"{what}: a record of named arrays needs 'input_ids'")
    arrays = {}
    for name, value in record.items():
        array = np.asarray(value)
        if not isinstance(name, str) or array.dtype.kind not in "biuf":
            raise ValueError(
                f"{what}: {name!r} must be a str naming a numeric array, got {array.dtype}")
        arrays[name] = array
    arrays["input_ids"] = _token_ids(f"{what} 'input_ids'", record["input_ids"]).astype(np.int32)
    return NAMED_RECORD_MAGIC + serialization.msgpack_serialize(arrays)


def _record_bytes(number: int, record: TokenRecord) -> bytes:
    what = f"sequence {number}"
    if isinstance(record, Mapping):
        return _named_record(what, record)
    ids = _token_ids(what, record)
    if ids.size and ids[0] == _MAGIC_ID:
        raise ValueError(f"{what}: token id {_MAGIC_ID} would read as a named-arrays record")
    return ids.tobytes()


def write_token_records(path: str | os.PathLike, records: Iterable[TokenRecord]) -> int:
    """Writes pre-tokenized records to an array_record file (format in the module docstring).

    Args:
      path: the file to create (overwritten if it exists).
      records: each either a 1-D sequence of token ids (must fit in int32), or a mapping of
        names to numeric arrays with ``"input_ids"`` among them (stored as int32; other arrays
        keep their dtype and shape, e.g. ``"teacher_probs"`` float32 ``[n, K]``).

    Returns:
      The number of records written.
    """
    writer = ArrayRecordWriter(str(epath.Path(path)), "group_size:1")
    count = 0
    try:
        for number, record in enumerate(records):
            writer.write(_record_bytes(number, record))
            count += 1
    finally:
        writer.close()
    return count


class TokenRecordSource:
    """Pre-tokenized records of array_record files written by :func:`write_token_records`.

    ``source[i]`` is ``{"input_ids": np.ndarray int32 [n]}``, plus the other named arrays of a
    named-arrays record; records of all files are numbered in file order.
    """

    def __init__(self, paths: PathsLike):
        self._paths = _as_paths(paths)
        counts = []
        for path in self._paths:
            reader = ArrayRecordReader(str(path))
            counts.append(reader.num_records())
            reader.close()
        self._ends = np.cumsum(counts)
        if not self._ends[-1]:
            raise EmptyDatasetError(f"no records in {', '.join(map(str, self._paths))}")
        self._source = ArrayRecordDataSource([str(p) for p in self._paths])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def location(self, index: int) -> str:
        """``"path record k"`` (0-based within its file) of global record ``index``."""
        file_id = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[file_id - 1]) if file_id else 0
        return f"{self._paths[file_id]} record {index - start}"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        data = self._source[index]
        if data[: len(NAMED_RECORD_MAGIC)] == NAMED_RECORD_MAGIC:
            return self._named_arrays(index, data[len(NAMED_RECORD_MAGIC) :])
        if len(data) % 4:
            raise DataFormatError(
                f"{self.location(index)}: {len(data)} bytes is not a whole number of int32 tokens"
            )
        return {"input_ids": np.frombuffer(data, dtype="<i4").astype(np.int32)}

    def _named_arrays(self, index: int, data: bytes) -> dict[str, np.ndarray]:
        where = self.location(index)
        try:
            record = serialization.msgpack_restore(data)
        except (ValueError, TypeError) as err:
            raise DataFormatError(f"{where}: corrupt named-arrays record ({err})") from err
        if not isinstance(record, dict) or not all(
                isinstance(v, np.ndarray) for v in record.values()):
            raise DataFormatError(f"{where}: a named-arrays record must map names to arrays")
        ids = record.get("input_ids")
        if ids is None or ids.dtype != np.int32 or ids.ndim != 1:
            raise DataFormatError(f"{where}: named-arrays record without int32 [n] 'input_ids'")
        return record

    def __repr__(self) -> str:
        return f"TokenRecordSource({[str(p) for p in self._paths]}, records={len(self)})"
