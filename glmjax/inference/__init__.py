"""Inference: generation engine, sampling, chat and tool-calling loop, tools (the GLM-4 All Tools:
the sandboxed Python interpreter and the simple_browser), and LLM clients."""

from glmjax.inference.all_tools import ALL_TOOLS, register_all_tools
from glmjax.inference.browser import (
    BrowserError,
    HTTPSearchBackend,
    LocalDocumentIndex,
    SearchBackend,
    SimpleBrowser,
    register_browser_tool,
)
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
    "ALL_TOOLS",
    "AssistantTurn",
    "BrowserError",
    "ChatResult",
    "ChatSession",
    "ExecutionResult",
    "GenerationEngine",
    "GenerationResult",
    "HTTPSearchBackend",
    "LLMClient",
    "LLMClientError",
    "LLMConnectionError",
    "LLMHTTPError",
    "LLMResponseError",
    "LocalDocumentIndex",
    "LocalEngineClient",
    "OpenAIHTTPClient",
    "PythonInterpreter",
    "SamplingConfig",
    "SamplingParams",
    "SandboxLimits",
    "SearchBackend",
    "SimpleBrowser",
    "ToolRegistry",
    "ToolSpec",
    "register_all_tools",
    "register_browser_tool",
    "register_python_tool",
    "run_chat",
    "run_chats",
]
