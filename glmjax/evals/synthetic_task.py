"""Exact-match accuracy of greedy (and optionally sampled) answers on the held-out synthetic
arithmetic problems."""

from __future__ import annotations

import dataclasses
import time

import gin
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_template import stop_token_ids
from glmjax.data.synthetic import EvalPrompt, exact_match_accuracy, load_eval_prompts
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig
from glmjax.models.decoder import Decoder


@gin.configurable
@dataclasses.dataclass
class ArithmeticExactMatch:
    """A trainer evaluator: ``evaluator(model, step) -> {"exact_match": fraction, ...}``.

    The first call builds one ``GenerationEngine`` (and reads the problems); later calls hand it
    the current parameters (``update_model``), so the compiled programs are reused: one
    compilation per run, not per evaluation. By default the engine shares the trainer's
    parameter buffers (``stacked_layers``): no copy of the weights per evaluation and none held
    between evaluations.

    Attributes:
      path: an ``eval.jsonl`` written by :func:`glmjax.data.synthetic.write_arithmetic_jsonl`.
      tokenizer: the tokenizer the model was trained with.
      max_problems: evaluate the first N problems (all when None).
      max_new_tokens: generation budget per problem.
      batch_size: prompts per compiled generation batch.
      stacked_layers: decode with the training layout (shared buffers). False copies the weights
        into the per-layer layout at every evaluation and keeps that copy until the next one
        (faster decode on CPU, a second copy of the weights in memory).
      num_samples: also sample this many answers per problem at ``temperature`` and report
        ``sampled_exact_match`` (pass@1 averaged over the samples; 0: greedy only). Sample ``j``
        of problem ``i`` draws with seed ``seed + i * num_samples + j`` at every evaluation.
      temperature, seed: of those samples.
    """

    path: str = gin.REQUIRED
    tokenizer: PreTrainedTokenizerBase = gin.REQUIRED
    max_problems: int | None = None
    max_new_tokens: int = 192
    batch_size: int = 64
    stacked_layers: bool = True
    num_samples: int = 0
    temperature: float = 1.0
    seed: int = 0
    _engine: GenerationEngine | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _prompts: list[EvalPrompt] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def engine(self) -> GenerationEngine | None:
        """The engine built by the first call (None before it)."""
        return self._engine

    def __call__(self, model: Decoder, step: int) -> dict[str, float]:
        del step
        if self._engine is None:
            self._prompts = load_eval_prompts(self.path, self.tokenizer)[: self.max_problems]
            self._engine = GenerationEngine(model, max_batch_size=self.batch_size,
                                            length_buckets=(64, 128, 256, 512),
                                            stacked_layers=self.stacked_layers)
        else:
            self._engine.update_model(model)
        start = time.time()
        results = self._engine.generate(
            [p.input_ids.tolist() for p in self._prompts], SamplingConfig(temperature=0.0),
            max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids(self.tokenizer),
        )
        texts = [self.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
        answers = [p.answer for p in self._prompts]
        out = {"exact_match": exact_match_accuracy(texts, answers), "problems": float(len(self._prompts))}
        if self.num_samples:
            sampled = self._engine.generate(
                [p.input_ids.tolist() for p in self._prompts], SamplingConfig(temperature=self.temperature),
                max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids(self.tokenizer),
                seed=self.seed, num_samples=self.num_samples)
            sampled_texts = [self.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in sampled]
            out["sampled_exact_match"] = exact_match_accuracy(
                sampled_texts, [a for a in answers for _ in range(self.num_samples)])
        out["generation_seconds"] = time.time() - start
        return out
