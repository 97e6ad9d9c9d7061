"""How attention's operands are laid out over the ambient mesh inside ``shard_map``.

Kernels that run per shard (splash, context parallelism, SampleAttention) split the batch over
the batch axes, the heads over the tensor axis and, for context parallelism, the queries over
the sequence axis, by the same logical rules as the model's activations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from glmjax import sharding

Q_AXES: sharding.LogicalAxes = ("act_batch", "act_seq", "act_heads", "act_head_dim")
KV_AXES: sharding.LogicalAxes = ("act_batch", "act_seq", "act_kv_heads", "act_head_dim")


def axis_names(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry, as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def ambient_mesh() -> jax.sharding.AbstractMesh | None:
    """The ambient (``jax.set_mesh``) mesh, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.axis_sizes) == 1 else mesh


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Specs of q [b, s, heads, d] and k/v [b, s, kv_heads, d] for a per-shard kernel.

    Attributes:
      q_spec, kv_spec: ``PartitionSpec`` of q and of k/v (batch, sequence, heads, head_dim).
      local_groups: query heads per KV head inside a shard.
      select_kv: inside ``shard_map``, maps the shard's k or v to the KV heads its query heads
        use. The identity unless the tensor axis splits the query heads but not the fewer KV
        heads (GLM-4-9B: 32 query heads, 2 KV heads, tensor 8): K/V then stay replicated over
        the tensor axis and each shard slices the KV heads of its own query heads, so no shard
        computes another shard's heads.
    """

    q_spec: PartitionSpec
    kv_spec: PartitionSpec
    local_groups: int
    select_kv: Callable[[jax.Array], jax.Array]

    @property
    def segment_spec(self) -> PartitionSpec:
        """Spec of segment ids [b, s] (batch and sequence like q)."""
        return PartitionSpec(self.q_spec[0], self.q_spec[1])

    @property
    def sequence_axes(self) -> tuple[str, ...]:
        """Mesh axes splitting the sequence (empty without context parallelism)."""
        return axis_names(self.q_spec[1])


def head_layout(
    q_shape: tuple[int, ...], kv_shape: tuple[int, ...], mesh: jax.sharding.AbstractMesh,
    *, split_sequence: bool,
) -> HeadLayout:
    """The layout of attention's operands on ``mesh`` under the active rules.

    Args:
      q_shape: [b, s, heads, d]; kv_shape: [b, s, kv_heads, d].
      split_sequence: whether the sequence dimension keeps its ``act_seq`` mesh axes (context
        parallelism) or is whole in every shard.
    """
    heads, kv_heads = q_shape[2], kv_shape[2]
    groups = heads // kv_heads
    q_spec = sharding.logical_to_spec(Q_AXES, q_shape, mesh)
    kv_spec = sharding.logical_to_spec(KV_AXES, kv_shape, mesh)
    seq_entry = q_spec[1] if split_sequence and q_spec[1] == kv_spec[1] else None
    q_spec = PartitionSpec(q_spec[0], seq_entry, q_spec[2], None)
    kv_spec = PartitionSpec(kv_spec[0], seq_entry, kv_spec[2], None)
    head_axes = axis_names(q_spec[2])
    local_heads = heads // math.prod(mesh.shape[name] for name in head_axes)
    split_queries_only = (bool(head_axes) and kv_spec[2] is None and q_spec[0] == kv_spec[0]
                          and not (groups % local_heads and local_heads % groups))
    if not split_queries_only:  # heads split like the KV heads, or not at all
        return HeadLayout(kv_spec, kv_spec, groups, lambda x: x)
    local_kv_heads = max(1, local_heads // groups)

    def select_kv(x: jax.Array) -> jax.Array:
        first_kv_head = jax.lax.axis_index(head_axes) * local_heads // groups
        return jax.lax.dynamic_slice_in_dim(x, first_kv_head, local_kv_heads, axis=2)

    return HeadLayout(q_spec, kv_spec, local_heads // local_kv_heads, select_kv)
