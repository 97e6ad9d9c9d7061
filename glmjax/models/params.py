"""Creating decoders: concrete, abstract (no memory), or directly sharded over a mesh."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from glmjax import sharding as sharding_lib
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(variable: nnx.Variable) -> sharding_lib.LogicalAxes:
    """The ``logical_axes`` metadata of a parameter (one name per dimension)."""
    return variable.get_metadata()["logical_axes"]


def state_shardings(
    state: nnx.State, mesh: Mesh, rules: sharding_lib.AxisRules | None = None
) -> nnx.State:
    """A state-shaped tree of ``NamedSharding`` from each parameter's logical axes."""
    return jax.tree.map(
        lambda v: v.replace(sharding_lib.named_sharding(logical_axes(v), v.shape, mesh, rules)),
        state,
        is_leaf=_is_variable,
    )


def create_model(config: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised decoder on the default device."""
    return Decoder(config, nnx.Rngs(params=seed))


def abstract_model(config: ModelConfig) -> Decoder:
    """A decoder whose parameters are ``ShapeDtypeStruct``s: no memory is allocated."""
    return nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0)))


def create_sharded_model(
    config: ModelConfig, mesh: Mesh, seed: int = 0, rules: sharding_lib.AxisRules | None = None
) -> Decoder:
    """Random init compiled with the parameters' shardings as outputs: each device only
    materialises its own shards."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init() -> nnx.State:
        return nnx.split(Decoder(config, nnx.Rngs(params=seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def flat_params(model_or_state: Decoder | nnx.State) -> dict[str, nnx.Variable]:
    """Parameters keyed by dotted path (``layers.attention.q_kernel``)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def sharding_report(model: Decoder, mesh: Mesh, rules: sharding_lib.AxisRules | None = None):
    """``glmjax.sharding.ShardingReport`` of the model's parameters on ``mesh``."""
    params = flat_params(model)
    arrays: Mapping[str, Any] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    shardings: Mapping[str, NamedSharding] = {
        k: sharding_lib.named_sharding(logical_axes(v), v.shape, mesh, rules) for k, v in params.items()
    }
    return sharding_lib.sharding_report(arrays, shardings)
