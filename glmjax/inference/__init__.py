"""Inference: generation engine, sampling, chat and tool-calling loop, tools, the sandboxed Python
interpreter and LLM clients."""

from glmjax.inference.chat import ChatResult, ChatSession, run_chat, run_chats
from glmjax.inference.engine import GenerationEngine, GenerationResult
from glmjax.inference.llm_client import (
    AssistantTurn,
    LLMClient,
    LLMClientError,
    LLMConnectionError,
    LLMHTTPError,
    LLMResponseError,
    OpenAIHTTPClient,
    SamplingParams,
)
from glmjax.inference.local_client import LocalEngineClient
from glmjax.inference.python_tool import (
    ExecutionResult,
    PythonInterpreter,
    SandboxLimits,
    register_python_tool,
)
from glmjax.inference.sampling import SamplingConfig
from glmjax.inference.tools import ToolRegistry, ToolSpec

__all__ = [
    "AssistantTurn",
    "ChatResult",
    "ChatSession",
    "ExecutionResult",
    "GenerationEngine",
    "GenerationResult",
    "LLMClient",
    "LLMClientError",
    "LLMConnectionError",
    "LLMHTTPError",
    "LLMResponseError",
    "LocalEngineClient",
    "OpenAIHTTPClient",
    "PythonInterpreter",
    "SamplingConfig",
    "SamplingParams",
    "SandboxLimits",
    "ToolRegistry",
    "ToolSpec",
    "register_python_tool",
    "run_chat",
    "run_chats",
]
