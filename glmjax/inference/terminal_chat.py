"""A chat on the terminal with a local model, optionally with GLM-4's All Tools."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from transformers import PreTrainedTokenizerBase

from glmjax.inference.all_tools import register_all_tools
from glmjax.inference.chat import ChatSession
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import SamplingParams
from glmjax.inference.local_client import LocalEngineClient
from glmjax.inference.tools import ToolRegistry


def run_interactive(engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase, *, sampling: SamplingParams,
                    tools: Sequence[str], system: str | None, max_turns: int,
                    documents: Sequence[str] = (), stdin: TextIO = sys.stdin,
                    stdout: TextIO = sys.stdout) -> None:
    """A terminal chat on ``stdin``/``stdout``; tool calls and observations are shown as they happen.
    Only the conversation goes to ``stdout``. Commands: ``/reset`` (new conversation), ``/exit``.

    ``tools`` names GLM-4 All Tools (``python``, ``simple_browser`` over a local index of
    ``documents``; ``glmjax.inference.all_tools``).

    Raises:
      ValueError: an unknown or refused tool name, or ``simple_browser`` without documents.
    """
    registry = register_all_tools(ToolRegistry(), tools, documents=documents) if tools else None

    def show(_: int, message: dict[str, Any]) -> None:
        if message.get("tool_calls"):
            call = message["tool_calls"][0]["function"]
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            print(f"[tool call] {call['name']} {arguments}", file=stdout)
        elif message["role"] in ("tool", "observation"):
            print(f"[observation] {message['content']}", file=stdout)
        else:
            print(f"assistant> {message['content']}", file=stdout)

    session = ChatSession(LocalEngineClient(engine, tokenizer), tools=registry, system=system,
                          sampling=sampling, max_turns=max_turns, on_message=show)
    print("Chat: /reset starts over, /exit quits.", file=stdout, flush=True)
    while True:
        print("user> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if line.strip():
            result = session.send(line.rstrip("\n"))
            if result.finish_reason != "answer":
                print(f"[{result.finish_reason}] {result.error or ''}".rstrip(), file=stdout)
        stdout.flush()
