"""The GLM-4 chat format: rendering to text, to token ids with a loss mask, and parsing replies.

Rendered layout (the format of GLM-4 chat models)::

    [gMASK]<sop><|system|>\\n{system}<|user|>\\n{question}<|assistant|>\\n{reply}
    <|assistant|>{function_name}\\n{json arguments}<|observation|>\\n{tool result}...

* Every conversation starts with ``[gMASK]<sop>``.
* Each message is ``<|{role}|>`` followed by ``\\n{content}``. Roles: ``system``, ``user``,
  ``assistant``, ``observation`` (``tool`` is accepted as an alias of ``observation``).
* An assistant tool call is ``<|assistant|>{name}\\n{arguments as JSON}`` (no newline before the
  name); a plain assistant reply starts with a newline. This is how a reply is told apart from a
  tool call when parsing.
* Tool specifications go in the system turn (appended to a leading system message, or in a system
  turn of their own at the start).
* The generation prompt is a bare ``<|assistant|>``.
* A model ends its turn by emitting one of :data:`STOP_TOKENS`.

Loss mask of :func:`encode_chat` (one int per token, aligned with ``input_ids``): 1 on the tokens of
every assistant turn after its ``<|assistant|>`` token (the ``\\n{content}`` or
``{name}\\n{arguments}`` tokens) and on the single token that follows an assistant turn (the next
role token, or the appended ``<|endoftext|>`` when the conversation ends with the assistant), because
the model has to learn to emit that token to end its turn; 0 everywhere else, including on the
``<|assistant|>`` tokens themselves. The mask marks tokens that are *targets*: a training step
predicts token ``i`` from tokens ``< i`` and counts the loss where ``loss_mask[i] == 1``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

GMASK = "[gMASK]"
SOP = "<sop>"
EOS = "<|endoftext|>"
ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = (EOS, GMASK, SOP, *ROLE_TOKENS.values())
STOP_TOKENS = (ROLE_TOKENS["user"], ROLE_TOKENS["observation"], EOS)

_ROLE_ALIASES = {"tool": "observation"}
_TOOL_INSTRUCTION = (
    "To call a tool, reply with its name on the first line and its arguments as a JSON object "
    "on the next line."
)


class ChatFormatError(ValueError):
    """A conversation, tool spec or model reply that does not fit the GLM-4 chat format."""


class TokenizerLike(Protocol):
    """The two methods of a Hugging Face tokenizer that :func:`encode_chat` uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
    """A tokenized conversation.

    Attributes:
      input_ids: int32 ``[num_tokens]``.
      loss_mask: int32 ``[num_tokens]``, 1 where the token is an assistant target (module doc).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One special token and the plain text after it; ``assistant`` marks an assistant turn."""

    special: str
    text: str
    assistant: bool


def _tool_name(tool: Mapping[str, Any], index: int) -> tuple[str, Mapping[str, Any]]:
    spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ChatFormatError(f"tools[{index}]: a tool needs a non-empty string field 'name'")
    return spec["name"], spec


def _tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    parts = ["# Available tools"]
    for index, tool in enumerate(tools):
        name, spec = _tool_name(tool, index)
        parts.append(f"## {name}\n\n{json.dumps(spec, indent=4, ensure_ascii=False)}")
    parts.append(_TOOL_INSTRUCTION)
    return "\n\n".join(parts)


def _role(message: Any, index: int) -> str:
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"message {index}: expected an object, got {type(message).__name__}")
    if "role" not in message:
        raise ChatFormatError(f"message {index}: missing field 'role'")
    role = _ROLE_ALIASES.get(message["role"], message["role"])
    if role not in ROLES:
        raise ChatFormatError(
            f"message {index}: role {message['role']!r} is not one of {ROLES + tuple(_ROLE_ALIASES)}"
        )
    return role


def _content(message: Mapping[str, Any], index: int, *, required: bool) -> str:
    content = message.get("content")
    if content is None and not required:
        return ""
    if not isinstance(content, str):
        raise ChatFormatError(
            f"message {index}: field 'content' must be a string, got {type(content).__name__}"
        )
    return content


def tool_call_parts(call: Any, index: int, call_index: int) -> tuple[str, Mapping[str, Any]]:
    """(name, arguments) of entry ``call_index`` of message ``index``'s ``tool_calls``:
    ``{"function": {"name", "arguments"}}`` or the inner object alone; arguments as a mapping or
    a JSON string of an object.

    Raises:
      ChatFormatError: naming the message and call, for a missing name or bad arguments.
    """
    where = f"message {index}: tool_calls[{call_index}]"
    spec = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ChatFormatError(f"{where}: missing string field 'name'")
    arguments = spec.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ChatFormatError(f"{where}: field 'arguments' is not valid JSON: {err}") from err
    if not isinstance(arguments, Mapping):
        raise ChatFormatError(f"{where}: field 'arguments' must be a JSON object")
    return spec["name"], arguments


def _tool_call_text(call: Any, index: int, call_index: int) -> str:
    name, arguments = tool_call_parts(call, index, call_index)
    return f"{name}\n{json.dumps(arguments, ensure_ascii=False)}"


def _segments(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
) -> list[_Segment]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role', 'content'} objects")
    segments = [_Segment(GMASK, "", False), _Segment(SOP, "", False)]
    roles = [_role(message, index) for index, message in enumerate(messages)]
    first = 0
    if tools:
        system = _content(messages[0], 0, required=True) if roles[0] == "system" else ""
        first = 1 if roles[0] == "system" else 0
        block = _tools_block(tools)
        text = f"{system}\n\n{block}" if system else block
        segments.append(_Segment(ROLE_TOKENS["system"], f"\n{text}", False))
    for index in range(first, len(messages)):
        message, role = messages[index], roles[index]
        if role != "assistant":
            content = _content(message, index, required=True)
            segments.append(_Segment(ROLE_TOKENS[role], f"\n{content}", False))
            continue
        calls = message.get("tool_calls") or []
        content = _content(message, index, required=not calls)
        if content or not calls:
            segments.append(_Segment(ROLE_TOKENS["assistant"], f"\n{content}", True))
        for call_index, call in enumerate(calls):
            text = _tool_call_text(call, index, call_index)
            segments.append(_Segment(ROLE_TOKENS["assistant"], text, True))
    if add_generation_prompt:
        segments.append(_Segment(ROLE_TOKENS["assistant"], "", False))
    return segments


def render_messages(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Renders a conversation as GLM-4 chat text (layout in the module docstring).

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]``; an assistant message may carry
        ``tool_calls``: ``[{"function": {"name": str, "arguments": dict | JSON str}}]`` (or the
        inner ``{"name", "arguments"}`` directly).
      add_generation_prompt: append ``<|assistant|>`` so a model continues with the reply.
      tools: tool specs (``{"type": "function", "function": {"name": ..., ...}}`` or the inner
        object), listed in the system turn.

    Returns:
      The rendered text; it contains no ``<|endoftext|>``.

    Raises:
      ChatFormatError: naming the message index and field that is wrong.
    """
    return "".join(s.special + s.text for s in _segments(messages, tools, add_generation_prompt))


def _special_id(tokenizer: TokenizerLike, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        raise ChatFormatError(f"the tokenizer has no single-token entry for {token!r}")
    return token_id


def stop_token_ids(tokenizer: TokenizerLike) -> list[int]:
    """Ids of :data:`STOP_TOKENS` (``<|user|>``, ``<|observation|>``, ``<|endoftext|>``), in order."""
    return [_special_id(tokenizer, token) for token in STOP_TOKENS]


def encode_chat(
    tokenizer: TokenizerLike,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    append_eos: bool = True,
) -> ChatEncoding:
    """Tokenizes a conversation and marks the assistant tokens (see the module docstring).

    The ids equal ``tokenizer.encode(render_messages(...), add_special_tokens=False)``, plus one
    ``<|endoftext|>`` at the end when ``append_eos`` is set and the last turn is the assistant's
    (and no generation prompt is requested).

    Returns:
      :class:`ChatEncoding` with int32 ``input_ids`` and ``loss_mask`` of equal length.
    """
    segments = _segments(messages, tools, add_generation_prompt)
    ids: list[int] = []
    mask: list[int] = []
    after_assistant = False
    for segment in segments:
        ids.append(_special_id(tokenizer, segment.special))
        mask.append(int(after_assistant))
        if segment.text:
            text_ids = tokenizer.encode(segment.text, add_special_tokens=False)
            ids.extend(text_ids)
            mask.extend([int(segment.assistant)] * len(text_ids))
        after_assistant = segment.assistant
    if append_eos and after_assistant:
        ids.append(_special_id(tokenizer, EOS))
        mask.append(1)
    return ChatEncoding(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int32))


def parse_assistant_output(text: str) -> dict[str, Any]:
    """Parses one generated assistant turn (the text after ``<|assistant|>``).

    Anything from the first stop token (:data:`STOP_TOKENS`) on is ignored.

    Returns:
      ``{"content": str}`` for a plain reply (text starting with a newline, which is dropped), or
      ``{"tool_call": name, "arguments": dict}`` for ``{name}\\n{json object}``.

    Raises:
      ChatFormatError: a tool call without a newline after the name, or whose arguments are not a
        valid JSON object.
    """
    for stop in STOP_TOKENS:
        text = text.split(stop, 1)[0]
    if text.startswith("\n"):
        return {"content": text[1:]}
    name, newline, arguments = text.partition("\n")
    name = name.strip()
    if not newline or not name:
        raise ChatFormatError(
            "assistant output is neither a reply (starts with a newline) nor a tool call "
            f"('name' newline JSON arguments): {text[:80]!r}"
        )
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as err:
        raise ChatFormatError(
            f"tool call {name!r}: arguments are not valid JSON ({err}): {arguments[:80]!r}"
        ) from err
    if not isinstance(parsed, dict):
        raise ChatFormatError(
            f"tool call {name!r}: arguments must be a JSON object, got {type(parsed).__name__}"
        )
    return {"tool_call": name, "arguments": parsed}
