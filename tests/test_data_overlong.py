"""Over-long examples: window / truncate / drop, and the exact, checkpointed count of drops."""

import json

import numpy as np
import pytest

from glmjax.data.pipeline import dropped_examples, make_lm_dataset
from glmjax.data.sources import write_token_records
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer

ONE_HOST = {"process_index": 0, "process_count": 1}
SEQ_LEN = 8
LENGTHS = (5, 12, 9, 20, 3, 9, 30, 6)  # (input, target) pairs: 4, 11*, 8, 19*, 2, 8, 29*, 5
OVERLONG = [n - 1 > SEQ_LEN for n in LENGTHS]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """Document d has ids 100 d + i, so a row's first token names its document and offset."""
    path = tmp_path_factory.mktemp("overlong") / "docs.array_record"
    write_token_records(path, [100 * d + np.arange(n) for d, n in enumerate(LENGTHS, start=1)])
    return path


def _dataset(path, overlong, **kwargs):
    args = dict(seq_len=SEQ_LEN, global_batch_size=1, shuffle=False, num_epochs=1,
                packing=False, **ONE_HOST)
    args.update(kwargs)
    return make_lm_dataset(path, "tokens", overlong=overlong, **args)


def _rows(path, overlong):
    """(document, first offset, pairs) of every row, and the drop count after each row."""
    iterator = iter(_dataset(path, overlong))
    rows, counts = [], []
    for batch in iterator:
        first, pairs = int(batch["inputs"][0, 0]), int(batch["segment_ids"].sum())
        rows.append((first // 100, first % 100, pairs))
        counts.append(dropped_examples(iterator))
    return rows, counts


def test_window_cuts_long_documents(token_file):
    rows, counts = _rows(token_file, "window")
    expected = []
    for doc, n in enumerate(LENGTHS, start=1):
        starts = range(0, n - 1, SEQ_LEN)
        expected += [(doc, start, min(SEQ_LEN, n - 1 - start)) for start in starts]
    assert rows == expected and counts == [0] * len(rows)


def test_truncate_keeps_the_first_window(token_file):
    rows, counts = _rows(token_file, "truncate")
    assert rows == [(doc, 0, min(SEQ_LEN, n - 1)) for doc, n in enumerate(LENGTHS, start=1)]
    assert counts == [0] * len(LENGTHS)


def test_drop_skips_and_counts_exactly(token_file):
    rows, counts = _rows(token_file, "drop")
    kept = [doc for doc, long in enumerate(OVERLONG, start=1) if not long]
    assert rows == [(doc, 0, LENGTHS[doc - 1] - 1) for doc in kept]
    # the count after a row: the over-long documents in front of it
    assert counts == [sum(OVERLONG[: doc - 1]) for doc in kept] == [0, 1, 2, 2, 3]


def test_drop_count_with_packing(token_file):
    iterator = iter(_dataset(token_file, "drop", packing=True))
    inputs = [batch["inputs"] for batch in iterator]
    assert dropped_examples(iterator) == sum(OVERLONG) == 3
    docs = {int(t) // 100 for b in inputs for t in b[b > 0]}
    assert docs == {doc for doc, long in enumerate(OVERLONG, start=1) if not long}


def _run(build, steps):
    iterator = iter(build())
    return [(next(iterator), dropped_examples(iterator)) for _ in range(steps)]


@pytest.mark.parametrize("packing", [True, False])
def test_drop_count_survives_checkpoint_resume(token_file, packing):
    def build():
        return _dataset(token_file, "drop", num_epochs=None, shuffle=True, seed=5,
                        packing=packing, global_batch_size=2, num_data_shards=2)

    reference = _run(build, 12)
    assert reference[-1][1] >= 6  # several epochs, several drops each
    iterator = iter(build())
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["dropped_examples"] == reference[4][1]
    restored = iter(build())
    restored.set_state(state)
    for want, count in reference[5:]:
        got = next(restored)
        assert "_dropped_examples" not in got and set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        assert dropped_examples(restored) == count


def test_drop_count_sums_over_processes(token_file):
    common = dict(num_epochs=None, shuffle=True, seed=2, global_batch_size=2, num_data_shards=2)
    single = _run(lambda: _dataset(token_file, "drop", **common), 8)
    hosts = [
        _run(lambda i=i: _dataset(token_file, "drop", **{**common, "process_index": i,
                                                          "process_count": 2}), 8)
        for i in range(2)
    ]
    assert [count for _, count in single] == [a + b for (_, a), (_, b) in zip(*hosts)]


def test_chat_drops_by_default_and_too_small_seq_len_fails(tmp_path):
    tokenizer = load_tokenizer(build_default_tokenizer(tmp_path / "tok"))
    records = [{"messages": [{"role": "user", "content": "q " * words},
                             {"role": "assistant", "content": "a"}]} for words in (1, 60, 2)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = dict(tokenizer=tokenizer, seq_len=32, global_batch_size=1, shuffle=False,
                  num_epochs=1, packing=False, **ONE_HOST)
    iterator = iter(make_lm_dataset(path, "chat", **common))
    assert len(list(iterator)) == 2 and dropped_examples(iterator) == 1
    windows = list(make_lm_dataset(path, "chat", overlong="window", **common))
    assert len(windows) == 3  # only the window with the answer has loss
    with pytest.raises(ValueError, match=r"3 examples in a row are longer than seq_len=4"):
        next(iter(make_lm_dataset(path, "chat", **{**common, "seq_len": 4, "num_epochs": None})))
    with pytest.raises(ValueError, match="overlong must be one of"):
        make_lm_dataset(path, "chat", overlong="cut", **common)
    assert dropped_examples(iter([])) == 0
