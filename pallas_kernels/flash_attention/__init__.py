"""Flash attention with segment ids and a causal offset: Pallas kernels (Triton on GPU).

Public API: :func:`flash_attention` (the kernels, differentiable) and the dense jnp
:func:`reference_attention` / :func:`allowed_mask` it is tested against.
"""
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import allowed_mask, reference_attention

__all__ = ["allowed_mask", "flash_attention", "reference_attention"]
