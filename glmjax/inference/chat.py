"""The chat and tool-calling loop: generate a turn, run its tool calls, append the results, repeat.

Each round asks an ``LLMClient`` for the next assistant turn of every active conversation
(``LLMClient.assistant_turns`` with the tool specs); a turn comes back parsed (``AssistantTurn.reply``:
content and tool calls), whatever serves the model: the local engine (``LocalEngineClient``, which
renders the tokenizer's chat format) or an OpenAI-compatible endpoint (``OpenAIHTTPClient``, which
sends native ``tools`` / ``tool_calls`` / ``tool`` messages). Per turn:

* a reply without tool calls ends the loop with that answer;
* a reply with tool calls is appended as an assistant message with ``tool_calls`` (a call without an
  id gets ``call_<n>``, ``n`` counting the conversation's calls from 0), each call is run through the
  ``ToolRegistry`` (whose errors come back as ``"Error: ..."`` results) and its result appended as a
  ``tool`` message (``tool_call_id``, ``name``, ``content``), in order; then the next round.

Messages are OpenAI-style (``glmjax.data.chat_format``), so a conversation can move between
clients. The loop also ends when a turn runs out of tokens ("length"), when a turn is a malformed
tool call ("format_error"; the raw text is kept as the assistant's content), or after
``max_turns`` generated turns ("max_turns"). :func:`run_chats` steps many conversations in
lockstep, one ``assistant_turns`` batch per round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import tool_message
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.inference.local_client import LocalEngineClient
from glmjax.inference.tools import ToolRegistry

ChatFinish = Literal["answer", "length", "format_error", "max_turns"]
NO_TOOLS_OBSERVATION = "Error: no tools are available in this conversation"


@dataclasses.dataclass
class ChatResult:
    """The outcome of one conversation.

    Attributes:
      messages: the input messages plus every assistant and tool message added.
      answer: the final plain reply, or None when the loop ended otherwise.
      finish_reason: "answer", "length", "format_error" or "max_turns" (module docstring).
      turns: assistant turns generated.
      error: the parse error for "format_error", else None.
    """

    messages: list[dict[str, Any]]
    answer: str | None
    finish_reason: ChatFinish
    turns: int
    error: str | None = None


def _as_client(model: GenerationEngine | LLMClient,
               tokenizer: PreTrainedTokenizerBase | None) -> LLMClient:
    if isinstance(model, LLMClient):
        return model
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to chat with a GenerationEngine")
    return LocalEngineClient(model, tokenizer)


def run_chats(
    model: GenerationEngine | LLMClient,
    tokenizer: PreTrainedTokenizerBase | None,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    tools: ToolRegistry | None = None,
    sampling: SamplingParams | None = None,
    max_turns: int = 8,
    on_message: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[ChatResult]:
    """Runs the tool-calling loop for every conversation, batching each round.

    Args:
      model: a ``GenerationEngine`` (chatted with through ``LocalEngineClient(model, tokenizer)``)
        or any ``LLMClient``, used as is (e.g. ``OpenAIHTTPClient`` for vLLM / SGLang / hosted
        endpoints).
      tokenizer: the model's tokenizer; needed for a ``GenerationEngine``, unused for a client.
      conversations: message lists, each ending where the assistant should answer.
      tools: the tools offered to the model (None: none; a tool call then gets an error result).
      sampling: generation settings per turn (default ``SamplingParams()``).
      max_turns: most assistant turns per conversation.
      on_message: called as ``on_message(conversation_index, message)`` for each added message.

    Returns:
      One ``ChatResult`` per conversation, in order.

    Raises:
      ValueError: ``max_turns < 1``, or a ``GenerationEngine`` without a tokenizer.
      LLMClientError: from the client (e.g. an HTTP failure after its retries), ending every
        conversation of the batch.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    client = _as_client(model, tokenizer)
    specs = tools.specs() if tools is not None and tools.names else None
    states = [ChatResult([dict(m) for m in c], None, "max_turns", 0) for c in conversations]
    active = list(range(len(states)))

    def add(index: int, message: dict[str, Any]) -> None:
        states[index].messages.append(message)
        if on_message is not None:
            on_message(index, message)

    while active:
        turns = client.assistant_turns([states[i].messages for i in active], sampling, tools=specs)
        still_active = []
        for index, turn in zip(active, turns):
            state = states[index]
            state.turns += 1
            if turn.finish_reason == "length" or turn.error is not None:
                add(index, {"role": "assistant", "content": turn.reply.content})
                state.finish_reason = "length" if turn.finish_reason == "length" else "format_error"
                state.error = turn.error if state.finish_reason == "format_error" else None
                continue
            seen = sum(len(m.get("tool_calls") or []) for m in state.messages if m.get("role") == "assistant")
            calls = [call if call.id is not None else dataclasses.replace(call, id=f"call_{seen + n}")
                     for n, call in enumerate(turn.reply.tool_calls)]
            add(index, dataclasses.replace(turn.reply, tool_calls=calls).to_message())
            if not calls:
                state.answer, state.finish_reason = turn.reply.content, "answer"
                continue
            for call in calls:
                result = tools.call(call.name, call.arguments) if specs else NO_TOOLS_OBSERVATION
                add(index, tool_message(call, result))
            if state.turns < max_turns:
                still_active.append(index)
        active = still_active
    return states


def run_chat(
    model: GenerationEngine | LLMClient,
    tokenizer: PreTrainedTokenizerBase | None,
    messages: Sequence[Mapping[str, Any]],
    tools: ToolRegistry | None = None,
    sampling: SamplingParams | None = None,
    max_turns: int = 8,
    on_message: Callable[[int, dict[str, Any]], None] | None = None,
) -> ChatResult:
    """:func:`run_chats` for one conversation."""
    return run_chats(model, tokenizer, [messages], tools, sampling, max_turns, on_message)[0]


class ChatSession:
    """A conversation kept across user messages (interactive chat).

    Args:
      model, tokenizer, tools, sampling, max_turns, on_message: as for :func:`run_chats`.
      system: optional system prompt that starts the conversation.
    """

    def __init__(
        self,
        model: GenerationEngine | LLMClient,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        tools: ToolRegistry | None = None,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        max_turns: int = 8,
        on_message: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self._client = _as_client(model, tokenizer)
        self._system = system
        self.tools = tools
        self.sampling = sampling
        self.max_turns = max_turns
        self.on_message = on_message
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget everything but the system prompt."""
        self.messages = [{"role": "system", "content": self._system}] if self._system else []

    def send(self, text: str) -> ChatResult:
        """Adds a user message, runs the tool loop, and keeps the resulting messages."""
        result = run_chat(self._client, None, [*self.messages, {"role": "user", "content": text}],
                          self.tools, self.sampling, self.max_turns, self.on_message)
        self.messages = result.messages
        return result
