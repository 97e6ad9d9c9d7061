"""The model config a run trains, recorded in ``MODEL_DIR/model_config.json`` and checked against
initial checkpoints and resumed runs.

Only runtime settings may differ between a run and the checkpoint it starts from or resumes:
dtypes, remat and the attention backend (``RUNTIME_FIELDS``); token-id metadata
(``METADATA_FIELDS``) may differ with a warning. Every other field changes the function the
weights compute (shapes, rope theta, rotary fraction, norm eps, biases, tied head, ...) and a
difference is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
from etils import epath

from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.orbax_io import CONFIG_FILE, config_from_json, config_to_json
from glmjax.models.config import ModelConfig

RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "remat_policy", "attention_backend",
                  "sample_attention_alpha")
METADATA_FIELDS = ("max_position_embeddings", "pad_token_id", "eos_token_ids", "bos_token_id")


def function_differences(reference: ModelConfig, config: ModelConfig) -> list[str]:
    """``"field: reference-value vs config-value"`` for every field that changes the function."""
    out = []
    for field in dataclasses.fields(ModelConfig):
        name = field.name
        if name in RUNTIME_FIELDS or name in METADATA_FIELDS:
            continue
        a, b = getattr(reference, name), getattr(config, name)
        if a != b:
            out.append(f"{name}: {a!r} vs {b!r}")
    return out


def check_same_function(reference: ModelConfig, config: ModelConfig, where: str, what: str) -> None:
    """Raises ``CheckpointError`` naming ``where`` and each differing field when ``config``
    computes another function than ``reference`` (``what`` names the reference, e.g. "checkpoint").
    Warns about differing token metadata."""
    differing = function_differences(reference, config)
    if differing:
        raise CheckpointError(
            f"{where}: the {what} and the run's model config differ ({'; '.join(differing)}, "
            f"{what} vs config); only {', '.join(RUNTIME_FIELDS)} may differ")
    metadata = [f"{n}: {getattr(reference, n)!r} vs {getattr(config, n)!r}" for n in METADATA_FIELDS
                if getattr(reference, n) != getattr(config, n)]
    if metadata:
        logging.warning("%s: token metadata differs from the run's config (%s)", where, "; ".join(metadata))


def check_run_config(model_dir: str | epath.Path, config: ModelConfig) -> bool:
    """Checks ``config`` against the one recorded in ``model_dir`` (if any); touches nothing.

    Returns:
      Whether a config is recorded.

    Raises:
      CheckpointError: the directory holds a run of a model that computes another function.
    """
    path = epath.Path(model_dir) / CONFIG_FILE
    if not path.exists():
        return False
    try:
        recorded = config_from_json(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    check_same_function(recorded, config, str(path), "recorded run")
    return True


def record_run_config(model_dir: str | epath.Path, config: ModelConfig) -> None:
    """Writes ``model_dir/model_config.json`` (process 0; written whole, then renamed)."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / (CONFIG_FILE + ".tmp")
    temp.write_text(json.dumps(config_to_json(config), indent=2))
    temp.rename(directory / CONFIG_FILE)
