"""Chunking, sentence mapping and retrieval (glmjax.pipelines.retrieval), and the /v1/embeddings
client (glmjax.inference.embeddings_client) against the fake OpenAI server."""

import math
import sys

import numpy as np
import pytest

from glmjax.data.tokenizer import default_tokenizer
from glmjax.evals.longcite import sentence_spans, split_sentences
from glmjax.inference.embeddings_client import EmbeddingsClient
from glmjax.inference.llm_client import LLMClientError, LLMHTTPError, LLMResponseError
from glmjax.pipelines.retrieval import (
    BM25Retriever,
    EmbedderUnavailable,
    EmbeddingRetriever,
    RetrievalError,
    WordLlamaEmbedder,
    chunk_spans,
    chunk_text,
    count_tokens,
    lexical_terms,
    sentences_of_chunks,
)
from fake_openai_server import Behaviour, FakeOpenAIServer, hashed_bag_of_words

TEXT = "The quick brown fox jumps. 北京是首都。Paris, France!\n\nEnd."


def test_count_tokens_by_hand():
    # The, quick, brown, fox, jumps, "." | 北 京 是 首 都 。 | Paris , France ! | End .
    assert count_tokens(TEXT) == 6 + 6 + 4 + 2


def test_chunk_spans_by_hand():
    spans = chunk_spans(TEXT, 4)
    assert chunk_text(TEXT, 4) == ["The quick brown fox ", "jumps. 北京", "是首都。", "Paris, France!\n\n", "End."]
    assert spans[0][0] == 0 and spans[-1][1] == len(TEXT)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert chunk_text(TEXT, 100) == [TEXT]
    assert chunk_text("   \n ", 4) == [] and chunk_text("", 4) == []
    with pytest.raises(RetrievalError, match="chunk_tokens"):
        chunk_spans(TEXT, 0)


def test_chunk_spans_with_a_tokenizer(tmp_path):
    tokenizer = default_tokenizer(tmp_path)
    chunks = chunk_text(TEXT, 5, tokenizer)
    assert "".join(chunks) == TEXT
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert count_tokens(TEXT, tokenizer) == len(ids)
    # Every chunk but the last holds 5 tokens, except where a boundary would fall inside one
    # character (byte-level BPE splits a CJK character into 3 byte tokens): then it moves back to
    # the character's start, so a chunk may hold up to 2 tokens fewer or more.
    assert len(chunks) == pytest.approx(len(ids) / 5, abs=2)
    for chunk in chunks[:-1]:
        assert 3 <= count_tokens(chunk, tokenizer) <= 7
    latin = "alpha beta gamma delta epsilon zeta eta theta"
    latin_ids = tokenizer(latin, add_special_tokens=False)["input_ids"]
    assert [count_tokens(c, tokenizer) for c in chunk_text(latin, 5, tokenizer)] == \
        [5] * (len(latin_ids) // 5) + ([len(latin_ids) % 5] if len(latin_ids) % 5 else [])


def test_sentence_spans_and_chunk_sentences_by_hand():
    spans = sentence_spans(TEXT)
    assert split_sentences(TEXT) == ["The quick brown fox jumps. ", "北京是首都。", "Paris, France!\n\n", "End."]
    assert spans == [(0, 27), (27, 33), (33, 49), (49, 53)]
    # chunks of 4 tokens (test_chunk_spans_by_hand): [0,20) [20,29) [29,33) [33,49) [49,53)
    chunks = chunk_spans(TEXT, 4)
    assert chunks == [(0, 20), (20, 29), (29, 33), (33, 49), (49, 53)]
    assert sentences_of_chunks(chunks, spans) == [[0], [0, 1], [1], [2], [3]]
    assert sentences_of_chunks([(10, 40), (27, 28)], spans) == [[0, 1, 2], [1]]


def test_lexical_terms():
    assert lexical_terms("The Fox and THE dog's 2 bones") == ["fox", "dog", "s", "2", "bones"]
    assert lexical_terms("北京大学") == ["北", "京", "大", "学", "北京", "京大", "大学"]


def _lucene_bm25(query_terms, docs, k1=1.5, b=0.75):
    """BM25 as Lucene scores it (idf log(1 + (N - df + 0.5) / (df + 0.5)), no (k1 + 1) factor in
    the term frequency part), written out independently for the hand-check."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        score = 0.0
        for term in query_terms:
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(score)
    return scores


def test_bm25_ranking_and_scores():
    chunks = ["Cats purr when they are content.",
              "Dogs bark at cats and cats run away from dogs.",
              "The stock market fell sharply on Monday.",
              "A cat sleeps most of the day.",
              "北京是中国的首都。"]
    retriever = BM25Retriever(chunks)
    assert retriever.search("why do cats purr", 5) == [0, 1]
    assert retriever.search("stock market", 5) == [2]
    assert retriever.search("首都", 5) == [4]
    assert retriever.search("the of and", 5) == []  # stopwords only
    assert retriever.search("unknownword", 5) == []
    assert retriever.search("cats dogs", 1) == [1]
    expected = _lucene_bm25(lexical_terms("cats purr"), [lexical_terms(c) for c in chunks])
    np.testing.assert_allclose(retriever.scores("cats purr"), expected, rtol=1e-5)
    weights = np.array([0, 1, 1, 1, 1], np.float32)
    assert retriever.search("why do cats purr", 5, weights=weights) == [1]
    assert retriever.search_batch(["stock", "cat"], 3) == [[2], [3]]
    with pytest.raises(RetrievalError):
        BM25Retriever([])
    assert BM25Retriever(["...", "!!"]).search("anything", 3) == []


def test_bm25_ties_keep_chunk_order():
    retriever = BM25Retriever(["apple pie", "banana", "apple pie"])
    assert retriever.search("apple", 3) == [0, 2]


def _table_embedder(table):
    def embed(texts):
        return np.array([table[t] for t in texts], np.float32)
    return embed


def test_embedding_retriever_cosine():
    table = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [1, 1, 0], "z": [0, 0, 0],
             "q1": [10, 1, 0], "q2": [0, 3, 0.1]}
    retriever = EmbeddingRetriever(["a", "b", "c", "z"], _table_embedder(table))
    # cosines q1: a .995, b .0995, c .77, z 0 ; q2: a 0, b .9994, c .7068, z 0
    assert retriever.search("q1", 4) == [0, 2, 1, 3]
    assert retriever.search_batch(["q1", "q2"], 2) == [[0, 2], [1, 2]]
    np.testing.assert_allclose(retriever.similarities(["q1"])[0, 2], 11 / math.sqrt(101) / math.sqrt(2), rtol=1e-6)
    assert retriever.search_batch([], 2) == []


def test_embedding_retriever_rejects_bad_embeddings():
    with pytest.raises(RetrievalError, match="shape"):
        EmbeddingRetriever(["a", "b"], lambda texts: np.zeros((1, 3)))
    with pytest.raises(RetrievalError, match="non-finite"):
        EmbeddingRetriever(["a"], lambda texts: np.array([[np.nan, 1.0]]))
    retriever = EmbeddingRetriever(["a"], lambda texts: np.ones((len(texts), 3 if texts == ["a"] else 4)))
    with pytest.raises(RetrievalError, match="dimension"):
        retriever.search("q", 1)


def test_wordllama_embedder_ranks_by_meaning():  # glmjax[test] installs wordllama
    chunks = ["Cats purr softly on the sofa.", "The central bank raised interest rates.",
              "Heavy rain flooded the streets."]
    retriever = EmbeddingRetriever(chunks, WordLlamaEmbedder())
    assert retriever.search_batch(["a kitten purring", "monetary policy and inflation", "storm and water"], 1) \
        == [[0], [1], [2]]
    assert WordLlamaEmbedder(dim=64)(["x"]).shape == (1, 64)


def test_wordllama_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wordllama", None)
    with pytest.raises(EmbedderUnavailable, match="pip install 'wordllama"):
        WordLlamaEmbedder()


def test_embeddings_client_batches_in_order():
    with FakeOpenAIServer() as server:
        client = EmbeddingsClient(server.base_url, "emb", batch_size=2, api_key="k")
        texts = ["cats purr", "dogs bark", "cats and dogs", "markets"]
        vectors = client(texts)
        assert vectors.shape == (4, 64) and vectors.dtype == np.float32
        np.testing.assert_array_equal(vectors, np.array([hashed_bag_of_words(t) for t in texts], np.float32))
        bodies = [r.body for r in server.requests]
        assert [b["input"] for b in bodies] == [texts[:2], texts[2:]]
        assert all(b["model"] == "emb" for b in bodies)
        assert server.requests[0].headers["Authorization"] == "Bearer k"
        assert client.prompt_tokens == 8
        assert client([]).shape[0] == 0


def test_embeddings_client_retries_and_errors():
    with FakeOpenAIServer() as server:
        client = EmbeddingsClient(server.base_url, "emb", max_retries=2, backoff_base_s=0.01)
        server.script_embeddings(Behaviour.error(500), Behaviour.rate_limited(0.0))
        assert client(["x y"]).shape == (1, 64)
        assert len(server.requests) == 3
        server.script_embeddings(Behaviour.error(400, "bad model"))
        with pytest.raises(LLMHTTPError, match="HTTP 400: bad model") as err:
            client(["x"])
        assert not err.value.retryable and len(server.requests) == 4
        server.script_embeddings(*[Behaviour.malformed()] * 3)
        with pytest.raises(LLMResponseError, match="not an embeddings reply.*gave up after 3 attempts"):
            client(["x"])
        server.script_embeddings(Behaviour.malformed('{"data": [{"index": 0, "embedding": [1, 2]}]}'))
        with pytest.raises(LLMResponseError, match="2 embeddings expected"):
            EmbeddingsClient(server.base_url, "emb", max_retries=0)(["a", "b"])
    with pytest.raises(LLMClientError, match="failed"):
        EmbeddingsClient(server.base_url, "emb", max_retries=0, timeout_s=2)(["x"])
    with pytest.raises(ValueError, match="not set"):
        EmbeddingsClient("http://127.0.0.1:1/v1", "emb", api_key_env="GLMJAX_TEST_UNSET_KEY")


def test_embedding_retriever_over_http():
    chunks = ["cats purr on the sofa", "stock market news today", "dogs bark at cats"]
    with FakeOpenAIServer() as server:
        retriever = EmbeddingRetriever(chunks, EmbeddingsClient(server.base_url, "emb"))
        assert retriever.search_batch(["market news", "purr sofa"], 1) == [[1], [0]]
        assert len(server.requests) == 2  # the chunks once, then the queries in one call
