"""grain pipelines that turn records into fixed-shape, packed language-model batches.

Batch contract. Every element of the dataset returned by :func:`lm_dataset` is a dict of numpy
arrays, all int32 of shape ``[rows, seq_len]`` where ``rows = global_batch_size // process_count``
(the per-host batch):

* ``inputs``: token ids fed to the model.
* ``targets``: the token each position must predict (``inputs`` shifted left by one within its
  document); 0 on padding.
* ``loss_mask``: 1 where ``targets`` counts in the loss (assistant tokens for chat, every token for
  text and pre-tokenized data), 0 elsewhere and on padding.
* ``segment_ids``: 1, 2, 3, ... for the documents packed into a row, 0 on padding. Attention must
  stay within a segment.
* ``positions``: position of the token within its document, restarting at 0 for each document;
  0 on padding.

How a record becomes rows: it is encoded to ``input_ids``/``loss_mask`` (:mod:`glmjax.data.encoders`);
a document of ``n`` tokens yields ``n - 1`` (input, target) pairs, cut into windows of at most
``seq_len`` pairs (a long document continues in the next window, with positions restarting at 0);
windows without any target in the loss are dropped. With ``packing`` the windows are packed
first-fit into rows (grain's ``FirstFitPackIterDataset``); without it each window is one row,
padded at the end.

Order and sharding: record indices are shuffled with ``seed`` (a new order each epoch), repeated
for ``num_epochs`` (None: forever), and dealt round-robin to ``num_data_shards`` shards (default: one
per process). Each shard is tokenized, packed and batched on its own into
``global_batch_size // num_data_shards`` rows; a process owns a contiguous block of shards and
concatenates their rows. The global batch (all processes' rows in process order) therefore depends
only on ``num_data_shards``, not on how many processes share the work.

Checkpointing: ``it = iter(dataset)`` is a ``grain.DatasetIterator``; ``it.get_state()`` returns a
JSON-serializable dict and ``it.set_state(state)`` on a fresh iterator of the same pipeline continues
with identical batches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import grain
import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

from glmjax.data.encoders import ChatEncoder, Example, TextEncoder, TokenEncoder
from glmjax.data.sources import DataFormatError, JsonlSource, TokenRecordSource

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_PAIR_KEYS = ("inputs", "targets", "loss_mask")
DataFormat = Literal["text", "chat", "tokens"]


class RecordSource(Protocol):
    """A grain random-access source whose ``location(i)`` names record ``i`` for error messages."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def location(self, index: int) -> str: ...


class _ReadAndEncode:
    """Record index -> encoded example; errors name the record's file and line."""

    def __init__(self, source: RecordSource, encoder: Callable[[Any], Example]):
        self._source = source
        self._encoder = encoder

    def __call__(self, index: int) -> Example:
        record = self._source[index]
        try:
            return self._encoder(record)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, DataFormatError):
                raise
            message = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise DataFormatError(f"{self._source.location(index)}: {message}") from err


class _Windows(grain.experimental.FlatMapTransform):
    """Example -> windows of at most ``seq_len`` (input, target, loss_mask) pairs."""

    # FlatMapIterDataset does not bound the fan-out; a long document may give many windows.
    max_fan_out = sys.maxsize

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, example: Example) -> list[dict[str, np.ndarray]]:
        ids, mask = example["input_ids"], example["loss_mask"]
        windows = []
        for start in range(0, len(ids) - 1, self._seq_len):
            stop = min(start + self._seq_len, len(ids) - 1)
            window_mask = mask[start + 1 : stop + 1]
            if window_mask.any():
                windows.append(
                    {
                        "inputs": ids[start:stop],
                        "targets": ids[start + 1 : stop + 1],
                        "loss_mask": window_mask,
                    }
                )
        return windows


def _from_packed(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: row[k].astype(np.int32) for k in _PAIR_KEYS}
    out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
    out["positions"] = row["inputs_positions"].astype(np.int32)
    return out


class _PadRow:
    """One window -> one row of ``seq_len``, padded at the end."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def __call__(self, window: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(window["inputs"])
        out = {}
        for key in _PAIR_KEYS:
            out[key] = np.zeros(self._seq_len, np.int32)
            out[key][:n] = window[key]
        out["segment_ids"] = (np.arange(self._seq_len) < n).astype(np.int32)
        out["positions"] = np.where(out["segment_ids"] == 1, np.arange(self._seq_len), 0).astype(
            np.int32
        )
        return out


def _concat_rows(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}


def _shard_dataset(
    indices: grain.MapDataset,
    read: _ReadAndEncode,
    *,
    seq_len: int,
    rows: int,
    packing: bool,
    read_options: grain.ReadOptions,
) -> grain.IterDataset:
    windows = grain.experimental.FlatMapIterDataset(
        indices.map(read).to_iter_dataset(read_options), _Windows(seq_len)
    )
    if packing:
        rows_ds = grain.experimental.FirstFitPackIterDataset(
            windows,
            length_struct={k: seq_len for k in _PAIR_KEYS},
            num_packing_bins=rows,
            shuffle_bins=False,
        ).map(_from_packed)
    else:
        rows_ds = windows.map(_PadRow(seq_len))
    return rows_ds.batch(rows, drop_remainder=True)


def lm_dataset(
    source: RecordSource,
    encoder: Callable[[Any], Example],
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_data_shards: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The per-host dataset of LM batches (contract in the module docstring).

    Args:
      source: random-access records (e.g. :class:`~glmjax.data.sources.JsonlSource`).
      encoder: record -> ``{"input_ids", "loss_mask"}`` (:mod:`glmjax.data.encoders`).
      seq_len: tokens per row.
      global_batch_size: rows per step over all processes.
      seed: shuffling seed.
      shuffle: shuffle record order (per epoch); False keeps file order.
      num_epochs: passes over the records; None repeats forever.
      packing: pack several documents per row; otherwise one window per row.
      process_index, process_count: this host and the number of hosts; default
        ``jax.process_index()`` and ``jax.process_count()``.
      num_data_shards: independent data streams making up the global batch; must be a multiple of
        ``process_count`` and divide ``global_batch_size``. Default ``process_count``. Fix it to get
        the same global batches on any number of processes.
      read_options: grain read threads and prefetch for reading and encoding records.

    Returns:
      A ``grain.IterDataset`` of per-host batches; a finite one (``num_epochs`` set) drops a final
      partial batch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_data_shards = process_count if num_data_shards is None else num_data_shards
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if num_data_shards % process_count or global_batch_size % num_data_shards:
        raise ValueError(
            f"num_data_shards ({num_data_shards}) must be a multiple of process_count "
            f"({process_count}) and divide global_batch_size ({global_batch_size})"
        )
    if seq_len < 1 or (num_epochs is not None and num_epochs < 1):
        raise ValueError(
            f"need seq_len >= 1 and num_epochs >= 1 or None, got {seq_len}, {num_epochs}"
        )
    indices = grain.MapDataset.range(len(source))
    if shuffle:
        indices = indices.shuffle(seed)
    indices = indices.repeat(num_epochs)
    read = _ReadAndEncode(source, encoder)
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
    shards_per_process = num_data_shards // process_count
    first = process_index * shards_per_process
    shards = [
        _shard_dataset(
            indices[shard::num_data_shards],
            read,
            seq_len=seq_len,
            rows=global_batch_size // num_data_shards,
            packing=packing,
            read_options=read_options,
        )
        for shard in range(first, first + shards_per_process)
    ]
    if len(shards) == 1:
        return shards[0]
    return grain.experimental.ZipIterDataset(shards, strict=False).map(_concat_rows)


def make_lm_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    data_format: DataFormat,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    field: str | None = None,
    **pipeline_kwargs: Any,
) -> grain.IterDataset:
    """Opens data files and builds :func:`lm_dataset` over them.

    Args:
      paths: JSONL files (``"text"``, ``"chat"``) or array_record files (``"tokens"``).
      data_format: ``"text"`` (records ``{"text": str}``), ``"chat"`` (``{"messages": [...]}``,
        optional ``"tools"``) or ``"tokens"`` (records of :func:`~glmjax.data.sources.write_token_records`).
      tokenizer: needed for ``"text"`` and ``"chat"``.
      field: the record key holding the text or messages (default ``"text"`` / ``"messages"``).
      **pipeline_kwargs: passed to :func:`lm_dataset` (``seq_len``, ``global_batch_size``, ...).
    """
    if data_format == "tokens":
        return lm_dataset(TokenRecordSource(paths), TokenEncoder(), **pipeline_kwargs)
    if data_format not in ("text", "chat"):
        raise ValueError(f"data_format must be 'text', 'chat' or 'tokens', got {data_format!r}")
    if tokenizer is None:
        raise ValueError(f"data_format {data_format!r} needs a tokenizer")
    encoder_cls = TextEncoder if data_format == "text" else ChatEncoder
    encoder = encoder_cls(tokenizer, field) if field else encoder_cls(tokenizer)
    source = JsonlSource(paths, required_fields=encoder.required_fields)
    return lm_dataset(source, encoder, **pipeline_kwargs)
