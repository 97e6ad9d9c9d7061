"""A job of several stages run in order: training runs (SFT, then RL from it) and evaluations.

The embedded default is T1's recipe at toy scale: SFT on worked, self-checking solutions, RL from
the SFT model, then the inference-scaling probe on both. Each training stage is ``train()`` under
its own gin scope (``sft/train.model_dir = ...``, ``rl/train.objective = ...``; unscoped
``train.*`` bindings are shared), so one gin file describes the whole job.

Resumable: every finished stage's result is written to ``results_path`` (JSON, replaced
atomically); a rerun reports finished stages from it and continues with the first unfinished one,
and a training stage killed midway resumes from its last checkpoint (``train`` does that).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import gin
import jax
from etils import epath

from glmjax.checkpoints.training_runs import load_trained_model
from glmjax.evals.inference_scaling import (
    evaluate_inference_scaling,
    load_scaling_problems,
    run_checkpoint_steps,
    write_scaling_report,
)
from glmjax.models.decoder import Decoder
from glmjax.training.trainer import train


class Stage(Protocol):
    name: str

    def run(self) -> dict[str, Any]:
        """Runs the stage; returns a JSON-serialisable result."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainStage:
    """``train()`` with the bindings of gin scope ``name`` (over the unscoped ones).

    Result: ``{"stage", "model_dir", "step", "before", "after", "metrics"}`` (evaluator results
    before and after training, the last logged metrics).
    """

    name: str

    def run(self) -> dict[str, Any]:
        with gin.config_scope(self.name):
            result = train()
        return {"stage": self.name, "model_dir": result.model_dir, "step": result.step,
                "before": result.before, "after": result.after, "metrics": result.metrics,
                "stopped_early": result.stopped_early}


class _Checkpoints(Mapping[str, Decoder]):
    """label -> the model of (run_dir, step), loaded on access (one in memory at a time)."""

    def __init__(self, entries: Mapping[str, tuple[str, int]]):
        self.entries = dict(entries)

    def __getitem__(self, label: str) -> Decoder:
        run_dir, step = self.entries[label]
        return load_trained_model(run_dir, step)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class InferenceScalingStage:
    """The truncation probe (``glmjax.evals.inference_scaling``) on checkpoints of earlier stages.

    Attributes:
      runs: ``(label, run_dir)`` pairs; every checkpoint of each run is evaluated when
        ``every_checkpoint``, else its newest one.
      problems_path: the problems (the built-in task's eval JSONL or a math JSONL).
      tokenizer: the models' tokenizer.
      output_dir: where the JSON, Markdown and PNG reports go.
      budgets, num_samples, temperature, checker, max_problems, finished_responses: the probe's
        settings (``evaluate_inference_scaling``).
    """

    name: str = "scaling"
    runs: Sequence[tuple[str, str]] = gin.REQUIRED
    problems_path: str = gin.REQUIRED
    tokenizer: Any = gin.REQUIRED
    output_dir: str = gin.REQUIRED
    budgets: Sequence[int] = (8, 16, 32, 64, 96)
    num_samples: int = 4
    temperature: float = 1.0
    checker: str = "arithmetic"
    max_problems: int | None = None
    every_checkpoint: bool = True
    finished_responses: str = "own_answer"
    seed: int = 0

    def checkpoints(self) -> dict[str, tuple[str, int]]:
        entries = {}
        for label, run_dir in self.runs:
            steps = run_checkpoint_steps(run_dir)
            for step in steps if self.every_checkpoint else steps[-1:]:
                entries[f"{label} step {step}"] = (run_dir, step)
        return entries

    def run(self) -> dict[str, Any]:
        problems = load_scaling_problems(self.problems_path, self.tokenizer)[: self.max_problems]
        report = evaluate_inference_scaling(
            _Checkpoints(self.checkpoints()), self.tokenizer, problems, self.budgets, self.num_samples,
            self.temperature, checker=self.checker, seed=self.seed,
            finished_responses=self.finished_responses)
        files = write_scaling_report(report, self.output_dir) if jax.process_index() == 0 else {}
        accuracy = {entry.name: {str(cell.budget): cell.accuracy for cell in entry.budgets}
                    for entry in report.checkpoints}
        return {"stage": self.name, "files": {k: str(v) for k, v in files.items()},
                "pass_at_1": accuracy, "own_answer": {e.name: e.full_accuracy for e in report.checkpoints},
                "markdown": report.markdown()}


def _read_results(path: epath.Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        return {row["stage"]: row for row in json.loads(path.read_text())}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a stage results file ({err}); move it away to rerun every stage") from err


def _write_results(path: epath.Path, results: list[dict[str, Any]]) -> None:
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / (path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=1))
    partial.replace(path)


@gin.configurable
def run_stages(
    stages: Sequence[Stage] = gin.REQUIRED,
    results_path: str = gin.REQUIRED,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs ``stages`` in order, skipping those recorded as finished in ``results_path``.

    Args:
      stages: the stages; their names must be unique.
      results_path: JSON list of finished stages' results.
      on_result: called with each stage's result (finished earlier or just now), in order.

    Returns:
      Every stage's result, in order.
    """
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"run_stages.stages: stage names must be unique, got {names}")
    path = epath.Path(results_path)
    finished = _read_results(path)
    results = []
    for stage in stages:
        if stage.name in finished:
            logging.info("stage %s: finished earlier (%s)", stage.name, path)
            result = finished[stage.name]
        else:
            logging.info("stage %s: running", stage.name)
            result = stage.run()
            if result.get("stopped_early"):
                if on_result is not None:
                    on_result(result)
                results.append(result)
                break  # stopped by a signal: the rerun resumes this stage
            _write_results(path, [*results, result])
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def stage_summary(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the training stages' evaluator results before and after (exact match,
    and sampled exact match where measured), then each evaluation stage's own table."""
    lines = ["| stage | steps | exact match before | after | sampled exact match before | after |",
             "|---|---:|---:|---:|---:|---:|"]
    tables = []
    for result in results:
        if "markdown" in result:
            tables.append(result["markdown"])
            continue
        before, after = result.get("before", {}), result.get("after", {})
        lines.append(f"| {result['stage']} | {result.get('step', '-')} | {_percent(before.get('exact_match'))} | "
                     f"{_percent(after.get('exact_match'))} | {_percent(before.get('sampled_exact_match'))} | "
                     f"{_percent(after.get('sampled_exact_match'))} |")
    return "\n".join(["\n".join(lines), *tables])
