"""Checkpoint interop: orbax conversion both ways, streaming into shards, and bad input."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

import glmjax
from glmjax import sharding
from glmjax.checkpoints import CheckpointError
from glmjax.checkpoints.orbax_io import load_model, save_model
from glmjax.models import create_model, flat_params, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    glmjax.save_pretrained(create_model(preset("glm4-0414-tiny"), seed=31), str(path))
    return path


def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_load_streams_into_mesh_shards(hf_dir):
    mesh = sharding.make_mesh((1, 2, 4, 1))
    model = glmjax.from_pretrained(str(hf_dir), mesh=mesh)
    gate_up = flat_params(model)["layers.mlp.gate_up_kernel"][...]
    assert gate_up.sharding.spec == PartitionSpec(None, "fsdp", None, "tensor")
    assert gate_up.addressable_shards[0].data.shape == (2, 64, 2, 88)
    reference = glmjax.from_pretrained(str(hf_dir))
    np.testing.assert_array_equal(np.asarray(gate_up), np.asarray(flat_params(reference)["layers.mlp.gate_up_kernel"][...]))


def test_orbax_round_trip_in_process(tmp_path, hf_dir):
    model = glmjax.from_pretrained(str(hf_dir))
    save_model(model, str(tmp_path / "orbax"))
    mesh = sharding.make_mesh((2, 2, 2, 1))
    restored = load_model(str(tmp_path / "orbax"), mesh=mesh)
    assert restored.config == model.config
    ids = jnp.arange(24).reshape(2, 12)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(restored(ids)), atol=1e-6)


def test_convert_entrypoint_both_ways(tmp_path, hf_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    orbax_dir, back_dir = tmp_path / "orbax", tmp_path / "back"
    for args in (
        [f"--hf_dir={hf_dir}", f"--orbax_dir={orbax_dir}", "--mesh_shape=1,2,2,1"],
        ["--to_hf", f"--orbax_dir={orbax_dir}", f"--hf_dir={back_dir}"],
    ):
        result = subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1])["architecture"] == "glm4"
    original, converted = load_file(str(hf_dir / "model.safetensors")), load_file(str(back_dir / "model.safetensors"))
    assert sorted(original) == sorted(converted)
    for name in original:
        np.testing.assert_array_equal(original[name], converted[name])


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        glmjax.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a directory"):
        glmjax.from_pretrained(str(tmp_path / "nope"))


def test_unsupported_architecture(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    raw = json.loads((bad / "config.json").read_text())
    raw["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config.json: field 'architectures' = \['LlamaForCausalLM'\]"):
        glmjax.from_pretrained(str(bad))


def test_missing_config_field(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    raw = json.loads((bad / "config.json").read_text())
    del raw["hidden_size"]
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="missing required field 'hidden_size'"):
        glmjax.from_pretrained(str(bad))


def test_missing_tensor(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' is missing"):
        glmjax.from_pretrained(str(bad))


def test_misshaped_tensor(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 128), np.float32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                              r"has shape \[32, 128\], expected \[64, 128\]"):
        glmjax.from_pretrained(str(bad))


def test_dtype_errors(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match="dtype=int8"):
        glmjax.from_pretrained(str(hf_dir), dtype=jnp.int8)
    bad = _copy(hf_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.norm.weight"] = np.full((128,), 1e6, np.float32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has values outside the range of float16"):
        glmjax.from_pretrained(str(bad), dtype=jnp.float16)
    glmjax.from_pretrained(str(bad), dtype=jnp.bfloat16)  # bf16 holds 1e6
    tensors["model.norm.weight"] = np.ones((128,), np.int32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has non-float dtype int32"):
        glmjax.from_pretrained(str(bad))


def test_index_lists_missing_file(tmp_path):
    model = create_model(preset("glm4-tiny"), seed=1)
    glmjax.save_pretrained(model, str(tmp_path), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=f"{victim}: listed in model.safetensors.index.json but missing"):
        glmjax.from_pretrained(str(tmp_path))


def test_orbax_checkpoint_of_another_config(tmp_path):
    save_model(create_model(preset("glm4-tiny"), seed=2), str(tmp_path / "ckpt"))
    raw = json.loads((tmp_path / "ckpt" / "model_config.json").read_text())
    raw["intermediate_size"] = 96
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="parameters do not match model_config.json"):
        load_model(str(tmp_path / "ckpt"))
    raw["bogus_field"] = 1
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"unknown model config fields \['bogus_field'\]"):
        load_model(str(tmp_path / "ckpt"))


def test_bfloat16_tensors_load_into_float32(tmp_path, hf_dir):
    bad = _copy(hf_dir, tmp_path / "bf16")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(bad / "model.safetensors")).items()}
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    model = glmjax.from_pretrained(str(bad))
    assert flat_params(model)["embedding"][...].dtype == jnp.float32


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_name_the_file(tmp_path, hf_dir, damage):
    bad = _copy(hf_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07garbage" * 100)
    with pytest.raises(CheckpointError, match=rf"{weights}: not a readable safetensors file \(Error while deser"):
        glmjax.from_pretrained(str(bad))


def _weights(model):
    return {name: np.asarray(v[...]) for name, v in flat_params(model).items()}


def test_save_pretrained_refuses_then_replaces_a_sharded_checkpoint(tmp_path):
    old, new = create_model(preset("glm4-tiny"), seed=1), create_model(preset("glm4-tiny"), seed=2)
    glmjax.save_pretrained(old, str(tmp_path), max_shard_bytes=200_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: output directory is not empty \(config.json, "):
        glmjax.save_pretrained(new, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
    glmjax.save_pretrained(new, str(tmp_path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    reloaded = _weights(glmjax.from_pretrained(str(tmp_path)))
    for name, value in _weights(new).items():
        np.testing.assert_array_equal(reloaded[name], value)


def test_interrupted_overwrite_never_loads_as_the_old_weights(tmp_path, monkeypatch):
    from etils import epath

    old, new = create_model(preset("glm4-tiny"), seed=1), create_model(preset("glm4-tiny"), seed=2)
    glmjax.save_pretrained(old, str(tmp_path), max_shard_bytes=200_000)
    # A crash while writing the new files: the old checkpoint is untouched.
    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr("glmjax.checkpoints.hf.write_sharded", disk_full)
    with pytest.raises(OSError, match="disk full"):
        glmjax.save_pretrained(new, str(tmp_path), overwrite=True)
    monkeypatch.undo()
    reloaded = _weights(glmjax.from_pretrained(str(tmp_path)))
    assert all(np.array_equal(reloaded[name], value) for name, value in _weights(old).items())
    # A crash while moving the new files in: no config.json, so loading fails loudly.
    rename = epath.Path.rename
    calls = []

    def crash_on_second(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("killed")
        return rename(self, target)

    monkeypatch.setattr(type(epath.Path(tmp_path)), "rename", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        glmjax.save_pretrained(new, str(tmp_path), overwrite=True, max_shard_bytes=300_000)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no config.json"):
        glmjax.from_pretrained(str(tmp_path))


def test_save_model_refuses_then_overwrites(tmp_path):
    old, new = create_model(preset("glm4-tiny"), seed=1), create_model(preset("glm4-tiny"), seed=2)
    save_model(old, str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match=r"ckpt: output directory is not empty \(model_config.json, params\)"):
        save_model(new, str(tmp_path / "ckpt"))
    save_model(new, str(tmp_path / "ckpt"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["model_config.json", "params"]
    reloaded = _weights(load_model(str(tmp_path / "ckpt")))
    for name, value in _weights(new).items():
        np.testing.assert_array_equal(reloaded[name], value)
