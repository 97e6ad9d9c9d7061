"""The GLM-4 All Tools set: ``python`` (the sandboxed interpreter) and ``simple_browser``.

GLM-4 chat models are trained on these tools in a fixed form (the glm-4-9b-chat template lists them
with fixed descriptions; calls use their own syntax, see ``glmjax.data.chat_format``). glmjax serves
``python`` with :class:`~glmjax.inference.python_tool.PythonInterpreter` and ``simple_browser`` with
:class:`~glmjax.inference.browser.SimpleBrowser` over a local document index (by default) or a
search HTTP API. ``cogview`` (image generation) is refused: glmjax serves no image model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from glmjax.inference.browser import LocalDocumentIndex, SearchBackend, SimpleBrowser, register_browser_tool
from glmjax.inference.python_tool import PythonInterpreter, register_python_tool
from glmjax.inference.tools import ToolRegistry

ALL_TOOLS = ("python", "simple_browser")


def register_all_tools(
    registry: ToolRegistry,
    names: Sequence[str] = ALL_TOOLS,
    *,
    documents: Sequence[str | os.PathLike] = (),
    search_backend: SearchBackend | None = None,
    interpreter: PythonInterpreter | None = None,
) -> ToolRegistry:
    """Registers the named GLM-4 All Tools in ``registry``.

    Args:
      registry: where to register them.
      names: tools to register, from :data:`ALL_TOOLS`.
      documents: files and directories the browser's local index covers (used when no
        ``search_backend`` is given).
      search_backend: the browser's backend (e.g. ``HTTPSearchBackend``) instead of a local index.
      interpreter: the Python sandbox (default ``PythonInterpreter()``).

    Returns:
      ``registry``.

    Raises:
      ValueError: ``cogview`` or an unknown name, or ``simple_browser`` with neither documents
        nor a search backend (or documents that cannot be indexed).
    """
    for name in names:
        if name == "python":
            register_python_tool(registry, interpreter)
        elif name == "simple_browser":
            if search_backend is None and not documents:
                raise ValueError("simple_browser needs documents to index (files or directories) "
                                 "or a search backend")
            backend = search_backend or LocalDocumentIndex(documents)
            register_browser_tool(registry, SimpleBrowser(backend))
        elif name == "cogview":
            raise ValueError("cogview (image generation) is not available: glmjax serves no image "
                             f"model (GLM-4 All Tools available: {', '.join(ALL_TOOLS)})")
        else:
            raise ValueError(f"unknown tool {name!r} (GLM-4 All Tools available: {', '.join(ALL_TOOLS)})")
    return registry
