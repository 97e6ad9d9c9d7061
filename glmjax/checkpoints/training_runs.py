"""Reading a ``launch.train`` MODEL_DIR without the trainer: its model config, its tokenizer and
the verified parameters of a checkpoint (serving, generation and evaluation use this)."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from glmjax import sharding as sharding_lib
from glmjax.checkpoints import paths
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.orbax_io import read_model_config, restore_target
from glmjax.checkpoints.step_checkpoints import restore_newest_good, restore_step
from glmjax.models.decoder import Decoder

TOKENIZER_DIR = "tokenizer"
"""Where a run keeps its tokenizer: ``MODEL_DIR/tokenizer`` (``save_pretrained`` layout)."""


def run_tokenizer_dir(model_dir: str | os.PathLike) -> str:
    """The tokenizer directory a training run recorded (``train.tokenizer``).

    Raises:
      CheckpointError: the run recorded none (it was trained without ``train.tokenizer``).
    """
    path = paths.as_path(model_dir) / TOKENIZER_DIR
    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{model_dir}: the run recorded no tokenizer ({path} is missing; set "
                              "train.tokenizer when training, or pass the tokenizer's directory)")
    return str(path)


def load_trained_model(
    model_dir: str | os.PathLike,
    step: int | None = None,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.AxisRules | None = None,
    **overrides,
) -> Decoder:
    """The model of a training run: ``model_dir/model_config.json`` and the verified parameters
    of checkpoint ``step`` (default: the newest good one) read straight into their shards;
    optimizer and host states are not read.

    Args:
      model_dir: the run's MODEL_DIR (``launch.train``), a local path or URL.
      step: checkpoint step; None for the newest good one.
      mesh, rules: where to place the parameters (default: the first device).
      overrides: runtime config fields (e.g. ``attention_backend``, ``compute_dtype``).

    Raises:
      CheckpointError: no model config, no such checkpoint, a corrupt ``step`` (or every
        checkpoint corrupt), or parameters that do not fit the config.
    """
    model_dir = paths.as_path(model_dir)
    config = read_model_config(model_dir, **overrides)
    directory = model_dir / "checkpoints"
    steps = sorted(ocp.utils.checkpoint_steps(directory))
    if not steps:
        raise CheckpointError(f"{directory}: no checkpoints (is {model_dir} a launch.train MODEL_DIR?)")
    graphdef, state, target = restore_target(config, mesh, rules)
    abstract = {"params": target}
    (arrays, _), _, _ = restore_newest_good(
        directory, steps, step, lambda step_dir: restore_step(step_dir, abstract, [], partial=True)
    )
    nnx.replace_by_pure_dict(state, arrays["params"])
    return nnx.merge(graphdef, state)
