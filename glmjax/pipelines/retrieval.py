"""Chunking a long context and retrieving its chunks for a query (LongCite's CoF, LongReward).

* **Chunks** (:func:`chunk_spans`, :func:`chunk_text`): the context cut into consecutive pieces of
  ``chunk_tokens`` tokens each (the last one shorter), as LongCite's CoF does (128 GLM-4 tokens;
  the windows do not follow sentence boundaries). The pieces cover the context exactly: chunk
  ``c`` runs from the first character of its first token to the first character of the next
  chunk's first token (so whitespace between tokens stays with the chunk before it), and the
  chunks joined give the context back. Tokens are those of a Hugging Face *fast* tokenizer when one
  is given (its offset mapping places them), else :func:`count_tokens`'s: each CJK character
  (Han, kana, hangul) is one token, each run of other letters/digits is one, and every other
  non-space character (punctuation, symbols) is one -- about one token per English word, close to
  how BPE tokenizers count Chinese.
* **Sentences of chunks** (:func:`sentences_of_chunks`): which of the context's sentences
  (their spans: ``glmjax.evals.longcite.sentence_spans``) each chunk overlaps, so that a
  chunk-level citation can be refined to sentences (CoF stage 3).
* **Retrievers**: :class:`BM25Retriever` (lexical, the ``bm25s`` library; the default) and
  :class:`EmbeddingRetriever` (cosine similarity of embeddings from any embedder: an
  ``/v1/embeddings`` endpoint, ``glmjax.inference.embeddings_client``, or the local
  :class:`WordLlamaEmbedder`). Both return chunk indices, best first.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Span = tuple[int, int]
"""A character span ``[start, end)`` of the context."""

Embedder = Callable[[list[str]], np.ndarray]
"""``embed(texts) -> float array [len(texts), dim]``: one embedding per text."""

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+|[^\s]")
_WORD = re.compile(rf"(?:(?![{_CJK}])[^\W_])+|[{_CJK}]+")
_CJK_RUN = re.compile(rf"[{_CJK}]+")


class RetrievalError(ValueError):
    """Retrieval inputs that cannot work (an empty corpus, embeddings of the wrong shape, ...)."""


class EmbedderUnavailable(RuntimeError):
    """A local embedding model whose package is not installed (the message says what to install)."""


def _token_starts(text: str, tokenizer: Any | None) -> list[int]:
    """The character offset where each token of ``text`` starts (non-decreasing)."""
    if tokenizer is None:
        return [match.start() for match in _TOKEN.finditer(text)]
    if not getattr(tokenizer, "is_fast", False):
        raise RetrievalError("chunking by a tokenizer needs a fast Hugging Face tokenizer (its offset "
                             f"mapping places the tokens); got {type(tokenizer).__name__}")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [start for start, end in encoded["offset_mapping"] if end > start]


def count_tokens(text: str, tokenizer: Any | None = None) -> int:
    """Tokens of ``text``: ``tokenizer``'s (without special tokens), or the count in the module
    docstring (a CJK character, a run of other letters/digits, or another non-space character)."""
    if tokenizer is None:
        return sum(1 for _ in _TOKEN.finditer(text))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_spans(text: str, chunk_tokens: int = 128, tokenizer: Any | None = None) -> list[Span]:
    """The character spans of ``text``'s chunks of ``chunk_tokens`` tokens (module docstring).

    Returns:
      Consecutive spans covering ``text`` from 0 to ``len(text)``; ``[]`` for a text that is empty
      or only whitespace. A text with fewer than ``chunk_tokens`` tokens is one chunk.

    Raises:
      RetrievalError: ``chunk_tokens < 1``, or a tokenizer that is not a fast one.
    """
    if chunk_tokens < 1:
        raise RetrievalError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not text.strip():
        return []
    starts = _token_starts(text, tokenizer)
    boundaries = [0]
    for start in starts[chunk_tokens::chunk_tokens]:
        if start > boundaries[-1]:  # several tokens of one character (byte-level BPE) never split it
            boundaries.append(start)
    return list(zip(boundaries, [*boundaries[1:], len(text)]))


def chunk_text(text: str, chunk_tokens: int = 128, tokenizer: Any | None = None) -> list[str]:
    """``text`` cut into chunks of about ``chunk_tokens`` tokens (:func:`chunk_spans`); joined, the
    chunks are ``text``."""
    return [text[start:end] for start, end in chunk_spans(text, chunk_tokens, tokenizer)]


def sentences_of_chunks(chunks: Sequence[Span], sentences: Sequence[Span]) -> list[list[int]]:
    """For each chunk span, the ids of the sentence spans it overlaps (a sentence across a chunk
    boundary belongs to both chunks), ascending."""
    starts = np.asarray([start for start, _ in sentences], np.int64)
    ends = np.asarray([end for _, end in sentences], np.int64)
    return [np.flatnonzero((starts < end) & (ends > start)).tolist() for start, end in chunks]


def lexical_terms(text: str) -> list[str]:
    """The BM25 terms of ``text``: lower-cased words that are not English or Chinese stopwords,
    and for each run of CJK characters its characters and its character bigrams (Chinese has no
    spaces between words)."""
    stopwords = _stopwords()
    terms = []
    for match in _WORD.finditer(text.lower()):
        word = match.group()
        if _CJK_RUN.fullmatch(word):
            terms.extend(c for c in word if c not in stopwords)
            terms.extend(word[i:i + 2] for i in range(len(word) - 1))
        elif word not in stopwords:
            terms.append(word)
    return terms


@functools.cache
def _stopwords() -> frozenset[str]:
    """bm25s's English and Chinese stopword lists (imported on use: see :class:`BM25Retriever`)."""
    from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN

    return frozenset((*STOPWORDS_EN, *STOPWORDS_CHINESE))


class Retriever(Protocol):
    """Ranks the chunks it was built on for a query."""

    def search(self, query: str, k: int) -> list[int]:
        """At most ``k`` chunk indices, best first."""

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """:meth:`search` of each query."""


@functools.cache
def _inherit_bm25s_log_level() -> None:
    """bm25s sets its logger to DEBUG when imported (a line per index built); leave the level to
    the application's logging configuration instead."""
    logging.getLogger("bm25s").setLevel(logging.NOTSET)


def _top_k(scores: np.ndarray, k: int, keep: np.ndarray | None = None) -> list[int]:
    """Indices of the ``k`` highest ``scores`` (ties: the lower index first), among ``keep``."""
    order = np.argsort(-scores, kind="stable")
    if keep is not None:
        order = order[keep[order]]
    return order[:max(k, 0)].tolist()


class BM25Retriever:
    """BM25 (the ``bm25s`` library; Lucene's variant, without the ``(k1 + 1)`` factor) over
    ``chunks``, with :func:`lexical_terms` as the analyser.

    Args:
      chunks: the texts to rank (at least one).
      k1, b: the BM25 parameters.

    Raises:
      RetrievalError: no chunks.
    """

    def __init__(self, chunks: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        if not chunks:
            raise RetrievalError("BM25Retriever needs at least one chunk")
        # Imported here, not with this module: importing bm25s runs a JAX op (its top-k probe),
        # which would initialize JAX's backends before a program can configure them.
        import bm25s

        _inherit_bm25s_log_level()
        self.chunks = list(chunks)
        corpus = [lexical_terms(chunk) for chunk in self.chunks]
        self._empty = not any(corpus)
        self._bm25 = bm25s.BM25(k1=k1, b=b)
        if not self._empty:
            self._bm25.index(corpus, show_progress=False)

    def __len__(self) -> int:
        return len(self.chunks)

    def scores(self, query: str, weights: np.ndarray | None = None) -> np.ndarray:
        """The BM25 score of every chunk for ``query`` (float32 ``[len(chunks)]``; 0 for a chunk
        sharing no term with it), each multiplied by ``weights`` when given."""
        terms = [] if self._empty else [t for t in lexical_terms(query) if t in self._bm25.vocab_dict]
        if not terms:
            return np.zeros(len(self.chunks), np.float32)
        mask = None if weights is None else np.asarray(weights, np.float32)
        return np.asarray(self._bm25.get_scores(terms, weight_mask=mask), np.float32)

    def search(self, query: str, k: int, *, weights: np.ndarray | None = None) -> list[int]:
        """At most ``k`` chunk indices by BM25 score, best first (ties: earlier chunk first); chunks
        that share no term with ``query`` (or have weight 0) are left out."""
        scores = self.scores(query, weights)
        return _top_k(scores, k, scores > 0)

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[int]]:
        return [self.search(query, k) for query in queries]


def _unit_rows(matrix: Any, rows: int, what: str) -> np.ndarray:
    """``matrix`` checked to be finite ``[rows, dim]`` floats, each row scaled to norm 1 (a zero
    row stays zero: it matches nothing)."""
    array = np.asarray(matrix, np.float64)
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
        raise RetrievalError(f"the embedder returned shape {array.shape} for {rows} {what}, "
                             f"expected [{rows}, dim]")
    if not np.isfinite(array).all():
        raise RetrievalError(f"the embedder returned non-finite values for the {what}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0)


class EmbeddingRetriever:
    """Dense retrieval: chunks ranked by the cosine similarity of their embeddings to the query's.

    Args:
      chunks: the texts to rank (at least one); embedded once, here, in one ``embed`` call.
      embed: the embedder (:data:`Embedder`); queries are embedded with the same function.

    Raises:
      RetrievalError: no chunks, or embeddings that are not ``[len(chunks), dim]`` finite numbers.
    """

    def __init__(self, chunks: Sequence[str], embed: Embedder) -> None:
        if not chunks:
            raise RetrievalError("EmbeddingRetriever needs at least one chunk")
        self.chunks = list(chunks)
        self.embed = embed
        self.vectors = _unit_rows(embed(self.chunks), len(self.chunks), "chunks")

    def __len__(self) -> int:
        return len(self.chunks)

    def similarities(self, queries: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each query to each chunk: ``[len(queries), len(chunks)]``."""
        queries = list(queries)
        vectors = _unit_rows(self.embed(queries), len(queries), "queries")
        if vectors.shape[1] != self.vectors.shape[1]:
            raise RetrievalError(f"query embeddings have dimension {vectors.shape[1]}, the chunks' "
                                 f"{self.vectors.shape[1]}")
        return vectors @ self.vectors.T

    def search(self, query: str, k: int) -> list[int]:
        """The ``k`` chunks most similar to ``query``, best first (ties: earlier chunk first)."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """:meth:`search` of each query, the queries embedded in one call."""
        if not queries:
            return []
        return [_top_k(row, k) for row in self.similarities(queries)]


class WordLlamaEmbedder:
    """A local sentence-embedding model: WordLlama's ``l2_supercat`` (token embeddings distilled
    from LLMs, mean-pooled; 256 dimensions by default), whose weights and tokenizer ship inside the
    ``wordllama`` wheel (``pip install 'wordllama>=0.4'``); nothing is downloaded.

    Args:
      dim: embedding size (64, 128, 256, 512 or 1024 are the model's truncations; only the shipped
        256-dimensional weights load without a download, and smaller ones truncate them).

    Raises:
      EmbedderUnavailable: ``wordllama`` is not installed, or its shipped files are missing.
    """

    def __init__(self, dim: int = 256) -> None:
        try:
            import wordllama
        except ImportError:
            raise EmbedderUnavailable("the local embedding model needs the 'wordllama' package "
                                      "(pip install 'wordllama>=0.4'), or use --retriever=bm25 or an "
                                      "/v1/embeddings endpoint") from None
        package = Path(wordllama.__file__).parent
        try:
            # The package directory holds weights/ and tokenizers/: the loader finds both there,
            # and disable_download makes a missing file an error instead of a hub download.
            self._model = wordllama.WordLlama.load(cache_dir=package, dim=256,
                                                   trunc_dim=None if dim == 256 else dim,
                                                   disable_download=True)
        except FileNotFoundError as err:
            raise EmbedderUnavailable(f"wordllama's shipped model files are missing ({err})") from None
        self.dim = dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32 embeddings."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._model.embed(list(texts)), np.float32)
