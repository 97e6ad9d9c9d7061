"""Chat formats: prompts, training encodings and reply parsing from a tokenizer's chat template.

:func:`chat_format_for` picks the format of a tokenizer:

1. its own ``chat_template`` when it has one (every released GLM-4 and Qwen2.5 chat model does): the
   model's format, rendered exactly as ``tokenizer.apply_chat_template(messages, tools=tools,
   add_generation_prompt=True)`` renders it;
2. otherwise, with the GLM-4 special tokens (the embedded default tokenizer), the official
   glm-4-9b-chat template (:data:`glmjax.data.templates.GLM4_CHAT_TEMPLATE`);
3. otherwise, with ``<|im_start|>``/``<|im_end|>``, our ChatML template
   (:data:`glmjax.data.templates.CHATML_CHAT_TEMPLATE`);
4. otherwise a :class:`ChatFormatError`.

Messages are OpenAI-style dicts: ``role`` (``system``, ``user``, ``assistant``, ``tool``; GLM-4's
``observation`` is accepted as ``tool``), ``content``, an assistant's ``tool_calls``
(``[{"id"?, "type": "function", "function": {"name", "arguments": dict | JSON str}}]``), a tool
message's ``tool_call_id``; other fields (GLM-4's ``tools`` on a system message and ``metadata`` on
an assistant tool call, ...) are passed to the template as given. Tools are function specs
(``{"type": "function", "function": {"name", "description", "parameters"}}``; the inner object alone
is accepted) or, for GLM-4, All Tools built-ins (``{"type": "python" | "simple_browser" |
"cogview"}``). Each format brings the conventions of its tool-call dialect:

* ``glm4`` (a tokenizer with the GLM-4 special tokens): a reply is ``\\n{content}`` or a tool call
  ``{name}\\n{arguments}`` after ``<|assistant|>``, several of them joined by ``<|assistant|>``;
  arguments are JSON for functions, a fenced code block for ``python`` and a call such as
  ``search("query", recency_days=7)`` / ``mclick([0, 2])`` / ``open_url("...")`` for
  ``simple_browser`` (GLM-4's ``glm_server.py`` / composite demo conventions). When the template does
  not render ``tool_calls`` itself (glm-4-9b-chat's does not), OpenAI-style messages are rewritten to
  GLM-4's own form before rendering: each call becomes an assistant message with ``metadata`` = the
  tool name, followed by its result as an ``observation`` message (a message with several calls
  becomes call, result, call, result: GLM-4 makes one call per turn and ends it with
  ``<|observation|>``). Row-level ``tools`` go on a leading system message, as glm_server does, when
  the template ignores its ``tools`` argument (glm-4-9b-chat's reads tools from messages). Stop
  tokens: ``<|user|>``, ``<|observation|>``, ``<|endoftext|>``.
* ``tool_call_json`` (templates with ``<tool_call>``: Qwen2.5 and our ChatML): a tool call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the reply; stop tokens:
  ``<|im_end|>`` (and the eos token). ``observation`` messages become ``tool`` messages.
* ``plain`` (any other template): replies are text only (:attr:`ChatFormat.parses_tool_calls` is
  false); stop tokens: the special token the template writes after an assistant turn, and eos.

**Content is data.** Text such as ``<|assistant|>`` or ``<|im_end|>`` inside a message, a tool
result or a tool spec is encoded as plain text, never as the control token: ids come from
``apply_chat_template(..., sanitize_control_tokens=True)``, which marks every control token found in
the input's strings before rendering and encodes the marked ones as ordinary text, so only the
control tokens the template writes itself become special ids. What that cannot cover is refused:
roles outside the known set (GLM-4's template builds ``<|{role}|>``) and dict keys that contain a
control token. For conversations without such text the ids equal the rendering tokenized.

Training encodings (:meth:`ChatFormat.encode`) mark as targets exactly the tokens the model
produces in each assistant turn: what the template renders after the generation prompt, through
the first stop token; when the turn has none (GLM-4), the token that follows it (the next role
token, ``<|assistant|>`` when the model continues with a tool call) and, after a final assistant
turn, an appended ``<|user|>`` (GLM-4's fine-tuning convention; ``<|observation|>`` after a final
tool call; other formats: their first stop token).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import jinja2
import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from glmjax.data.templates import CHATML_CHAT_TEMPLATE, GLM4_CHAT_TEMPLATE

EOS = "<|endoftext|>"
GMASK = "[gMASK]"
SOP = "<sop>"
GLM4_ROLE_TOKENS = {role: f"<|{role}|>" for role in ("system", "user", "assistant", "observation")}
GLM4_SPECIAL_TOKENS = (EOS, GMASK, SOP, *GLM4_ROLE_TOKENS.values())
"""The GLM-4 special tokens a tokenizer needs for the GLM-4 format (the embedded tokenizer's set)."""
GLM4_STOP_TOKENS = (GLM4_ROLE_TOKENS["user"], GLM4_ROLE_TOKENS["observation"], EOS)
GLM4_BUILTIN_TOOLS = ("python", "simple_browser", "cogview")
"""GLM-4 All Tools built-ins: tool ``type`` values the GLM-4 template lists with fixed descriptions."""
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant", "tool", "observation")

_GLM4_OPEN_TURN_END = GLM4_ROLE_TOKENS["user"]
_BROWSER_PARAMETERS = {"search": ("query", "recency_days"), "mclick": ("ids",), "open_url": ("url",)}
_CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PROBE = "glmjax-probe-7f3a"


class ChatFormatError(ValueError):
    """A conversation, tool spec, tokenizer or model reply that does not fit the chat format."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One tool call of a reply.

    Attributes:
      name: the tool's name.
      arguments: the call's arguments as a JSON object.
      id: the call's id (OpenAI ``tool_calls[].id``), or None when the model gave none.
    """

    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The call as an OpenAI-style ``tool_calls`` entry (arguments as an object)."""
        call = {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}
        return call if self.id is None else {"id": self.id, **call}


@dataclasses.dataclass(frozen=True)
class Reply:
    """A parsed assistant turn: its text and its tool calls (in order)."""

    content: str
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """The reply as an assistant message for the next turn: ``{"role": "assistant", "content",
        "tool_calls"?}``; every format renders it back as the model wrote it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return message


def tool_message(call: ToolCall, content: str) -> dict[str, Any]:
    """The message answering ``call`` with ``content``: ``{"role": "tool", "tool_call_id"?, "name",
    "content"}``."""
    message = {"role": "tool", "name": call.name, "content": content}
    return message if call.id is None else {"role": "tool", "tool_call_id": call.id, **message}


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
    """A tokenized conversation.

    Attributes:
      input_ids: int32 ``[num_tokens]``.
      loss_mask: int32 ``[num_tokens]``, 1 exactly on the assistant tokens the model produces
        (module docstring).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray


# ------------------------------------------------------------------ message and tool validation


def message_role(message: Any, index: int) -> str:
    """The role of message ``index``, checked to be one of :data:`ROLES`."""
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"message {index}: expected an object, got {type(message).__name__}")
    if "role" not in message:
        raise ChatFormatError(f"message {index}: missing field 'role'")
    if message["role"] not in ROLES:
        raise ChatFormatError(f"message {index}: role {message['role']!r} is not one of {ROLES}")
    return message["role"]


def _content(message: Mapping[str, Any], index: int, *, required: bool) -> str:
    content = message.get("content")
    if content is None and not required:
        return ""
    if not isinstance(content, str):
        raise ChatFormatError(
            f"message {index}: field 'content' must be a string, got {type(content).__name__}")
    return content


def tool_calls_of(message: Mapping[str, Any], index: int) -> list[ToolCall]:
    """The ``tool_calls`` of message ``index`` as :class:`ToolCall` objects.

    Each entry is ``{"id"?, "function": {"name", "arguments"}}`` or the inner object alone; arguments
    are an object or the JSON text of one.

    Raises:
      ChatFormatError: naming the message and call, for a missing name or bad arguments.
    """
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ChatFormatError(f"message {index}: field 'tool_calls' must be a list")
    parsed = []
    for call_index, call in enumerate(calls):
        where = f"message {index}: tool_calls[{call_index}]"
        spec = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ChatFormatError(f"{where}: missing string field 'name'")
        arguments = spec.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise ChatFormatError(f"{where}: field 'arguments' is not valid JSON: {err}") from err
        if not isinstance(arguments, Mapping):
            raise ChatFormatError(f"{where}: field 'arguments' must be a JSON object")
        call_id = call.get("id") if isinstance(call, Mapping) else None
        if call_id is not None and not isinstance(call_id, str):
            raise ChatFormatError(f"{where}: field 'id' must be a string")
        parsed.append(ToolCall(spec["name"], dict(arguments), call_id))
    return parsed


def function_tool(tool: Any, index: int) -> dict[str, Any]:
    """Tool spec ``tools[index]`` as ``{"type": "function", "function": {...}}`` (the OpenAI form).

    Raises:
      ChatFormatError: a spec without a function object with a non-empty ``name``.
    """
    spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ChatFormatError(
            f"tools[{index}]: a tool needs a function object with a non-empty string 'name'")
    return {"type": "function", "function": dict(spec)}


def _glm4_tool(tool: Any, index: int) -> dict[str, Any]:
    """Tool spec ``tools[index]`` for the GLM-4 template: built-ins (``type`` python,
    simple_browser, cogview) as given, functions in the OpenAI form."""
    if isinstance(tool, Mapping) and tool.get("type") in GLM4_BUILTIN_TOOLS:
        return dict(tool)
    return function_tool(tool, index)


def _checked_tools(tools: Any) -> list[Any] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatFormatError("tools must be a list of tool specs")
    return list(tools) or None


def _checked_messages(messages: Any) -> list[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role', 'content'} objects")
    for index, message in enumerate(messages):
        message_role(message, index)
    return list(messages)


# ------------------------------------------------------------------ GLM-4 tool-call bodies


def glm4_call_arguments(name: str, body: str) -> dict[str, Any]:
    """The arguments of a GLM-4 tool call ``{name}\\n{body}``.

    ``python``: ``{"code"}``, the last fenced code block of ``body`` (else the ``code`` of a JSON
    object body, else ``body`` itself);
    ``simple_browser``: ``{"action": "search" | "mclick" | "open_url", ...}`` from a call such as
    ``search("query", recency_days=7)``; ``cogview``: ``{"prompt": body}``; any other tool: ``body``
    as a JSON object.

    Raises:
      ChatFormatError: a body that does not fit the tool's form.
    """
    if name == "python":
        blocks = _CODE_BLOCK.findall(body)
        if blocks:
            return {"code": blocks[-1].rstrip("\n")}
        try:
            arguments = json.loads(body)
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict) and isinstance(arguments.get("code"), str):
            return {"code": arguments["code"]}  # the function form, {"code": ...}
        return {"code": body.strip()}
    if name == "simple_browser":
        return _browser_arguments(body)
    if name == "cogview":
        return {"prompt": body.strip()}
    try:
        arguments = json.loads(body)
    except json.JSONDecodeError as err:
        raise ChatFormatError(
            f"tool call {name!r}: arguments are not valid JSON ({err}): {body[:80]!r}") from err
    if not isinstance(arguments, dict):
        raise ChatFormatError(
            f"tool call {name!r}: arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def glm4_call_body(name: str, arguments: Mapping[str, Any]) -> str:
    """The text GLM-4 writes after ``<|assistant|>{name}\\n`` for a call (inverse of
    :func:`glm4_call_arguments`)."""
    if name == "python" and isinstance(arguments.get("code"), str):
        return f"```python\n{arguments['code']}\n```"
    if name == "simple_browser" and arguments.get("action") in _BROWSER_PARAMETERS:
        action = arguments["action"]
        values = [json.dumps(arguments[key], ensure_ascii=False)
                  for key in _BROWSER_PARAMETERS[action][:1] if key in arguments]
        if action == "search" and arguments.get("recency_days") is not None:
            values.append(f"recency_days={json.dumps(arguments['recency_days'])}")
        return f"{action}({', '.join(values)})"
    if name == "cogview" and isinstance(arguments.get("prompt"), str):
        return arguments["prompt"]
    return json.dumps(dict(arguments), ensure_ascii=False)


def _browser_arguments(body: str) -> dict[str, Any]:
    example = 'search("query", recency_days=7), mclick([0, 1]) or open_url("https://...")'
    try:
        call = ast.parse(body.strip(), mode="eval").body
    except SyntaxError:
        call = None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            and call.func.id in _BROWSER_PARAMETERS):
        raise ChatFormatError(f"simple_browser call is not one of {example}: {body[:80]!r}")
    action = call.func.id
    parameters = _BROWSER_PARAMETERS[action]
    try:
        positional = [ast.literal_eval(argument) for argument in call.args]
        keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except ValueError as err:
        raise ChatFormatError(f"simple_browser {action}: arguments must be literals: {body[:80]!r}") from err
    unknown = [key for key in keywords if key not in parameters]
    if len(positional) > len(parameters) or unknown:
        raise ChatFormatError(f"simple_browser {action} takes ({', '.join(parameters)}): {body[:80]!r}")
    return {"action": action, **dict(zip(parameters, positional)), **keywords}


def _parse_glm4(text: str) -> Reply:
    contents, calls = [], []
    for segment in text.split(GLM4_ROLE_TOKENS["assistant"]):
        head, newline, body = segment.partition("\n")
        name = head.strip()
        if not name:
            if segment:
                contents.append(body)
            continue
        if not newline:
            raise ChatFormatError(
                "assistant output is neither a reply (starts with a newline) nor a tool call "
                f"('name' newline arguments): {segment[:80]!r}")
        calls.append(ToolCall(name, glm4_call_arguments(name, body)))
    return Reply("\n".join(contents), calls)


def _parse_tool_call_json(text: str) -> Reply:
    calls = []
    for block in _TOOL_CALL_BLOCK.findall(text):
        excerpt = block.strip()[:80]
        try:
            call = json.loads(block)
        except json.JSONDecodeError as err:
            raise ChatFormatError(f"<tool_call> is not valid JSON ({err}): {excerpt!r}") from err
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise ChatFormatError(f"<tool_call> needs a JSON object with a string 'name': {excerpt!r}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise ChatFormatError(
                    f"tool call {call['name']!r}: arguments are not valid JSON ({err})") from err
        if not isinstance(arguments, dict):
            raise ChatFormatError(f"tool call {call['name']!r}: arguments must be a JSON object")
        calls.append(ToolCall(call["name"], arguments))
    rest = _TOOL_CALL_BLOCK.sub("", text)
    if "<tool_call>" in rest or "</tool_call>" in rest:
        raise ChatFormatError(f"unterminated <tool_call> in the reply: {rest[:80]!r}")
    return Reply(rest.strip() if calls else rest, calls)


# ------------------------------------------------------------------ native messages per dialect


@dataclasses.dataclass(frozen=True)
class _Native:
    """Messages and tools as the template receives them; ``origin[i]`` is the input message that
    native message ``i`` comes from (None for one glmjax added)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    origin: list[int | None]


def _openai_native(messages: list[Mapping[str, Any]], tools: list[Any] | None) -> _Native:
    """Messages for templates that render OpenAI-style tool calls: ``observation`` becomes
    ``tool`` and tool-call arguments become objects."""
    native = []
    for index, message in enumerate(messages):
        role = message_role(message, index)
        converted = dict(message)
        if role == "observation":
            converted["role"] = "tool"
        if role == "assistant" and message.get("tool_calls"):
            _content(message, index, required=False)
            converted["tool_calls"] = [call.to_dict() for call in tool_calls_of(message, index)]
        else:
            _content(message, index, required=True)
        native.append(converted)
    specs = None if tools is None else [function_tool(tool, i) for i, tool in enumerate(tools)]
    return _Native(native, specs, list(range(len(messages))))


def _glm4_native(messages: list[Mapping[str, Any]], tools: list[Any] | None, *,
                 convert_calls: bool, tools_on_system: bool) -> _Native:
    """Messages in GLM-4's own form (module docstring)."""
    if not convert_calls:
        converted = _openai_native(messages, None)
        native, origin = converted.messages, converted.origin
    else:
        native, origin = _glm4_messages(messages)
    specs = None if tools is None else [_glm4_tool(tool, i) for i, tool in enumerate(tools)]
    if specs and tools_on_system:
        holder = next((i for i, m in enumerate(messages) if "tools" in m), None)
        if holder is not None:
            raise ChatFormatError(f"message {holder}: tools are given both on the message and as "
                                  "the conversation's tools")
        return _Native([{"role": "system", "tools": specs}, *native], None, [None, *origin])
    return _Native(native, specs, origin)


def _glm4_messages(messages: list[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[int | None]]:
    native: list[dict[str, Any]] = []
    origin: list[int | None] = []
    index = 0
    while index < len(messages):
        message, role = messages[index], message_role(messages[index], index)
        if role == "assistant" and message.get("tool_calls"):
            calls = tool_calls_of(message, index)
            end = index + 1
            while end < len(messages) and message_role(messages[end], end) in ("tool", "observation"):
                end += 1
            answers = _match_answers(messages, index, calls, list(range(index + 1, end)))
            content = _content(message, index, required=False)
            if content:
                native.append({"role": "assistant", "content": content})
                origin.append(index)
            for call_index, (call, answer) in enumerate(zip(calls, answers)):
                native.append({"role": "assistant", "metadata": call.name,
                               "content": glm4_call_body(call.name, call.arguments)})
                origin.append(index)
                if answer is not None:
                    native.append({"role": "observation",
                                   "content": _content(messages[answer], answer, required=True)})
                    origin.append(answer)
                elif call_index < len(calls) - 1 or end < len(messages):
                    raise ChatFormatError(
                        f"message {index}: tool_calls[{call_index}] has no tool message answering it "
                        "(GLM-4 makes one call per turn, each followed by its result)")
            index = end
            continue
        converted = dict(message)
        if role in ("tool", "observation"):
            converted = {"role": "observation", "content": _content(message, index, required=True)}
        elif not (role == "system" and "tools" in message):
            _content(message, index, required=True)
        native.append(converted)
        origin.append(index)
        index += 1
    for position in range(len(native) - 1):
        if native[position].get("metadata") and native[position + 1]["role"] == "assistant":
            raise ChatFormatError(
                f"message {origin[position]}: a GLM-4 tool call must be followed by its observation, "
                "not by another assistant message")
    return native, origin


def _match_answers(messages: list[Mapping[str, Any]], index: int, calls: list[ToolCall],
                   answers: list[int]) -> list[int | None]:
    """For each call of message ``index``, the tool message answering it (by ``tool_call_id`` when
    every call and answer has one, else in order)."""
    ids = [messages[a].get("tool_call_id") for a in answers]
    if answers and all(ids) and all(call.id for call in calls):
        by_id = dict(zip(ids, answers))
        for answer, call_id in zip(answers, ids):
            if call_id not in {call.id for call in calls}:
                raise ChatFormatError(
                    f"message {answer}: tool_call_id {call_id!r} answers no call of message {index}")
        return [by_id.get(call.id) for call in calls]
    if len(answers) > len(calls):
        raise ChatFormatError(
            f"message {answers[len(calls)]}: tool message answers no call of message {index}")
    return answers + [None] * (len(calls) - len(answers))


# ------------------------------------------------------------------ the format


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of ``token`` if the tokenizer encodes it as exactly that one token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        return None
    return token_id


def _has_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> bool:
    return all(_single_token_id(tokenizer, token) is not None for token in tokens)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ChatFormat:
    """A chat template with the conventions of its tool-call dialect (module docstring).

    Build it with :func:`chat_format_for`.

    Attributes:
      tokenizer: the tokenizer.
      template: the Jinja chat template.
      dialect: ``"glm4"``, ``"tool_call_json"`` or ``"plain"``.
      source: where the template comes from, for messages.
      stop_token_ids: the ids that end an assistant turn.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, dialect: str, source: str):
        self.tokenizer = tokenizer
        self.template = template
        self.dialect = dialect
        self.source = source
        stops = self._stop_tokens()
        ids = [_single_token_id(tokenizer, token) for token in stops]
        missing = [token for token, token_id in zip(stops, ids) if token_id is None]
        if missing:
            raise ChatFormatError(f"the tokenizer has no single-token entry for {missing[0]!r} "
                                  f"(a stop token of the {dialect} chat format)")
        self._stop_strings = stops
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        end = _GLM4_OPEN_TURN_END if dialect == "glm4" else stops[0]
        self._open_turn_end_id = ids[stops.index(end)]
        self._call_end_id = ids[stops.index(GLM4_ROLE_TOKENS["observation"])] if dialect == "glm4" else None
        self._control_tokens = tuple(
            added.content for added in tokenizer.added_tokens_decoder.values()
            if added.special or (added.content in template and not added.content.isspace()))

    @property
    def parses_tool_calls(self) -> bool:
        """Whether :meth:`parse_reply` can find tool calls in this format's replies."""
        return self.dialect != "plain"

    @cached_property
    def renders_tools_argument(self) -> bool:
        """Whether the template renders its ``tools`` argument (glm-4-9b-chat's does not)."""
        probe = [{"role": "user", "content": "x"}]
        tool = {"type": "function", "function": {"name": _PROBE, "parameters": {}}}
        try:
            return _PROBE in self._render(probe, [tool], False)
        except ChatFormatError:
            return True

    def _stop_tokens(self) -> tuple[str, ...]:
        eos = self.tokenizer.eos_token
        if self.dialect == "glm4":
            return GLM4_STOP_TOKENS
        if self.dialect == "tool_call_json":
            return tuple(dict.fromkeys([CHATML_TOKENS[1], *([eos] if eos else [])]))
        specials = [added.content for added in self.tokenizer.added_tokens_decoder.values() if added.special]
        conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self._render(conversation, None, False)
        except ChatFormatError:
            text = ""
        after = text[text.find(_PROBE) + len(_PROBE):] if _PROBE in text else ""
        found = sorted((after.find(token), token) for token in specials if token in after)
        stops = ([found[0][1]] if found else []) + ([eos] if eos else [])
        if not stops:
            raise ChatFormatError(f"{self.source}: cannot tell which token ends an assistant turn "
                                  "(no special token after it, and the tokenizer has no eos token)")
        return tuple(dict.fromkeys(stops))

    # -------------------------------------------------------------- rendering

    def _native(self, messages: Any, tools: Any) -> _Native:
        messages = _checked_messages(messages)
        tools = _checked_tools(tools)
        if self.dialect != "glm4":
            native = _openai_native(messages, tools)
        else:
            native = _glm4_native(
                messages, tools, convert_calls="tool_calls" not in self.template,
                tools_on_system=tools is not None and not self.renders_tools_argument)
        for message, origin in zip(native.messages, native.origin):
            self._check_keys(message, "tools" if origin is None else f"message {origin}")
        for index, tool in enumerate(native.tools or []):
            self._check_keys(tool, f"tools[{index}]")
        return native

    def _check_keys(self, value: Any, where: str) -> None:
        """Refuses dict keys that contain a control token (keys are not sanitized)."""
        if isinstance(value, Mapping):
            for key, item in value.items():
                token = next((t for t in self._control_tokens if isinstance(key, str) and t in key), None)
                if token is not None:
                    raise ChatFormatError(f"{where}: key {key!r} contains the control token {token!r}")
                self._check_keys(item, where)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._check_keys(item, where)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.template,
                add_generation_prompt=add_generation_prompt, tokenize=False)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
            raise ChatFormatError(f"{self.source} failed on this conversation: {_first_line(err)}") from err

    def _ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
             add_generation_prompt: bool) -> list[int]:
        try:
            return list(self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.template,
                add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
                sanitize_control_tokens=True))
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
            raise ChatFormatError(f"{self.source} failed on this conversation: {_first_line(err)}") from err

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
               add_generation_prompt: bool = False) -> str:
        """The conversation as the template renders it (text; content is not marked as data here,
        so use :meth:`prompt_ids` / :meth:`encode` for token ids).

        Raises:
          ChatFormatError: naming the message index and field that is wrong.
        """
        native = self._native(messages, tools)
        return self._render(native.messages, native.tools, add_generation_prompt)

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Any] | None = None) -> list[int]:
        """Token ids of the conversation plus the generation prompt, ready for generation.

        Raises:
          ChatFormatError: naming the message index and field that is wrong.
        """
        native = self._native(messages, tools)
        return self._ids(native.messages, native.tools, True)

    def encode(self, messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Any] | None = None) -> ChatEncoding:
        """Token ids of a whole conversation and its loss mask, for training (module docstring).

        Raises:
          ChatFormatError: naming the message index and field that is wrong, or an assistant
            message the template does not render as a turn of its own.
        """
        native = self._native(messages, tools)
        full = self._ids(native.messages, native.tools, False)
        mask = [0] * len(full)
        for index, message in enumerate(native.messages):
            if message["role"] != "assistant":
                continue
            where = f"message {native.origin[index]}"
            if index == 0:
                raise ChatFormatError(f"{where}: a conversation cannot start with an assistant turn")
            before = self._ids(native.messages[:index], native.tools, True)
            through = self._ids(native.messages[: index + 1], native.tools, False)
            if full[: len(through)] != through:
                raise ChatFormatError(f"{where}: {self.source} renders the turns before this one "
                                      "differently when the conversation goes on")
            start = next((k for k, (a, b) in enumerate(zip(before, through)) if a != b),
                         min(len(before), len(through)))
            if len(through) <= start:
                raise ChatFormatError(f"{where}: {self.source} renders nothing for this assistant message")
            ended = False
            for position in range(start, len(through)):
                mask[position] = 1
                if full[position] in self.stop_token_ids:
                    ended = True
                    break
            if not ended and len(through) < len(full):
                mask[len(through)] = 1
            elif not ended:
                is_call = self._call_end_id is not None and message.get("metadata")
                full.append(self._call_end_id if is_call else self._open_turn_end_id)
                mask.append(1)
        return ChatEncoding(np.asarray(full, np.int32), np.asarray(mask, np.int32))

    # -------------------------------------------------------------- replies

    def parse_reply(self, text: str) -> Reply:
        """Parses one generated assistant turn (the text after the generation prompt; anything
        from the first stop token on is ignored).

        Raises:
          ChatFormatError: a malformed tool call.
        """
        for stop in self._stop_strings:
            text = text.split(stop, 1)[0]
        if self.dialect == "glm4":
            return _parse_glm4(text)
        if self.dialect == "tool_call_json":
            return _parse_tool_call_json(text)
        return Reply(text)


def chat_format_for(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The chat format of ``tokenizer`` (module docstring for the order of choices).

    Raises:
      ChatFormatError: a tokenizer with no template and neither the GLM-4 nor the ChatML special
        tokens, or whose format's stop tokens are not single tokens.
    """
    glm4 = _has_tokens(tokenizer, GLM4_SPECIAL_TOKENS)
    if tokenizer.chat_template:
        try:
            template = tokenizer.get_chat_template()
        except ValueError as err:
            raise ChatFormatError(f"the tokenizer's chat_template: {_first_line(err)}") from err
        dialect = "glm4" if glm4 else "tool_call_json" if "<tool_call>" in template else "plain"
        return ChatFormat(tokenizer, template, dialect, "the tokenizer's chat_template")
    if glm4:
        return ChatFormat(tokenizer, GLM4_CHAT_TEMPLATE, "glm4", "the GLM-4 chat template")
    if _has_tokens(tokenizer, CHATML_TOKENS):
        return ChatFormat(tokenizer, CHATML_CHAT_TEMPLATE, "tool_call_json", "the ChatML chat template")
    raise ChatFormatError(
        "the tokenizer has no chat_template and neither the GLM-4 special tokens "
        f"({', '.join(GLM4_SPECIAL_TOKENS)}) nor ChatML's {' and '.join(CHATML_TOKENS)}; "
        "give it a chat_template")


def render_glm4(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = False) -> str:
    """A conversation rendered with the glm-4-9b-chat template, without a tokenizer (text).

    Raises:
      ChatFormatError: naming the message index and field that is wrong.
    """
    native = _glm4_native(_checked_messages(messages), _checked_tools(tools), convert_calls=True,
                          tools_on_system=True)
    try:
        rendered, _ = render_jinja_template(
            [native.messages], tools=native.tools, chat_template=GLM4_CHAT_TEMPLATE,
            add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as err:
        raise ChatFormatError(f"the GLM-4 chat template failed: {_first_line(err)}") from err
    return rendered[0]


__all__ = [
    "CHATML_TOKENS",
    "EOS",
    "GLM4_BUILTIN_TOOLS",
    "GLM4_ROLE_TOKENS",
    "GLM4_SPECIAL_TOKENS",
    "GLM4_STOP_TOKENS",
    "GMASK",
    "ROLES",
    "SOP",
    "ChatEncoding",
    "ChatFormat",
    "ChatFormatError",
    "Reply",
    "ToolCall",
    "chat_format_for",
    "function_tool",
    "glm4_call_arguments",
    "glm4_call_body",
    "message_role",
    "render_glm4",
    "tool_calls_of",
    "tool_message",
]
