"""Train state and its shardings."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax import sharding as sharding_lib
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.models.params import abstract_model, state_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      step: int32 scalar, optimiser steps taken.
      params: nested dict of parameter arrays (``nnx.to_pure_dict`` of the model).
      opt_state: optax state.
      rng: uint32 [2] raw PRNG key data (dropout-free models use it for objectives that sample).
      extra: the objective's state (reference model, anchor, ...), or None.
    """

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array
    extra: Any = None


def model_graph(config: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef of the decoder, its parameters as a nested dict of ShapeDtypeStructs)."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    return graphdef, nnx.to_pure_dict(abstract_state)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: sharding_lib.AxisRules | None = None) -> dict:
    """Nested dict of ``NamedSharding`` for the parameters, from their logical axes."""
    _, abstract_state = nnx.split(abstract_model(config))
    return nnx.to_pure_dict(state_shardings(abstract_state, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: dict, shardings: dict, mesh: Mesh):
    """Optimizer-state shardings: parameter-shaped entries follow their parameter, the rest
    (counts, scalars) are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt, shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def leaf_shardings(tree: Any, mesh: Mesh) -> Any:
    """The sharding of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s); leaves without
    a concrete sharding on ``mesh`` are replicated."""

    def sharding_of(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(mesh, sharding.spec)
        return replicated(mesh)

    return jax.tree.map(sharding_of, tree)


def train_state_shardings(
    tx: optax.GradientTransformation, config: ModelConfig, mesh: Mesh, extra: Any = None,
    rules: sharding_lib.AxisRules | None = None,
) -> TrainState:
    """A TrainState-shaped tree of shardings; ``extra`` (arrays or ``ShapeDtypeStruct``s) gives
    the objective's evolving state its own."""
    _, abstract_params = model_graph(config)
    shardings = param_shardings(config, mesh, rules)
    return TrainState(
        step=replicated(mesh),
        params=shardings,
        opt_state=opt_state_shardings(tx, abstract_params, shardings, mesh),
        rng=replicated(mesh),
        extra=leaf_shardings(extra, mesh),
    )


def random_params(config: ModelConfig, seed: int) -> dict:
    """Seeded random parameters (the same values every time for the same config and seed)."""
    return nnx.to_pure_dict(nnx.state(Decoder(config, nnx.Rngs(params=seed)), nnx.Param))


def init_random_params(config: ModelConfig, mesh: Mesh, seed: int, shardings: dict) -> dict:
    """``random_params`` computed straight into ``shardings`` (each device makes its shards)."""
    with jax.set_mesh(mesh):
        return jax.jit(lambda: random_params(config, seed), out_shardings=shardings)()


def fresh_train_state(
    config: ModelConfig, tx: optax.GradientTransformation, seed: int, params: dict | None = None,
    extra: Any = None,
) -> TrainState:
    """Step 0: ``params`` (default: ``random_params(config, seed)``), zero optimiser state."""
    if params is None:
        params = random_params(config, seed)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
        extra=extra,
    )


def abstract_train_state(
    config: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState, extra: Any = None
) -> TrainState:
    """The train state as ``ShapeDtypeStruct``s carrying ``shardings`` (nothing allocated)."""
    shapes = jax.eval_shape(lambda: fresh_train_state(config, tx, 0, extra=extra))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(
    config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    shardings: TrainState,
    params: dict,
    extra: Any = None,
    donate: bool = False,
) -> TrainState:
    """``fresh_train_state`` from ``params`` computed into ``shardings``. With ``donate`` the
    parameter buffers move into the state (``params`` must not be used afterwards); otherwise
    the state holds its own copy."""
    with jax.set_mesh(mesh):
        return jax.jit(
            lambda params, extra: fresh_train_state(config, tx, seed, params, extra),
            out_shardings=shardings, donate_argnums=(0,) if donate else (),
        )(params, extra)
