"""Flags and set-up shared by the launch entrypoints (train, generate, serve, pipeline, evaluate)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from absl import flags, logging

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
