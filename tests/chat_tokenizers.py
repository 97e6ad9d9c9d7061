"""Tokenizers for chat-format tests, built locally (never downloaded).

* :func:`qwen_tokenizer`: a byte-level BPE with Qwen2.5's control tokens (special ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``; added, not special, ``<tool_call>``, ``</tool_call>``), eos
  ``<|im_end|>`` and the published Qwen2.5-Instruct chat template.
* :func:`glm4_tokenizer`: the embedded default tokenizer carrying the published glm-4-9b-chat
  chat template.
* :func:`plain_tokenizer`: the same BPE without special tokens or template.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from glmjax.data.templates import GLM4_CHAT_TEMPLATE, QWEN2_5_CHAT_TEMPLATE
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer

CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "What is the weather in Paris? It is 21 degrees and sunny.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "# Tools\n\nYou may call one or more functions to assist with the user query.",
    "system user assistant tool tool_response function",
] * 20


def _bpe(special_tokens: list[str], vocab_size: int = 420) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def qwen_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A Qwen2.5-style tokenizer with the official template, saved to and loaded from ``directory``."""
    tokenizer = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False, normalized=False),
                          AddedToken("</tool_call>", special=False, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>",
                                 extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = QWEN2_5_CHAT_TEMPLATE
    hf.save_pretrained(str(directory))
    return load_tokenizer(directory)


def glm4_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The embedded tokenizer with the official glm-4-9b-chat template, saved and loaded back."""
    tokenizer = load_tokenizer(build_default_tokenizer(directory))
    tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return load_tokenizer(directory)


def plain_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE with no special tokens and no chat template."""
    hf = PreTrainedTokenizerFast(tokenizer_object=_bpe([]), clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(directory))
    return load_tokenizer(directory)
