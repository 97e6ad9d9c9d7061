"""Pair data: record forms, chat encoding with the loss on the completion only, adjacent rows,
over-long pairs dropped and counted (through checkpoints), malformed records with file:line,
stored reference log-probs, and the synthetic arithmetic pairs."""

import json
import random

import numpy as np
import pytest

from glmjax.data.chat_format import chat_format_for
from glmjax.data.pairs import (
    PairEncoder,
    corrupt_solution,
    pair_data,
    pair_rows,
    synthetic_arithmetic_pairs_file,
    write_arithmetic_pairs_jsonl,
)
from glmjax.data.pipeline import dropped_examples
from glmjax.data.sources import DataFormatError
from glmjax.data.synthetic import ArithmeticConfig, extract_answer, generate_problems
from glmjax.data.tokenizer import default_tokenizer

SMALL = ArithmeticConfig(min_ops=1, max_ops=2, max_operand=9, max_factor=5, max_value=60, error_rate=0.2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def _write(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def _data(path, tokenizer, **kwargs):
    args = dict(seed=0, process_index=0, process_count=1, paths=path, tokenizer=tokenizer, seq_len=64,
                global_batch_size=4, shuffle=False, num_epochs=1)
    args.update(kwargs)
    return pair_data(**args)


def _completion_text(tokenizer, batch, row):
    return tokenizer.decode(batch["targets"][row][batch["loss_mask"][row] > 0])


def test_rows_are_adjacent_pairs_with_the_loss_on_the_completion_only(tmp_path, tokenizer):
    records = [{"prompt": f"Compute {i}+1.", "chosen": f"Answer: {i + 1}", "rejected": f"Answer: {i + 2}"}
               for i in range(4)]
    batches = list(_data(_write(tmp_path / "p.jsonl", records), tokenizer))
    assert len(batches) == 2
    fmt = chat_format_for(tokenizer)
    for b, batch in enumerate(batches):
        assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        for pair in range(2):
            record = records[2 * b + pair]
            chosen, rejected = 2 * pair, 2 * pair + 1
            assert _completion_text(tokenizer, batch, chosen) == f"\n{record['chosen']}<|user|>"
            assert _completion_text(tokenizer, batch, rejected) == f"\n{record['rejected']}<|user|>"
            prompt = fmt.prompt_ids([{"role": "user", "content": record["prompt"]}])
            # The prompt (all but its last token, which predicts the first completion token) is
            # the same in both rows and carries no loss.
            n = len(prompt) - 1
            np.testing.assert_array_equal(batch["inputs"][chosen, :n], prompt[:-1])
            np.testing.assert_array_equal(batch["inputs"][rejected, :n], prompt[:-1])
            assert not batch["loss_mask"][[chosen, rejected], : n - 1].any()
            for row in (chosen, rejected):
                length = int(batch["segment_ids"][row].sum())
                np.testing.assert_array_equal(batch["positions"][row, :length], np.arange(length))
                assert not batch["positions"][row, length:].any() and not batch["loss_mask"][row, length:].any()
                np.testing.assert_array_equal(batch["targets"][row, : length - 1], batch["inputs"][row, 1:length])


def test_record_forms_encode_alike(tokenizer):
    encoder = PairEncoder(tokenizer, prompt_template="{context}\n\n{query}")
    base = encoder({"prompt": "Doc text\n\nWhat?", "chosen": "Good.", "rejected": "Bad."})
    forms = [
        {"messages": [{"role": "user", "content": "Doc text\n\nWhat?"}], "chosen": "Good.", "rejected": "Bad."},
        {"prompt": [{"role": "user", "content": "Doc text\n\nWhat?"}],
         "chosen": {"role": "assistant", "content": "Good."},
         "rejected": [{"role": "assistant", "content": "Bad."}]},
        {"context": "Doc text", "query": "What?", "win_response": "Good.", "lose_response": "Bad."},
    ]
    for record in forms:
        example = encoder(record)
        for field in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
            np.testing.assert_array_equal(getattr(example, field), getattr(base, field), err_msg=field)


def test_earlier_assistant_turns_are_context(tokenizer):
    encoder = PairEncoder(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Add 2+2."}]
    example = encoder({"messages": messages, "chosen": "4", "rejected": "5"})
    masked = tokenizer.decode(example.chosen_ids[example.chosen_mask > 0])
    assert masked == "\n4<|user|>"
    assert "Hello there" in tokenizer.decode(example.chosen_ids)


def test_overlong_pairs_are_dropped_and_counted_through_a_checkpoint(tmp_path, tokenizer):
    records = []
    for i in range(12):
        long = i % 3 == 1  # every third pair has a rejected completion far beyond seq_len
        records.append({"prompt": f"Q{i}", "chosen": "short", "rejected": "x " * 80 if long else "no"})
    path = _write(tmp_path / "p.jsonl", records)
    data = _data(path, tokenizer, num_epochs=None)
    it = iter(data)
    first = [next(it) for _ in range(2)]
    assert dropped_examples(it) == 2  # 4 kept pairs came from records 0, 2, 3, 5
    state = it.get_state()
    later = [next(it) for _ in range(2)]
    assert dropped_examples(it) == 4
    restored = iter(_data(path, tokenizer, num_epochs=None))
    restored.set_state(json.loads(json.dumps(state)))
    assert dropped_examples(restored) == 2
    for expected in later:
        batch = next(restored)
        for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key])
    assert dropped_examples(restored) == 4
    texts = [_completion_text(tokenizer, b, r) for b in first for r in range(4)]
    assert texts == ["\nshort<|user|>", "\nno<|user|>"] * 4


def test_a_pair_too_long_on_one_side_only_is_dropped(tokenizer):
    encoder = PairEncoder(tokenizer)
    example = encoder({"prompt": "Q", "chosen": "y " * 40, "rejected": "n"})
    assert pair_rows(example, example.positions()) is not None
    assert pair_rows(example, example.positions() - 1) is None


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Q", "chosen": "a"', "malformed JSON"),
    ({"prompt": "Q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or an assistant message"),
    ({"prompt": "Q", "messages": [], "chosen": "a", "rejected": "b"}, "exactly one of 'prompt' and 'messages'"),
    ({"context": "c", "query": 1, "win_response": "a", "lose_response": "b"}, "field 'query' must be a string"),
    ({"prompt": "Q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "assistant message"),
])
def test_malformed_records_name_file_and_line(tmp_path, tokenizer, line, message):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl:3: .*{message}"):
        list(_data(path, tokenizer, global_batch_size=8))


def test_stored_reference_logps_follow_the_rows(tmp_path, tokenizer):
    records = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b", "ref_chosen_logp": -1.5 - i,
                "ref_rejected_logp": -2.25 - i} for i in range(4)]
    data = _data(_write(tmp_path / "p.jsonl", records), tokenizer, ref_logps=True, global_batch_size=8)
    assert data.batch_spec.features["ref_logps"].axes == ("act_batch",)
    assert data.batch_spec.group_size == 2
    (batch,) = list(data)
    np.testing.assert_array_equal(batch["ref_logps"], np.float32(
        [-1.5, -2.25, -2.5, -3.25, -3.5, -4.25, -4.5, -5.25]))
    records[2].pop("ref_rejected_logp")
    data = _data(_write(tmp_path / "q.jsonl", records), tokenizer, ref_logps=True, global_batch_size=8)
    with pytest.raises(DataFormatError, match=r"q.jsonl:3: field 'ref_rejected_logp' must be a finite number"):
        list(data)


def test_an_overlong_pair_needs_no_reference_log_probs(tmp_path, tokenizer):
    records = [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b", "ref_chosen_logp": -1.0,
                "ref_rejected_logp": -2.0} for i in range(4)]
    records.insert(1, {"prompt": "Q", "chosen": "a " * 80, "rejected": "b"})  # as precompute_ref writes it
    data = _data(_write(tmp_path / "p.jsonl", records), tokenizer, ref_logps=True)
    it = iter(data)
    batches = [next(it) for _ in range(2)]
    assert dropped_examples(it) == 1
    np.testing.assert_array_equal(np.concatenate([b["ref_logps"] for b in batches]), np.float32([-1, -2] * 4))


def test_rows_per_shard_must_hold_whole_pairs(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        _data(path, tokenizer, global_batch_size=6, num_data_shards=2)


def test_data_shards_keep_pairs_adjacent(tmp_path, tokenizer):
    records = [{"prompt": f"Q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(8)]
    batches = list(_data(_write(tmp_path / "p.jsonl", records), tokenizer, global_batch_size=8,
                         num_data_shards=2, num_epochs=1))
    texts = [_completion_text(tokenizer, batch, r) for batch in batches for r in range(8)]
    # shard 0 holds records 0, 2, 4, 6 and shard 1 records 1, 3, 5, 7 (round-robin); each batch
    # is shard 0's two pairs, then shard 1's
    order = (0, 2, 1, 3, 4, 6, 5, 7)
    assert texts == [f"\n{k}{i}<|user|>" for i in order for k in "cr"]


def test_synthetic_pairs_prefer_the_correct_solution(tmp_path):
    paths = write_arithmetic_pairs_jsonl(tmp_path, num_train=200, num_eval=20, seed=3, config=SMALL)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    problems = generate_problems(200, seed=3, split="train", config=SMALL)
    kinds = set()
    for record, problem in zip(records, problems):
        assert record["prompt"] == problem.question and record["chosen"] == problem.solution
        assert extract_answer(record["chosen"]) == problem.answer
        assert extract_answer(record["rejected"]) != problem.answer
        chosen, rejected = record["chosen"].split("\n"), record["rejected"].split("\n")
        assert len(chosen) == len(rejected)
        differing = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        kinds.add("answer" if differing == [len(chosen) - 1] else "step")
        assert chosen[: differing[0]] == rejected[: differing[0]]
    assert kinds == {"answer", "step"}
    # same seed -> same file; the eval split's prompts are held out
    again = write_arithmetic_pairs_jsonl(tmp_path / "again", num_train=200, num_eval=20, seed=3, config=SMALL)
    assert again["train"].read_text() == paths["train"].read_text()
    eval_prompts = {json.loads(line)["prompt"] for line in paths["eval"].read_text().splitlines()}
    assert not eval_prompts & {r["prompt"] for r in records}


def test_a_corrupted_step_carries_its_error_to_the_answer():
    (problem,) = [p for p in generate_problems(50, seed=0, split="train", config=SMALL)
                  if p.solution.count("Step") == 2][:1]
    rejected = corrupt_solution(problem, random.Random(0), step_fraction=1.0)
    lines = rejected.split("\n")
    assert lines[-1] != problem.solution.split("\n")[-1]
    assert all(line.endswith("ok.") for line in lines[:-1] if line not in problem.solution.split("\n"))


def test_synthetic_pairs_file_writes_once(tmp_path):
    path = synthetic_arithmetic_pairs_file(data_dir=str(tmp_path), split="eval", num_train=10, num_eval=5,
                                           config=SMALL)
    assert path.endswith("eval.jsonl") and len(open(path).readlines()) == 5
    stamp = (tmp_path / "train.jsonl").stat().st_mtime_ns
    synthetic_arithmetic_pairs_file(data_dir=str(tmp_path), split="train", num_train=10, num_eval=5)
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == stamp
