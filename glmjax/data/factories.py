"""gin-configurable data factories for the trainer (``train.train_data = @train/lm_data``).

Extra record fields become batch features through ``RecordField``, e.g.::

    lm_data.data_format = "tokens"
    lm_data.token_features = {"teacher_ids": @teacher_ids/RecordField(),
                              "teacher_probs": @teacher_probs/RecordField()}
    teacher_ids/RecordField.dtype = "int32"
    teacher_ids/RecordField.shape = (8,)
    teacher_probs/RecordField.dtype = "float32"
    teacher_probs/RecordField.shape = (8,)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import gin
import grain
import numpy as np
from etils import epath
from transformers import PreTrainedTokenizerBase

from glmjax.data.encoders import RecordField
from glmjax.data.pipeline import Overlong, make_lm_dataset
from glmjax.data.spec import LM_FEATURES, SpecifiedIterDataset, lm_batch_spec, with_batch_spec
from glmjax.data.synthetic import ArithmeticConfig, write_arithmetic_jsonl
from glmjax.data.tokenizer import default_tokenizer, load_tokenizer

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "glmjax")


@gin.configurable
def tokenizer(directory: str | None = None, cache_dir: str = DEFAULT_CACHE_DIR) -> PreTrainedTokenizerBase:
    """An HF tokenizer from a local ``directory``, or the embedded default one (built once)."""
    return load_tokenizer(directory) if directory else default_tokenizer(cache_dir)


@gin.configurable
def synthetic_arithmetic_file(
    data_dir: str = gin.REQUIRED,
    split: str = "train",
    num_train: int = 20000,
    num_eval: int = 200,
    seed: int = 0,
    data_format: str = "chat",
    config: ArithmeticConfig = ArithmeticConfig(),
) -> str:
    """Path of the synthetic reasoning task's ``split`` JSONL, written on first use."""
    directory = epath.Path(data_dir)
    if not ((directory / "train.jsonl").exists() and (directory / "eval.jsonl").exists()):
        write_arithmetic_jsonl(data_dir, num_train=num_train, num_eval=num_eval, seed=seed,
                               config=config, fmt=data_format)
    return str(directory / f"{split}.jsonl")


gin.external_configurable(ArithmeticConfig, module="glmjax.data")
gin.external_configurable(RecordField, module="glmjax.data")


@gin.configurable
def lm_data(
    *,
    seed: int,
    process_index: int,
    process_count: int,
    paths: str | Sequence[str] | None = None,
    data_format: str = "text",
    tokenizer: PreTrainedTokenizerBase | None = None,
    field: str | None = None,
    seq_len: int = gin.REQUIRED,
    global_batch_size: int = gin.REQUIRED,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = True,
    overlong: Overlong | None = None,
    token_features: Mapping[str, RecordField] | None = None,
    example_features: Mapping[str, RecordField] | None = None,
    max_segments_per_row: int | None = None,
    group_size: int = 1,
    num_data_shards: int | None = None,
    tfds_name: str | None = None,
    tfds_split: str = "train",
    tfds_data_dir: str | None = None,
) -> SpecifiedIterDataset:
    """The trainer's data factory over :func:`glmjax.data.pipeline.make_lm_dataset`: files
    (``paths``) or a TFDS dataset (``tfds_name``, ``tfds_split``, ``tfds_data_dir``)."""
    return make_lm_dataset(
        paths, data_format, tokenizer=tokenizer, field=field, token_features=token_features,
        example_features=example_features, overlong=overlong, tfds_name=tfds_name,
        tfds_split=tfds_split, tfds_data_dir=tfds_data_dir, seq_len=seq_len,
        global_batch_size=global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        packing=packing, max_segments_per_row=max_segments_per_row, group_size=group_size,
        process_index=process_index, process_count=process_count,
        num_data_shards=num_data_shards,
    )


@gin.configurable
def placeholder_lm_data(
    *,
    seed: int,
    process_index: int,
    process_count: int,
    seq_len: int = gin.REQUIRED,
    global_batch_size: int = gin.REQUIRED,
) -> SpecifiedIterDataset:
    """All-zero LM batches of the right shapes, for compile-only memory checks (no data needed).

    Every element is this process's ``global_batch_size // process_count`` rows of the LM keys
    (``spec.LM_FEATURES``), int32 ``[rows, seq_len]``, one document per row.
    """
    del seed, process_index
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of {process_count} processes")
    rows = global_batch_size // process_count
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in LM_FEATURES}
    batch["segment_ids"][:] = 1
    batch["positions"][:] = np.arange(seq_len)
    batch["loss_mask"][:] = 1
    dataset = grain.MapDataset.source([batch]).repeat().to_iter_dataset()
    return with_batch_spec(dataset, lm_batch_spec())
