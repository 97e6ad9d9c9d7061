"""Inference: tools, the sandboxed Python interpreter and LLM clients."""

from glmjax.inference.llm_client import (
    LLMClient,
    LLMClientError,
    LLMConnectionError,
    LLMHTTPError,
    LLMResponseError,
    OpenAIHTTPClient,
    SamplingParams,
)
from glmjax.inference.python_tool import (
    ExecutionResult,
    PythonInterpreter,
    SandboxLimits,
    register_python_tool,
)
from glmjax.inference.tools import ToolRegistry, ToolSpec

__all__ = [
    "ExecutionResult",
    "LLMClient",
    "LLMClientError",
    "LLMConnectionError",
    "LLMHTTPError",
    "LLMResponseError",
    "OpenAIHTTPClient",
    "PythonInterpreter",
    "SamplingParams",
    "SandboxLimits",
    "ToolRegistry",
    "ToolSpec",
    "register_python_tool",
]
