"""Preference pairs for DPO: JSONL records -> batches of adjacent (chosen, rejected) rows.

Records (one JSON object per line), either

* ``{"prompt": str | [messages], "chosen": C, "rejected": C}`` or
  ``{"messages": [messages], "chosen": C, "rejected": C}`` (optional ``"tools"``), where a
  completion ``C`` is a string, an assistant message ``{"role": "assistant", "content": ...}`` or a
  list holding one such message; a string prompt is one user turn; or
* LongReward's ``{"context": str, "query": str, "win_response": str, "lose_response": str}``:
  the prompt is one user turn ``prompt_template.format(context=..., query=...)`` (default
  ``"{context}\\n\\n{query}"``), the winner is chosen.

Optional per-record reference log-probs (``launch.precompute_ref`` writes them):
``"ref_chosen_logp"`` and ``"ref_rejected_logp"``, summed completion log-probs in nats.

Encoding: prompt + completion in the tokenizer's chat format
(:func:`glmjax.data.chat_format.chat_format_for`), the loss mask on the completion's tokens only
(the final assistant turn and the token that ends it; earlier assistant turns of a multi-turn prompt
are context). Both completions must extend the same prompt tokens.

Batches: every element has ``global_batch_size // process_count`` rows; rows ``2i`` and ``2i + 1``
are the chosen and rejected sequence of one pair (the batch spec's ``group_size`` is 2). Keys are
the LM keys (``glmjax.data.spec.LM_FEATURES``), int32 ``[rows, seq_len]``, one sequence per row
padded at the end (segment id 1 on it, 0 on padding; positions from 0), plus with ``ref_logps``
float32 ``[rows]`` ``ref_logps`` (``glmjax.objectives.dpo.REF_LOGPS``).

A pair whose chosen or rejected sequence has more than ``seq_len`` (input, target) positions is
dropped and counted: the iterator's ``dropped_examples`` (:func:`glmjax.data.pipeline.dropped_examples`;
the trainer reports it), exactly through checkpoints as for LM data. A malformed record raises
:class:`~glmjax.data.sources.DataFormatError` naming its file and line.

Shuffling, repetition, data shards and checkpointable iterators are as in
:func:`glmjax.data.pipeline.lm_dataset` (records are pairs; each shard yields whole pairs).

The synthetic arithmetic task gives pairs too (:func:`write_arithmetic_pairs_jsonl`): the chosen
completion is the worked solution, the rejected one the same solution with one step's result made
wrong (and its check falsely passed, every later step following the wrong value) or with a wrong
final answer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import grain
import jax
import numpy as np
from etils import epath
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import chat_format_for
from glmjax.data.encoders import settle_tokenizer
from glmjax.data.pipeline import (
    DROPPED_KEY,
    CountDrops,
    FoldDrops,
    ReadAndEncode,
    check_pipeline_arguments,
    concat_rows,
)
from glmjax.data.sources import JsonlSource, PathsLike
from glmjax.data.spec import (
    BatchSpec,
    FeatureSpec,
    SpecifiedIterDataset,
    lm_batch_spec,
    with_batch_spec,
)
from glmjax.data.synthetic import ArithmeticConfig, Problem, generate_problems

REF_CHOSEN_FIELD = "ref_chosen_logp"
REF_REJECTED_FIELD = "ref_rejected_logp"
REF_LOGPS_KEY = "ref_logps"
LONG_REWARD_TEMPLATE = "{context}\n\n{query}"
_ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One encoded pair: int32 ``[n]`` token ids and loss masks of both sequences, and the stored
    reference log-probs (``[2]`` float32: chosen, rejected) when read."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    ref_logps: np.ndarray | None = None

    def positions(self) -> int:
        """(input, target) positions of the longer sequence (``len(ids) - 1``)."""
        return max(len(self.chosen_ids), len(self.rejected_ids)) - 1


def _completion(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"field {field!r}: a list must hold exactly one assistant message, got {len(value)}")
        value = value[0]
    if not isinstance(value, Mapping) or value.get("role") != "assistant":
        raise ValueError(f"field {field!r} must be a string or an assistant message")
    return dict(value)


class PairEncoder:
    """A pair record (module docstring) -> :class:`PairExample`.

    Args:
      tokenizer: the model's tokenizer (its chat format is used).
      ref_logps: read ``ref_chosen_logp`` / ``ref_rejected_logp`` (required then, except in pairs
        longer than ``max_positions``, which ``launch.precompute_ref`` writes without them).
      prompt_template: how LongReward records' ``context`` and ``query`` become the user turn.
      max_positions: the rows' ``seq_len``; a longer pair is returned without reference
        log-probs (:func:`pair_rows` drops it). None: read them from every pair.
    """

    required_fields: tuple[str, ...] = ()

    def __init__(self, tokenizer: PreTrainedTokenizerBase, ref_logps: bool = False,
                 prompt_template: str = LONG_REWARD_TEMPLATE, max_positions: int | None = None):
        settle_tokenizer(tokenizer)
        self.chat_format = chat_format_for(tokenizer)
        self.ref_logps = ref_logps
        self.prompt_template = prompt_template
        self.max_positions = max_positions

    def _prompt_and_completions(self, record: Mapping[str, Any]) -> tuple[list, dict, dict]:
        if not isinstance(record, Mapping):
            raise ValueError(f"a pair record must be a JSON object, got {type(record).__name__}")
        if "win_response" in record or "lose_response" in record:
            for field in ("context", "query", "win_response", "lose_response"):
                if not isinstance(record.get(field), str):
                    raise ValueError(f"LongReward record: field {field!r} must be a string")
            content = self.prompt_template.format(context=record["context"], query=record["query"])
            return ([{"role": "user", "content": content}],
                    _completion(record["win_response"], "win_response"),
                    _completion(record["lose_response"], "lose_response"))
        if ("prompt" in record) == ("messages" in record):
            raise ValueError("a pair record needs exactly one of 'prompt' and 'messages' (or "
                             "LongReward's context/query/win_response/lose_response)")
        prompt = record["prompt"] if "prompt" in record else record["messages"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("field 'prompt'/'messages' must be a string or a non-empty list of messages")
        for field in ("chosen", "rejected"):
            if field not in record:
                raise KeyError(field)
        return list(prompt), _completion(record["chosen"], "chosen"), _completion(record["rejected"], "rejected")

    def _encode(self, prompt: list, completion: dict, tools: Any, prompt_ids: list[int],
                field: str) -> tuple[np.ndarray, np.ndarray]:
        encoding = self.chat_format.encode([*prompt, completion], tools)
        ids, mask = encoding.input_ids, encoding.loss_mask.copy()
        if ids[: len(prompt_ids)].tolist() != prompt_ids:
            raise ValueError(f"field {field!r}: the conversation does not start with the prompt's "
                             "tokens (the chat template renders the prompt differently)")
        mask[: len(prompt_ids)] = 0
        if not mask.any():
            raise ValueError(f"field {field!r}: the completion encodes to no trainable tokens")
        return ids, mask

    def __call__(self, record: Mapping[str, Any]) -> PairExample:
        prompt, chosen, rejected = self._prompt_and_completions(record)
        tools = record.get("tools")
        prompt_ids = self.chat_format.prompt_ids(prompt, tools)
        chosen_ids, chosen_mask = self._encode(prompt, chosen, tools, prompt_ids, "chosen")
        rejected_ids, rejected_mask = self._encode(prompt, rejected, tools, prompt_ids, "rejected")
        example = PairExample(chosen_ids, chosen_mask, rejected_ids, rejected_mask)
        if not self.ref_logps or (self.max_positions is not None and example.positions() > self.max_positions):
            return example
        values = []
        for field in (REF_CHOSEN_FIELD, REF_REJECTED_FIELD):
            value = record.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"field {field!r} must be a finite number (run launch.precompute_ref), "
                                 f"got {value!r}")
            values.append(value)
        return dataclasses.replace(example, ref_logps=np.asarray(values, np.float32))


def _row(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    n = len(ids) - 1
    row = {key: np.zeros(seq_len, np.int32) for key in _ROW_KEYS}
    row["inputs"][:n] = ids[:-1]
    row["targets"][:n] = ids[1:]
    row["loss_mask"][:n] = mask[1:]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


def pair_rows(example: PairExample, seq_len: int) -> dict[str, np.ndarray] | None:
    """The pair as two rows (``{key: [2, seq_len]}``, plus ``ref_logps`` ``[2]`` when read), or
    None when either sequence has more than ``seq_len`` (input, target) positions."""
    if example.positions() > seq_len:
        return None
    chosen = _row(example.chosen_ids, example.chosen_mask, seq_len)
    rejected = _row(example.rejected_ids, example.rejected_mask, seq_len)
    rows = {key: np.stack([chosen[key], rejected[key]]) for key in _ROW_KEYS}
    if example.ref_logps is not None:
        rows[REF_LOGPS_KEY] = example.ref_logps
    return rows


class _ToRows:
    """PairExample -> two rows with no drops before them, or a drop marker (over-long)."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def __call__(self, example: PairExample) -> dict[str, Any]:
        rows = pair_rows(example, self._seq_len)
        return {DROPPED_KEY: 1} if rows is None else {**rows, DROPPED_KEY: 0}


def _flatten_pairs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[pairs, 2, ...] -> [rows, ...] (chosen, rejected, chosen, ...); drop counts stay per pair."""
    return {key: value if key == DROPPED_KEY else value.reshape(-1, *value.shape[2:])
            for key, value in batch.items()}


def pair_batch_spec(ref_logps: bool) -> BatchSpec:
    """The LM keys, ``ref_logps`` float32 ``(act_batch,)`` when stored, and ``group_size`` 2."""
    extra = {REF_LOGPS_KEY: FeatureSpec("float32", ("act_batch",))} if ref_logps else None
    return lm_batch_spec(extra, group_size=2)


def pair_dataset(
    source: JsonlSource,
    encoder: PairEncoder,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_data_shards: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> SpecifiedIterDataset:
    """The per-host dataset of pair batches (module docstring).

    Args:
      source: the pair records.
      encoder: a :class:`PairEncoder`.
      seq_len: tokens per row.
      global_batch_size: rows per step over all processes (two per pair); rows per data shard
        must be even.
      seed, shuffle, num_epochs, process_index, process_count, num_data_shards, read_options: as
        :func:`glmjax.data.pipeline.lm_dataset`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_data_shards = process_count if num_data_shards is None else num_data_shards
    check_pipeline_arguments(
        seq_len=seq_len, global_batch_size=global_batch_size, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count, num_data_shards=num_data_shards,
        overlong="drop", group_size=2)
    indices = grain.MapDataset.range(len(source))
    if shuffle:
        indices = indices.shuffle(seed)
    indices = indices.repeat(num_epochs)
    read = ReadAndEncode(source, encoder)
    to_rows = _ToRows(seq_len)
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
    pairs_per_shard = global_batch_size // num_data_shards // 2
    shards_per_process = num_data_shards // process_count
    first = process_index * shards_per_process
    shards = []
    for shard in range(first, first + shards_per_process):
        elements = indices[shard::num_data_shards].map(read).map(to_rows).to_iter_dataset(read_options)
        pairs = FoldDrops(elements, len(source), seq_len)
        shards.append(pairs.batch(pairs_per_shard, drop_remainder=True).map(_flatten_pairs))
    batches = shards[0] if len(shards) == 1 else grain.experimental.ZipIterDataset(
        shards, strict=False).map(concat_rows)
    return with_batch_spec(CountDrops(batches), pair_batch_spec(encoder.ref_logps))


@gin.configurable
def pair_data(
    *,
    seed: int,
    process_index: int,
    process_count: int,
    paths: PathsLike = gin.REQUIRED,
    tokenizer: PreTrainedTokenizerBase = gin.REQUIRED,
    seq_len: int = gin.REQUIRED,
    global_batch_size: int = gin.REQUIRED,
    shuffle: bool = True,
    num_epochs: int | None = None,
    ref_logps: bool = False,
    prompt_template: str = LONG_REWARD_TEMPLATE,
    num_data_shards: int | None = None,
) -> SpecifiedIterDataset:
    """The trainer's pair data factory (``train.train_data = @pair_data``) over JSONL ``paths``
    (:func:`pair_dataset`; ``global_batch_size`` counts rows, two per pair). With ``ref_logps``
    the records' stored reference log-probs become the ``ref_logps`` key
    (``DPOObjective.reference = "precomputed"``)."""
    encoder = PairEncoder(tokenizer, ref_logps=ref_logps, prompt_template=prompt_template,
                          max_positions=seq_len)
    return pair_dataset(
        JsonlSource(paths), encoder, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
        process_count=process_count, num_data_shards=num_data_shards)


# -- pairs from the synthetic arithmetic task ---------------------------------------------------

_TOKENS = re.compile(r"\d+|[+\-*]")
_INVERSE = {"+": "-", "-": "+", "*": "/"}


def _chain(expression: str) -> tuple[int, list[tuple[str, int]]]:
    """``"(7+5)*3-4"`` -> ``(7, [("+", 5), ("*", 3), ("-", 4)])`` (evaluated left to right)."""
    tokens = _TOKENS.findall(expression)
    return int(tokens[0]), [(op, int(b)) for op, b in zip(tokens[1::2], tokens[2::2])]


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _step_line(number: int, op: str, a: int, b: int, result: int, claimed_back: int) -> str:
    """A step whose check claims ``result inverse b = claimed_back`` and passes."""
    return f"Step {number}: {a}{op}{b}={result}. Check: {result}{_INVERSE[op]}{b}={claimed_back}, ok."


def _wrong(rng: random.Random, value: int) -> int:
    return value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])


def corrupt_solution(problem: Problem, rng: random.Random, step_fraction: float = 0.5) -> str:
    """A wrong version of ``problem.solution``: with probability ``step_fraction`` one step's
    result is off by 1-3, its check falsely passes and the later steps carry the error to a wrong
    answer; otherwise only the final answer is off by 1-3. The lines before the corruption are
    the solution's own, so chosen and rejected share a prefix."""
    lines = problem.solution.split("\n")
    start, steps = _chain(problem.expression)
    if rng.random() >= step_fraction:
        return "\n".join([*lines[:-1], f"Answer: {_wrong(rng, problem.answer)}"])
    bad = rng.randrange(len(steps))
    value = start
    for op, b in steps[:bad]:
        value = _apply(op, value, b)
    out = list(lines[:bad])
    for number, (op, b) in enumerate(steps[bad:], start=bad + 1):
        result = _apply(op, value, b)
        if number == bad + 1:
            result = _wrong(rng, result)
        out.append(_step_line(number, op, value, b, result, value))
        value = result
    out.append(f"Answer: {value}")
    return "\n".join(out)


def write_arithmetic_pairs_jsonl(
    out_dir: str | Path,
    *,
    num_train: int,
    num_eval: int,
    seed: int = 1,
    config: ArithmeticConfig = ArithmeticConfig(),
    step_fraction: float = 0.5,
) -> dict[str, Path]:
    """Writes ``train.jsonl`` and ``eval.jsonl`` pair files under ``out_dir``: records
    ``{"prompt": question, "chosen": solution, "rejected": corrupted, "answer": N}`` over the
    synthetic task's splits (``glmjax.data.synthetic.generate_problems`` with ``seed``).

    Returns:
      ``{"train": path, "eval": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", num_train), ("eval", num_eval)):
        rng = random.Random(f"pairs-{seed}-{split}")
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for problem in generate_problems(count, seed=seed, split=split, config=config):
                record = {"prompt": problem.question, "chosen": problem.solution,
                          "rejected": corrupt_solution(problem, rng, step_fraction),
                          "answer": problem.answer}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


@gin.configurable
def synthetic_arithmetic_pairs_file(
    data_dir: str = gin.REQUIRED,
    split: str = "train",
    num_train: int = 20000,
    num_eval: int = 200,
    seed: int = 1,
    step_fraction: float = 0.5,
    config: ArithmeticConfig = ArithmeticConfig(),
) -> str:
    """Path of the synthetic task's ``split`` pair JSONL, written on first use
    (:func:`write_arithmetic_pairs_jsonl`)."""
    directory = epath.Path(data_dir)
    if not ((directory / "train.jsonl").exists() and (directory / "eval.jsonl").exists()):
        write_arithmetic_pairs_jsonl(data_dir, num_train=num_train, num_eval=num_eval, seed=seed,
                                     config=config, step_fraction=step_fraction)
    return str(directory / f"{split}.jsonl")


__all__ = ["LONG_REWARD_TEMPLATE", "PairEncoder", "PairExample", "corrupt_solution", "pair_batch_spec",
           "pair_data", "pair_dataset", "pair_rows", "synthetic_arithmetic_pairs_file",
           "write_arithmetic_pairs_jsonl"]
