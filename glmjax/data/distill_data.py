"""The trainer's batches for offline distillation: the LM keys plus stored teacher distributions.

``offline_distill_data`` is ``lm_data`` over the same corpus with the dump of
``python -m launch.dump_logits`` (``glmjax.data.teacher_logits``) joined to it record by record;
the teacher slots ride through windowing and packing as per-token features
(:class:`~glmjax.data.encoders.RecordField`), so in every batch::

    teacher_ids    int32   [rows, seq_len, top_k]   (act_batch, act_seq, None)
    teacher_probs  float32 [rows, seq_len, top_k]   (act_batch, act_seq, None)
    teacher_tail   float32 [rows, seq_len]          (act_batch, act_seq)    with_tail=True only

``teacher_*[r, t]`` is the teacher's distribution over ``targets[r, t]`` (computed at the token
``inputs[r, t]``); padding and a document's last token (no next token) have all-zero
probabilities. gin::

    train.train_data = @train/offline_distill_data
    train/offline_distill_data.paths = "corpus.jsonl"
    train/offline_distill_data.logits_dir = "/data/teacher_logits"
    train/offline_distill_data.tokenizer = @tokenizer()
    train/offline_distill_data.seq_len = 4096
    train/offline_distill_data.global_batch_size = 2048

The dump is checked against the corpus when the dataset is built (document count, data format
and field, tokenizer, and the first record's tokens) and every record against its document when
read (token count and CRC): a mismatch is a one-line ``TeacherLogitsError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np
from transformers import PreTrainedTokenizerBase

from glmjax.data.encoders import Example, RecordField
from glmjax.data.pipeline import (
    DEFAULT_OVERLONG,
    DataFormat,
    Overlong,
    RecordSource,
    lm_dataset,
    record_encoder,
    record_source,
)
from glmjax.data.spec import SpecifiedIterDataset
from glmjax.data.teacher_logits import LogitsFormat, TeacherLogitsError, TeacherLogitsReader

_RECORD_KEY = "__teacher_logits_record"


class TeacherJoinedSource:
    """Corpus record ``i`` with the bytes of teacher record ``i`` under a private key."""

    def __init__(self, source: RecordSource, reader: TeacherLogitsReader):
        if len(source) != len(reader):
            raise TeacherLogitsError(f"{reader.directory}: {len(reader)} teacher records for a "
                                     f"corpus of {len(source)} documents")
        self._source = source
        self._reader = reader

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._source[index], _RECORD_KEY: self._reader[index]}

    def location(self, index: int) -> str:
        return f"{self._source.location(index)} (teacher record {index} of {self._reader.directory})"


class TeacherEncoder:
    """The corpus encoder's example plus the decoded teacher slots, checked to belong to the
    example's tokens; declares them as per-token features (``n - 1`` entries, the pipeline
    aligns entry ``i`` with ``targets[i]``)."""

    def __init__(self, encoder: Callable[[Any], Example], fmt: LogitsFormat, with_tail: bool):
        self.encoder = encoder
        self.format = fmt
        self.with_tail = with_tail
        self.required_fields = tuple(getattr(encoder, "required_fields", ()))
        self.token_features = {
            "teacher_ids": RecordField("int32", (fmt.top_k,)),
            "teacher_probs": RecordField("float32", (fmt.top_k,)),
        }
        if with_tail:
            self.token_features["teacher_tail"] = RecordField("float32")

    def __call__(self, record: dict[str, Any]) -> Example:
        example = dict(self.encoder(record))
        ids, probs, tail = self.format.unpack(record[_RECORD_KEY], example["input_ids"])
        decoded = {"teacher_ids": ids, "teacher_probs": probs, "teacher_tail": tail}
        for name, feature in self.token_features.items():
            value = decoded[name]
            last = np.zeros((1, *feature.shape), value.dtype)  # the last token predicts nothing
            example[name] = np.concatenate([value, last])
        return example


@gin.configurable
def offline_distill_data(
    *,
    seed: int,
    process_index: int,
    process_count: int,
    paths: str | Sequence[str] = gin.REQUIRED,
    logits_dir: str = gin.REQUIRED,
    data_format: DataFormat = "text",
    tokenizer: PreTrainedTokenizerBase | None = None,
    field: str | None = None,
    seq_len: int = gin.REQUIRED,
    global_batch_size: int = gin.REQUIRED,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = True,
    overlong: Overlong | None = None,
    with_tail: bool = False,
    max_segments_per_row: int | None = None,
    num_data_shards: int | None = None,
) -> SpecifiedIterDataset:
    """``lm_data``'s batches of the corpus ``paths`` (same arguments, same windows and packing)
    with the teacher keys of the dump in ``logits_dir`` (module docstring).

    Args:
      logits_dir: a complete ``launch.dump_logits`` output made from this corpus.
      with_tail: also yield ``teacher_tail`` (for ``DistillObjective(student_side="tail")``).

    Raises:
      TeacherLogitsError: an incomplete dump, or one made from other data or another tokenizer.
    """
    encoder = record_encoder(data_format, tokenizer, field)
    source = record_source(paths, data_format, getattr(encoder, "required_fields", ()))
    reader = TeacherLogitsReader(logits_dir)
    reader.check_corpus(num_documents=len(source), data_format=data_format, field=field,
                        tokenizer=tokenizer)
    joined = TeacherJoinedSource(source, reader)
    teacher_encoder = TeacherEncoder(encoder, reader.format, with_tail)
    try:
        teacher_encoder(joined[0])
    except ValueError as err:
        raise TeacherLogitsError(f"{joined.location(0)}: {err}") from err
    overlong = DEFAULT_OVERLONG[data_format] if overlong is None else overlong
    return lm_dataset(
        joined, teacher_encoder, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, packing=packing, overlong=overlong,
        max_segments_per_row=max_segments_per_row, process_index=process_index,
        process_count=process_count, num_data_shards=num_data_shards)
