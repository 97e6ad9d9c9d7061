"""A synthetic length-following task: does SFT teach a model to write as many words as asked?

The LongWriter question at toy scale. Each record asks for ``n`` words from a start word
(``Write 60 words, starting from "c".``); the answer walks a fixed cycle of :data:`LEXICON`
from that word, ``n`` words, so everything in it is predictable except where to stop. Most
records ask for a few words (short), some for many (long), the mix of a chat SFT set beside
LongWriter's long outputs: how the loss is averaged over the packed batch
(``LMObjective.averaging``) decides how much the long answers weigh.

* :func:`write_length_task_jsonl` / :func:`length_task_file`: the data (``train.jsonl``,
  ``eval.jsonl``), chat records ``{"id", "messages", "words", "kind"}`` that ``lm_data`` reads.
* :class:`LengthFollowing`: a trainer evaluator, greedy answers to the eval prompts scored with
  LongBench-Write's length score ``S_l`` (``glmjax.evals.longbench_write.length_score``), overall
  and by kind.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from collections.abc import Sequence
from typing import Any

import gin
from etils import epath
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import chat_format_for
from glmjax.evals.longbench_write import count_words, length_score
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models.decoder import Decoder

LEXICON = tuple("abcdefghijklmnopqrst")
"""The cycle an answer walks: each word is followed by the next (the last by the first). One-letter
words: LongBench-Write's ``count_words`` counts each, and a small tokenizer spends two tokens on one."""

KINDS = ("short", "long")


def answer_for(start: str, words: int) -> str:
    """``words`` words of :data:`LEXICON`'s cycle from ``start``, separated by spaces."""
    first = LEXICON.index(start)
    return " ".join(LEXICON[(first + k) % len(LEXICON)] for k in range(words))


def prompt_for(start: str, words: int) -> str:
    return f'Write {words} words, starting from "{start}".'


def _records(count: int, rng: random.Random, short_words: Sequence[int], long_words: Sequence[int],
             long_fraction: float, prefix: str) -> list[dict[str, Any]]:
    records = []
    for index in range(count):
        kind = "long" if rng.random() < long_fraction else "short"
        words = rng.choice(long_words if kind == "long" else short_words)
        start = rng.choice(LEXICON)
        records.append({"id": f"{prefix}{index}", "kind": kind, "words": words, "messages": [
            {"role": "user", "content": prompt_for(start, words)},
            {"role": "assistant", "content": answer_for(start, words)}]})
    return records


def write_length_task_jsonl(data_dir: str, *, num_train: int = 4000, num_eval: int = 64,
                            short_words: Sequence[int] = tuple(range(2, 9)),
                            long_words: Sequence[int] = tuple(range(40, 101, 10)),
                            long_fraction: float = 0.2, seed: int = 0) -> None:
    """Writes ``DATA_DIR/train.jsonl`` (``long_fraction`` of it long) and ``eval.jsonl`` (half short,
    half long, other draws of the same lengths).

    Raises:
      ValueError: a length below 1, or ``long_fraction`` outside [0, 1].
    """
    if min([*short_words, *long_words]) < 1 or not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"word counts must be >= 1 and long_fraction in [0, 1]: {short_words}, {long_words}, "
                         f"{long_fraction}")
    rng = random.Random(seed)
    train = _records(num_train, rng, short_words, long_words, long_fraction, "train-")
    evaluation = _records(num_eval, rng, short_words, long_words, 0.5, "eval-")
    directory = epath.Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evaluation)):
        tmp = directory / f"{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.rename(directory / f"{name}.jsonl")


@gin.configurable
def length_task_file(data_dir: str = gin.REQUIRED, split: str = "train", num_train: int = 4000,
                     num_eval: int = 64, long_fraction: float = 0.2, seed: int = 0) -> str:
    """Path of the task's ``split`` JSONL, written on first use (:func:`write_length_task_jsonl`)."""
    directory = epath.Path(data_dir)
    if not ((directory / "train.jsonl").exists() and (directory / "eval.jsonl").exists()):
        write_length_task_jsonl(data_dir, num_train=num_train, num_eval=num_eval,
                                long_fraction=long_fraction, seed=seed)
    return str(directory / f"{split}.jsonl")


@gin.configurable
@dataclasses.dataclass
class LengthFollowing:
    """A trainer evaluator: greedy answers to the eval prompts, scored by length.

    Returns ``{"length_score", "length_score_short", "length_score_long"}`` (mean ``S_l`` in
    [0, 100]) and ``"long_words_ratio"`` (median produced / required words of the long prompts).

    Attributes:
      path: an ``eval.jsonl`` of :func:`write_length_task_jsonl`.
      tokenizer: the run's tokenizer.
      max_new_tokens: generation budget (enough for the longest answer and more).
      batch_size: prompts per generation batch.
    """

    path: str = gin.REQUIRED
    tokenizer: PreTrainedTokenizerBase = gin.REQUIRED
    max_new_tokens: int = 256
    batch_size: int = 64
    _engine: GenerationEngine | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __call__(self, model: Decoder, step: int) -> dict[str, float]:
        del step
        rows = [json.loads(line) for line in epath.Path(self.path).read_text().splitlines() if line.strip()]
        fmt = chat_format_for(self.tokenizer)
        prompts = [fmt.prompt_ids(row["messages"][:1]) for row in rows]
        if self._engine is None:
            self._engine = GenerationEngine(model, max_batch_size=self.batch_size,
                                            length_buckets=(64, 128, 256, 512))
        else:
            self._engine.update_model(model)
        results = self._engine.generate(prompts, SamplingConfig(temperature=0.0), max_new_tokens=self.max_new_tokens,
                                        stop_token_ids=fmt.stop_token_ids)
        produced = [count_words(self.tokenizer.decode(r.tokens, skip_special_tokens=True)) for r in results]
        scores = {kind: [length_score(row["words"], n) for row, n in zip(rows, produced) if row["kind"] == kind]
                  for kind in KINDS}
        ratios = [n / row["words"] for row, n in zip(rows, produced) if row["kind"] == "long"]
        return {"length_score": statistics.fmean([*scores["short"], *scores["long"]]),
                **{f"length_score_{kind}": statistics.fmean(values) if values else float("nan")
                   for kind, values in scores.items()},
                "long_words_ratio": statistics.median(ratios) if ratios else float("nan")}
