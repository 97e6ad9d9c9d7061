r"""Trains a model from gin configs, or runs a job of stages (``run_stages.stages`` bound, e.g.
the quickstart: SFT -> RL -> inference scaling; one JSON line per finished stage).

  python -m launch.train --gin_file=configs/quickstart.gin
  python -m launch.train --gin_file=configs/experiments/glm4_9b_sft.gin \
      --gin.MODEL_DIR="'/ckpt/run1'" --gin.MESH_SHAPE="(1, -1, 4, 1)"

Repeatable ``--gin_file`` and ``--gin_bindings``; ``--gin.NAME=VALUE`` is shorthand for the
binding ``NAME = VALUE``. Multi-process runs pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or ``--distributed`` to read them from the
environment on TPU pods / SLURM).
"""

from __future__ import annotations

import json
import sys

import gin
import jax
from absl import app, flags, logging

from glmjax import configurables  # noqa: F401  (registers everything gin files may name)
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.data.sources import DataFormatError, EmptyDatasetError
from glmjax.data.spec import BatchSpecError
from glmjax.rl.stages import run_stages, stage_summary
from glmjax.training.trainer import ConfigError, TrainingDivergedError, train
from launch import common
from launch.common import GinConfigError, one_line, parse_gin, split_gin_shorthand  # noqa: F401  (re-exported)

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin config files, applied in order.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step, print memory per device, exit.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: compile for this TPU topology (e.g. v5p:2x2x1, v5e:2x4) "
    "through libtpu, without a TPU; prints per-device HBM use and XLA's FLOPs.")

# Errors that mean "the config or the input is wrong": one line, non-zero exit, nothing lost.
_USER_ERRORS = (ConfigError, CheckpointError, BatchSpecError, DataFormatError, EmptyDatasetError,
                FileNotFoundError)


def _fail(message: str) -> int:
    logging.error("%s", message)
    print(f"train: {message}", file=sys.stderr)
    return 2


def main(argv: list[str], extra_bindings: list[str]) -> int:
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {argv[1:]}")
    common.quiet_library_logs()
    common.initialize_distributed()
    try:
        parse_gin(_GIN_FILES.value, [*_GIN_BINDINGS.value, *extra_bindings])
    except GinConfigError as err:
        return _fail(f"gin config error: {err}")
    if _TOPOLOGY.value and not _COMPILE_ONLY.value:
        return _fail("--topology needs --compile_only")
    try:
        if _COMPILE_ONLY.value:
            print(json.dumps(train(compile_only=True, topology=_TOPOLOGY.value)))
            return 0
        if _has_stages():
            results = run_stages(on_result=_print_stage)
            if jax.process_index() == 0:
                print(stage_summary(results), flush=True)
            return 0
        result = train()
    except TrainingDivergedError as err:
        logging.error("%s", err)
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    except _USER_ERRORS as err:
        return _fail(one_line(err))
    if jax.process_index() == 0:
        summary = {
            "step": result.step,
            "loss": result.metrics.get("loss"),
            "before": result.before,
            "after": result.after,
            "skipped_updates": result.skipped_updates,
            "dropped_examples": result.dropped_examples,
            "model_dir": result.model_dir,
            "checkpoints": result.checkpoint_dir,
            "metrics": f"{result.model_dir}/metrics.jsonl",
            "stopped_early": result.stopped_early,
        }
        print(json.dumps(summary))
    return 0


def _has_stages() -> bool:
    """Whether the gin config describes a job of stages (``run_stages.stages`` is bound)."""
    try:
        gin.query_parameter("run_stages.stages")
    except ValueError:
        return False
    return True


def _print_stage(result: dict) -> None:
    """One line per stage on stdout: the stage's result as JSON (process 0 only); a Markdown
    summary of all stages follows at the end."""
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}), flush=True)


def run() -> None:
    argv, extra_bindings = split_gin_shorthand(sys.argv)
    app.run(lambda args: main(args, extra_bindings), argv=argv)


if __name__ == "__main__":
    run()
