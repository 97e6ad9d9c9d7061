"""A registry of tools (Python callables) that a tool-calling model may invoke.

Each tool has a JSON-schema-like spec (name, description, parameters) that is
rendered into the system prompt, and :meth:`ToolRegistry.call` turns a parsed
tool call into an observation string.  A tool registered as ``python`` or
``simple_browser`` is a GLM-4 All Tools built-in (its spec's ``type`` says so):
GLM-4 models are offered it in the official All Tools form (fixed description,
native call syntax), other models as the function it is.  ``cogview`` (image
generation) is refused: glmjax serves no image model.  ``call`` never raises for anything the
model can get wrong (unknown tool, malformed or mistyped arguments, a tool that
raises): it returns an observation starting with ``"Error: "`` instead, so a
chat loop can hand it back to the model and continue.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Callable, Mapping, get_type_hints

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
_PYTHON_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean",
                   list: "array", dict: "object"}
BUILTIN_KINDS = ("python", "simple_browser")
"""GLM-4 All Tools built-ins a registry can hold: a tool registered under one of these names has
that kind."""


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """Name, description and JSON-schema parameters of a tool, and its kind: ``"function"``, or a
    GLM-4 All Tools built-in (:data:`BUILTIN_KINDS`)."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    kind: str = "function"

    def to_dict(self) -> dict[str, Any]:
        """The spec in the OpenAI / Hugging Face function-tool format; a built-in's ``type`` is its
        kind (``{"type": "python", "function": {...}}``), which GLM-4's template lists as the
        built-in and ``glmjax.data.chat_format.function_tool`` turns back into a function."""
        return {
            "type": self.kind,
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclasses.dataclass(frozen=True)
class _Tool:
    spec: ToolSpec
    function: Callable[..., Any]


class ToolRegistry:
    """Named tools, their specs, and error-tolerant invocation."""

    def __init__(self) -> None:
        self._tools: dict[str, _Tool] = {}

    def register(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        """Register ``function`` as a tool; usable directly or as a decorator.

        Args:
          function: the callable; it receives the arguments as keyword arguments.
          name: tool name (default: ``function.__name__``); ``python`` and
            ``simple_browser`` register GLM-4 All Tools built-ins, ``cogview`` is refused.
          description: what the tool does (default: the docstring's first paragraph).
          parameters: JSON schema of an object (``{"type": "object", "properties":
            ..., "required": [...]}``); by default inferred from the signature,
            where ``str``/``int``/``float``/``bool``/``list``/``dict`` annotations
            become JSON types and parameters without defaults are required.

        Returns:
          ``function`` (or, without it, a decorator that registers and returns it).

        Raises:
          ValueError: no name can be inferred, the name is taken or is ``cogview``, or the
            parameters are not an object schema.
        """
        if function is None:
            return lambda f: self.register(f, name=name, description=description,
                                           parameters=parameters)
        tool_name = name or getattr(function, "__name__", None)
        if not tool_name:
            raise ValueError(f"cannot infer a tool name for {function!r}; pass name=")
        if tool_name == "cogview":
            raise ValueError("cogview (image generation) is not available: glmjax serves no image "
                             "model; the GLM-4 All Tools it offers are python and simple_browser")
        if tool_name in self._tools:
            raise ValueError(f"a tool named {tool_name!r} is already registered")
        if description is None:
            description = (inspect.getdoc(function) or "").split("\n\n")[0].strip()
        if parameters is None:
            parameters = _infer_parameters(function)
        elif parameters.get("type") != "object":
            raise ValueError(f"parameters of tool {tool_name!r} must be a JSON schema of "
                             f"type 'object', got {parameters!r}")
        kind = tool_name if tool_name in BUILTIN_KINDS else "function"
        self._tools[tool_name] = _Tool(ToolSpec(tool_name, description, parameters, kind), function)
        return function

    @property
    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def spec(self, name: str) -> ToolSpec:
        """The spec of tool ``name`` (``KeyError`` if unknown)."""
        return self._tools[name].spec

    def specs(self) -> list[dict[str, Any]]:
        """All specs (:meth:`ToolSpec.to_dict`), for rendering into a system prompt."""
        return [tool.spec.to_dict() for tool in self._tools.values()]

    def call(self, name: str, arguments: Mapping[str, Any] | str | None) -> str:
        """Run tool ``name`` with ``arguments`` and return the observation text.

        ``arguments`` may be a mapping or its JSON text (as a model writes it).
        Results that are not strings are serialised to JSON.  Problems come back
        as observations beginning with ``"Error: "``; only ``KeyboardInterrupt``
        and similar host signals propagate.
        """
        tool = self._tools.get(name)
        if tool is None:
            available = ", ".join(self._tools) or "none"
            return f"Error: unknown tool {name!r}; available tools: {available}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                return f"Error: arguments for tool {name!r} are not valid JSON: {error}"
        if arguments is None:
            arguments = {}
        problem = _validate(arguments, tool.spec.parameters)
        if problem is not None:
            return f"Error: bad arguments for tool {name!r}: {problem}"
        try:
            result = tool.function(**arguments)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - reported to the model
            return f"Error: tool {name!r} raised {type(error).__name__}: {error}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(result)


def _infer_parameters(function: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema for ``function``'s keyword-callable parameters."""
    signature = inspect.signature(function)
    try:
        hints = get_type_hints(function)
    except (NameError, TypeError):
        hints = {}
    properties: dict[str, Any] = {}
    required = []
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD,
                              parameter.POSITIONAL_ONLY):
            continue
        json_type = _PYTHON_TO_JSON.get(hints.get(parameter.name))
        properties[parameter.name] = {"type": json_type} if json_type else {}
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    return {"type": "object", "properties": properties, "required": required}


def _validate(arguments: Any, schema: Mapping[str, Any]) -> str | None:
    """Check the top level of ``arguments`` against an object schema; return the problem."""
    if not isinstance(arguments, Mapping):
        return f"expected a JSON object, got {type(arguments).__name__}"
    properties: Mapping[str, Any] = schema.get("properties", {})
    missing = [key for key in schema.get("required", []) if key not in arguments]
    if missing:
        return f"missing required argument(s): {', '.join(missing)}"
    # Arguments the schema does not list are rejected unless it allows them explicitly.
    if not schema.get("additionalProperties", not properties):
        unknown = [key for key in arguments if key not in properties]
        if unknown:
            expected = ", ".join(properties) or "none"
            return f"unknown argument(s): {', '.join(unknown)} (expected: {expected})"
    for key, value in arguments.items():
        problem = _check_value(value, properties.get(key, {}))
        if problem is not None:
            return f"argument {key!r} {problem}"
    return None


def _check_value(value: Any, schema: Mapping[str, Any]) -> str | None:
    if "enum" in schema and value not in schema["enum"]:
        return f"must be one of {schema['enum']!r}, got {value!r}"
    declared = schema.get("type")
    if declared is None:
        return None
    names = [declared] if isinstance(declared, str) else list(declared)
    for type_name in names:
        python_types = _JSON_TYPES.get(type_name)
        if python_types is None:
            return None  # A type this validator does not know: leave it to the tool.
        is_bool = isinstance(value, bool)
        if isinstance(value, python_types) and (type_name == "boolean" or not is_bool):
            return None
    return f"must be of type {' or '.join(names)}, got {type(value).__name__} {value!r}"
