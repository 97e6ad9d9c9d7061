"""Benchmarks and scorers run on generated text."""

from glmjax.evals.synthetic_task import ArithmeticExactMatch

__all__ = ["ArithmeticExactMatch"]
