"""gin-configurable data factories for the trainer (``train.train_data = @train/lm_data``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin
import grain
from transformers import PreTrainedTokenizerBase

from glmjax.data.pipeline import make_lm_dataset
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
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not (os.path.exists(os.path.join(data_dir, "train.jsonl")) and os.path.exists(
            os.path.join(data_dir, "eval.jsonl"))):
        write_arithmetic_jsonl(data_dir, num_train=num_train, num_eval=num_eval, seed=seed,
                               config=config, fmt=data_format)
    return path


gin.external_configurable(ArithmeticConfig, module="glmjax.data")


@gin.configurable
def lm_data(
    *,
    seed: int,
    process_index: int,
    process_count: int,
    paths: str | Sequence[str] = gin.REQUIRED,
    data_format: str = "text",
    tokenizer: PreTrainedTokenizerBase | None = None,
    field: str | None = None,
    seq_len: int = gin.REQUIRED,
    global_batch_size: int = gin.REQUIRED,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = True,
    num_data_shards: int | None = None,
) -> grain.IterDataset:
    """The trainer's data factory over :func:`glmjax.data.pipeline.make_lm_dataset`."""
    return make_lm_dataset(
        paths, data_format, tokenizer=tokenizer, field=field, seq_len=seq_len,
        global_batch_size=global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        packing=packing, process_index=process_index, process_count=process_count,
        num_data_shards=num_data_shards,
    )
