"""The hardware a mesh targets: TPU topology meshes for compiles without a TPU, the mesh's
platform, and its devices' peak FLOP/s.

``tpu_topology_mesh("v5p:2x2x1", (1, 4, 1, 1))`` builds a mesh over the compile-only devices
of a TPU slice (libtpu, ``pip install 'glmjax[tpu_aot]'``) on any host. A program jitted and
lowered under ``jax.set_mesh`` of that mesh, with ``jax.ShapeDtypeStruct`` inputs sharded over
it, compiles through XLA:TPU (and Mosaic for Pallas kernels): ``compiled.memory_analysis()``
gives the per-device HBM use and ``compiled.cost_analysis()`` XLA's per-device FLOP count, in
which a scanned layer stack counts once and Mosaic kernels not at all (use ``glmjax.flops``).
Nothing can run on those devices, and no eager JAX operation works under ``jax.set_mesh`` of
such a mesh: states and batches are abstract (``jax.eval_shape``), never initialised.
Mosaic rejects ``jax_default_matmul_precision="highest"`` for bf16 kernel operands.

Code that picks a kernel per platform reads ``current_platform()`` (the ambient mesh's
devices), never ``jax.default_backend()``, which is ``"cpu"`` on such a host.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from jax.experimental import topologies
from jax.sharding import AbstractMesh, Mesh

from glmjax.sharding import make_mesh
from pallas_kernels.platform import current_platform, mesh_platform

__all__ = [
    "PEAK_BF16_FLOPS", "current_platform", "libtpu_available", "mesh_platform", "peak_flops",
    "tpu_topology_mesh",
]

# Dense bf16 peak FLOP/s of one device, by device-kind prefix (the longest matching prefix wins:
# "TPU v5 lite" is a v5e, "TPU v5" a v5p).
PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def libtpu_available() -> bool:
    """True when libtpu (XLA:TPU and the TPU runtime) is installed or ``TPU_LIBRARY_PATH`` names it."""
    return importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


def tpu_topology_mesh(topology_name: str, mesh_shape: Sequence[int]) -> Mesh:
    """A mesh over ``MESH_AXES`` of the compile-only devices of a TPU slice.

    Args:
      topology_name: ``"<generation>:<chips>"`` as libtpu names slices, e.g. ``"v5e:2x2"``,
        ``"v5e:2x4"``, ``"v5p:2x2x1"``, ``"v6e:2x2"``, ``"v4:2x2x1"``; one device per chip
        (v4 in megacore mode, as its runtime runs it).
      mesh_shape: four sizes (data, fsdp, tensor, sequence) as for ``glmjax.sharding.make_mesh``;
        at most one -1.

    Raises:
      RuntimeError: libtpu is not installed, or rejects ``topology_name``.
      ValueError: ``mesh_shape`` does not fit the topology's device count.
    """
    if not libtpu_available():
        raise RuntimeError(
            f"TPU topology {topology_name!r}: libtpu is not installed (pip install 'glmjax[tpu_aot]')"
        )
    # These devices only compile, so several processes may load libtpu at once (libtpu otherwise
    # takes /tmp/libtpu_lockfile, and a second compile-only process fails).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        # v4 chips have two TensorCores; runtimes and meshes use them as one megacore device.
        options = {"chip_config_name": "megacore"} if topology_name.startswith("v4") else {}
        devices = topologies.get_topology_desc(topology_name, "tpu", **options).devices
    except RuntimeError as err:
        raise RuntimeError(
            f"libtpu rejects TPU topology {topology_name!r} ({str(err).splitlines()[0]}); "
            "names look like 'v5e:2x2' or 'v5p:2x2x1'"
        ) from None
    try:
        return make_mesh(mesh_shape, devices=devices)
    except ValueError as err:
        raise ValueError(f"TPU topology {topology_name!r} ({len(devices)} devices): {err}") from None


def peak_flops(mesh: Mesh | AbstractMesh) -> float | None:
    """Dense bf16 peak FLOP/s of one of the mesh's devices; None for an unknown kind (CPU)."""
    abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
    device = None if abstract.empty else abstract.abstract_device
    if device is None:
        return None
    for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if device.device_kind.startswith(prefix):
            return PEAK_BF16_FLOPS[prefix]
    return None
