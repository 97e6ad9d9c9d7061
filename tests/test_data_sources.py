"""JSONL and array_record sources: random access, errors naming file and line, empty data."""

import pickle

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from glmjax.data.sources import (
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
