"""Logits parity with transformers, HF round trips, rotary, packing and the KV cache."""

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import glmjax
from glmjax.models import KVCache, create_model, flat_params, preset
from glmjax.models.decoder import pad_features, unstack_layers
from glmjax.models.rotary import apply_rotary, rotary_angles
from hf_models import make_hf_model

TOLERANCE = 1e-4

# (heads, kv_heads): GQA ratios 1, 2, 4 and MQA.
HEAD_LAYOUTS = [(4, 4), (4, 2), (8, 2), (4, 1)]


def _hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("architecture", ["glm", "glm4", "qwen2"])
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_logits_match_transformers(tmp_path, architecture, heads, kv_heads):
    seed = zlib.crc32(f"{architecture}-{heads}-{kv_heads}".encode()) % 1000
    vocab = 251 if kv_heads > 1 else 257
    hf_model = make_hf_model(
        architecture, vocab_size=vocab, num_heads=heads, num_kv_heads=kv_heads, seed=seed,
        tie_word_embeddings=architecture == "qwen2" and kv_heads == 1,
    )
    hf_model.save_pretrained(tmp_path)
    model = glmjax.from_pretrained(str(tmp_path), dtype=jnp.float32)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(3, 19))
    expected = _hf_logits(hf_model, ids)
    actual = np.asarray(model(jnp.asarray(ids)))
    assert actual.shape == (3, 19, vocab)
    assert np.abs(expected).max() > 1.0  # logits large enough for the check to mean something
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("architecture", ["glm", "glm4", "qwen2"])
def test_round_trip_through_transformers(tmp_path, architecture):
    config = preset(f"{'glm4' if architecture == 'glm' else 'glm4-0414' if architecture == 'glm4' else 'qwen2.5'}-tiny")
    config = config.replace(vocab_size=203, tie_word_embeddings=architecture == "qwen2")
    model = create_model(config, seed=3)
    # Perturb norms and biases away from their 1/0 init so every tensor is exercised.
    for name, variable in flat_params(model).items():
        noise = jax.random.normal(jax.random.key(len(name)), variable.shape) * 0.1
        variable.set_value(variable[...] + noise)
    hf_dir = tmp_path / "hf"
    glmjax.save_pretrained(model, str(hf_dir))

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert type(hf_model).__name__ == {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}[architecture]
    ids = np.random.default_rng(1).integers(0, 203, size=(2, 11))
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(_hf_logits(hf_model, ids), ours, atol=TOLERANCE, rtol=0)

    reloaded = glmjax.from_pretrained(str(hf_dir))
    for name, variable in flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(flat_params(reloaded)[name][...]))


def test_sharded_safetensors_index_round_trip(tmp_path):
    model = create_model(preset("glm4-tiny"), seed=5)
    glmjax.save_pretrained(model, str(tmp_path), max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = glmjax.from_pretrained(str(tmp_path))
    ids = jnp.arange(20).reshape(2, 10)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(reloaded(ids)))


def test_bfloat16_save_and_load(tmp_path):
    model = create_model(preset("glm4-tiny"), seed=6)
    glmjax.save_pretrained(model, str(tmp_path), dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = glmjax.from_pretrained(str(tmp_path), dtype="auto")
    assert reloaded.config.param_dtype == "bfloat16"
    assert flat_params(reloaded)["lm_head"][...].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(flat_params(reloaded)["lm_head"][...], np.float32),
        np.asarray(flat_params(model)["lm_head"][...]), rtol=1e-2, atol=1e-3,
    )


@pytest.mark.parametrize("interleaved,partial", [(True, 0.5), (False, 1.0)])
def test_rotary_matches_transformers(interleaved, partial):
    from transformers.models.glm import modeling_glm
    from transformers.models.qwen2 import modeling_qwen2

    batch, seq, heads, head_dim = 2, 7, 3, 16
    rotary_dim = int(head_dim * partial)
    rng = np.random.default_rng(4)
    q = rng.normal(size=(batch, heads, seq, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, heads, seq, head_dim)).astype(np.float32)
    positions = rng.integers(0, 500, size=(batch, seq))
    theta = 10000.0
    cos, sin = rotary_angles(jnp.asarray(positions), rotary_dim, theta)
    # transformers' tables: cat(freqs, freqs) of width rotary_dim.
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.tensor(positions, dtype=torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    apply = modeling_glm.apply_rotary_pos_emb if interleaved else modeling_qwen2.apply_rotary_pos_emb
    q_ref, k_ref = apply(torch.tensor(q), torch.tensor(k), emb.cos(), emb.sin())
    to_ours = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))  # noqa: E731
    q_out = apply_rotary(to_ours(q), cos, sin, interleaved=interleaved)
    k_out = apply_rotary(to_ours(k), cos, sin, interleaved=interleaved)
    np.testing.assert_allclose(np.asarray(q_out), q_ref.numpy().transpose(0, 2, 1, 3), atol=1e-5)
    np.testing.assert_allclose(np.asarray(k_out), k_ref.numpy().transpose(0, 2, 1, 3), atol=1e-5)


def test_packed_segments_equal_separate_sequences():
    model = create_model(preset("glm4-0414-tiny"), seed=7)
    rng = np.random.default_rng(8)
    first, second = rng.integers(2, 512, size=5), rng.integers(2, 512, size=8)
    packed = jnp.asarray(np.concatenate([first, second, [0, 0, 0]])[None])
    segment_ids = jnp.asarray([[1] * 5 + [2] * 8 + [0] * 3])
    positions = jnp.asarray([list(range(5)) + list(range(8)) + [0, 0, 0]])
    out = np.asarray(model(packed, positions=positions, segment_ids=segment_ids))
    np.testing.assert_allclose(out[0, :5], np.asarray(model(jnp.asarray(first[None])))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:13], np.asarray(model(jnp.asarray(second[None])))[0], atol=1e-5)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "stacked,prefill,backend",
    [(True, False, "xla"), (False, False, "xla"), (False, True, "xla"), (True, True, "blockwise"),
     (False, True, "splash")],
)
def test_kv_cache_prefill_and_decode_match_full_forward(stacked, prefill, backend):
    config = preset("qwen2.5-tiny")
    reference = create_model(config, seed=9)
    model = create_model(config.replace(attention_backend=backend), seed=9)
    model = model if stacked else unstack_layers(model)
    rng = np.random.default_rng(10)
    ids = rng.integers(2, 512, size=(2, 12))
    full = np.asarray(reference(jnp.asarray(ids)))
    # Row 0 has a 6-token prompt, row 1 a 4-token prompt (right-padded to 6).
    lengths = np.array([6, 4])
    prompt = ids[:, :6].copy()
    prompt[1, 4:] = 0
    valid = jnp.asarray(np.arange(6)[None] < lengths[:, None])
    cache = KVCache.create(config, batch=2, max_len=16, stacked=stacked)
    logits, cache = model.forward_with_cache(jnp.asarray(prompt), cache, valid=valid, prefill=prefill)
    np.testing.assert_allclose(np.asarray(logits)[0, :6], full[0, :6], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[1, :4], full[1, :4], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    for step in range(3):
        positions = np.asarray(cache.lengths)
        next_ids = ids[np.arange(2), positions][:, None]
        logits, cache = model.forward_with_cache(jnp.asarray(next_ids), cache)
        for row in range(2):
            np.testing.assert_allclose(np.asarray(logits)[row, 0], full[row, positions[row]], atol=1e-5)


def test_unstack_layers_keeps_parameters_and_logits():
    config = preset("glm4-0414-tiny")
    model = create_model(config, seed=15)
    unstacked = unstack_layers(model)
    assert model.stacked and not unstacked.stacked and len(unstacked.layers) == config.num_layers
    stacked_params, per_layer = flat_params(model), flat_params(unstacked)
    for name, value in stacked_params.items():
        if name.startswith("layers."):
            for index in range(config.num_layers):
                layer_name = name.replace("layers.", f"layers.{index}.", 1)
                np.testing.assert_array_equal(per_layer[layer_name], np.asarray(value)[index])
        else:
            np.testing.assert_array_equal(per_layer[name], value)
    axes = {v.logical_axes for v in jax.tree.leaves(
        nnx.state(unstacked.layers), is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert all("layers" not in a for a in axes)
    ids = jnp.asarray(np.random.default_rng(16).integers(0, 512, size=(2, 9)))
    np.testing.assert_allclose(np.asarray(unstacked(ids)), np.asarray(model(ids)), atol=1e-5)
    with pytest.raises(ValueError, match="stacked=False"):
        unstacked.forward_with_cache(ids, KVCache.create(config, batch=2, max_len=16))


def test_bf16_compute_close_to_fp32():
    config = preset("glm4-tiny")
    model32 = create_model(config, seed=11)
    model16 = create_model(config.replace(compute_dtype="bfloat16"), seed=11)
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 512, size=(2, 9)))
    out32 = np.asarray(model32(ids))
    out16 = np.asarray(model16(ids), np.float32)
    assert np.abs(out32 - out16).max() < 0.05 * np.abs(out32).max() + 1e-3


@pytest.mark.parametrize("backend", ["fused", "splash"])
def test_attention_backends_match_xla(backend):
    config = preset("glm4-tiny").replace(num_layers=1)
    ids = jnp.asarray(np.random.default_rng(13).integers(0, 512, size=(2, 128)))
    reference = np.asarray(create_model(config, seed=14)(ids))
    other = np.asarray(create_model(config.replace(attention_backend=backend), seed=14)(ids))
    np.testing.assert_allclose(other, reference, atol=1e-4)
    segment_ids = jnp.asarray(np.repeat([[1, 2]], 64, axis=1))
    reference_packed = np.asarray(create_model(config, seed=14)(ids, segment_ids=segment_ids))
    other_packed = np.asarray(create_model(config.replace(attention_backend=backend), seed=14)(
        ids, segment_ids=segment_ids))
    np.testing.assert_allclose(other_packed, reference_packed, atol=1e-4)


def test_env_sees_eight_devices():
    assert len(jax.devices()) == 8, os.environ.get("XLA_FLAGS")


def test_pad_features_keeps_logits_and_cached_decoding():
    # Row strides of 2 KiB (hidden 512, 2 x MLP 256, vocabulary 512 in fp32) get padded.
    config = preset("glm4-tiny").replace(hidden_size=512, intermediate_size=256)
    model = unstack_layers(create_model(config, seed=17))
    padded = pad_features(model)
    layer = padded.layers[0]
    assert layer.attention.o_kernel[...].shape == (4, 32, 576)
    assert layer.mlp.gate_up_kernel[...].shape == (512, 2, 288)
    assert layer.mlp.down_kernel[...].shape == (288, 576)
    assert padded.lm_head[...].shape == (512, 576)
    assert model.layers[0].mlp.down_kernel[...].shape == (256, 512)  # the argument is unchanged
    ids = jnp.asarray(np.random.default_rng(18).integers(0, 512, size=(2, 9)))
    np.testing.assert_allclose(np.asarray(padded(ids)), np.asarray(model(ids)), atol=1e-5)
    caches = [KVCache.create(config, batch=2, max_len=16, stacked=False) for _ in range(2)]
    for step in range(3):
        outputs = []
        for index, m in enumerate((model, padded)):
            logits, caches[index] = m.forward_with_cache(ids[:, step:step + 1], caches[index])
            outputs.append(np.asarray(logits))
        assert outputs[1].shape == (2, 1, 512)
        np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
    with pytest.raises(ValueError, match="per-layer"):
        pad_features(create_model(config, seed=17))
