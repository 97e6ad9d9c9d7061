"""TFDS datasets as record sources, read without TensorFlow.

:class:`TfdsSource` wraps ``tfds.data_source(name, split=..., data_dir=...)``: random access to a
dataset prepared in the array_record file format (``file_format="array_record"``; TFDS writes and
reads that format without TensorFlow, so only ``tensorflow-datasets`` is needed: the ``tfds``
extra). Records come back as dicts of python and numpy values, shaped like JSONL records:

* ``Text`` features are ``str`` (TFDS returns UTF-8 bytes);
* a ``Sequence`` of a ``FeaturesDict`` (TFDS returns a dict of lists) is a list of dicts, e.g. chat
  ``messages`` stored as ``Sequence({"role": Text(), "content": Text()})`` read as
  ``[{"role": ..., "content": ...}, ...]``;
* other features stay as TFDS decodes them (numpy arrays and scalars, lists of them).

``location(i)`` names the array_record shard file and the record within it, like
:class:`~glmjax.data.sources.TokenRecordSource`.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

from glmjax.data.sources import DataFormatError, EmptyDatasetError


def _tfds() -> ModuleType:
    """``tensorflow_datasets``, imported on first use (an optional extra)."""
    try:
        import tensorflow_datasets
    except ImportError as err:
        raise ImportError(
            "TFDS data needs tensorflow-datasets: pip install 'glmjax[tfds]'") from err
    return tensorflow_datasets


def _item(columns: Any, index: int) -> Any:
    """Element ``index`` of a TFDS column structure (dicts of lists, possibly nested)."""
    if isinstance(columns, dict):
        return {key: _item(value, index) for key, value in columns.items()}
    return columns[index]


def _num_items(columns: Any) -> int:
    while isinstance(columns, dict):
        if not columns:
            return 0
        columns = next(iter(columns.values()))
    return len(columns)


def _decode(value: Any, feature: Any) -> Any:
    """A TFDS-decoded value with text as ``str`` and sequences of dicts as lists of dicts."""
    features = _tfds().features
    if isinstance(feature, features.Text):
        return value.decode("utf-8") if isinstance(value, bytes) else value
    if isinstance(feature, features.FeaturesDict):
        return {key: _decode(item, feature[key]) for key, item in value.items()}
    if isinstance(feature, features.Sequence):
        inner = feature.feature
        if isinstance(value, dict):
            return [_decode(_item(value, i), inner) for i in range(_num_items(value))]
        if isinstance(inner, (features.Text, features.FeaturesDict, features.Sequence)):
            return [_decode(item, inner) for item in value]
    return value


class TfdsSource:
    """The records of one split of a TFDS dataset (array_record file format).

    Args:
      name: the dataset name, optionally with config and version (``"my_data/cfg:1.0.0"``).
      split: a TFDS split, slices allowed (``"train"``, ``"train[:90%]"``).
      data_dir: where the prepared dataset lives (a local path or URL); default TFDS's own.
    """

    def __init__(self, name: str, *, split: str = "train",
                 data_dir: str | os.PathLike | None = None):
        tfds = _tfds()
        self._source = tfds.data_source(
            name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir))
        info = self._source.dataset_info
        self._features = info.features
        self._description = f"tfds {info.full_name} {split}"
        instructions = info.splits[split].file_instructions
        self._files = [(str(fi.filename), int(fi.skip)) for fi in instructions]
        self._ends = np.cumsum([int(fi.take) for fi in instructions], dtype=np.int64)
        if not len(self._source):
            raise EmptyDatasetError(f"no records in {self._description}")

    def __len__(self) -> int:
        return len(self._source)

    def location(self, index: int) -> str:
        """``"shard_file record k"`` (0-based within the file) of record ``index``."""
        file_id = int(np.searchsorted(self._ends, index, side="right"))
        filename, skip = self._files[file_id]
        start = int(self._ends[file_id - 1]) if file_id else 0
        return f"{filename} record {skip + index - start}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Record ``index`` (negative indices count from the end), decoded (module docstring)."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        try:
            return _decode(self._source[index], self._features)
        except UnicodeDecodeError as err:
            raise DataFormatError(
                f"{self.location(index)}: text not UTF-8 ({err.reason} at byte {err.start})"
            ) from err

    def __repr__(self) -> str:
        return f"TfdsSource({self._description}, records={len(self)})"
