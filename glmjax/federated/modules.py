"""NNX networks of the APFed parties (MLPs: the views here are small flattened strips/columns).

The paper's MNIST/CIFAR nets are small CNNs; on 8x8 digit strips (8-32 pixels per view) and
10-column tabular views an MLP is the natural size, so every module here is an ``MLP``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Linear -> ReLU -> ... -> Linear. Maps (B, in_dim) -> (B, out_dim).

    ``final_activation`` applies ReLU after the last layer too (encoders' representations).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, *, rngs: nnx.Rngs,
                 final_activation: bool = False):
        dims = [in_dim, *hidden, out_dim]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.final_activation = final_activation

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.final_activation:
                x = jax.nn.relu(x)
        return x


class ActiveModel(nnx.Module):
    """The active party's nets: encoder f_A, task head h and (APFed-C) projection head g_A.

    ``encode``: (B, D_A) -> z (B, rep_dim); ``logits``: z -> (B, C); ``project``: z -> (B, proj_dim).
    """

    def __init__(self, in_dim: int, num_classes: int, *, encoder_hidden: Sequence[int], rep_dim: int,
                 head_hidden: Sequence[int], proj_dim: int | None, rngs: nnx.Rngs):
        self.encoder = MLP(in_dim, encoder_hidden, rep_dim, rngs=rngs, final_activation=True)
        self.head = MLP(rep_dim, head_hidden, num_classes, rngs=rngs)
        self.projection = nnx.Linear(rep_dim, proj_dim, rngs=rngs) if proj_dim else None

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)

    def logits(self, z: jax.Array) -> jax.Array:
        return self.head(z)

    def project(self, z: jax.Array) -> jax.Array:
        if self.projection is None:
            raise ValueError("this ActiveModel has no projection head (proj_dim=None: APFed-R)")
        return self.projection(z)

    def predict(self, x: jax.Array) -> jax.Array:
        """argmax h(f_A(x)): (B, D_A) -> (B,) int32 class ids; needs no other party."""
        return jnp.argmax(self.logits(self.encode(x)), axis=-1).astype(jnp.int32)


class ReconstructionModel(nnx.Module):
    """APFed-R passive nets: decoder D_p, z (B, rep_dim) -> reconstruction (B, D_p)."""

    def __init__(self, rep_dim: int, view_dim: int, *, hidden: Sequence[int], rngs: nnx.Rngs):
        self.decoder = MLP(rep_dim, hidden, view_dim, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)


class ContrastiveModel(nnx.Module):
    """APFed-C passive nets: encoder f_p and linear projection g_p, x_p (B, D_p) -> (B, proj_dim)."""

    def __init__(self, view_dim: int, proj_dim: int, *, encoder_hidden: Sequence[int], rep_dim: int,
                 rngs: nnx.Rngs):
        self.encoder = MLP(view_dim, encoder_hidden, rep_dim, rngs=rngs, final_activation=True)
        self.projection = nnx.Linear(rep_dim, proj_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.projection(self.encoder(x))
