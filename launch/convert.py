r"""Converts between HF safetensors directories and glmjax orbax model checkpoints.

  python -m launch.convert --hf_dir=/ckpt/glm-4-9b --orbax_dir=/ckpt/glm4-9b-orbax
  python -m launch.convert --to_hf --orbax_dir=/ckpt/glm4-9b-orbax --hf_dir=/ckpt/out --dtype=bfloat16

With ``--mesh_shape`` the parameters are streamed straight into shards on that mesh.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from glmjax import sharding
from glmjax.checkpoints import from_pretrained, save_pretrained
from glmjax.checkpoints.orbax_io import load_model, save_model
from glmjax.flops import count_params

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + safetensors).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "glmjax orbax model checkpoint directory.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "Convert orbax -> HF instead of HF -> orbax.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter dtype (float32, bfloat16, float16; 'auto' for HF).")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", ["-1", "1", "1", "1"], "data,fsdp,tensor,sequence")
flags.mark_flags_as_required(["hf_dir", "orbax_dir"])


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    mesh = sharding.make_mesh([int(s) for s in _MESH_SHAPE.value])
    if _TO_HF.value:
        model = load_model(_ORBAX_DIR.value, mesh=mesh)
        dtype = None if _DTYPE.value == "auto" else _DTYPE.value
        save_pretrained(model, _HF_DIR.value, dtype=dtype)
        source, target = _ORBAX_DIR.value, _HF_DIR.value
    else:
        model = from_pretrained(_HF_DIR.value, dtype=_DTYPE.value, mesh=mesh)
        save_model(model, _ORBAX_DIR.value)
        source, target = _HF_DIR.value, _ORBAX_DIR.value
    print(json.dumps({
        "source": source,
        "target": target,
        "architecture": model.config.architecture,
        "parameters": count_params(model.config).total,
        "seconds": round(time.time() - start, 2),
    }))


if __name__ == "__main__":
    app.run(main)
