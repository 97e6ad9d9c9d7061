"""Tests for the tool registry: specs, invocation and error observations."""

import json

import pytest

from glmjax.inference.tools import ToolRegistry, ToolSpec


def _weather_registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.register
    def get_weather(city: str, days: int = 1) -> dict:
        """Forecast for a city.

        Longer explanation that is not part of the description.
        """
        return {"city": city, "days": days, "forecast": "sunny"}

    return registry


def test_specs_are_inferred_from_signature_and_docstring():
    registry = _weather_registry()
    assert registry.names == ["get_weather"]
    assert "get_weather" in registry
    assert registry.specs() == [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }]


def test_explicit_spec_and_string_results():
    registry = ToolRegistry()
    parameters = {
        "type": "object",
        "properties": {"unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["unit"],
    }
    registry.register(lambda unit: f"20 {unit}", name="temperature", description="Now.",
                      parameters=parameters)
    assert registry.spec("temperature") == ToolSpec("temperature", "Now.", parameters)
    assert registry.call("temperature", {"unit": "C"}) == "20 C"
    assert registry.call("temperature", '{"unit": "F"}') == "20 F"
    error = registry.call("temperature", {"unit": "K"})
    assert error.startswith("Error: bad arguments for tool 'temperature'") and "'C', 'F'" in error


def test_non_string_results_are_json():
    registry = _weather_registry()
    observation = registry.call("get_weather", {"city": "Zürich", "days": 3})
    assert json.loads(observation) == {"city": "Zürich", "days": 3, "forecast": "sunny"}
    assert "Zürich" in observation  # Not ASCII-escaped: the model reads it.


def test_registration_errors():
    registry = _weather_registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(lambda city: city, name="get_weather")
    with pytest.raises(ValueError, match="type 'object'"):
        registry.register(lambda x: x, name="bad", parameters={"type": "string"})


def test_unknown_tool():
    observation = _weather_registry().call("get_stock_price", {"symbol": "X"})
    assert observation == ("Error: unknown tool 'get_stock_price'; "
                           "available tools: get_weather")


@pytest.mark.parametrize("arguments, message", [
    ({}, "missing required argument(s): city"),
    ({"city": "Paris", "country": "FR"}, "unknown argument(s): country (expected: city, days)"),
    ({"city": 3}, "argument 'city' must be of type string, got int 3"),
    ({"city": "Paris", "days": True}, "argument 'days' must be of type integer, got bool True"),
    ({"city": "Paris", "days": 1.5}, "must be of type integer"),
    (["Paris"], "expected a JSON object, got list"),
    ('{"city": ', "are not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_bad_arguments_are_reported(arguments, message):
    observation = _weather_registry().call("get_weather", arguments)
    assert observation.startswith("Error: ")
    assert message in observation


def test_empty_arguments_for_a_tool_without_parameters():
    registry = ToolRegistry()
    registry.register(lambda: "pong", name="ping")
    assert registry.call("ping", None) == "pong"
    assert registry.call("ping", "") == "pong"
    assert registry.call("ping", {}) == "pong"


def test_exceptions_in_tools_become_observations():
    registry = ToolRegistry()

    @registry.register
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    @registry.register
    def leave() -> None:
        """Calls sys.exit."""
        raise SystemExit(3)

    assert registry.call("divide", {"a": 1, "b": 4}) == "0.25"
    assert registry.call("divide", {"a": 1, "b": 0}) == (
        "Error: tool 'divide' raised ZeroDivisionError: division by zero")
    assert registry.call("leave", {}) == "Error: tool 'leave' raised SystemExit: 3"


def test_additional_properties_allowed_when_declared():
    registry = ToolRegistry()
    registry.register(lambda **kwargs: sorted(kwargs), name="collect", description="",
                      parameters={"type": "object", "properties": {"a": {"type": "integer"}},
                                  "additionalProperties": True})
    assert registry.call("collect", {"a": 1, "b": 2}) == '["a", "b"]'


def test_glm4_all_tools_names_are_builtins_and_cogview_is_refused():
    registry = ToolRegistry()
    registry.register(lambda code: code, name="python", description="Runs Python.",
                      parameters={"type": "object", "properties": {"code": {"type": "string"}}})
    assert registry.spec("python").kind == "python"
    assert registry.specs()[0]["type"] == "python" and registry.specs()[0]["function"]["name"] == "python"
    with pytest.raises(ValueError, match="cogview \\(image generation\\) is not available: glmjax serves no image"):
        registry.register(lambda prompt: prompt, name="cogview")
