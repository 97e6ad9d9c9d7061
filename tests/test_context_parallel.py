"""Context parallelism: attention with the sequence split over the mesh's sequence axis.

Every device keeps its query chunk and gathers K/V; outputs and gradients equal dense attention,
segment ids are respected, and no device holds a [seq, seq] (or [seq / n, seq]) score matrix.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import sharding
from glmjax.data.spec import lm_batch_spec
from glmjax.models import attention as attention_lib
from glmjax.models import blockwise, preset
from glmjax.training.trainer import train
from training_helpers import fixed_batches_factory


def _qkv(seed, batch, seq, heads, kv_heads, head_dim):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim))
    return q, k, v, jax.random.normal(keys[3], q.shape)


def _packed(batch, seq, seed):
    """Documents that cross shard boundaries, and right padding (segment 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
        row = np.zeros(seq, np.int32)
        row[: cuts[0]], row[cuts[0]: cuts[1]], row[cuts[1]: cuts[2]] = 1, 2, 3
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def _dense(q, k, v, seg):
    return attention_lib.xla_attention(q, k, v, attention_lib.attention_mask(seg, seg, None))


def _value_and_grads(fn, q, k, v, cotangent, visible):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * cotangent * visible[:, :, None, None]), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("q_offset,seq_q", [(0, 64), (96, 64), (37, 91)])
def test_blockwise_query_offset_matches_dense(q_offset, seq_q):
    """Queries at positions [offset, offset + seq_q) against keys [0, seq_kv): the per-shard
    kernel of context parallelism and of chunked prefill."""
    seq_kv = q_offset + seq_q
    q, k, v, cotangent = _qkv(3, 2, seq_kv, 4, 2, 16)
    seg = _packed(2, seq_kv, 4)
    q, cotangent, q_seg = q[:, q_offset:], cotangent[:, q_offset:], seg[:, q_offset:]
    offsets = jnp.full((2,), q_offset, jnp.int32)
    visible = (q_seg != 0).astype(jnp.float32)
    reference = lambda q, k, v: attention_lib.xla_attention(  # noqa: E731
        q, k, v, attention_lib.attention_mask(q_seg, seg, offsets))
    kernel = lambda q, k, v: blockwise.blockwise_attention(  # noqa: E731
        q, k, v, q_seg, seg, q_offset=jnp.int32(q_offset), block_q=16, block_k=24)
    want, want_grads = _value_and_grads(reference, q, k, v, cotangent, visible)
    got, grads = _value_and_grads(jax.jit(kernel), q, k, v, cotangent, visible)
    mask = np.asarray(visible)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(got) * mask, np.asarray(want) * mask, atol=2e-5)
    assert np.all(np.asarray(got)[mask[..., 0, 0] == 0] == 0)  # padding queries: exactly 0
    for name, grad, ref in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(grad, ref, atol=5e-5, err_msg=f"d{name}")


def test_blockwise_program_size_does_not_grow_with_length():
    """The loops keep one program for any length: 2K and 32K lower to the same op count."""
    def ops(seq):
        shape = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
        seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)

        def loss(q, k, v, seg):
            return blockwise.blockwise_attention(q, k, v, seg, seg).sum()

        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape, seg).as_text()
        return len(re.findall(r"^\s*%?\S+ = ", text, flags=re.M))

    assert ops(32768) == ops(2048)


@pytest.mark.parametrize("backend", ["blockwise", "splash", "fused"])
@pytest.mark.parametrize("mesh_shape,heads,kv_heads", [
    ((1, 1, 1, 8), 4, 2),   # sequence only
    ((2, 1, 1, 4), 4, 2),   # batch x sequence
    ((1, 1, 4, 2), 8, 2),   # tensor splits query heads, not the 2 KV heads; sequence 2
    ((1, 2, 2, 2), 4, 2),   # fsdp x tensor x sequence
])
def test_context_parallel_matches_dense(backend, mesh_shape, heads, kv_heads):
    # splash runs per shard for 128-token chunks; shorter chunks (256 tokens over 4 or 8
    # shards) take the blockwise kernel.
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    batch, seq = 2, 256
    q, k, v, cotangent = _qkv(5, batch, seq, heads, kv_heads, 16)
    seg = _packed(batch, seq, 6)
    visible = (seg != 0).astype(jnp.float32)
    want, want_grads = _value_and_grads(lambda q, k, v: _dense(q, k, v, seg), q, k, v, cotangent, visible)

    def run(q, k, v):
        return attention_lib.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offsets=None,
                                    backend=backend)

    with jax.set_mesh(mesh):
        place = lambda x, axes: jax.device_put(x, sharding.named_sharding(axes, x.shape, mesh))  # noqa: E731
        args = (place(q, ("act_batch", "act_seq", "act_heads", None)),
                place(k, ("act_batch", "act_seq", "act_kv_heads", None)),
                place(v, ("act_batch", "act_seq", "act_kv_heads", None)))
        got, grads = jax.jit(functools.partial(_value_and_grads, run))(*args, cotangent, visible)
        hlo = jax.jit(run).lower(*args).compile().as_text()
    assert "all-gather" in hlo
    mask = np.asarray(visible)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(got) * mask, np.asarray(want) * mask, atol=2e-5)
    for name, grad, ref in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(grad, ref, atol=5e-5, err_msg=f"d{name}")


def test_context_parallel_never_builds_a_chunk_by_sequence_score_matrix():
    """At 8K tokens over 8 sequence shards each device holds 1K queries; the kernel meets them
    with one 512-key block at a time, never all 8K keys at once (the "xla" backend does)."""
    seq, shards = 8192, 8
    mesh = sharding.make_mesh((1, 1, 1, shards), devices=jax.devices()[:shards])
    q_shape = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(backend, q, k, v, seg):
        out = attention_lib.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offsets=None,
                                   backend=backend)
        return out.sum()

    def compiled(backend):
        with jax.set_mesh(mesh):
            specs = [sharding.named_sharding(("act_batch", "act_seq", "act_heads", None), q_shape.shape, mesh)] * 3
            args = [jax.ShapeDtypeStruct(q_shape.shape, q_shape.dtype, sharding=s) for s in specs]
            seg_arg = jax.ShapeDtypeStruct(seg.shape, seg.dtype,
                                           sharding=sharding.named_sharding(("act_batch", "act_seq"), seg.shape, mesh))
            grad = jax.grad(functools.partial(loss, backend), argnums=(0, 1, 2))
            return jax.jit(grad).lower(*args, seg_arg).compile()

    chunk = seq // shards
    flash, dense = compiled("blockwise"), compiled("xla")
    assert re.search(rf"\[[^\]]*\b{chunk},{seq}\]", dense.as_text())  # the dense path does
    assert not re.search(rf"\[[^\]]*\b{chunk},{seq}\]", flash.as_text())
    assert not re.search(rf"\[[^\]]*\b{seq},{seq}\]", flash.as_text())
    flash_temp = flash.memory_analysis().temp_size_in_bytes
    dense_temp = dense.memory_analysis().temp_size_in_bytes
    print(f"per-device temporaries at {seq} tokens over {shards} shards: flash {flash_temp} B, "
          f"dense {dense_temp} B")
    assert flash_temp < dense_temp / 4


def test_train_step_per_device_flops_and_temporaries_fall_with_the_sequence_axis():
    """One 32K-token sequence per device (data = 8) against one sequence over 8 sequence
    shards: XLA's per-device FLOPs and temporaries of the real train step fall close to 1/8.

    The model has GLM-4-9B's proportions (2 KV heads of 32 query heads, MLP 3.3 x hidden) at
    1/4 of its width and 2 layers. XLA counts a loop body once (the layer scan, the flash
    kernel's block loops), the same way in both programs.
    """
    config = preset("glm4-tiny").replace(hidden_size=1024, intermediate_size=3424, num_heads=32, num_kv_heads=2,
                                         head_dim=32, num_layers=2, attention_backend="blockwise",
                                         remat_policy="full")
    seq = 32768

    def report(mesh_shape, rows):
        batch = {key: np.zeros((rows, seq), np.int32) for key in lm_batch_spec().features}
        return train(model_dir="unused", model_config=config, train_data=fixed_batches_factory([batch]),
                     train_steps=10, mesh_shape=mesh_shape, compile_only=True)

    whole, split = report((8, 1, 1, 1), 8), report((1, 1, 1, 8), 1)
    flops_ratio = split["xla_flops_per_device"] / whole["xla_flops_per_device"]
    temp_ratio = split["temp_bytes_per_device"] / whole["temp_bytes_per_device"]
    print(f"sequence 1 -> 8 at {seq} tokens: XLA FLOPs per device x{flops_ratio:.3f}, "
          f"temporaries x{temp_ratio:.3f}")
    assert 0.1 < flops_ratio < 0.15
    assert 0.1 < temp_ratio < 0.17


@pytest.mark.parametrize("sequence_shards", [1, 2])
def test_fused_backend_on_gpu_takes_the_packed_flash_kernel(sequence_shards):
    """Packed inputs with backend "fused", lowered for CUDA on this CPU host (an abstract mesh
    whose devices are GPUs): the Pallas GPU flash kernels (Triton, not the interpreter), per
    sequence shard with K/V all-gathered under context parallelism; no [seq, seq] mask or scores."""
    seq = 256
    mesh = jax.sharding.AbstractMesh((1, 1, 1, sequence_shards), sharding.MESH_AXES,
                                     abstract_device=jax.sharding.AbstractDevice(
                                         device_kind="NVIDIA H200", num_cores=None, platform="cuda"))

    def loss(q, k, v, seg):
        out = attention_lib.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_offsets=None,
                                   backend="fused")
        return out.astype(jnp.float32).sum()

    def arg(shape, dtype, axes):
        spec = sharding.logical_to_spec(axes, shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    q_axes, kv_axes = ("act_batch", "act_seq", "act_heads", None), ("act_batch", "act_seq", "act_kv_heads", None)
    args = (arg((2, seq, 4, 64), jnp.bfloat16, q_axes), arg((2, seq, 2, 64), jnp.bfloat16, kv_axes),
            arg((2, seq, 2, 64), jnp.bfloat16, kv_axes), arg((2, seq), jnp.int32, ("act_batch", "act_seq")))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    for kernel in ("flash_attention_forward", "flash_attention_dq", "flash_attention_dkdv"):
        assert kernel in text
    assert ("all_gather" in text) == (sequence_shards > 1)
    assert f"{seq}x{seq}" not in text
