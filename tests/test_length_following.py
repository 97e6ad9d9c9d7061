"""The length-following task (glmjax.evals.length_following): its data and its evaluator's scores
against LongBench-Write's length rule applied by hand."""

import json

import numpy as np
import pytest

from glmjax.data.factories import lm_data
from glmjax.data.tokenizer import default_tokenizer
from glmjax.evals import length_following as lf
from glmjax.evals.longbench_write import length_score
from glmjax.models import create_model, preset


def test_answers_walk_the_cycle_and_the_files_mix_kinds(tmp_path):
    assert lf.answer_for("s", 4) == "s t a b"
    assert lf.prompt_for("c", 60) == 'Write 60 words, starting from "c".'
    lf.write_length_task_jsonl(str(tmp_path), num_train=500, num_eval=40, long_fraction=0.2, seed=3)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 500 and len(evaluation) == 40
    assert 0.12 < np.mean([row["kind"] == "long" for row in train]) < 0.28
    for row in train + evaluation:
        user, assistant = row["messages"]
        words = assistant["content"].split()
        assert len(words) == row["words"] and user["content"] == lf.prompt_for(words[0], row["words"])
        assert (row["words"] >= 40) == (row["kind"] == "long")
    # Written once: a second call with another seed reads the same files.
    assert lf.length_task_file(str(tmp_path), split="eval", seed=9) == str(tmp_path / "eval.jsonl")
    assert [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == evaluation
    with pytest.raises(ValueError, match="word counts must be >= 1"):
        lf.write_length_task_jsonl(str(tmp_path / "bad"), short_words=(0, 2))


def test_records_read_as_chat_sft_data(tmp_path):
    path = lf.length_task_file(str(tmp_path), split="train", num_train=50, num_eval=4)
    batches = iter(lm_data(seed=0, process_index=0, process_count=1, paths=path, data_format="chat",
                           tokenizer=default_tokenizer(str(tmp_path / "tok")), seq_len=256, global_batch_size=2))
    batch = next(batches)
    assert batch["loss_mask"].sum() > 0 and batch["segment_ids"].max() > 1  # packed documents


def test_evaluator_scores_what_the_model_wrote(tmp_path):
    tokenizer = default_tokenizer(str(tmp_path / "tok"))
    path = lf.length_task_file(str(tmp_path), split="eval", num_train=10, num_eval=6)
    rows = [json.loads(line) for line in open(path)]
    model = create_model(preset("glm4-tiny").replace(vocab_size=len(tokenizer)), seed=0)
    evaluator = lf.LengthFollowing(path=path, tokenizer=tokenizer, max_new_tokens=12, batch_size=8)
    result = evaluator(model, 0)
    # The same greedy answers, scored by hand.
    from glmjax.data.chat_format import chat_format_for
    from glmjax.evals.longbench_write import count_words
    from glmjax.inference.sampling import SamplingConfig
    fmt = chat_format_for(tokenizer)
    outputs = evaluator._engine.generate([fmt.prompt_ids(row["messages"][:1]) for row in rows],
                                         SamplingConfig(temperature=0.0), max_new_tokens=12,
                                         stop_token_ids=fmt.stop_token_ids)
    produced = [count_words(tokenizer.decode(o.tokens, skip_special_tokens=True)) for o in outputs]
    by_kind = {kind: [length_score(r["words"], n) for r, n in zip(rows, produced) if r["kind"] == kind]
               for kind in lf.KINDS}
    assert result["length_score"] == pytest.approx(np.mean(by_kind["short"] + by_kind["long"]))
    for kind in lf.KINDS:
        assert result[f"length_score_{kind}"] == pytest.approx(np.mean(by_kind[kind]) if by_kind[kind] else np.nan,
                                                               nan_ok=True)
    # A second call reuses the engine (new weights, no new compile).
    engine = evaluator._engine
    assert evaluator(model, 1) == result and evaluator._engine is engine
