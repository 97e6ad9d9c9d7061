"""The active party's modules and steps: encoder f_A, task head h, projection g_A (APFed-C).

Per batch: ``sent`` computes what goes to the passive parties (z = f_A(x_A), or g_A(z));
``update`` applies grad L_task + vjp(sent)(sum_p lambda_p dL_p/d sent), the passive gradients
pulled back through g_A and f_A with ``jax.vjp``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glmjax.federated import losses
from glmjax.federated.modules import ActiveModel
from glmjax.federated.optim import PartyOptimizer


@functools.lru_cache(maxsize=64)
def _active_steps(graphdef: nnx.GraphDef, variant: str, optimizer: PartyOptimizer):
    """Jitted (send, update_helped, update_alone, predict) of one module structure and optimiser
    setting, shared by every ActiveParty with them (a sweep compiles each once)."""
    tx = optimizer.build()

    def send_fn(params, x):
        m = nnx.merge(graphdef, params)
        z = m.encode(x)
        return m.project(z) if variant == "C" else z

    def task_fn(params, x, y):
        m = nnx.merge(graphdef, params)
        return losses.cross_entropy(m.logits(m.encode(x)), y)

    def apply(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def update_helped(params, opt_state, x, y, g_sent):
        task_loss, g_task = jax.value_and_grad(task_fn)(params, x, y)
        _, pull_back = jax.vjp(lambda p: send_fn(p, x), params)
        (g_help,) = pull_back(g_sent)
        grads = jax.tree.map(jnp.add, g_task, g_help)
        return (*apply(params, opt_state, grads), task_loss)

    @jax.jit
    def update_alone(params, opt_state, x, y):
        task_loss, g_task = jax.value_and_grad(task_fn)(params, x, y)
        return (*apply(params, opt_state, g_task), task_loss)

    predict = jax.jit(lambda params, x: nnx.merge(graphdef, params).predict(x))
    return jax.jit(send_fn), update_helped, update_alone, predict


class ActiveParty:
    """Holds f_A, h, g_A and their optimiser state; every step is one jitted call.

    Args:
      in_dim: D_A, the width of the active view.
      num_classes: C.
      variant: "R" (sends z, (B, rep_dim)) or "C" (sends g_A(z), (B, proj_dim)).
    """

    def __init__(self, in_dim: int, num_classes: int, *, variant: str, encoder_hidden: Sequence[int],
                 rep_dim: int, head_hidden: Sequence[int], proj_dim: int, seed: int):
        self.variant = variant
        model = ActiveModel(in_dim, num_classes, encoder_hidden=tuple(encoder_hidden), rep_dim=rep_dim,
                            head_hidden=tuple(head_hidden), proj_dim=proj_dim if variant == "C" else None,
                            rngs=nnx.Rngs(seed))
        self.sent_dim = proj_dim if variant == "C" else rep_dim
        self._graphdef, self.params = nnx.split(model, nnx.Param)
        optimizer = PartyOptimizer()
        self.opt_state = optimizer.build().init(self.params)
        self._send, self._update_helped, self._update_alone, self._predict = _active_steps(
            self._graphdef, variant, optimizer)

    def sent(self, x: np.ndarray) -> np.ndarray:
        """(B, D_A) -> (B, sent_dim) float32: what the passive parties receive."""
        return np.asarray(self._send(self.params, jnp.asarray(x)), np.float32)

    def update(self, x: np.ndarray, y: np.ndarray, g_sent: np.ndarray | None) -> float:
        """One optimiser step on L_task + sum_p lambda_p L_p; ``g_sent`` (B, sent_dim) is
        sum_p lambda_p dL_p/d sent, or None when no passive party helped this step.
        Returns the batch's task loss (nats)."""
        if g_sent is None:
            self.params, self.opt_state, loss = self._update_alone(self.params, self.opt_state, x, y)
        else:
            self.params, self.opt_state, loss = self._update_helped(self.params, self.opt_state, x, y,
                                                                    jnp.asarray(g_sent))
        return float(loss)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """argmax h(f_A(x)): (N, D_A) -> (N,) int32; the active party alone."""
        return np.asarray(self._predict(self.params, jnp.asarray(x)))

    def model(self) -> ActiveModel:
        """The trained modules as an ``ActiveModel``."""
        return nnx.merge(self._graphdef, self.params)

    def state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def load_state(self, state: dict) -> None:
        state = jax.tree.map(jnp.asarray, state)
        self.params, self.opt_state = state["params"], state["opt_state"]
