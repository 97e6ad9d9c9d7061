"""Tokenizers: load a Hugging Face tokenizer from a local directory, or build the embedded default.

The default tokenizer is a byte-level BPE (any UTF-8 text round-trips) whose digits are always
single tokens, trained on text from the synthetic arithmetic generator with a fixed seed, plus
the GLM-4 special tokens (:data:`glmjax.data.chat_template.SPECIAL_TOKENS`; ``<|endoftext|>`` is
id 0 and serves as eos and pad). Building it takes well under a second, needs no network and is
deterministic: the same version and vocabulary size give a byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from etils import epath
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from glmjax.data.chat_template import EOS, SPECIAL_TOKENS
from glmjax.data.synthetic import generate_problems

DEFAULT_TOKENIZER_VERSION = 1
DEFAULT_VOCAB_SIZE = 384
_CORPUS_PROBLEMS = 4000
_CORPUS_SEED = 20240605


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used (the message names it)."""


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Loads a fast Hugging Face tokenizer from a directory (local or a URL; never the hub).

    The directory must hold ``tokenizer.json`` (and usually ``tokenizer_config.json``), as written by
    ``save_pretrained``. Any model's tokenizer loads; what a chat needs from it (a chat template or
    known special tokens) is checked by ``glmjax.data.chat_format``. A tokenizer without a pad
    token pads with its eos token.

    Raises:
      TokenizerError: naming the directory, when it is missing or unusable.
    """
    source = epath.Path(path)
    if "://" in str(path):
        with tempfile.TemporaryDirectory(prefix="glmjax-tokenizer-") as local:
            _copy_tree(source, epath.Path(local))
            return _load_local(Path(local), str(path))
    return _load_local(Path(path), str(path))


def _load_local(path: Path, where: str) -> PreTrainedTokenizerBase:
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(f"{where}: no tokenizer.json (expected a saved Hugging Face tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{where}: not a usable tokenizer ({str(err).splitlines()[0]})") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer`` with ``save_pretrained`` into ``directory`` (local or a URL)."""
    with tempfile.TemporaryDirectory(prefix="glmjax-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        _copy_tree(epath.Path(local), epath.Path(directory))


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())


def _training_corpus() -> list[str]:
    problems = generate_problems(_CORPUS_PROBLEMS, seed=_CORPUS_SEED, split="train")
    return [f"{p.question}\n{p.solution}" for p in problems]


def build_default_tokenizer(
    out_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> Path:
    """Trains the default tokenizer and saves it with ``save_pretrained`` into ``out_dir``.

    Args:
      out_dir: directory to create (or overwrite files in).
      vocab_size: total vocabulary, including 256 byte tokens and the special tokens; the trainer
        may stop below it when the corpus has no more merges.

    Returns:
      ``out_dir`` as a Path.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t != EOS],
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out))
    return out


def default_tokenizer(
    cache_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerBase:
    """The default tokenizer, built once into ``cache_dir`` and loaded from there afterwards.

    The cached copy lives in ``cache_dir/glmjax-default-v{version}-{vocab_size}``; it is built in a
    temporary directory and renamed into place, so concurrent processes never see a partial copy.
    """
    target = Path(cache_dir) / f"glmjax-default-v{DEFAULT_TOKENIZER_VERSION}-{vocab_size}"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
        try:
            build_default_tokenizer(staging, vocab_size)
            os.rename(staging, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(target)
