"""``LLMClient`` backed by the local ``GenerationEngine``: GLM-4 chat template in, text out.

Conversations are rendered with the GLM-4 template (``encode_chat`` with a generation prompt),
generated as one batch through the engine until a chat stop token (``<|user|>``,
``<|observation|>``, ``<|endoftext|>``), and decoded.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_template import ChatFormatError, encode_chat, parse_assistant_output, stop_token_ids
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


def reply_text(turn_text: str) -> str:
    """The user-facing text of a turn: a plain reply without its leading newline; a tool call or
    unparseable output as generated."""
    try:
        parsed = parse_assistant_output(turn_text)
    except ChatFormatError:
        return turn_text
    return parsed.get("content", turn_text)


class LocalEngineClient(LLMClient):
    """Chat completions from a local ``GenerationEngine``.

    Args:
      engine: the generation engine.
      tokenizer: a tokenizer with the GLM-4 special tokens.
    """

    def __init__(self, engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids(tokenizer)

    def complete(self, messages: Sequence[Message], sampling: SamplingParams | None = None) -> str:
        """The reply text to one conversation (``reply_text`` of the generated turn)."""
        return self.complete_batch([messages], sampling)[0]

    def complete_batch(
        self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams | None = None
    ) -> list[str]:
        """Reply texts, generated as one engine batch, in the order given."""
        return [reply_text(turn.text) for turn in self.assistant_turns(conversations, sampling)]

    def assistant_turns(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingParams | None = None,
        tools: Sequence[ToolSpecDict] | None = None,
    ) -> list[AssistantTurn]:
        """Generates the next assistant turn of every conversation (one engine batch).

        Args:
          conversations: chat messages (``render_messages`` format).
          sampling: ``max_tokens``, temperature and filters, ``seed`` (None draws a fresh one),
            ``stop`` strings.
          tools: tool specs rendered into the system turn (``ToolRegistry.specs()``).

        Raises:
          LLMClientError: a conversation does not fit the chat format or the engine's limits (the
            message names it; ``batch_index`` is set for format errors).
        """
        sampling = sampling or SamplingParams()
        prompts = []
        for index, messages in enumerate(conversations):
            try:
                encoded = encode_chat(self.tokenizer, messages, add_generation_prompt=True, tools=tools)
            except ChatFormatError as err:
                error = LLMClientError(f"conversation {index}: {err}")
                error.batch_index = index
                raise error from err
            prompts.append(encoded.input_ids.tolist())
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
            turns.append(AssistantTurn(text, result.tokens, result.logprobs, finish))
        return turns
