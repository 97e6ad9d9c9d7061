"""Compiling for a TPU slice on a CPU-only host: libtpu's compile-only topology devices.

The decoder's forward + backward with splash attention and the Pallas SampleAttention kernel
compile through XLA:TPU and Mosaic (not the Pallas interpreter), and the platform-dependent
choices read the mesh's devices. Only compile time is spent: nothing runs on those devices.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glmjax import flops, hardware, sharding
from glmjax.models import abstract_model, preset, state_shardings
from pallas_kernels.sample_attention import resolve_backend, sample_attention

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(
        not hardware.libtpu_available(),
        reason="libtpu is not installed (pip install 'glmjax[tpu_aot]'): no TPU topology to compile for",
    ),
]


@pytest.fixture(autouse=True)
def _default_matmul_precision():
    """conftest's "highest" precision asks Mosaic for fp32 contraction of bf16 operands, which
    it rejects ("Bad lhs type"); TPU programs compile at the default precision."""
    with jax.default_matmul_precision("default"):
        yield


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying ``shardings`` (no array can live on compile-only devices)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@pytest.mark.parametrize("topology,kind,peak", [
    ("v5e:2x2", "TPU v5 lite", 197e12), ("v5p:2x2x1", "TPU v5", 459e12),
    ("v6e:2x2", "TPU v6 lite", 918e12), ("v4:2x2x1", "TPU v4", 275e12),  # v4 as megacore
])
def test_topology_mesh_devices_and_peak_flops(topology, kind, peak):
    mesh = hardware.tpu_topology_mesh(topology, (1, -1, 1, 1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1}  # one per chip
    assert mesh.devices.flat[0].device_kind == kind
    assert hardware.mesh_platform(mesh) == "tpu"
    assert hardware.peak_flops(mesh) == peak


def test_platform_is_read_from_the_ambient_mesh():
    tpu_mesh = hardware.tpu_topology_mesh("v5p:2x2x1", (1, -1, 1, 1))
    cpu_mesh = sharding.make_mesh((2, 1, 1, 1), devices=jax.devices()[:2])
    assert hardware.mesh_platform(cpu_mesh) == "cpu"
    assert hardware.peak_flops(cpu_mesh) is None
    seen = []

    def probe(x):
        seen.append((hardware.current_platform(), resolve_backend("auto")))
        return x

    assert hardware.current_platform() == "cpu"  # no mesh: the default backend
    for mesh in (tpu_mesh, cpu_mesh):
        with jax.set_mesh(mesh):
            seen.append((hardware.current_platform(), resolve_backend("auto")))
            spec = NamedSharding(mesh, PartitionSpec())
            jax.jit(probe).lower(jax.ShapeDtypeStruct((8,), jnp.float32, sharding=spec))  # traced
    assert seen == [("tpu", "pallas"), ("tpu", "pallas"), ("cpu", "xla"), ("cpu", "xla")]


def test_topology_errors_name_the_topology():
    with pytest.raises(RuntimeError, match="'v9z:2x2'"):
        hardware.tpu_topology_mesh("v9z:2x2", (-1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"'v5e:2x2' \(4 devices\)"):
        hardware.tpu_topology_mesh("v5e:2x2", (1, 8, 1, 1))


@pytest.mark.parametrize("topology,mesh_shape,seq", [
    ("v5e:2x2", (1, 4, 1, 1), 256),    # FSDP: splash per batch shard
    ("v5p:2x2x1", (2, 1, 2, 1), 256),  # data x tensor: splash per (batch, KV head) shard
    ("v5p:2x2x1", (1, 1, 1, 4), 512),  # context parallel: each chip's 128-query chunk, K/V gathered
])
def test_decoder_forward_backward_compiles_for_tpu_with_splash(topology, mesh_shape, seq, capsys):
    config = preset("glm4-tiny").replace(attention_backend="splash", compute_dtype="bfloat16")
    mesh = hardware.tpu_topology_mesh(topology, mesh_shape)
    graphdef, state = nnx.split(abstract_model(config))
    shardings = state_shardings(state, mesh)
    abstract_state = _abstract(state, shardings)
    batch = 4
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.named_sharding(
        ("act_batch", "act_seq"), (batch, seq), mesh))

    def loss_fn(state, ids):
        logits = nnx.merge(graphdef, state)(ids).astype(jnp.float32)
        targets = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - targets)

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))
        compiled = step.lower(abstract_state, ids).compile()
    assert "tpu_custom_call" in compiled.as_text()  # Mosaic splash kernels, not the interpreter
    assert ("all-gather" in compiled.as_text()) == (mesh_shape[3] > 1 or mesh_shape[1] > 1)
    memory = compiled.memory_analysis()
    param_bytes = 4 * flops.count_params(config).total
    assert 0 < memory.argument_size_in_bytes < param_bytes  # parameters are sharded
    cost = compiled.cost_analysis()
    assert cost["flops"] > 0
    with capsys.disabled():
        print(f"\nglm4-tiny fwd+bwd on {topology} {dict(mesh.shape)}: arguments "
              f"{memory.argument_size_in_bytes} B, temporaries {memory.temp_size_in_bytes} B per "
              f"device, XLA flops {cost['flops']:.3g} (Mosaic kernels not counted)")


def test_sample_attention_pallas_kernel_compiles_for_tpu():
    mesh = hardware.tpu_topology_mesh("v5e:2x2", (-1, 1, 1, 1))
    spec = PartitionSpec("data")  # Mosaic kernels are not auto-partitioned: one per batch shard
    batch, seq, heads, kv_heads, head_dim = 4, 512, 4, 2, 128
    q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.bfloat16,
                              sharding=NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        attend = jax.jit(jax.shard_map(
            lambda q, k, v: sample_attention(q, k, v, alpha=0.95), in_specs=(spec,) * 3,
            out_specs=spec, check_vma=False))
        compiled = attend.lower(q, kv, kv).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.output_shardings.shard_shape(q.shape) == (1, seq, heads, head_dim)


def _one_chip_mesh(topology):
    """A 1-device mesh on the first chip of ``topology`` (the kernel's single-chip program)."""
    return sharding.make_mesh((1, 1, 1, 1), devices=list(hardware.tpu_topology_mesh(topology, (-1, 1, 1, 1)).devices.flat)[:1])


def _glm4_9b_attention_inputs(mesh, seq):
    """bf16 q [1, seq, 32, 128] and k/v [1, seq, 2, 128] (GLM-4-9B's heads), replicated."""
    spec = NamedSharding(mesh, PartitionSpec())
    q = jax.ShapeDtypeStruct((1, seq, 32, 128), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((1, seq, 2, 128), jnp.bfloat16, sharding=spec)
    return q, kv


@pytest.mark.parametrize("seq", [
    32768, 131072, 1 << 20])
def test_sample_attention_kernel_compiles_at_long_context(seq, capsys):
    """The Pallas kernel alone (any selection: lists as abstract inputs) at GLM-4-9B's heads,
    block 128. Its SMEM holds one list row and 128 counts (33 KiB at 1M), not all the lists
    (128 MiB at 128K when they were scalar-prefetched), and it needs no XLA temporaries."""
    from pallas_kernels.sample_attention import BlockLayout, Selection
    from pallas_kernels.sample_attention.pallas_tpu import pallas_sample_attention, smem_bytes_per_call

    mesh = _one_chip_mesh("v5p:2x2x1")
    layout = BlockLayout.create(seq, 128, 128, causal=True, window_ratio=0.08)
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    spec = NamedSharding(mesh, PartitionSpec())
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    def kernel(q, k, v, blocks, counts):
        selection = Selection(blocks, counts, jnp.zeros((1, 32), jnp.float32))
        return pallas_sample_attention(q, k, v, selection, layout, 128 ** -0.5)

    with jax.set_mesh(mesh):
        compiled = jax.jit(kernel).lower(
            arg((1, 32, seq, 128), jnp.bfloat16), arg((1, 2, seq, 128), jnp.bfloat16),
            arg((1, 2, seq, 128), jnp.bfloat16), arg((1, 32, nq, nk), jnp.int32),
            arg((1, 32, nq), jnp.int32)).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert smem_bytes_per_call(nk) <= 34 * 1024 < 4 * 32 * nq * nk  # one row, not all the lists
    assert compiled.memory_analysis().temp_size_in_bytes == 0  # lists read in place, no copy
    with capsys.disabled():
        print(f"\nsample attention kernel seq {seq}: SMEM {smem_bytes_per_call(nk)} B per call "
              f"(scalar-prefetched lists would be {4 * 32 * nq * (nk + 1)} B), XLA temp "
              f"{compiled.memory_analysis().temp_size_in_bytes / 2**30:.3f} GiB")


@pytest.mark.parametrize("seq,stage", [
    (32768, "selection"),
    pytest.param(32768, "attention", marks=pytest.mark.slow),
    pytest.param(131072, "selection", marks=pytest.mark.slow),
    pytest.param(131072, "attention", marks=pytest.mark.slow),
    pytest.param(1 << 20, "selection", marks=pytest.mark.slow),
    pytest.param(1 << 20, "attention", marks=pytest.mark.slow),
])
def test_sample_attention_stages_compile_at_long_context(seq, stage, capsys):
    """Stages 1+2 alone and the whole call (stages + kernel) for one v5p chip (95 GiB HBM):
    their memory is printed, and must fit the chip."""
    from pallas_kernels.sample_attention import sample_attention_selection

    mesh = _one_chip_mesh("v5p:2x2x1")
    q, kv = _glm4_9b_attention_inputs(mesh, seq)
    with jax.set_mesh(mesh):
        if stage == "selection":
            compiled = jax.jit(lambda q, k: sample_attention_selection(q, k, alpha=0.95)).lower(q, kv).compile()
        else:
            compiled = jax.jit(lambda q, k, v: sample_attention(q, k, v, alpha=0.95)).lower(q, kv, kv).compile()
            assert "tpu_custom_call" in compiled.as_text()
    memory = compiled.memory_analysis()
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    assert total < 95 * 2**30
    with capsys.disabled():
        print(f"\nsample attention {stage} seq {seq} on one v5p chip: arguments "
              f"{memory.argument_size_in_bytes / 2**30:.3f} GiB, output "
              f"{memory.output_size_in_bytes / 2**30:.3f} GiB, temporaries "
              f"{memory.temp_size_in_bytes / 2**30:.3f} GiB")


@pytest.mark.parametrize("mesh_shape,local_shape", [
    ((1, 1, 4, 1), (1, 8192, 8, 128)),  # tensor 4: query heads split, the 2 KV heads sliced
    ((1, 1, 2, 2), (1, 4096, 16, 128)),  # tensor x sequence: gathered selection, local blocks
])
def test_sharded_sample_attention_compiles_for_tpu_meshes(mesh_shape, local_shape):
    """GLM-4-9B heads on 4 v5p chips: the per-shard program (Mosaic kernel) compiles."""
    from glmjax.models.sparse_attention import sharded_sample_attention

    mesh = hardware.tpu_topology_mesh("v5p:2x2x1", mesh_shape)
    seq = 8192
    q = jax.ShapeDtypeStruct((1, seq, 32, 128), jnp.bfloat16, sharding=sharding.named_sharding(
        ("act_batch", "act_seq", "act_heads", "act_head_dim"), (1, seq, 32, 128), mesh))
    kv = jax.ShapeDtypeStruct((1, seq, 2, 128), jnp.bfloat16, sharding=sharding.named_sharding(
        ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"), (1, seq, 2, 128), mesh))
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda q, k, v: sharded_sample_attention(q, k, v, alpha=0.95)).lower(
            q, kv, kv).compile()
    assert "tpu_custom_call" in compiled.as_text()
    assert compiled.output_shardings.shard_shape(q.shape) == local_shape
    assert ("all-gather" in compiled.as_text()) == (mesh_shape[3] > 1)  # q/k/v over the sequence
