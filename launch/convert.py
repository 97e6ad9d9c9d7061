r"""Converts between HF safetensors directories and glmjax orbax model checkpoints.

  python -m launch.convert --hf_dir=/ckpt/glm-4-9b --orbax_dir=/ckpt/glm4-9b-orbax
  python -m launch.convert --to_hf --orbax_dir=/ckpt/glm4-9b-orbax --hf_dir=/ckpt/out --dtype=bfloat16

With ``--mesh_shape`` the parameters are streamed straight into shards on that mesh. An
existing non-empty output directory is refused before anything is loaded, unless
``--overwrite``: then the new checkpoint is written completely before the old one's files are
removed. Errors print one line ``convert: <message>`` and exit with status 1.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from glmjax import sharding
from glmjax.checkpoints import CheckpointError, from_pretrained, paths, save_pretrained
from glmjax.checkpoints.hf_config import read_hf_config
from glmjax.checkpoints.orbax_io import load_model, read_model_config, save_model
from glmjax.flops import count_params

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + safetensors).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "glmjax orbax model checkpoint directory.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "Convert orbax -> HF instead of HF -> orbax.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter dtype (float32, bfloat16, float16; 'auto' for HF).")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", ["-1", "1", "1", "1"], "data,fsdp,tensor,sequence")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the checkpoint in a non-empty output directory.")
flags.mark_flags_as_required(["hf_dir", "orbax_dir"])


def convert() -> dict:
    """Checks the source and the output, then loads and writes; returns the summary."""
    start = time.time()
    if _TO_HF.value:
        source, target = _ORBAX_DIR.value, _HF_DIR.value
        read_model_config(source)
    else:
        source, target = _HF_DIR.value, _ORBAX_DIR.value
        read_hf_config(source)
    paths.refuse_existing(paths.as_path(target), _OVERWRITE.value)
    mesh = sharding.make_mesh([int(s) for s in _MESH_SHAPE.value])
    if _TO_HF.value:
        model = load_model(source, mesh=mesh)
        dtype = None if _DTYPE.value == "auto" else _DTYPE.value
        save_pretrained(model, target, dtype=dtype, overwrite=_OVERWRITE.value)
    else:
        model = from_pretrained(source, dtype=_DTYPE.value, mesh=mesh)
        save_model(model, target, overwrite=_OVERWRITE.value)
    return {
        "source": source,
        "target": target,
        "architecture": model.config.architecture,
        "parameters": count_params(model.config).total,
        "seconds": round(time.time() - start, 2),
    }


def main(argv: list[str]) -> None:
    del argv
    try:
        summary = convert()
    except (CheckpointError, ValueError, OSError) as err:
        print(f"convert: {err}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
