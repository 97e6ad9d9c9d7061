"""Reading and writing safetensors checkpoints (single file or sharded with an index)."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read it)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from glmjax.checkpoints.hf_config import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_PATTERNS = ("model-*-of-*.safetensors", ".shard-*.tmp")

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsReader:
    """Random access to the tensors of a checkpoint directory, one tensor at a time.

    Files are memory-mapped by safetensors; ``get`` reads just the requested tensor.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from err
            self._file_of = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        elif os.path.isfile(single_path):
            self._file_of = None
            self._single = single_path
        else:
            raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._handles: dict[str, object] = {}
        if self._file_of is None:
            self._file_of = {name: single_path for name in self._open(single_path).keys()}
        for path in sorted(set(self._file_of.values())):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")

    def _open(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def file_of(self, name: str) -> str:
        if name not in self._file_of:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        return self._file_of[name]

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        sliced = self._open(self.file_of(name)).get_slice(name)
        dtype = sliced.get_dtype()
        if dtype not in _DTYPES:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has unsupported dtype {dtype}")
        return tuple(sliced.get_shape()), np.dtype(_DTYPES[dtype])

    def get(self, name: str) -> np.ndarray:
        path = self.file_of(name)
        try:
            return self._open(path).get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({err})") from err


def checkpoint_files(directory: str) -> list[str]:
    """Names of the safetensors checkpoint files in ``directory``: the single file, the index,
    the shards it lists and any ``model-*-of-*.safetensors`` or unfinished shard left over."""
    if not os.path.isdir(directory):
        return []
    entries = os.listdir(directory)
    names = {name for name in entries if name in (SINGLE_FILE, INDEX_FILE)}
    names.update(name for name in entries if any(fnmatch.fnmatch(name, p) for p in _SHARD_PATTERNS))
    try:
        with open(os.path.join(directory, INDEX_FILE)) as f:
            listed = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = set()  # no index, or one too broken to list more shards than the patterns found
    names.update(name for name in entries if name in listed)
    return sorted(names)


def write_sharded(
    tensors: Iterable[tuple[str, np.ndarray]], directory: str, max_shard_bytes: int = 5 << 30
) -> list[str]:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` files of at most
    ``max_shard_bytes`` each (a single ``model.safetensors`` when one suffices), plus the index.

    Only one shard's tensors are held in memory at a time. Returns the written file names.
    """
    os.makedirs(directory, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    shard_bytes = 0
    temp_files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        temp = os.path.join(directory, f".shard-{len(temp_files):05d}.tmp")
        save_file(shard, temp, metadata={"format": "pt"})
        temp_files.append((temp, list(shard)))
        shard, shard_bytes = {}, 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if shard and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
        shard[name] = array
        shard_bytes += array.nbytes
    flush()

    if len(temp_files) == 1:
        os.replace(temp_files[0][0], os.path.join(directory, SINGLE_FILE))
        return [SINGLE_FILE]
    total = len(temp_files)
    weight_map = {}
    names = []
    for i, (temp, tensor_names) in enumerate(temp_files):
        file = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(temp, os.path.join(directory, file))
        names.append(file)
        weight_map.update({t: file for t in tensor_names})
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return names
