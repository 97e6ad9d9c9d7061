"""RoPE scaling (linear, dynamic NTK, yarn): frequencies and logits against transformers,
HF config round trips and refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import glmjax
from glmjax.checkpoints.hf_config import CheckpointError, config_from_hf, config_to_hf
from glmjax.checkpoints.orbax_io import config_from_json, config_to_json
from glmjax.models import KVCache, create_model, preset
from glmjax.models.rotary import RopeScaling, rope_inv_freq, rotary_angles
from hf_models import make_hf_model

TOLERANCE = 2e-5  # fp32 logits; the largest gap measured is 2.9e-6
HF_CLASSES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONFIG_CLASSES = {"glm": transformers.GlmConfig, "glm4": transformers.Glm4Config,
                  "qwen2": transformers.Qwen2Config}

# name -> (max_position_embeddings, HF rope dict, sequence length).
# glmjax-only tests: presets shrunk to the sizes of the transformers-parity models.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, head_dim=16, num_layers=1)

LOGIT_CASES = {
    "linear": (32, {"rope_type": "linear", "factor": 3.0}, 40),
    "dynamic_long": (32, {"rope_type": "dynamic", "factor": 4.0}, 48),
    "dynamic_short": (32, {"rope_type": "dynamic", "factor": 4.0}, 20),
    "yarn": (128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 48),
}


def _raw_config(architecture: str, rope: dict, max_positions: int = 128, key: str = "rope_scaling") -> dict:
    return {
        "architectures": [HF_CLASSES[architecture]], "vocab_size": 101, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": max_positions,
        "rope_theta": 1000.0, "pad_token_id": 0, "eos_token_id": 1, key: dict(rope),
    }


def _hf_rope(raw: dict, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """transformers' inverse frequencies and attention factor for a config dict."""
    architecture = {v: k for k, v in HF_CLASSES.items()}[raw["architectures"][0]]
    fields = {k: v for k, v in json.loads(json.dumps(raw)).items() if k != "architectures"}
    config = CONFIG_CLASSES[architecture](**fields)
    fn = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]]
    inv_freq, attention = fn(config, None, seq_len=None if seq_len is None else torch.tensor(seq_len))
    return inv_freq.numpy(), float(attention)


@pytest.mark.parametrize("architecture,rope,seq_len", [
    ("qwen2", {"rope_type": "linear", "factor": 3.0}, None),
    ("qwen2", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, None),
    ("glm", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
             "mscale_all_dim": 1.0, "truncate": False, "beta_fast": 16, "beta_slow": 2}, None),
    ("glm4", {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3}, None),
    ("qwen2", {"rope_type": "dynamic", "factor": 2.0}, 300),
    ("glm", {"type": "dynamic", "factor": 2.0}, 300),
    ("glm", {"rope_type": "dynamic", "factor": 2.0}, 20),
])
def test_inv_freq_and_attention_factor_match_transformers(architecture, rope, seq_len):
    raw = _raw_config(architecture, rope)
    expected, expected_attention = _hf_rope(raw, seq_len)
    config = config_from_hf(raw)
    inv_freq, attention = rope_inv_freq(config.rotary_dim, config.rope_theta, config.rope_scaling, seq_len)
    np.testing.assert_allclose(np.asarray(inv_freq), expected, rtol=1e-6, atol=0)
    assert attention == pytest.approx(expected_attention, rel=1e-12)
    plain, _ = rope_inv_freq(config.rotary_dim, config.rope_theta)
    changed = not np.allclose(np.asarray(plain), expected, rtol=1e-6, atol=0)
    assert changed == (seq_len is None or seq_len > 128)  # dynamic changes nothing up to 128


def _scaled_pair(tmp_path, architecture: str, max_positions: int, rope: dict, key: str, seed: int):
    """A tiny random HF model saved with ``rope`` under ``key``, reloaded by transformers
    (fresh: dynamic NTK state starts at the trained length) and by glmjax."""
    make_hf_model(architecture, seed=seed).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["max_position_embeddings"] = max_positions
    if key == "rope_scaling":  # the pre-v5 form next to the v5 one (which it replaces)
        raw["rope_theta"] = raw["rope_parameters"]["rope_theta"]
        raw["rope_scaling"] = dict(rope)
    else:
        raw["rope_parameters"].update(rope)
    path.write_text(json.dumps(raw))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    return hf_model, glmjax.from_pretrained(str(tmp_path), dtype=jnp.float32)


def _hf_logits(hf_model, ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
    with torch.no_grad():
        return hf_model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("architecture,case", [
    (architecture, case) for case in LOGIT_CASES for architecture in ("qwen2", "glm", "glm4")
    # GLM-4-0414 rotates like GLM-4; it is checked on the two paths that change the frequencies.
    if architecture != "glm4" or case in ("dynamic_long", "yarn")
])
def test_logits_match_transformers(tmp_path, architecture, case):
    max_positions, rope, seq = LOGIT_CASES[case]
    key = "rope_scaling" if architecture == "qwen2" else "rope_parameters"
    seed = len(case) + 7 * len(architecture)
    hf_model, model = _scaled_pair(tmp_path, architecture, max_positions, rope, key, seed)
    assert model.config.rope_scaling.type == rope["rope_type"]
    ids = np.random.default_rng(seed).integers(0, 251, size=(2, seq))
    expected = _hf_logits(hf_model, ids)
    actual = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)
    # The scaling matters exactly where it should: plain RoPE on the same weights.
    plain = glmjax.from_pretrained(str(tmp_path), dtype=jnp.float32, rope_scaling=None)
    gap = np.abs(np.asarray(plain(jnp.asarray(ids))) - actual).max()
    if case == "dynamic_short":
        assert gap < 1e-5, gap
    else:
        assert gap > 1e-2, gap


def test_dynamic_under_jit_reads_traced_positions(tmp_path):
    """One compiled forward; the positions (not the shape) decide the NTK base."""
    hf_dir = tmp_path / "hf"
    _, model = _scaled_pair(hf_dir, "glm", 32, {"rope_type": "dynamic", "factor": 4.0},
                            "rope_parameters", seed=3)
    traces = []

    @nnx.jit
    def forward(model, ids, positions):
        traces.append(1)
        return model(ids, positions=positions)

    ids = np.random.default_rng(4).integers(0, 251, size=(2, 16))
    for offset in (0, 40, 100):
        positions = np.broadcast_to(np.arange(16) + offset, (2, 16)).copy()
        # A fresh transformers model each time: its dynamic state would otherwise keep the
        # longest length seen.
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
        expected = _hf_logits(hf_model, ids, positions)
        actual = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(positions)))
        np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)
    assert len(traces) == 1


def test_dynamic_ignores_padding_positions():
    scaling = RopeScaling("dynamic", factor=4.0)
    model = create_model(preset("qwen2.5-tiny", max_position_embeddings=16, rope_scaling=scaling, **SMALL), seed=5)
    assert model.config.rope_scaling.original_max_position_embeddings == 16
    ids = np.random.default_rng(6).integers(2, 256, size=(1, 24))
    alone = np.asarray(model(jnp.asarray(ids[:, :20])))
    # Four padding tokens placed at far positions: they would raise the NTK length to 1001.
    positions = np.concatenate([np.arange(20), np.full(4, 1000)])[None]
    segments = np.concatenate([np.ones(20, int), np.zeros(4, int)])[None]
    padded = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions),
                              segment_ids=jnp.asarray(segments)))
    np.testing.assert_allclose(padded[:, :20], alone, atol=1e-5)
    # Right-padded prefill: positions past each row's length are padding too.
    cache = KVCache.create(model.config, batch=1, max_len=40)
    valid = jnp.asarray(np.arange(24)[None] < 20)
    prompt = jnp.asarray(ids)
    logits, _ = model.forward_with_cache(prompt, cache, positions=jnp.asarray(positions), valid=valid)
    np.testing.assert_allclose(np.asarray(logits)[:, :20], alone, atol=1e-5)
    # Whereas counted positions do change the frequencies of every token.
    counted = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions)))
    assert np.abs(counted[:, :20] - alone).max() > 1e-3


@pytest.mark.parametrize("name", ["glm4-tiny", "qwen2.5-tiny"])
def test_yarn_kv_cache_matches_full_forward(name):
    scaling = RopeScaling("yarn", factor=4.0, original_max_position_embeddings=8)
    config = preset(name, rope_scaling=scaling, **SMALL)
    model = create_model(config, seed=7)
    ids = np.random.default_rng(8).integers(2, 256, size=(2, 14))
    full = np.asarray(model(jnp.asarray(ids)))
    cache = KVCache.create(config, batch=2, max_len=16)
    logits, cache = model.forward_with_cache(jnp.asarray(ids[:, :10]), cache, prefill=True)
    np.testing.assert_allclose(np.asarray(logits), full[:, :10], atol=1e-5)
    for step in range(10, 12):
        logits, cache = model.forward_with_cache(jnp.asarray(ids[:, step:step + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, step], atol=1e-5)


def test_yarn_attention_factor_scales_cos_and_sin():
    scaling = RopeScaling("yarn", factor=16.0, original_max_position_embeddings=64)
    positions = jnp.arange(12)[None]
    cos, sin = rotary_angles(positions, 16, 10000.0, scaling)
    inv_freq, attention = rope_inv_freq(16, 10000.0, scaling)
    assert attention == pytest.approx(0.1 * np.log(16.0) + 1.0)
    angles = np.arange(12)[None, :, None] * np.asarray(inv_freq)
    np.testing.assert_allclose(np.asarray(cos), attention * np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), attention * np.sin(angles), atol=1e-6)


@pytest.mark.parametrize("architecture,key,rope", [
    ("qwen2", "rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("qwen2", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}),
    ("glm", "rope_scaling", {"rope_type": "linear", "factor": 2.5}),
    ("glm", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}),
    ("glm4", "rope_scaling", {"type": "dynamic", "factor": 3.0}),
    ("glm4", "rope_parameters", {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.1,
                                 "beta_fast": 8.0, "beta_slow": 0.5}),
])
def test_hf_config_round_trip_keeps_rope_scaling(architecture, key, rope):
    raw = _raw_config(architecture, rope, key=key)
    config = config_from_hf(raw)
    assert config.rope_scaling is not None and config.rope_scaling.type == rope.get("rope_type", rope.get("type"))
    written = config_to_hf(config)
    for field in ("rope_parameters", "rope_scaling"):
        assert written[field]["rope_type"] == config.rope_scaling.type
        assert written[field]["factor"] == rope["factor"]
        for name in ("original_max_position_embeddings", "mscale", "mscale_all_dim", "attention_factor",
                     "truncate", "beta_fast", "beta_slow", "rope_theta"):
            if name in rope:
                assert written[field][name] == rope[name], (field, name)
    assert config_from_hf(written) == config
    # transformers reads the written dict into the same frequencies as the original.
    for seq_len in (None, 400):
        original, original_attention = _hf_rope(raw, seq_len)
        again, again_attention = _hf_rope(written, seq_len)
        np.testing.assert_array_equal(again, original)
        assert again_attention == original_attention
    # The glmjax checkpoint form (dataclasses.asdict -> JSON) keeps it too.
    assert config_from_json(json.loads(json.dumps(config_to_json(config))), "model_config.json") == config


def test_save_pretrained_writes_rope_scaling(tmp_path):
    scaling = RopeScaling("yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                          mscale_all_dim=0.5)
    model = create_model(preset("glm4-0414-tiny", rope_scaling=scaling), seed=9)
    glmjax.save_pretrained(model, str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "yarn" and raw["rope_scaling"]["mscale_all_dim"] == 0.5
    assert glmjax.from_pretrained(str(tmp_path)).config.rope_scaling == scaling
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert hf_model.config.rope_parameters["rope_type"] == "yarn"
    ids = np.random.default_rng(10).integers(0, 512, size=(2, 24))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(hf_model, ids),
                               atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("rope,message", [
    ({"type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]},
     r"config.json: field 'rope_scaling' has rope type 'longrope'; supported: default, linear, dynamic, yarn"),
    ({"rope_type": "llama3", "factor": 8.0}, r"field 'rope_scaling' has rope type 'llama3'"),
    ({"rope_type": "linear"}, r"field 'rope_scaling.factor' is required for rope type 'linear'"),
    ({"rope_type": "dynamic", "factor": "2"}, r"field 'rope_scaling.factor' = '2' is not a number"),
    ({"rope_type": "yarn", "factor": 0.0}, r"field 'rope_scaling': rope_scaling.factor=0.0 must be > 0"),
])
def test_unsupported_rope_scaling_is_refused(rope, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(_raw_config("qwen2", rope))


def test_plain_rope_configs_are_written_as_before():
    raw = _raw_config("glm", {"rope_type": "default", "rope_theta": 5e6}, key="rope_parameters")
    config = config_from_hf(raw)
    assert config.rope_scaling is None and config.rope_theta == 5e6
    written = config_to_hf(config)
    assert "rope_scaling" not in written
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}


def test_invalid_rope_scaling_fields_are_refused():
    with pytest.raises(ValueError, match="beta_fast apply to yarn only"):
        RopeScaling("linear", factor=2.0, beta_fast=8.0)
    with pytest.raises(ValueError, match="rope_scaling: unknown field"):
        preset("glm4-tiny", rope_scaling={"type": "yarn", "factor": 2.0, "scale": 1.0})
    config = preset("qwen2.5-tiny", rope_scaling=RopeScaling("dynamic", factor=2.0))
    with pytest.raises(CheckpointError, match="max_position_embeddings, so the two must be equal"):
        config_to_hf(config.replace(max_position_embeddings=64))
    assert hash(config) == hash(config.replace())

