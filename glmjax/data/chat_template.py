"""GLM-4 chat constants and tokenizer-level shortcuts to the tokenizer's chat format.

The chat formats themselves (templates, content kept from becoming control tokens, loss masks,
reply parsing) live in :mod:`glmjax.data.chat_format`; the template sources in
:mod:`glmjax.data.templates`. This module keeps what callers holding only a tokenizer need:

* the GLM-4 special tokens (:data:`SPECIAL_TOKENS`, the embedded tokenizer's set) and GLM-4's stop
  tokens (:data:`STOP_TOKENS`);
* :func:`encode_chat` and :func:`stop_token_ids`, through ``chat_format_for(tokenizer)``;
* :func:`render_messages`, the glm-4-9b-chat rendering as text (no tokenizer needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from glmjax.data.chat_format import (
    EOS,
    GLM4_SPECIAL_TOKENS,
    GLM4_STOP_TOKENS,
    GMASK,
    SOP,
    ChatEncoding,
    ChatFormatError,
    chat_format_for,
    render_glm4,
)

SPECIAL_TOKENS = GLM4_SPECIAL_TOKENS
STOP_TOKENS = GLM4_STOP_TOKENS


class TokenizerLike(Protocol):
    """The two methods of a Hugging Face tokenizer that plain-text encoding uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Any] | None = None,
) -> ChatEncoding:
    """A conversation in the tokenizer's chat format (``chat_format_for(tokenizer)``).

    Without ``add_generation_prompt``: :meth:`~glmjax.data.chat_format.ChatFormat.encode` (training
    ids and loss mask). With it: the prompt ids
    (:meth:`~glmjax.data.chat_format.ChatFormat.prompt_ids`) and an all-zero mask (a prompt has no
    targets).

    Raises:
      ChatFormatError: naming the message index and field that is wrong.
    """
    chat_format = chat_format_for(tokenizer)
    if not add_generation_prompt:
        return chat_format.encode(messages, tools)
    ids = np.asarray(chat_format.prompt_ids(messages, tools), np.int32)
    return ChatEncoding(ids, np.zeros_like(ids))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn in the tokenizer's chat format (GLM-4: ``<|user|>``,
    ``<|observation|>``, ``<|endoftext|>``; Qwen: ``<|im_end|>``)."""
    return list(chat_format_for(tokenizer).stop_token_ids)


def render_messages(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Any] | None = None,
) -> str:
    """A conversation rendered with the glm-4-9b-chat template as text
    (:func:`~glmjax.data.chat_format.render_glm4`)."""
    return render_glm4(messages, tools, add_generation_prompt)


__all__ = [
    "EOS",
    "GMASK",
    "SOP",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "ChatEncoding",
    "ChatFormatError",
    "TokenizerLike",
    "encode_chat",
    "render_messages",
    "stop_token_ids",
]
