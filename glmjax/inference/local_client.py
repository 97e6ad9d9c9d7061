"""``LLMClient`` backed by the local ``GenerationEngine``: the tokenizer's chat format in, parsed
turns out.

Conversations become prompt ids through the tokenizer's chat format
(:func:`glmjax.data.chat_format.chat_format_for`: its own chat template, else the GLM-4 or ChatML
layout; message content is encoded as text, never as control tokens), are generated as one batch
through the engine until one of the format's stop tokens (GLM-4: ``<|user|>``, ``<|observation|>``,
``<|endoftext|>``; Qwen: ``<|im_end|>``), decoded, and parsed into content and tool calls.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import ChatFormat, ChatFormatError, Reply, chat_format_for
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import (
    AssistantTurn,
    LLMClient,
    LLMClientError,
    Message,
    SamplingParams,
    ToolSpecDict,
)
from glmjax.inference.sampling import SamplingConfig


class LocalEngineClient(LLMClient):
    """Chat completions from a local ``GenerationEngine``.

    Args:
      engine: the generation engine.
      tokenizer: the model's tokenizer.
      chat_format: the chat format (default ``chat_format_for(tokenizer)``).

    Raises:
      ChatFormatError: the tokenizer has no chat format.
    """

    def __init__(self, engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase,
                 chat_format: ChatFormat | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_format = chat_format or chat_format_for(tokenizer)
        self.stop_token_ids = list(self.chat_format.stop_token_ids)

    def complete(self, messages: Sequence[Message], sampling: SamplingParams | None = None) -> str:
        """The reply text to one conversation (the parsed turn's content)."""
        return self.complete_batch([messages], sampling)[0]

    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Reply texts (each turn's parsed content, or its raw text when it does not parse),
        generated as one engine batch, in the order given."""
        return [turn.reply.content for turn in self.assistant_turns(conversations, sampling)]

    def assistant_turns(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingParams | None = None,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> list[AssistantTurn]:
        """Generates the next assistant turn of every conversation (one engine batch).

        Args:
          conversations: chat messages (``glmjax.data.chat_format``).
          sampling: ``max_tokens``, temperature and filters, ``seed`` (None draws a fresh one),
            ``stop`` strings.
          tools: tool specs offered to the model (``ToolRegistry.specs()``), rendered as the chat
            format does.

        Raises:
          LLMClientError: a conversation does not fit the chat format or the engine's limits (the
            message names it; ``batch_index`` is set for format errors), or tools are offered to
            a format whose tool calls cannot be parsed.
        """
        sampling = sampling or SamplingParams()
        if tools and not self.chat_format.parses_tool_calls:
            raise LLMClientError(f"tools: {self.chat_format.source} has no tool-call convention glmjax "
                                 "parses (GLM-4 or <tool_call> JSON)")
        prompts = []
        for index, messages in enumerate(conversations):
            try:
                prompts.append(self.chat_format.prompt_ids(messages, tools))
            except ChatFormatError as err:
                error = LLMClientError(f"conversation {index}: {err}")
                error.batch_index = index
                raise error from err
        seed = secrets.randbits(31) if sampling.seed is None else sampling.seed
        try:
            results = self.engine.generate(
                prompts, SamplingConfig.from_params(sampling), max_new_tokens=sampling.max_tokens,
                stop_token_ids=self.stop_token_ids, seed=seed,
            )
        except ValueError as err:
            raise LLMClientError(f"local engine: {err}") from err
        turns = []
        for result in results:
            body = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            finish = result.finish_reason
            for stop in sampling.stop:
                if stop in text:
                    text, finish = text.split(stop, 1)[0], "stop"
            try:
                reply, error = self.chat_format.parse_reply(text), None
            except ChatFormatError as err:
                reply, error = Reply(text), str(err)
            turns.append(AssistantTurn(text, result.tokens, result.logprobs, finish, reply, error))
        return turns
