"""A reference model that follows the policy: ``ref <- rate * policy + (1 - rate) * ref``.

T1's dynamic anchor (an EMA of the policy, ``rate = 1 - ref_ema_decay``) and TR-DPO's soft or
hard reference updates are the same move at different rates and cadences. After ``n`` updates
toward a fixed policy ``p``, ``ref_n = (1 - rate)^n ref_0 + (1 - (1 - rate)^n) p``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def blend_toward(reference: Any, params: Any, rate: float, due: jax.Array | bool = True) -> Any:
    """``rate * params + (1 - rate) * reference`` leaf by leaf (in fp32, cast back to the
    reference's dtype) where ``due``, else the reference unchanged.

    Args:
      reference: pytree of arrays (the anchor).
      params: pytree of the same structure (the policy).
      rate: in (0, 1]; 1 copies the policy (a hard sync).
      due: bool scalar (traced or not): whether this call moves the anchor.
    """

    def mix(ref: jax.Array, p: jax.Array) -> jax.Array:
        mixed = rate * p.astype(jnp.float32) + (1.0 - rate) * ref.astype(jnp.float32)
        return jnp.where(due, mixed.astype(ref.dtype), ref)

    return jax.tree.map(mix, reference, params)
