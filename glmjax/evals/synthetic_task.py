"""Exact-match accuracy of greedy answers on the held-out synthetic arithmetic problems."""

from __future__ import annotations

import dataclasses
import time

import gin
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_template import stop_token_ids
from glmjax.data.synthetic import exact_match_accuracy, load_eval_prompts
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models.decoder import Decoder


@gin.configurable
@dataclasses.dataclass
class ArithmeticExactMatch:
    """A trainer evaluator: ``evaluator(model, step) -> {"exact_match": fraction, ...}``.

    Attributes:
      path: an ``eval.jsonl`` written by :func:`glmjax.data.synthetic.write_arithmetic_jsonl`.
      tokenizer: the tokenizer the model was trained with.
      max_problems: evaluate the first N problems (all when None).
      max_new_tokens: generation budget per problem.
      batch_size: prompts per compiled generation batch.
    """

    path: str = gin.REQUIRED
    tokenizer: PreTrainedTokenizerBase = gin.REQUIRED
    max_problems: int | None = None
    max_new_tokens: int = 192
    batch_size: int = 64

    def __call__(self, model: Decoder, step: int) -> dict[str, float]:
        del step
        prompts = load_eval_prompts(self.path, self.tokenizer)[: self.max_problems]
        engine = GenerationEngine(model, max_batch_size=self.batch_size,
                                  length_buckets=(64, 128, 256, 512))
        start = time.time()
        results = engine.generate(
            [p.input_ids.tolist() for p in prompts], SamplingConfig(temperature=0.0),
            max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids(self.tokenizer),
        )
        texts = [self.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
        return {
            "exact_match": exact_match_accuracy(texts, [p.answer for p in prompts]),
            "problems": float(len(prompts)),
            "generation_seconds": time.time() - start,
        }
