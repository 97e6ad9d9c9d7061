"""grain LM pipelines: batch contract, packing, shuffling, sharding, checkpointing, global arrays."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmjax.data.global_batch import make_global_batch
from glmjax.data.pipeline import BATCH_KEYS, make_lm_dataset
from glmjax.data.sources import DataFormatError, EmptyDatasetError, write_token_records
from glmjax.data.synthetic import generate_problems, write_arithmetic_jsonl
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer

ONE_HOST = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_default_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_arithmetic_jsonl(tmp_path_factory.mktemp("arith"), num_train=64, num_eval=4)[
        "train"
    ]


def _text_file(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _take(dataset, n):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def _segments(batch):
    """Yields (row, segment id, slice) of every document segment in a batch."""
    for row, segment_ids in enumerate(batch["segment_ids"]):
        for segment in np.unique(segment_ids[segment_ids > 0]):
            (where,) = np.nonzero(segment_ids == segment)
            yield row, segment, slice(where[0], where[-1] + 1)


def test_chat_batch_contract(tokenizer, chat_file):
    solutions = {
        f"\n{p.solution}<|user|>" for p in generate_problems(64, seed=0, split="train")
    }
    batches = _take(
        make_lm_dataset(
            chat_file, "chat", tokenizer=tokenizer, seq_len=256, global_batch_size=4, **ONE_HOST
        ),
        3,
    )
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert batch[key].shape == (4, 256) and batch[key].dtype == np.int32, key
        padding = batch["segment_ids"] == 0
        for key in ("inputs", "targets", "loss_mask", "positions"):
            assert not batch[key][padding].any(), key
        for row, segment, cols in _segments(batch):
            seg = batch["segment_ids"][row]
            assert seg[: cols.stop].max() == segment  # ids count up from 1 along the row
            np.testing.assert_array_equal(
                batch["positions"][row, cols], np.arange(cols.stop - cols.start)
            )
            np.testing.assert_array_equal(
                batch["targets"][row, cols][:-1], batch["inputs"][row, cols][1:]
            )
            masked = batch["targets"][row, cols][batch["loss_mask"][row, cols] == 1]
            assert tokenizer.decode(masked.tolist()) in solutions
            assert tokenizer.decode(batch["inputs"][row, cols][:2].tolist()) == "[gMASK]<sop>"
        # packing puts more than one ~100-token conversation into most 256-token rows
        assert (batch["segment_ids"].max(axis=1) >= 2).sum() >= 2


def test_text_documents_round_trip_unpacked(tokenizer, tmp_path):
    texts = [f"doc {i} " + "word " * (i * 7) for i in range(8)]
    path = _text_file(tmp_path / "t.jsonl", texts)
    ds = make_lm_dataset(
        path,
        "text",
        tokenizer=tokenizer,
        seq_len=16,
        global_batch_size=1,
        shuffle=False,
        num_epochs=1,
        packing=False,
        **ONE_HOST,
    )
    rows = [{k: v[0] for k, v in b.items()} for b in ds]
    expected_targets = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = [
            *tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"]),
            *ids,
            tokenizer.eos_token_id,
        ]
        expected_targets.append(full[1:])
    got, index = [], 0
    for expected in expected_targets:  # long documents continue over several windows, in order
        targets = []
        while len(targets) < len(expected):
            row = rows[index]
            n = int(row["segment_ids"].sum())
            np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
            np.testing.assert_array_equal(row["loss_mask"], row["segment_ids"])
            targets.extend(row["targets"][:n].tolist())
            index += 1
        got.append(targets)
    assert got == expected_targets and index == len(rows)
    assert len(rows) > len(texts)  # some documents were split


def test_packed_text_covers_documents(tokenizer, tmp_path):
    texts = [f"document number {i}" for i in range(40)]
    path = _text_file(tmp_path / "t.jsonl", texts)
    ds = make_lm_dataset(
        path,
        "text",
        tokenizer=tokenizer,
        seq_len=32,
        global_batch_size=2,
        shuffle=False,
        num_epochs=1,
        **ONE_HOST,
    )
    decoded = []
    for batch in ds:
        for row, _, cols in _segments(batch):
            tokens = [*batch["inputs"][row, cols].tolist(), int(batch["targets"][row, cols][-1])]
            decoded.append(tokenizer.decode(tokens))
    expected = {f"[gMASK]<sop>{t}<|endoftext|>" for t in texts}
    assert len(decoded) == len(set(decoded)) and set(decoded) <= expected
    assert len(decoded) >= 30  # only a final partial batch is dropped


def test_shuffling_is_seeded(tokenizer, chat_file):
    def first_inputs(**kwargs):
        ds = make_lm_dataset(
            chat_file,
            "chat",
            tokenizer=tokenizer,
            seq_len=256,
            global_batch_size=2,
            **ONE_HOST,
            **kwargs,
        )
        return np.stack([b["inputs"] for b in _take(ds, 2)])

    np.testing.assert_array_equal(first_inputs(seed=1), first_inputs(seed=1))
    assert not np.array_equal(first_inputs(seed=1), first_inputs(seed=2))
    in_order = first_inputs(shuffle=False)
    first_problem = generate_problems(1, seed=0, split="train")[0]
    assert first_problem.question in tokenizer.decode(in_order[0, 0].tolist())


def _row_texts(ds, tokenizer):
    return [
        tokenizer.decode(b["inputs"][r][b["segment_ids"][r] > 0].tolist())
        for b in ds
        for r in range(len(b["inputs"]))
    ]


def test_epochs_reshuffle_and_end(tokenizer, tmp_path):
    path = _text_file(tmp_path / "t.jsonl", [f"item {i}" for i in range(6)])
    ds = make_lm_dataset(
        path,
        "text",
        tokenizer=tokenizer,
        seq_len=16,
        global_batch_size=1,
        packing=False,
        num_epochs=2,
        seed=3,
        **ONE_HOST,
    )
    rows = _row_texts(ds, tokenizer)
    assert len(rows) == 12
    assert sorted(rows[:6]) == sorted(rows[6:]) and len(set(rows)) == 6
    assert rows[:6] != rows[6:]


def test_per_host_slices_are_disjoint_and_complete(tokenizer, tmp_path):
    path = _text_file(tmp_path / "t.jsonl", [f"item {i}" for i in range(10)])
    common = dict(seq_len=16, global_batch_size=2, packing=False, num_epochs=1, seed=0)
    single = _row_texts(
        make_lm_dataset(path, "text", tokenizer=tokenizer, **common, **ONE_HOST), tokenizer
    )
    hosts = [
        _row_texts(
            make_lm_dataset(
                path, "text", tokenizer=tokenizer, **common, process_index=i, process_count=2
            ),
            tokenizer,
        )
        for i in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == 5
    assert not set(hosts[0]) & set(hosts[1])
    assert sorted(hosts[0] + hosts[1]) == sorted(single)


def test_global_batch_does_not_depend_on_process_count(tokenizer, chat_file):
    common = dict(tokenizer=tokenizer, seq_len=256, global_batch_size=8, num_data_shards=4, seed=7)
    single = _take(make_lm_dataset(chat_file, "chat", **common, **ONE_HOST), 3)
    halves = [
        _take(make_lm_dataset(chat_file, "chat", **common, process_index=i, process_count=2), 3)
        for i in range(2)
    ]
    for step, batch in enumerate(single):
        for key in BATCH_KEYS:
            assert halves[0][step][key].shape == (4, 256)
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(batch[key], joined, err_msg=f"{key} step {step}")


@pytest.mark.parametrize("num_data_shards", [None, 2])
def test_iterator_state_restores_identical_batches(tokenizer, chat_file, num_data_shards):
    def build():
        return make_lm_dataset(
            chat_file,
            "chat",
            tokenizer=tokenizer,
            seq_len=256,
            global_batch_size=4,
            num_data_shards=num_data_shards,
            seed=11,
            **ONE_HOST,
        )

    iterator = iter(build())
    for _ in range(9):  # past the end of the first epoch (64 conversations)
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(4)]
    restored = iter(build())
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(4)]):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])


def test_pretokenized_array_record(tmp_path):
    path = tmp_path / "tokens.array_record"
    write_token_records(path, [np.arange(3, 3 + n) for n in (5, 9, 18)])
    ds = make_lm_dataset(
        path, "tokens", seq_len=16, global_batch_size=2, shuffle=False, num_epochs=1, **ONE_HOST
    )
    (batch,) = list(ds)
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
    targets = sorted(tuple(batch["targets"][r, c].tolist()) for r, _, c in _segments(batch))
    # 4 + 8 + 17 (input, target) pairs; the 18-token record is cut into windows of 16 and 1
    assert targets == sorted([tuple(range(4, 8)), tuple(range(4, 12)), tuple(range(4, 20)), (20,)])


def test_bad_records_fail_with_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    cases = {
        '{"messages": [}': r":2: malformed JSON",
        json.dumps({"text": "no messages"}): r":2: missing required field 'messages'",
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}): r":2: message 0: role 'bot'",
    }
    for bad_line, match in cases.items():
        path.write_text(f"{good}\n{bad_line}\n{good}\n")
        ds = make_lm_dataset(
            path,
            "chat",
            tokenizer=tokenizer,
            seq_len=32,
            global_batch_size=2,
            shuffle=False,
            **ONE_HOST,
        )
        with pytest.raises(DataFormatError, match=f"{path}{match}"):
            next(iter(ds))


def test_empty_dataset_and_bad_arguments(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EmptyDatasetError, match="no records"):
        make_lm_dataset(
            empty, "text", tokenizer=tokenizer, seq_len=8, global_batch_size=1, **ONE_HOST
        )
    path = _text_file(tmp_path / "t.jsonl", ["x"])
    with pytest.raises(ValueError, match="num_data_shards"):
        make_lm_dataset(
            path,
            "text",
            tokenizer=tokenizer,
            seq_len=8,
            global_batch_size=4,
            process_index=0,
            process_count=2,
            num_data_shards=3,
        )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_lm_dataset(path, "chat", seq_len=8, global_batch_size=1, **ONE_HOST)
    with pytest.raises(ValueError, match="data_format"):
        make_lm_dataset(
            path, "parquet", tokenizer=tokenizer, seq_len=8, global_batch_size=1, **ONE_HOST
        )


def test_make_global_batch_shards_over_the_mesh(tokenizer, chat_file):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    batch = _take(
        make_lm_dataset(
            chat_file,
            "chat",
            tokenizer=tokenizer,
            seq_len=64,
            global_batch_size=8,
            overlong="window",
            **ONE_HOST,
        ),
        1,
    )[0]
    by_data = NamedSharding(mesh, P("data", None))
    by_both = NamedSharding(mesh, P(("data", "model"), None))
    arrays = make_global_batch(batch, {k: by_both if k == "inputs" else by_data for k in batch})
    for key, array in arrays.items():
        assert array.shape == (8, 64) and array.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(array), batch[key])
    assert arrays["targets"].sharding == by_data
    assert {s.data.shape for s in arrays["targets"].addressable_shards} == {(2, 64)}
    assert {s.data.shape for s in arrays["inputs"].addressable_shards} == {(1, 64)}
    single = make_global_batch(batch, by_data)
    assert single["positions"].sharding == by_data


def test_text_documents_use_the_tokenizers_own_affixes(tmp_path):
    """GLM-4 tokenizers frame a document as [gMASK]<sop> ... <|endoftext|>; others with their bos
    (if any) and eos, e.g. Qwen's text<|endoftext|>."""
    from chat_tokenizers import qwen_tokenizer

    from glmjax.data.encoders import TextEncoder

    qwen = qwen_tokenizer(tmp_path / "qwen")
    ids = TextEncoder(qwen)({"text": "hello"})["input_ids"].tolist()
    assert ids == [*qwen.encode("hello", add_special_tokens=False), qwen.eos_token_id]
