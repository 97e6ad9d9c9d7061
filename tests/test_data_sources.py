"""JSONL and array_record sources: random access, errors naming file and line, empty data."""

import io
import pickle

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from glmjax.data.sources import (
    NAMED_RECORD_MAGIC,
    DataFormatError,
    EmptyDatasetError,
    JsonlSource,
    TokenRecordSource,
    write_token_records,
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_random_access_across_files(tmp_path):
    a = _write(tmp_path / "a.jsonl", '{"text": "zero"}\n\n{"text": "one"}\n')
    b = _write(tmp_path / "b.jsonl", '{"text": "two"}')  # no trailing newline
    source = JsonlSource([a, b], required_fields=["text"])
    assert len(source) == 3
    assert [source[i]["text"] for i in (2, 0, 1, -1)] == ["two", "zero", "one", "two"]
    assert source.location(1) == f"{a}:3"
    assert source.location(2) == f"{b}:1"
    with pytest.raises(IndexError):
        source[3]


def test_jsonl_source_pickles_after_reading(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"text": "x"}\n{"text": "y"}\n')
    source = JsonlSource(path)
    assert source[0] == {"text": "x"}
    clone = pickle.loads(pickle.dumps(source))
    assert clone[1] == {"text": "y"} and len(clone) == 2


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n')
    source = JsonlSource(path)
    assert source[0] == {"text": "ok"} and source[2] == {"text": "ok"}
    with pytest.raises(DataFormatError, match=rf"^{path}:3: malformed JSON \(Expecting"):
        source[1]
    with pytest.raises(DataFormatError, match=rf"{path}:3"):
        source.validate()


def test_non_object_and_non_utf8_lines(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'[1, 2]\n{"text": "\xff"}\n')
    source = JsonlSource(path)
    with pytest.raises(DataFormatError, match=rf"{path}:1: expected a JSON object, got list"):
        source[0]
    with pytest.raises(DataFormatError, match=rf"{path}:2: not UTF-8"):
        source[1]


def test_missing_field_names_field_file_and_line(tmp_path):
    path = _write(tmp_path / "f.jsonl", '{"messages": []}\n{"text": "no messages"}\n')
    source = JsonlSource(path, required_fields=["messages"])
    assert source[0] == {"messages": []}
    with pytest.raises(DataFormatError, match=rf"{path}:2: missing required field 'messages'"):
        source[1]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_is_an_error(tmp_path, content):
    path = _write(tmp_path / "empty.jsonl", content)
    with pytest.raises(EmptyDatasetError, match=f"no records in {path}"):
        JsonlSource(path)


def test_missing_file_and_empty_path_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JsonlSource(tmp_path / "missing.jsonl")
    with pytest.raises(EmptyDatasetError, match="no data files"):
        JsonlSource([])


def test_token_records_round_trip(tmp_path):
    first = [[1, 2, 3], np.arange(5, dtype=np.int64), []]
    second = [[2**31 - 1, -7]]
    assert write_token_records(tmp_path / "a.array_record", first) == 3
    write_token_records(tmp_path / "b.array_record", second)
    source = TokenRecordSource([tmp_path / "a.array_record", tmp_path / "b.array_record"])
    assert len(source) == 4
    for index, expected in enumerate(first + second):
        record = source[index]
        assert record["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(record["input_ids"], np.asarray(expected, np.int32))
    assert source.location(3) == f"{tmp_path / 'b.array_record'} record 0"
    assert pickle.loads(pickle.dumps(source))[1]["input_ids"].tolist() == [0, 1, 2, 3, 4]


def test_token_record_errors(tmp_path):
    with pytest.raises(ValueError, match="sequence 1: expected a 1-D integer array"):
        write_token_records(tmp_path / "x.array_record", [[1], [[1, 2]]])
    with pytest.raises(ValueError, match="sequence 0: token ids do not fit in int32"):
        write_token_records(tmp_path / "y.array_record", [[2**31]])
    write_token_records(tmp_path / "empty.array_record", [])
    with pytest.raises(EmptyDatasetError, match="no records"):
        TokenRecordSource(tmp_path / "empty.array_record")
    writer = ArrayRecordWriter(str(tmp_path / "odd.array_record"), "group_size:1")
    writer.write(b"\x01\x00\x00\x00")
    writer.write(b"\x01\x02\x03")
    writer.close()
    source = TokenRecordSource(tmp_path / "odd.array_record")
    assert source[0]["input_ids"].tolist() == [1]
    with pytest.raises(DataFormatError, match="odd.array_record record 1: 3 bytes"):
        source[1]


def test_named_array_records_round_trip(tmp_path):
    path = tmp_path / "named.array_record"
    teacher = np.arange(12, dtype=np.float32).reshape(4, 3)
    records = [
        [7, 8, 9],
        {"input_ids": np.arange(4, dtype=np.int64), "teacher_probs": teacher,
         "teacher_ids": teacher.astype(np.int32), "ref_logp": np.float32(-1.5)},
        {"input_ids": []},
    ]
    assert write_token_records(path, records) == 3
    source = TokenRecordSource(path)
    assert source[0]["input_ids"].tolist() == [7, 8, 9] and set(source[0]) == {"input_ids"}
    named = source[1]
    assert set(named) == {"input_ids", "teacher_probs", "teacher_ids", "ref_logp"}
    assert named["input_ids"].dtype == np.int32 and named["input_ids"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(named["teacher_probs"], teacher)
    assert named["teacher_probs"].dtype == np.float32 and named["teacher_ids"].dtype == np.int32
    assert named["ref_logp"].shape == () and named["ref_logp"] == -1.5
    assert source[2]["input_ids"].shape == (0,)


def test_named_array_record_errors(tmp_path):
    path = tmp_path / "bad.array_record"
    with pytest.raises(ValueError, match="sequence 0: a record of named arrays needs 'input_ids'"):
        write_token_records(path, [{"ids": [1]}])
    with pytest.raises(ValueError, match="sequence 0: 'text' must be a str naming a numeric array"):
        write_token_records(path, [{"input_ids": [1], "text": "no"}])
    with pytest.raises(ValueError, match="sequence 1 'input_ids': token ids do not fit"):
        write_token_records(path, [{"input_ids": [1]}, {"input_ids": [2**40]}])
    magic_id = int(np.frombuffer(NAMED_RECORD_MAGIC, "<i4")[0])
    with pytest.raises(ValueError, match=f"sequence 0: token id {magic_id} would read as"):
        write_token_records(path, [[magic_id, 1]])
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(NAMED_RECORD_MAGIC + b"\xc1garbage")
    writer.close()
    with pytest.raises(DataFormatError, match="bad.array_record record 0: corrupt named-arrays"):
        TokenRecordSource(path)[0]


def test_url_paths_stay_urls():
    url = "gs://bucket/data/train.jsonl"
    content = b'{"text": "zero"}\n\n{"text": "one"}\n'
    opened = []

    def fake_open(_, path, mode="r", **kwargs):
        opened.append(path)
        return io.BytesIO(content)

    with epath.testing.mock_epath(exists=lambda _, path: path == url,
                                  isdir=lambda _, path: False, open=fake_open):
        source = JsonlSource(url, required_fields=["text"])
        assert source[1] == {"text": "one"}
        with pytest.raises(FileNotFoundError, match="gs://bucket/data/missing.jsonl"):
            JsonlSource("gs://bucket/data/missing.jsonl")
    assert set(opened) == {url}
    assert source.location(1) == f"{url}:3" and url in repr(source)
