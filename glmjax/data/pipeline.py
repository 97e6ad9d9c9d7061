"""grain pipelines that turn records into fixed-shape, packed language-model batches.

Batch contract. Every element of the dataset returned by :func:`lm_dataset` is a dict of numpy
arrays with ``rows = global_batch_size // process_count`` rows (the per-host batch). The LM keys
(``BATCH_KEYS``) are int32 ``[rows, seq_len]``:

* ``inputs``: token ids fed to the model.
* ``targets``: the token each position must predict (``inputs`` shifted left by one within its
  document); 0 on padding.
* ``loss_mask``: 1 where ``targets`` counts in the loss (assistant tokens for chat, every token for
  text and pre-tokenized data), 0 elsewhere and on padding.
* ``segment_ids``: 1, 2, 3, ... for the documents packed into a row, 0 on padding. Attention must
  stay within a segment.
* ``positions``: position of the token within its document, restarting at 0 for each document;
  0 on padding.

Extra features, declared by the encoder's ``token_features`` / ``example_features``
(:class:`~glmjax.data.encoders.FeatureEncoder`, :class:`~glmjax.data.encoders.RecordField`):

* a per-token feature of shape ``S`` per token is ``[rows, seq_len, *S]``, aligned with
  ``targets``: ``feature[r, t]`` belongs to the prediction of ``targets[r, t]`` (made at
  ``inputs[r, t]``); 0 on padding.
* a per-example feature of shape ``S`` is ``[rows, *S]`` without packing (the value of the row's
  document), and ``[rows, max_segments_per_row, *S]`` with packing: entry ``j`` is the value of
  segment ``j + 1`` of the row, 0 in unused slots. Packing never puts more than
  ``max_segments_per_row`` documents into a row (it opens the next row instead).

Every window of a document carries the document's per-example values.

The dataset says what it yields: ``glmjax.data.spec.batch_spec_of(dataset)`` is a ``BatchSpec``
with the LM keys (``spec.LM_FEATURES``) and the extra features: per token
``(act_batch, act_seq, None...)``, per example ``(act_batch, None...)`` unpacked and
``(act_batch, None, None...)`` packed (one ``None`` per dimension of ``S``).

How a record becomes rows: it is encoded (:mod:`glmjax.data.encoders`); a document of ``n`` tokens
yields ``n - 1`` (input, target) pairs. A document of at most ``seq_len`` pairs is one window;
a longer one is handled by ``overlong``:

* ``"window"``: cut into windows of at most ``seq_len`` pairs (a long document continues in the
  next window, positions restarting at 0);
* ``"truncate"``: only its first window;
* ``"drop"``: skipped entirely, and counted (below).

:func:`make_lm_dataset` defaults to ``"drop"`` for chat (a window that starts mid-answer, without
its prompt, teaches the wrong thing) and ``"window"`` for text and tokens. Windows without any
target in the loss are left out (not counted). With ``packing`` the windows are packed first-fit
into rows (grain's ``FirstFitPackIterDataset``); without it each window is one row, padded at the
end.

Dropped examples. ``it = iter(dataset)`` has ``it.dropped_examples`` (read it with
:func:`dropped_examples`, which gives 0 for iterators without the attribute): the number of
examples this process skipped under ``overlong="drop"``, from the start of the run. The count
travels with the data: each window carries the number of examples dropped just before it in its
data shard, and the iterator adds up the counts of the batches it has returned. It therefore
counts exactly the drops in front of the windows of the returned batches, whatever was read ahead
by prefetching, and it is part of ``it.get_state()``, so a restored iterator continues the count
(drops after the last window of a finite dataset, or in front of the windows of its dropped
partial last batch, are never counted). Each process counts its own data shards; the run's count
is the sum over processes (the same on any ``process_count`` for a fixed ``num_data_shards``).
If ``len(source)`` examples in a row are dropped in one shard, the pipeline raises ``ValueError``
(a ``seq_len`` too small for the data would otherwise loop forever).

Order and sharding: record indices are shuffled with ``seed`` (a new order each epoch), repeated
for ``num_epochs`` (None: forever), and dealt round-robin to ``num_data_shards`` shards (default: one
per process). Each shard is tokenized, packed and batched on its own into
``global_batch_size // num_data_shards`` rows; a process owns a contiguous block of shards and
concatenates their rows. The global batch (all processes' rows in process order) therefore depends
only on ``num_data_shards``, not on how many processes share the work.

Checkpointing: ``it = iter(dataset)`` is a ``grain.DatasetIterator``; ``it.get_state()`` returns a
JSON-serializable dict and ``it.set_state(state)`` on a fresh iterator of the same pipeline continues
with identical batches and drop count.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import grain
import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

from glmjax.data.encoders import (
    ChatEncoder,
    Example,
    FeatureEncoder,
    RecordField,
    TextEncoder,
    TokenEncoder,
)
from glmjax.data.sources import DataFormatError, JsonlSource, PathsLike, TokenRecordSource
from glmjax.data.spec import FeatureSpec, SpecifiedIterDataset, lm_batch_spec, with_batch_spec
from glmjax.data.tfds_source import TfdsSource

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_PAIR_KEYS = ("inputs", "targets", "loss_mask")
DROPPED_KEY = "_dropped_examples"  # per window / row / batch until the outermost iterator
_RESERVED = frozenset({*BATCH_KEYS, "input_ids", DROPPED_KEY})
DataFormat = Literal["text", "chat", "tokens"]
Overlong = Literal["drop", "truncate", "window"]
OVERLONG_POLICIES = ("drop", "truncate", "window")
DEFAULT_OVERLONG: dict[str, Overlong] = {"text": "window", "chat": "drop", "tokens": "window"}
""":func:`make_lm_dataset`'s ``overlong`` per data format."""


class RecordSource(Protocol):
    """A grain random-access source whose ``location(i)`` names record ``i`` for error messages."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def location(self, index: int) -> str: ...


class ReadAndEncode:
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


@dataclasses.dataclass(frozen=True)
class _Extras:
    """The features an encoder declares besides ``input_ids`` / ``loss_mask``."""

    token: Mapping[str, RecordField]
    example: Mapping[str, RecordField]

    @classmethod
    def of(cls, encoder: Any) -> "_Extras":
        token = dict(getattr(encoder, "token_features", {}))
        example = dict(getattr(encoder, "example_features", {}))
        clashes = sorted(((set(token) | set(example)) & _RESERVED) | (set(token) & set(example)))
        if clashes:
            raise ValueError(
                f"feature names {clashes} clash with the LM keys or are declared both per token "
                "and per example")
        return cls(token, example)

    def specs(self, packing: bool) -> dict[str, FeatureSpec]:
        """Batch specs of the extra keys (module docstring)."""
        segments = (None,) if packing else ()
        specs = {name: FeatureSpec(f.dtype, ("act_batch", "act_seq", *[None] * len(f.shape)))
                 for name, f in self.token.items()}
        specs.update({name: FeatureSpec(f.dtype, ("act_batch", *segments, *[None] * len(f.shape)))
                      for name, f in self.example.items()})
        return specs


class _Windows(grain.experimental.FlatMapTransform):
    """Example -> windows of at most ``seq_len`` (input, target) pairs, or one drop marker
    (``{DROPPED_KEY: 1}``) for an over-long example under ``overlong="drop"``."""

    # FlatMapIterDataset does not bound the fan-out; a long document may give many windows.
    max_fan_out = sys.maxsize

    def __init__(self, seq_len: int, overlong: Overlong, extras: _Extras):
        self._seq_len = seq_len
        self._overlong = overlong
        self._extras = extras

    def flat_map(self, example: Example) -> list[dict[str, Any]]:
        pairs = len(example["input_ids"]) - 1
        if pairs > self._seq_len and self._overlong == "drop":
            return [{DROPPED_KEY: 1}]
        starts = range(0, pairs, self._seq_len)
        if self._overlong == "truncate":
            starts = starts[:1]
        windows = (self._window(example, start) for start in starts)
        return [window for window in windows if window["loss_mask"].any()]

    def _window(self, example: Example, start: int) -> dict[str, Any]:
        ids = example["input_ids"]
        stop = min(start + self._seq_len, len(ids) - 1)
        window = {
            "inputs": ids[start:stop],
            "targets": ids[start + 1 : stop + 1],
            "loss_mask": example["loss_mask"][start + 1 : stop + 1],
            DROPPED_KEY: 0,
        }
        window.update({key: example[key][start:stop] for key in self._extras.token})
        window.update({key: example[key] for key in self._extras.example})
        return window


class _FoldDropsIterator(grain.DatasetIterator):
    """Windows, each counting the drop markers just before it (the markers themselves vanish).

    A ``next`` call consumes the markers together with the window it returns, so the parent's
    state is this iterator's state."""

    def __init__(self, parent: grain.DatasetIterator, max_streak: int, seq_len: int):
        super().__init__(parent)
        self._max_streak = max_streak
        self._seq_len = seq_len

    def __next__(self) -> dict[str, Any]:
        dropped = 0
        element = next(self._parent)
        while "inputs" not in element:
            dropped += element[DROPPED_KEY]
            if dropped >= self._max_streak:
                raise ValueError(
                    f"{dropped} examples in a row are longer than seq_len={self._seq_len} and were "
                    "dropped; raise seq_len or use overlong='truncate' or 'window'")
            element = next(self._parent)
        return {**element, DROPPED_KEY: dropped}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class FoldDrops(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_streak: int, seq_len: int):
        super().__init__(parent)
        self._max_streak = max_streak
        self._seq_len = seq_len

    def __iter__(self) -> _FoldDropsIterator:
        return _FoldDropsIterator(self._parent.__iter__(), self._max_streak, self._seq_len)


def _pad(array: np.ndarray, length: int, dtype: str | type) -> np.ndarray:
    """``array`` [n, ...] zero-padded at the end to [length, ...] of ``dtype``."""
    out = np.zeros((length, *array.shape[1:]), dtype)
    out[: len(array)] = array
    return out


class _PadRow:
    """One window -> one row of ``seq_len``, padded at the end."""

    def __init__(self, seq_len: int, extras: _Extras):
        self._seq_len = seq_len
        self._extras = extras

    def __call__(self, window: Mapping[str, Any]) -> dict[str, Any]:
        n, length = len(window["inputs"]), self._seq_len
        out = {key: _pad(window[key], length, np.int32) for key in _PAIR_KEYS}
        out["segment_ids"] = (np.arange(length) < n).astype(np.int32)
        out["positions"] = np.where(out["segment_ids"] == 1, np.arange(length), 0).astype(np.int32)
        out.update({key: _pad(window[key], length, feature.dtype)
                    for key, feature in self._extras.token.items()})
        out.update({key: window[key] for key in self._extras.example})
        out[DROPPED_KEY] = window[DROPPED_KEY]
        return out


def _per_segment(values: Sequence[np.ndarray], feature: RecordField, width: int) -> np.ndarray:
    """The values of a row's segments, in segment order, as [width, *shape] (0: unused slot)."""
    out = np.zeros((width, *feature.shape), feature.dtype)
    for slot, value in enumerate(values):
        out[slot] = value
    return out


class _FromPacked:
    """A row of grain's packer -> a batch row (per-example values per segment)."""

    def __init__(self, extras: _Extras, max_segments: int | None):
        self._extras = extras
        self._max_segments = max_segments

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = {key: row[key].astype(np.int32) for key in _PAIR_KEYS}
        out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
        out["positions"] = row["inputs_positions"].astype(np.int32)
        out.update({key: row[key].astype(f.dtype) for key, f in self._extras.token.items()})
        out.update({key: _per_segment(row[key], f, self._max_segments)
                    for key, f in self._extras.example.items()})
        out[DROPPED_KEY] = sum(row[DROPPED_KEY])
        return out


def concat_rows(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


class _CountDropsIterator(grain.DatasetIterator):
    """Batches without the internal drop counts; ``dropped_examples`` adds them up (module
    docstring) and is saved in the iterator state."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.dropped_examples = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self.dropped_examples += int(np.sum(batch.pop(DROPPED_KEY)))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "dropped_examples": self.dropped_examples}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.dropped_examples = int(state["dropped_examples"])


class CountDrops(grain.IterDataset):
    def __iter__(self) -> _CountDropsIterator:
        return _CountDropsIterator(self._parent.__iter__())


def dropped_examples(iterator: Any) -> int:
    """Examples this process dropped as over-long since the run started (module docstring); 0 for
    an iterator that does not count them. Sum it over processes for the run's count."""
    return int(getattr(iterator, "dropped_examples", 0))


@dataclasses.dataclass(frozen=True)
class _RowPlan:
    """How one data shard turns windows into rows."""

    seq_len: int
    rows: int
    packing: bool
    overlong: Overlong
    extras: _Extras
    max_segments: int | None
    max_streak: int


def _shard_dataset(
    indices: grain.MapDataset,
    read: ReadAndEncode,
    plan: _RowPlan,
    read_options: grain.ReadOptions,
) -> grain.IterDataset:
    examples = indices.map(read).to_iter_dataset(read_options)
    windows = grain.experimental.FlatMapIterDataset(
        examples, _Windows(plan.seq_len, plan.overlong, plan.extras))
    windows = FoldDrops(windows, plan.max_streak, plan.seq_len)
    if plan.packing:
        rows_ds = grain.experimental.FirstFitPackIterDataset(
            windows,
            length_struct={key: plan.seq_len for key in (*_PAIR_KEYS, *plan.extras.token)},
            num_packing_bins=plan.rows,
            shuffle_bins=False,
            meta_features=(*plan.extras.example, DROPPED_KEY),
            max_sequences_per_bin=plan.max_segments,
        ).map(_FromPacked(plan.extras, plan.max_segments))
    else:
        rows_ds = windows.map(_PadRow(plan.seq_len, plan.extras))
    return rows_ds.batch(plan.rows, drop_remainder=True)


def check_pipeline_arguments(
    *,
    seq_len: int,
    global_batch_size: int,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
    num_data_shards: int,
    overlong: str,
    group_size: int,
) -> None:
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
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    rows_per_shard = global_batch_size // num_data_shards
    if group_size < 1 or rows_per_shard % group_size:
        raise ValueError(
            f"rows per data shard ({rows_per_shard} = global_batch_size // num_data_shards) must "
            f"be a multiple of group_size ({group_size})")


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
    overlong: Overlong = "window",
    max_segments_per_row: int | None = None,
    group_size: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    num_data_shards: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> SpecifiedIterDataset:
    """The per-host dataset of LM batches (contract in the module docstring).

    Args:
      source: random-access records (e.g. :class:`~glmjax.data.sources.JsonlSource`).
      encoder: record -> ``{"input_ids", "loss_mask"}`` (:mod:`glmjax.data.encoders`), plus the
        keys it declares in ``token_features`` / ``example_features`` (e.g. a
        :class:`~glmjax.data.encoders.FeatureEncoder`).
      seq_len: tokens per row.
      global_batch_size: rows per step over all processes.
      seed: shuffling seed.
      shuffle: shuffle record order (per epoch); False keeps file order.
      num_epochs: passes over the records; None repeats forever.
      packing: pack several documents per row; otherwise one window per row.
      overlong: what to do with a document of more than ``seq_len`` (input, target) pairs:
        ``"window"``, ``"truncate"`` or ``"drop"`` (module docstring).
      max_segments_per_row: with packing, at most this many documents per row, and the width of
        the per-example features' segment axis; required with packing and per-example features.
        None: no limit. Unused without packing.
      group_size: consecutive rows the trainer must keep together (``BatchSpec.group_size``);
        rows per data shard must be a multiple of it.
      process_index, process_count: this host and the number of hosts; default
        ``jax.process_index()`` and ``jax.process_count()``.
      num_data_shards: independent data streams making up the global batch; must be a multiple of
        ``process_count`` and divide ``global_batch_size``. Default ``process_count``. Fix it to get
        the same global batches on any number of processes.
      read_options: grain read threads and prefetch for reading and encoding records.

    Returns:
      A ``grain.IterDataset`` of per-host batches carrying its ``BatchSpec``; its iterator counts
      dropped examples (:func:`dropped_examples`). A finite one (``num_epochs`` set) drops a final
      partial batch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_data_shards = process_count if num_data_shards is None else num_data_shards
    check_pipeline_arguments(
        seq_len=seq_len, global_batch_size=global_batch_size, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
        num_data_shards=num_data_shards, overlong=overlong, group_size=group_size)
    extras = _Extras.of(encoder)
    if packing and extras.example and max_segments_per_row is None:
        raise ValueError(
            f"packing with per-example features {sorted(extras.example)} needs "
            "max_segments_per_row (the width of their per-segment arrays)")
    indices = grain.MapDataset.range(len(source))
    if shuffle:
        indices = indices.shuffle(seed)
    indices = indices.repeat(num_epochs)
    read = ReadAndEncode(source, encoder)
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
    plan = _RowPlan(
        seq_len=seq_len, rows=global_batch_size // num_data_shards, packing=packing,
        overlong=overlong, extras=extras, max_segments=max_segments_per_row if packing else None,
        max_streak=len(source))
    shards_per_process = num_data_shards // process_count
    first = process_index * shards_per_process
    shards = [
        _shard_dataset(indices[shard::num_data_shards], read, plan, read_options)
        for shard in range(first, first + shards_per_process)
    ]
    batches = shards[0] if len(shards) == 1 else grain.experimental.ZipIterDataset(
        shards, strict=False).map(concat_rows)
    return with_batch_spec(CountDrops(batches), lm_batch_spec(extras.specs(packing), group_size))


def _encoder(
    data_format: str, tokenizer: PreTrainedTokenizerBase | None, field: str | None
) -> Callable[[Any], Example]:
    if data_format == "tokens":
        return TokenEncoder(field) if field else TokenEncoder()
    if data_format not in ("text", "chat"):
        raise ValueError(f"data_format must be 'text', 'chat' or 'tokens', got {data_format!r}")
    if tokenizer is None:
        raise ValueError(f"data_format {data_format!r} needs a tokenizer")
    encoder_cls = TextEncoder if data_format == "text" else ChatEncoder
    return encoder_cls(tokenizer, field) if field else encoder_cls(tokenizer)


def _source(
    paths: PathsLike | None,
    data_format: str,
    required_fields: Sequence[str],
    *,
    tfds_name: str | None,
    tfds_split: str,
    tfds_data_dir: str | os.PathLike | None,
) -> RecordSource:
    if (paths is None) == (tfds_name is None):
        raise ValueError("give either data paths or tfds_name (not both)")
    if tfds_name is not None:
        return TfdsSource(tfds_name, split=tfds_split, data_dir=tfds_data_dir)
    if data_format == "tokens":
        return TokenRecordSource(paths)
    return JsonlSource(paths, required_fields=required_fields)


def make_lm_dataset(
    paths: PathsLike | None,
    data_format: DataFormat,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    field: str | None = None,
    token_features: Mapping[str, RecordField] | None = None,
    example_features: Mapping[str, RecordField] | None = None,
    overlong: Overlong | None = None,
    tfds_name: str | None = None,
    tfds_split: str = "train",
    tfds_data_dir: str | os.PathLike | None = None,
    **pipeline_kwargs: Any,
) -> SpecifiedIterDataset:
    """Opens data files (or a TFDS dataset) and builds :func:`lm_dataset` over them.

    Args:
      paths: JSONL files (``"text"``, ``"chat"``) or array_record files (``"tokens"``), local or
        URLs (``gs://...``); None with ``tfds_name``.
      data_format: ``"text"`` (records ``{"text": str}``), ``"chat"`` (``{"messages": [...]}``,
        optional ``"tools"``) or ``"tokens"`` (``{"input_ids": int [n]}``, e.g. records of
        :func:`~glmjax.data.sources.write_token_records`).
      tokenizer: needed for ``"text"`` and ``"chat"``.
      field: the record key holding the text, messages or token ids (default ``"text"`` /
        ``"messages"`` / ``"input_ids"``).
      token_features, example_features: record fields carried into the batches
        (:class:`~glmjax.data.encoders.FeatureEncoder`).
      overlong: ``"window"``, ``"truncate"`` or ``"drop"``; default
        ``DEFAULT_OVERLONG[data_format]`` (chat: drop; text, tokens: window).
      tfds_name, tfds_split, tfds_data_dir: read the records from a TFDS dataset instead
        (:class:`~glmjax.data.tfds_source.TfdsSource`).
      **pipeline_kwargs: passed to :func:`lm_dataset` (``seq_len``, ``global_batch_size``, ...).
    """
    encoder = _encoder(data_format, tokenizer, field)
    if token_features or example_features:
        encoder = FeatureEncoder(encoder, token_features, example_features)
    source = _source(paths, data_format, encoder.required_fields, tfds_name=tfds_name,
                     tfds_split=tfds_split, tfds_data_dir=tfds_data_dir)
    overlong = DEFAULT_OVERLONG[data_format] if overlong is None else overlong
    return lm_dataset(source, encoder, overlong=overlong, **pipeline_kwargs)


def record_encoder(
    data_format: DataFormat, tokenizer: PreTrainedTokenizerBase | None = None, field: str | None = None
) -> Callable[[Any], Example]:
    """The encoder :func:`make_lm_dataset` uses for ``data_format`` (records -> examples), for
    tools that must tokenize a corpus exactly as the trainer does (``launch.dump_logits``)."""
    return _encoder(data_format, tokenizer, field)


def record_source(
    paths: PathsLike, data_format: DataFormat, required_fields: Sequence[str] = ()
) -> RecordSource:
    """The record source :func:`make_lm_dataset` opens for data files of ``data_format``."""
    return _source(paths, data_format, required_fields, tfds_name=None, tfds_split="train",
                   tfds_data_dir=None)
