"""Sharded forward equals unsharded; sharding rules and report; 9B ahead-of-time compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from glmjax import flops, sharding
from glmjax.models import abstract_model, create_model, create_sharded_model, preset, sharding_report, state_shardings
from hf_models import make_hf_model


def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2, 1), (1, 4, 2, 1)])
def test_sharded_forward_equals_unsharded(mesh_shape):
    config = preset("glm4-0414-tiny").replace(vocab_size=512, num_heads=8, num_kv_heads=4)
    model = create_model(config, seed=21)
    ids = jnp.asarray(np.random.default_rng(22).integers(0, 512, size=(4, 16)))
    expected = np.asarray(model(ids))

    mesh = sharding.make_mesh(mesh_shape)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    sharded_state = jax.device_put(state, shardings)
    q_kernel = sharded_state["layers"]["attention"]["q_kernel"]
    assert q_kernel[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    ids_sharding = sharding.named_sharding(("act_batch", "act_seq"), ids.shape, mesh)
    with jax.set_mesh(mesh):
        forward = jax.jit(_forward, static_argnums=0, in_shardings=(shardings, ids_sharding))
        actual = forward(graphdef, sharded_state, jax.device_put(ids, ids_sharding))
    assert actual.sharding.spec[0] in (("data", "fsdp"), "fsdp", "data")
    np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-5)


def test_create_sharded_model_places_shards():
    config = preset("glm4-tiny")
    mesh = sharding.make_mesh((1, 2, 4, 1))
    model = create_sharded_model(config, mesh, seed=0)
    embedding = nnx.state(model)["embedding"][...]
    assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (128, 64)
    ids = jnp.zeros((2, 4), jnp.int32)
    with jax.set_mesh(mesh):
        assert np.all(np.isfinite(np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))))


def test_rules_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh((1, 2, 4, 1))
    # 2 KV heads cannot be split 4 ways: the tensor axis is dropped, the rest kept.
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh)
    assert spec == PartitionSpec("fsdp", None, None)
    spec = sharding.logical_to_spec(("act_batch", "act_seq"), (8, 16), sharding.make_mesh((2, 4, 1, 1)))
    assert spec == PartitionSpec(("data", "fsdp"), None)
    custom = (("embed", "tensor"), ("kv_heads", None), ("head_dim", None))
    with sharding.use_rules(custom):
        assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == (
            PartitionSpec("tensor", None, None))
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("nonexistent",), (4,), mesh)


def test_make_mesh_validates_shape():
    assert sharding.make_mesh((-1, 2, 1, 1)).shape == {"data": 4, "fsdp": 2, "tensor": 1, "sequence": 1}
    with pytest.raises(ValueError, match="needs 16 devices but 8"):
        sharding.make_mesh((2, 2, 2, 2))
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh((-1, -1, 1, 1))
    with pytest.raises(ValueError, match="cannot be filled"):
        sharding.make_mesh((-1, 3, 1, 1))


def test_sharding_report_counts_bytes():
    config = preset("glm4-9b")
    model = abstract_model(config)
    report = sharding_report(model, sharding.make_mesh((1, 8, 1, 1)))
    total = flops.count_params(config).total
    assert report.total_bytes == 4 * total
    # Everything but the norm scales is split 8 ways.
    assert report.bytes_per_device < report.total_bytes / 8 * 1.01
    replicated = sharding_report(model, sharding.make_mesh((8, 1, 1, 1)))
    assert "embedding" in replicated.replicated and replicated.bytes_per_device == replicated.total_bytes


@pytest.mark.parametrize("architecture", ["glm", "glm4", "qwen2"])
def test_param_count_matches_transformers(architecture):
    hf_model = make_hf_model(architecture, tie_word_embeddings=architecture == "qwen2")
    from glmjax.checkpoints.hf_config import config_from_hf

    config = config_from_hf(hf_model.config.to_dict())
    assert flops.count_params(config).total == hf_model.num_parameters()


def test_glm4_9b_param_count_and_flops():
    config = preset("glm4-9b")
    assert 9.39e9 < flops.count_params(config).total < 9.41e9  # published: 9.40B
    per_token = flops.training_flops_per_token(config, 8192)
    assert per_token == pytest.approx(6 * flops.matmul_params(config) + 6 * 8192 * 4096 * 40)


def test_glm4_9b_forward_backward_compiles_ahead_of_time(capsys):
    """Lower and compile a GLM-4-9B train-style step on 8 devices from shapes alone."""
    config = preset("glm4-9b").replace(param_dtype="bfloat16", compute_dtype="bfloat16", remat_policy="full")
    mesh = sharding.make_mesh((1, 8, 1, 1))
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = state_shardings(abstract_state, mesh)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    batch, seq = 8, 1024
    ids_sharding = sharding.named_sharding(("act_batch", "act_seq"), (batch, seq), mesh)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=ids_sharding)

    def loss_fn(state, ids):
        model = nnx.merge(graphdef, state)
        hidden = model.hidden_states(ids[:, :-1])
        # A few vocab chunks stand in for the trainer's chunked cross-entropy.
        logits = model.logits(hidden[:, :128]).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + jnp.mean(hidden.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))
        compiled = step.lower(abstract_state, ids).compile()
    memory = compiled.memory_analysis()
    params_per_device = 2 * flops.count_params(config).total / 8
    assert memory.argument_size_in_bytes < params_per_device * 1.05 + 1e6
    with capsys.disabled():
        print(
            f"\nGLM-4-9B fwd+bwd, 8 devices (fsdp=8), batch {batch} x seq {seq}, bf16, full remat: "
            f"arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, "
            f"outputs {memory.output_size_in_bytes / 2**30:.2f} GiB, "
            f"temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB per device"
        )
