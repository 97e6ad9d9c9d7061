"""``LLMClient`` backed by the local ``GenerationEngine``: the tokenizer's chat format in, parsed
turns out.

Conversations become prompt ids through the tokenizer's chat format
(:func:`glmjax.data.chat_format.chat_format_for`: its own chat template, else the GLM-4 or ChatML
layout; message content is encoded as text, never as control tokens), are generated as one batch
through the engine until one of the format's stop tokens (GLM-4: ``<|user|>``, ``<|observation|>``,
``<|endoftext|>``; Qwen: ``<|im_end|>``), decoded, and parsed into content and tool calls.

It keeps the batch contract of ``glmjax.inference.llm_client``: conversation ``i`` samples with
seed ``seed + i``, and a conversation that fails (it does not fit the chat format or the engine's
limits) carries its error while the others are generated.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import ChatFormat, ChatFormatError, Reply, chat_format_for
from glmjax.inference.engine import GenerationEngine, GenerationResult
from glmjax.inference.llm_client import (
    AssistantTurn,
    LLMClient,
    LLMClientError,
    Message,
    SamplingParams,
    ToolSpecDict,
    raise_item_failures,
    report_usage,
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
        generated as one engine batch, in the order given; failures as :meth:`assistant_turns`
        (``results`` then holds texts and errors)."""
        try:
            return [turn.reply.content for turn in self.assistant_turns(conversations, sampling)]
        except LLMClientError as error:
            if error.results is not None:
                error.results = [outcome if isinstance(outcome, LLMClientError) else outcome.reply.content
                                 for outcome in error.results]
            raise

    def assistant_turns(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingParams | None = None,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> list[AssistantTurn]:
        """Generates the next assistant turn of every conversation (one engine batch).

        Args:
          conversations: chat messages (``glmjax.data.chat_format``).
          sampling: ``max_tokens``, temperature and filters, ``seed`` (conversation ``i`` samples
            with ``seed + i``; None draws a fresh base seed), ``stop`` strings.
          tools: tool specs offered to the model (``ToolRegistry.specs()``), rendered as the chat
            format does.

        Raises:
          LLMClientError: tools are offered to a format whose tool calls cannot be parsed; or some
            conversations do not fit the chat format or the engine's limits: the lowest-index one
            (its message names it), with ``batch_index`` and ``results`` (the turns of the others,
            generated all the same, and the errors) set.
        """
        sampling = sampling or SamplingParams()
        if tools and not self.chat_format.parses_tool_calls:
            raise LLMClientError(f"tools: {self.chat_format.source} has no tool-call convention glmjax "
                                 "parses (GLM-4 or <tool_call> JSON)")
        outcomes: list[AssistantTurn | LLMClientError | list[int]] = []
        for index, messages in enumerate(conversations):
            try:
                outcomes.append(self.chat_format.prompt_ids(messages, tools))
            except ChatFormatError as err:
                outcomes.append(LLMClientError(f"conversation {index}: {err}"))
        seed = secrets.randbits(31) if sampling.seed is None else sampling.seed
        ready = [index for index, outcome in enumerate(outcomes) if isinstance(outcome, list)]
        for index, turn in zip(ready, self._generate([outcomes[i] for i in ready], ready, seed, sampling)):
            outcomes[index] = turn
        raise_item_failures(outcomes)
        return outcomes

    def _generate(self, prompts: list[list[int]], indices: list[int], seed: int,
                  sampling: SamplingParams) -> list[AssistantTurn | LLMClientError]:
        """Turns for ``prompts`` (conversations ``indices``, seeds ``seed + index``) in one engine
        batch; when the engine refuses the batch, prompt by prompt, so that each refused one
        carries its own error."""
        if not prompts:
            return []
        seeds = seed if indices == list(range(len(prompts))) else [seed + index for index in indices]
        try:
            results = self.engine.generate(
                prompts, SamplingConfig.from_params(sampling), max_new_tokens=sampling.max_tokens,
                stop_token_ids=self.stop_token_ids, seed=seeds,
            )
        except ValueError as err:
            if len(prompts) == 1:
                return [LLMClientError(f"conversation {indices[0]}: local engine: {err}")]
            return [turn for prompt, index in zip(prompts, indices)
                    for turn in self._generate([prompt], [index], seed, sampling)]
        for prompt, result in zip(prompts, results):
            report_usage(len(prompt), len(result.tokens))
        return [self._turn(result, sampling) for result in results]

    def _turn(self, result: GenerationResult, sampling: SamplingParams) -> AssistantTurn:
        """The generated ``result`` as a parsed turn (its text cut before the earliest
        ``sampling.stop`` string)."""
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
        return AssistantTurn(text, result.tokens, result.logprobs, finish, reply, error)
