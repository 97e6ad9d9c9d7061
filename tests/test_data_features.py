"""Per-token and per-example features through windowing, packing and padding; batch specs."""

import json

import gin
import numpy as np
import pytest

from glmjax.data.encoders import RecordField
from glmjax.data.factories import lm_data
from glmjax.data.pipeline import BATCH_KEYS, make_lm_dataset
from glmjax.data.sources import DataFormatError, write_token_records
from glmjax.data.spec import FeatureSpec, batch_spec_of
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer

ONE_HOST = {"process_index": 0, "process_count": 1}
LENGTHS = (5, 9, 40, 3, 18, 2, 26, 12)  # 40, 18 and 26 tokens need several windows of 16
TOKEN_FEATURES = {
    "next_ids": RecordField("int32"),  # stored with n - 1 entries: token i + 1
    "index10": RecordField("float32", (2,)),  # stored with n entries: [10 i, -i]
}
EXAMPLE_FEATURES = {"doc": RecordField("int32"), "score": RecordField("float32", (2,))}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_default_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """Document d has ids 1000 d + i (i = 0..n-1), so a token names its document and index."""
    path = tmp_path_factory.mktemp("tokens") / "features.array_record"
    records = []
    for doc, n in enumerate(LENGTHS, start=1):
        ids = 1000 * doc + np.arange(n)
        records.append({
            "input_ids": ids,
            "next_ids": ids[1:].astype(np.int32),
            "index10": np.stack([10.0 * np.arange(n), -np.arange(n)], -1).astype(np.float32),
            "doc": np.int32(doc),
            "score": np.asarray([doc, 0.5], np.float32),
        })
    write_token_records(path, records)
    return path


def _batches(path, *, packing, **kwargs):
    ds = make_lm_dataset(
        path, "tokens", token_features=TOKEN_FEATURES, example_features=EXAMPLE_FEATURES,
        seq_len=16, global_batch_size=2, shuffle=False, num_epochs=1, packing=packing,
        max_segments_per_row=3, **ONE_HOST, **kwargs)
    batches = list(ds)
    for batch in batches:
        batch_spec_of(ds).check(batch)
    return ds, batches


def _assert_token_features_aligned(batch):
    padding = batch["segment_ids"] == 0
    np.testing.assert_array_equal(batch["next_ids"], batch["targets"])
    index = np.where(padding, 0, batch["inputs"] % 1000)  # position within the document
    np.testing.assert_array_equal(batch["index10"][..., 0], 10.0 * index)
    np.testing.assert_array_equal(batch["index10"][..., 1], -index)
    assert batch["next_ids"].dtype == np.int32 and batch["index10"].dtype == np.float32


def test_features_through_packing(token_file):
    ds, batches = _batches(token_file, packing=True)
    spec = batch_spec_of(ds)
    assert spec.features["next_ids"] == FeatureSpec("int32", ("act_batch", "act_seq"))
    assert spec.features["index10"] == FeatureSpec("float32", ("act_batch", "act_seq", None))
    assert spec.features["doc"] == FeatureSpec("int32", ("act_batch", None))
    assert spec.features["score"] == FeatureSpec("float32", ("act_batch", None, None))
    windows = 0
    for batch in batches:
        assert batch["index10"].shape == (2, 16, 2) and batch["doc"].shape == (2, 3)
        assert batch["score"].shape == (2, 3, 2)
        _assert_token_features_aligned(batch)
        for row in range(2):
            segments = batch["segment_ids"][row]
            count = segments.max()
            assert 1 <= count <= 3  # max_segments_per_row
            for j in range(3):
                docs = np.unique(batch["inputs"][row][segments == j + 1] // 1000)
                expected = docs.tolist() if j < count else [0]
                assert [batch["doc"][row, j]] == expected
                assert batch["score"][row, j].tolist() == [expected[0], 0.5 if j < count else 0]
            windows += count
    assert windows >= 10  # 14 windows in all, a final partial batch may be left out


def test_features_unpacked_with_long_documents_windowed(token_file):
    _, batches = _batches(token_file, packing=False)
    rows = [{key: value[r] for key, value in b.items()} for b in batches for r in range(2)]
    assert len(rows) == 12  # 8 documents; 39 pairs -> 3 windows, 17 and 25 pairs -> 2 each
    starts = []
    for row in rows:
        n = int(row["segment_ids"].sum())
        (doc,) = np.unique(row["inputs"][:n] // 1000)
        assert row["doc"] == doc and row["score"].tolist() == [doc, 0.5]
        starts.append((int(doc), int(row["inputs"][0] % 1000)))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
    assert starts[2:5] == [(3, 0), (3, 16), (3, 32)]  # each window keeps its document's values
    for batch in batches:
        assert batch["doc"].shape == (2,) and batch["score"].shape == (2, 2)
        _assert_token_features_aligned(batch)


def test_packing_with_example_features_needs_max_segments(token_file):
    with pytest.raises(ValueError, match="needs max_segments_per_row"):
        make_lm_dataset(token_file, "tokens", example_features=EXAMPLE_FEATURES, seq_len=16,
                        global_batch_size=2, **ONE_HOST)
    with pytest.raises(ValueError, match=r"\['targets'\] clash"):
        make_lm_dataset(token_file, "tokens", token_features={"targets": RecordField("int32")},
                        seq_len=16, global_batch_size=2, **ONE_HOST)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _text_records(tokenizer, texts):
    """Records whose ``next`` field is the encoded document without its first token."""
    prefix = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    records = []
    for i, text in enumerate(texts):
        ids = [*prefix, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
        records.append({"text": text, "next": ids[1:], "score": i / 2})
    return records


@pytest.mark.parametrize("packing", [True, False])
def test_jsonl_text_features(tokenizer, tmp_path, packing):
    texts = [f"doc {i} " + "word " * (3 * i) for i in range(10)]
    path = _write_jsonl(tmp_path / "t.jsonl", _text_records(tokenizer, texts))
    ds = make_lm_dataset(
        path, "text", tokenizer=tokenizer, token_features={"next": RecordField("int32")},
        example_features={"score": RecordField("float32")}, seq_len=24, global_batch_size=2,
        shuffle=False, num_epochs=1, packing=packing, max_segments_per_row=4, **ONE_HOST)
    scores = set()
    for batch in ds:
        batch_spec_of(ds).check(batch)
        np.testing.assert_array_equal(batch["next"], batch["targets"])
        scores.update(batch["score"].ravel().tolist())
    assert scores - {0.0} == {i / 2 for i in range(1, 10)}


def test_bad_feature_values_name_file_line_and_key(tokenizer, tmp_path):
    good = _text_records(tokenizer, ["first", "second"])
    cases = {
        "next": ([1, 2], r":2: token feature 'next' has shape \[2\]; expected \[\d+ or \d+\]"),
        "score": ([1.0, 2.0], r":2: example feature 'score' has shape \[2\]; expected \[\]"),
    }
    for key, (value, match) in cases.items():
        path = _write_jsonl(tmp_path / f"{key}.jsonl", [good[0], {**good[1], key: value}])
        ds = make_lm_dataset(
            path, "text", tokenizer=tokenizer, token_features={"next": RecordField("int32")},
            example_features={"score": RecordField("float32")}, seq_len=32, global_batch_size=1,
            shuffle=False, packing=False, **ONE_HOST)
        with pytest.raises(DataFormatError, match=f"{path}{match}"):
            list(zip(range(3), ds))
    floats = [0.5] * len(good[0]["next"])
    path = _write_jsonl(tmp_path / "float.jsonl", [{**good[0], "next": floats}])
    ds = make_lm_dataset(path, "text", tokenizer=tokenizer,
                         token_features={"next": RecordField("int32")}, seq_len=32,
                         global_batch_size=1, **ONE_HOST)
    with pytest.raises(DataFormatError, match=f"{path}:1: token feature 'next': float64 values"):
        next(iter(ds))
    path = _write_jsonl(tmp_path / "missing.jsonl", [{"text": "no features"}])
    with pytest.raises(DataFormatError, match=f"{path}:1: missing required field 'next'"):
        next(iter(make_lm_dataset(path, "text", tokenizer=tokenizer, seq_len=32,
                                  token_features={"next": RecordField("int32")},
                                  global_batch_size=1, **ONE_HOST)))


def _chat_records(n):
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "answer " * (i % 4 + 1)}],
             "reward": float(i)} for i in range(n)]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("with_features", [True, False])
def test_spec_describes_every_format(tokenizer, tmp_path, packing, with_features):
    chat = _write_jsonl(tmp_path / "chat.jsonl", _chat_records(12))
    text_records = _text_records(tokenizer, [f"t {i}" for i in range(12)])
    text = _write_jsonl(tmp_path / "text.jsonl", text_records)
    tokens = tmp_path / "tokens.array_record"
    write_token_records(tokens, [{"input_ids": np.arange(3, 8 + i), "r": np.float32(i)}
                                 for i in range(12)])
    extra = {"chat": "reward", "text": "score", "tokens": "r"}
    for data_format, path in {"chat": chat, "text": text, "tokens": tokens}.items():
        features = {extra[data_format]: RecordField("float32")} if with_features else None
        ds = make_lm_dataset(
            path, data_format, tokenizer=tokenizer, example_features=features, seq_len=32,
            global_batch_size=4, packing=packing, max_segments_per_row=8, **ONE_HOST)
        spec = batch_spec_of(ds)
        assert set(spec.features) == set(BATCH_KEYS) | ({extra[data_format]} if features else set())
        iterator = iter(ds)
        for _ in range(3):
            spec.check(next(iterator), where=f"{data_format} batch")


def test_lm_data_factory_from_gin(token_file):
    gin.clear_config()
    try:
        gin.parse_config("""
            lm_data.token_features = {"index10": @index10/RecordField()}
            index10/RecordField.dtype = "float32"
            index10/RecordField.shape = (2,)
            lm_data.data_format = "tokens"
            lm_data.group_size = 2
            lm_data.seq_len = 16
            lm_data.global_batch_size = 4
        """)
        ds = lm_data(seed=0, process_index=0, process_count=1, paths=str(token_file))
    finally:
        gin.clear_config()
    assert batch_spec_of(ds).group_size == 2
    batch = next(iter(ds))
    batch_spec_of(ds).check(batch)
    assert batch["index10"].shape == (4, 16, 2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        lm_data(seed=0, process_index=0, process_count=1, paths=str(token_file),
                data_format="tokens", seq_len=16, global_batch_size=3, group_size=2)
