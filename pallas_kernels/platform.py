"""The platform a program is built for: read from the mesh, not from the default backend.

An ahead-of-time compile for a TPU topology (``jax.experimental.topologies``) runs on a
CPU-only host, where ``jax.default_backend()`` is ``"cpu"`` although the program is built
for TPU. The mesh set by ``jax.set_mesh`` knows the target: its abstract mesh carries the
devices' platform and kind, also while ``jax.jit`` traces and inside ``shard_map``.
"""
from __future__ import annotations

import jax
from jax.sharding import AbstractMesh, Mesh

_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def canonical_platform(name: str) -> str:
  """``"cuda"`` and ``"rocm"`` -> ``"gpu"``; ``"tpu"``, ``"gpu"``, ``"cpu"`` unchanged."""
  name = name.lower()
  return _ALIASES.get(name, name)


def mesh_platform(mesh: Mesh | AbstractMesh) -> str:
  """``"tpu"``, ``"gpu"`` or ``"cpu"``: the platform of the mesh's devices.

  Raises:
    ValueError: the mesh is empty, or an abstract mesh that names no device.
  """
  abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
  device = None if abstract.empty else abstract.abstract_device
  if device is None:
    raise ValueError(f"{mesh} has no devices to read a platform from")
  return canonical_platform(device.platform)


def current_platform() -> str:
  """The platform of the mesh set by ``jax.set_mesh`` (works inside ``jax.jit`` tracing);
  ``jax.default_backend()`` when no mesh, or one without devices, is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.abstract_device is None:
    return canonical_platform(jax.default_backend())
  return mesh_platform(mesh)
