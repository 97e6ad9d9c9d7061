r"""Trains a model from gin configs.

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
import os
import sys

import gin
import jax
from absl import app, flags, logging

from glmjax import configurables  # noqa: F401  (registers everything gin files may name)
from glmjax.training.trainer import TrainingDivergedError, train

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin config files, applied in order.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step, print memory per device, exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() from the environment.")

_GIN_FLAG_PREFIX = "--gin."


def split_gin_shorthand(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--gin.NAME=VALUE`` arguments (returned as bindings) from the rest."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith(_GIN_FLAG_PREFIX):
            name, sep, value = arg[len(_GIN_FLAG_PREFIX):].partition("=")
            if not sep:
                raise app.UsageError(f"{arg}: expected --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return rest, bindings


def _initialize_distributed() -> None:
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_gin(extra_bindings: list[str]) -> None:
    gin.add_config_file_search_path(REPO_ROOT)
    try:
        gin.parse_config_files_and_bindings(_GIN_FILES.value, [*_GIN_BINDINGS.value, *extra_bindings])
    except (ValueError, SyntaxError, OSError) as err:
        raise app.UsageError(f"gin config error: {err}") from err


def _resolve(value):
    """Follows a gin macro reference (``%MODEL_DIR``) to its value."""
    while isinstance(value, gin.config.ConfigurableReference) and value.scoped_selector.endswith("gin.macro"):
        value = gin.query_parameter("%" + value.scoped_selector.rsplit("/", 1)[0])
    return value


def main(argv: list[str], extra_bindings: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs (orbax) drown the progress line
    _initialize_distributed()
    _parse_gin(extra_bindings)
    if _COMPILE_ONLY.value:
        report = train(compile_only=True)
        print(json.dumps(report))
        return 0
    model_dir = _resolve(gin.query_parameter("train.model_dir"))
    if jax.process_index() == 0:
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())
    try:
        result = train()
    except TrainingDivergedError as err:
        logging.error("%s", err)
        print(f"training stopped: {err}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())
        summary = {
            "step": result.step,
            "loss": result.metrics.get("loss"),
            "before": result.before,
            "after": result.after,
            "model_dir": os.path.abspath(result.model_dir),
            "checkpoints": os.path.abspath(result.checkpoint_dir),
            "metrics": os.path.abspath(os.path.join(result.model_dir, "metrics.jsonl")),
            "stopped_early": result.stopped_early,
        }
        print(json.dumps(summary))
    return 0


def run() -> None:
    argv, extra_bindings = split_gin_shorthand(sys.argv)
    app.run(lambda args: main(args, extra_bindings), argv=argv)


if __name__ == "__main__":
    run()
