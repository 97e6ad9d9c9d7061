"""Random-access record sources for grain: JSONL files and array_record files of token ids.

Both implement grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``) and can be
pickled (open file handles are dropped and reopened lazily), so they work in grain worker processes.

* :class:`JsonlSource`: one JSON object per line, blank lines skipped. An index of line offsets
  is built once when the source is created; records are parsed only when read. A malformed line
  raises :class:`DataFormatError` naming the file and the 1-based line number, as does a record that
  lacks a required field (the field is named too).
* :class:`TokenRecordSource`: array_record files whose records are little-endian int32 token id
  arrays (``np.asarray(ids, "<i4").tobytes()``), written by :func:`write_token_records`. A record
  reads as ``{"input_ids": int32 [n]}``.

Both raise :class:`EmptyDatasetError` when the files hold no records at all.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from grain.sources import ArrayRecordDataSource

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]


class DataFormatError(ValueError):
    """A record that cannot be used; the message names the file and line (or record index)."""


class EmptyDatasetError(ValueError):
    """A data source with no records."""


def _as_paths(paths: PathsLike) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result = [Path(p) for p in paths]
    if not result:
        raise EmptyDatasetError("no data files given")
    for path in result:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file not found")
    return result


def _index_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
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


def write_token_records(
    path: str | os.PathLike, sequences: Iterable[Sequence[int] | np.ndarray]
) -> int:
    """Writes token id sequences to an array_record file, one int32 record each.

    Args:
      path: the file to create (overwritten if it exists).
      sequences: 1-D sequences of token ids; each must fit in int32.

    Returns:
      The number of records written.
    """
    writer = ArrayRecordWriter(str(path), "group_size:1")
    count = 0
    try:
        for number, sequence in enumerate(sequences):
            array = np.asarray(sequence)
            if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
                raise ValueError(
                    f"sequence {number}: expected a 1-D integer array, got {array.dtype} {array.shape}"
                )
            int32 = np.iinfo(np.int32)
            if array.size and (array.min() < int32.min or array.max() > int32.max):
                raise ValueError(f"sequence {number}: token ids do not fit in int32")
            writer.write(array.astype("<i4").tobytes())
            count += 1
    finally:
        writer.close()
    return count


class TokenRecordSource:
    """Pre-tokenized records of array_record files written by :func:`write_token_records`.

    ``source[i]`` is ``{"input_ids": np.ndarray int32 [n]}``; records of all files are numbered in
    file order.
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
        if len(data) % 4:
            raise DataFormatError(
                f"{self.location(index)}: {len(data)} bytes is not a whole number of int32 tokens"
            )
        return {"input_ids": np.frombuffer(data, dtype="<i4").astype(np.int32)}

    def __repr__(self) -> str:
        return f"TokenRecordSource({[str(p) for p in self._paths]}, records={len(self)})"
