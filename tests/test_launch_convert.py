"""launch.convert: existing output needs --overwrite (checked before loading), --overwrite
replaces a sharded checkpoint completely, errors are one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import glmjax
from glmjax.checkpoints.orbax_io import save_model
from glmjax.models import create_model, flat_params, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result, message):
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith(f"convert: {message}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_existing_output_is_refused_before_loading(tmp_path):
    source = tmp_path / "hf"
    glmjax.save_pretrained(create_model(preset("glm4-tiny"), seed=1), str(source))
    (source / "model.safetensors").write_bytes(b"garbage")  # loading it first would fail on this
    target = tmp_path / "orbax"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = _convert(f"--hf_dir={source}", f"--orbax_dir={target}")
    _assert_one_line_error(result, f"{target}: output directory is not empty (notes.txt); pass --overwrite")
    assert os.listdir(target) == ["notes.txt"]


def test_overwrite_replaces_an_old_sharded_checkpoint(tmp_path):
    new = create_model(preset("glm4-tiny"), seed=2)
    save_model(new, str(tmp_path / "orbax"))
    out = tmp_path / "out"
    glmjax.save_pretrained(create_model(preset("glm4-tiny"), seed=1), str(out), max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    result = _convert("--to_hf", "--overwrite", f"--orbax_dir={tmp_path / 'orbax'}", f"--hf_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["target"] == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    reloaded = flat_params(glmjax.from_pretrained(str(out)))
    for name, variable in flat_params(new).items():
        np.testing.assert_array_equal(np.asarray(reloaded[name][...]), np.asarray(variable[...]))


@pytest.mark.parametrize("problem", ["missing", "garbage"])
def test_bad_source_is_one_line(tmp_path, problem):
    source = tmp_path / "hf"
    if problem == "garbage":
        glmjax.save_pretrained(create_model(preset("glm4-tiny"), seed=1), str(source))
        (source / "model.safetensors").write_bytes(b"\x08garbage" * 50)
        message = f"{source / 'model.safetensors'}: not a readable safetensors file"
    else:
        message = f"{source}: not a directory"
    result = _convert(f"--hf_dir={source}", f"--orbax_dir={tmp_path / 'orbax'}")
    _assert_one_line_error(result, message)
    assert not (tmp_path / "orbax").exists()
