"""Device meshes, logical axis rules and sharding helpers.

Every parameter and key activation carries a tuple of *logical* axis names
(``("embed", "mlp")``, ``("act_batch", "act_seq", "act_embed")``).  A rule table
maps each logical name to zero or more *mesh* axes out of ``MESH_AXES``.  The
mapping is shape-aware: a mesh axis whose size does not divide the dimension (for
example 2 KV heads on a tensor axis of 4) is dropped for that array, so the same
rules work for any model on any mesh; ``sharding_report`` lists what stayed
replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")

LogicalAxes = tuple[str | None, ...]
AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical name -> mesh axes.  Parameters: FSDP shards the model dimension over the fsdp
# and sequence axes (with context parallelism the sequence shards also hold a share of the
# weights, as MaxText's context axis does), tensor parallelism shards heads, MLP and vocabulary.  Activations: batch over
# data+fsdp, sequence over the sequence axis, heads/MLP/vocab over tensor.
# KV cache [batch, kv_heads, max_len, head_dim]: batch over data+fsdp, KV heads over
# tensor; the cache sequence takes the sequence axis and, when the KV heads cannot be
# split over tensor (2 KV heads on 8 tensor shards), the tensor axis too, so no
# tensor shard holds the whole cache (``glmjax.models.attention.write_cache``).
DEFAULT_RULES: AxisRules = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("norm", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("gate_up", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_kv_heads", "tensor"),
    ("cache_seq", ("sequence", "tensor")),
    ("cache_head_dim", None),
)


@gin.configurable
def axis_rules(rules: AxisRules = DEFAULT_RULES) -> AxisRules:
    """The logical axis rules in force; gin replaces them with ``axis_rules.rules = ...``."""
    return tuple((name, target) for name, target in rules)


_ACTIVE_RULES: contextvars.ContextVar[AxisRules | None] = contextvars.ContextVar(
    "glmjax_axis_rules", default=None
)


def active_rules() -> AxisRules:
    """Rules set by ``use_rules``, else ``axis_rules()`` (gin-configurable)."""
    rules = _ACTIVE_RULES.get()
    return axis_rules() if rules is None else rules


@contextlib.contextmanager
def use_rules(rules: AxisRules) -> Iterator[AxisRules]:
    """Temporarily replace the logical axis rules."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over ``MESH_AXES`` = (data, fsdp, tensor, sequence).

    Args:
      shape: four sizes; at most one may be -1, meaning "all remaining devices".
      devices: defaults to ``jax.devices()`` (all processes' devices).

    Raises:
      ValueError: the shape does not match the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"MESH_SHAPE {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"MESH_SHAPE {shape}: at most one entry may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"MESH_SHAPE {shape} cannot be filled with {len(devices)} devices "
                f"({len(devices)} is not a multiple of {known})"
            )
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"MESH_SHAPE {shape} needs {math.prod(shape)} devices but {len(devices)} are available"
        )
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _mesh_axes_for(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    target = rules[name]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(
    logical_axes: LogicalAxes,
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: AxisRules | None = None,
) -> PartitionSpec:
    """Maps logical axes of an array of ``shape`` to a ``PartitionSpec`` on ``mesh``.

    A mesh axis is used at most once per array, only if present in the mesh with
    size > 1, and only while the product of the axes chosen for a dimension
    divides that dimension.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {tuple(shape)}")
    table = dict(active_rules() if rules is None else rules)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(logical_axes, shape):
        chosen: list[str] = []
        for axis in _mesh_axes_for(name, table):
            size = sizes.get(axis, 1)
            if size == 1 or axis in used:
                continue
            if dim % (math.prod(sizes[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: LogicalAxes, shape: Sequence[int], mesh: Mesh, rules: AxisRules | None = None
) -> NamedSharding:
    """``NamedSharding`` for an array with the given logical axes and shape."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """``with_sharding_constraint`` by logical axes under the ambient mesh (``jax.set_mesh``).

    A no-op when no mesh is set, so model code runs unchanged on one device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


@dataclasses.dataclass(frozen=True)
class ShardingReport:
    """Per-parameter placement summary for one mesh.

    Attributes:
      bytes_per_device: parameter bytes held by the most loaded device.
      total_bytes: parameter bytes of one full (unsharded) copy.
      replicated: names of parameters with more than ``min_size`` elements left fully replicated.
      specs: parameter name -> PartitionSpec string.
    """

    bytes_per_device: int
    total_bytes: int
    replicated: tuple[str, ...]
    specs: Mapping[str, str]

    def summary(self) -> str:
        lines = [
            f"parameters: {self.total_bytes / 2**30:.3f} GiB total, "
            f"{self.bytes_per_device / 2**30:.3f} GiB per device",
        ]
        if self.replicated:
            lines.append("fully replicated (large): " + ", ".join(self.replicated))
        return "\n".join(lines)


def sharding_report(
    named_arrays: Mapping[str, jax.ShapeDtypeStruct | jax.Array],
    shardings: Mapping[str, NamedSharding],
    min_size: int = 1 << 16,
) -> ShardingReport:
    """Bytes per device and the large parameters that no mesh axis shards."""
    total = 0
    per_device = 0
    replicated = []
    specs = {}
    for name, array in named_arrays.items():
        sharding = shardings[name]
        nbytes = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        shard_shape = sharding.shard_shape(tuple(array.shape))
        total += nbytes
        per_device += int(np.prod(shard_shape)) * np.dtype(array.dtype).itemsize
        specs[name] = str(sharding.spec)
        if tuple(shard_shape) == tuple(array.shape) and np.prod(array.shape) > min_size:
            if math.prod(sharding.mesh.axis_sizes) > 1:
                replicated.append(name)
    return ShardingReport(per_device, total, tuple(replicated), specs)
