"""Flags, gin parsing, retrievers and set-up shared by the launch entrypoints (train, generate, serve, pipeline, evaluate, apfed)."""

from __future__ import annotations

import os
import re
import tokenize
from collections.abc import Callable, Sequence

import gin
import jax
from absl import app, flags, logging

from glmjax.inference.embeddings_client import EmbeddingsClient
from glmjax.pipelines.retrieval import BM25Retriever, EmbeddingRetriever, Retriever, WordLlamaEmbedder

COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() from the environment.")


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the flags (or the environment with ``--distributed``)."""
    if COORDINATOR.value:
        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    elif DISTRIBUTED.value:
        jax.distributed.initialize()


def quiet_library_logs() -> None:
    """Library INFO logs (orbax's) drown progress lines and chats; keep warnings unless the user
    asked for a verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


RETRIEVERS = ("bm25", "embeddings", "wordllama")
"""Chunk retrievers a command line can name: BM25, an ``/v1/embeddings`` endpoint, the local WordLlama."""


def retriever_factory(kind: str, *, base_url: str | None, model: str | None, api_key_env: str | None,
                      timeout_s: float) -> Callable[[Sequence[str]], Retriever]:
    """``chunks -> retriever`` for ``kind`` (one of :data:`RETRIEVERS`); an embedder is built once,
    here (``base_url``, ``model``, ``api_key_env``, ``timeout_s``: the endpoint's, for "embeddings").

    Raises:
      ValueError: "embeddings" without a model or base URL; an unknown kind.
      glmjax.pipelines.retrieval.EmbedderUnavailable: "wordllama" without its package.
    """
    if kind == "bm25":
        return BM25Retriever
    if kind == "wordllama":
        embed = WordLlamaEmbedder()
    elif kind == "embeddings":
        if not model:
            raise ValueError("the embeddings retriever needs --embeddings_model")
        if not base_url:
            raise ValueError("the embeddings retriever needs --embeddings_base_url (or --base_url)")
        embed = EmbeddingsClient(base_url, model, api_key_env=api_key_env, timeout_s=timeout_s)
    else:
        raise ValueError(f"unknown retriever {kind!r}, expected one of {', '.join(RETRIEVERS)}")
    return lambda chunks: EmbeddingRetriever(chunks, embed)


# ----------------------------------------------------------------------------------------- gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GIN_FLAG_PREFIX = "--gin."
_UNSET_MACRO = re.compile(r"No bindings specified for '([^'/]+)/gin\.macro'")


class GinConfigError(ValueError):
    """A gin file or binding that does not parse (the message names the file and line, or the binding)."""


def split_gin_shorthand(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--gin.NAME=VALUE`` arguments (returned as bindings ``NAME = VALUE``) from the rest."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith(_GIN_FLAG_PREFIX):
            name, sep, value = arg[len(_GIN_FLAG_PREFIX):].partition("=")
            if not sep:
                raise app.UsageError(f"{arg}: expected --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return rest, bindings


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a tokenizer error as ``line N: message``)."""
    if isinstance(err, tokenize.TokenError) and len(err.args) == 2:
        message, (line, _) = err.args
        return f"line {line}: {message}"
    return "; ".join(part.strip() for part in str(err).splitlines() if part.strip())


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Parses gin files (searched relative to the repository too) and then bindings, in order.

    Raises:
      GinConfigError: naming the file (and line) or the binding that failed, or a %MACRO used but
        never bound.
    """
    gin.add_config_file_search_path(REPO_ROOT)
    for file in files:
        try:
            gin.parse_config_file(file)
        except Exception as err:  # gin raises ValueError, SyntaxError, TokenError, IOError, ...
            raise GinConfigError(f"{file}: {one_line(err)}") from err
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as err:
            raise GinConfigError(f"binding {binding!r}: {one_line(err)}") from err
    try:
        gin.finalize()  # checks that every %MACRO used is bound
    except ValueError as err:
        unset = _UNSET_MACRO.match(str(err))
        if unset is None:
            raise GinConfigError(one_line(err)) from err
        raise GinConfigError(f"macro {unset.group(1)} is used but not set: bind it in a gin file or "
                             f"give --gin.{unset.group(1)}=VALUE") from err
