"""Record encoders: one data record in, ``{"input_ids", "loss_mask"}`` (int32 ``[n]`` each) out.

* :class:`TextEncoder`: ``{"text": str}`` -> ``[gMASK] <sop> text <|endoftext|>``, loss on every token.
* :class:`ChatEncoder`: ``{"messages": [...], "tools": [...]?}`` -> the GLM-4 chat rendering with
  ``<|endoftext|>`` after a final assistant turn, loss on assistant turns only
  (:func:`glmjax.data.chat_template.encode_chat`).
* :class:`TokenEncoder`: ``{"input_ids": int32 [n]}`` (a :class:`~glmjax.data.sources.TokenRecordSource`
  record) -> the same ids, loss on every token.

``required_fields`` names the record keys an encoder reads, so a source can check them and report
the file and line of a record that lacks one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_template import EOS, GMASK, SOP, encode_chat

Example = dict[str, np.ndarray]


def _settle(tokenizer: PreTrainedTokenizerBase) -> None:
    """Encodes once so the tokenizer drops any truncation/padding settings from tokenizer.json now.

    The first ``encode`` call mutates the Rust tokenizer when such settings exist; doing it here,
    before grain's reader threads share the tokenizer, keeps their calls read-only.
    """
    tokenizer.encode("", add_special_tokens=False)


class TextEncoder:
    """Plain text documents; ``field`` holds the text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, field: str = "text"):
        self.tokenizer = tokenizer
        self.field = field
        self.required_fields = (field,)
        _settle(tokenizer)
        self._prefix = tokenizer.convert_tokens_to_ids([GMASK, SOP])
        self._eos = tokenizer.convert_tokens_to_ids(EOS)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        text = record[self.field]
        if not isinstance(text, str):
            raise ValueError(f"field {self.field!r} must be a string, got {type(text).__name__}")
        ids = [*self._prefix, *self.tokenizer.encode(text, add_special_tokens=False), self._eos]
        return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.ones(len(ids), np.int32)}


class ChatEncoder:
    """Chat conversations; ``field`` holds the messages, optional ``tools_field`` the tool specs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        field: str = "messages",
        tools_field: str = "tools",
    ):
        self.tokenizer = tokenizer
        self.field = field
        self.tools_field = tools_field
        self.required_fields = (field,)
        _settle(tokenizer)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        encoding = encode_chat(
            self.tokenizer, record[self.field], tools=record.get(self.tools_field)
        )
        return {"input_ids": encoding.input_ids, "loss_mask": encoding.loss_mask}


class TokenEncoder:
    """Pre-tokenized records ``{"input_ids": int [n]}``; every token is a target."""

    required_fields = ("input_ids",)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        ids = np.asarray(record["input_ids"], dtype=np.int32)
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), np.int32)}
