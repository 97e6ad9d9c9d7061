"""The passive party: its view, its own modules, its own checkpoint; no labels.

APFed-R: a decoder D_p reconstructs x_p from the received z, L_p = MSE(D_p(z), x_p).
APFed-C: an encoder f_p and projection g_p, L_p = NT-Xent(received g_A(z), g_p(f_p(x_p))).
Each Step updates the passive modules on L_p and returns dL_p/d(received) for that batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from glmjax.federated import losses
from glmjax.federated.channel import (HandshakeReply, HandshakeRequest, PartyConfigError, PassiveService,
                                      StepNumber, StepReply, StepRequest)
from glmjax.federated.checkpoints import load_party_checkpoint, save_party_checkpoint
from glmjax.federated.data import PartyData, align_ids
from glmjax.federated.modules import ContrastiveModel, ReconstructionModel
from glmjax.federated.optim import PartyOptimizer

VARIANTS = ("R", "C")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PassiveConfig:
    """A passive party's settings (its own gin file; the active party never sees them).

    Attributes:
      name: the party's name in logs and checkpoints.
      variant: "R" (reconstruction decoder) or "C" (contrastive encoder + projection).
      hidden: hidden widths of the decoder (R) or of the encoder (C).
      rep_dim: the encoder's output width (C only).
      temperature: NT-Xent temperature (C only; the paper's code uses 1.0).
      seed: initialisation seed of the passive modules.
      checkpoint_dir: where ``{name}.npz`` is kept (None: no checkpoints).
    """

    name: str = "passive"
    variant: str = "R"
    hidden: Sequence[int] = (64,)
    rep_dim: int = 64
    temperature: float = 1.0
    seed: int = 0
    checkpoint_dir: str | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise PartyConfigError(f"PassiveConfig.variant={self.variant!r}: expected one of {VARIANTS}")


@functools.lru_cache(maxsize=64)
def _passive_step(graphdef: nnx.GraphDef, variant: str, temperature: float, optimizer: PartyOptimizer):
    """The jitted passive step (params, opt_state, sent (B, d), x (B, D_p)) ->
    (params, opt_state, dL_p/d sent (B, d), L_p), cached per module structure and settings."""
    tx = optimizer.build()

    def party_loss(params, sent, x):
        model = nnx.merge(graphdef, params)
        if variant == "R":
            return losses.reconstruction_mse(model(sent), x)
        return losses.nt_xent(sent, model(x), temperature)

    @jax.jit
    def step(params, opt_state, sent, x):
        loss, (g_params, g_sent) = jax.value_and_grad(party_loss, argnums=(0, 1))(params, sent, x)
        updates, opt_state = tx.update(g_params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, g_sent, loss

    return step


class PassiveParty(PassiveService):
    """Serves Handshake/Step/Checkpoint/Finish for one passive view.

    ``finished`` becomes True after Finish (the process hosting it may then exit).
    """

    def __init__(self, data: PartyData, config: PassiveConfig):
        if data.labels is not None:
            raise PartyConfigError(f"passive party {config.name!r}: its data must not carry labels")
        self.config = config
        self.data = data
        self.finished = False
        self._x: jax.Array | None = None

    @property
    def checkpoint_path(self) -> str | None:
        if self.config.checkpoint_dir is None:
            return None
        return os.path.join(self.config.checkpoint_dir, f"{self.config.name}.npz")

    # ------------------------------------------------------------------ calls
    def handshake(self, request: HandshakeRequest) -> HandshakeReply:
        cfg = self.config
        if request.variant != cfg.variant:
            raise PartyConfigError(f"the active party runs APFed-{request.variant}, passive party "
                                   f"{cfg.name!r} is configured for APFed-{cfg.variant}")
        order = align_ids(request.ids, self.data.ids, f"passive party {cfg.name!r}")
        self._x = jnp.asarray(self.data.x[order])
        self._build(request.sent_dim)
        restored = self._restore(request.resume_step)
        logging.info("passive %s: aligned %d samples, APFed-%s, sent_dim=%d, restored step %d",
                     cfg.name, len(order), cfg.variant, request.sent_dim, restored)
        return HandshakeReply(party=cfg.name, restored_step=restored)

    def step(self, request: StepRequest) -> StepReply:
        if self._x is None:
            raise PartyConfigError(f"passive party {self.config.name!r}: Step before Handshake")
        if request.sent.shape != (len(request.index), self._sent_dim):
            raise PartyConfigError(f"passive party {self.config.name!r}: sent {request.sent.shape}, "
                                   f"expected ({len(request.index)}, {self._sent_dim})")
        x = self._x[jnp.asarray(request.index)]
        self._params, self._opt_state, grad, loss = self._step(self._params, self._opt_state,
                                                               jnp.asarray(request.sent), x)
        return StepReply(grad=np.asarray(grad, np.float32), loss=float(loss))

    def checkpoint(self, request: StepNumber) -> StepNumber:
        self._save(request.step)
        return StepNumber(request.step)

    def finish(self, request: StepNumber) -> StepNumber:
        self._save(request.step)
        self.finished = True
        return StepNumber(request.step)

    # ------------------------------------------------------------------ internals
    def _build(self, sent_dim: int) -> None:
        cfg = self.config
        rngs = nnx.Rngs(cfg.seed)
        view_dim = self.data.x.shape[1]
        if cfg.variant == "R":
            model = ReconstructionModel(sent_dim, view_dim, hidden=tuple(cfg.hidden), rngs=rngs)
        else:
            model = ContrastiveModel(view_dim, sent_dim, encoder_hidden=tuple(cfg.hidden), rep_dim=cfg.rep_dim,
                                     rngs=rngs)
        graphdef, params = nnx.split(model, nnx.Param)
        optimizer = PartyOptimizer()
        self._sent_dim = sent_dim
        self._params, self._opt_state = params, optimizer.build().init(params)
        self._step = _passive_step(graphdef, cfg.variant, float(cfg.temperature), optimizer)

    def _state(self):
        return {"params": self._params, "opt_state": self._opt_state}

    def _meta(self, step: int) -> dict:
        return {"party": self.config.name, "variant": self.config.variant, "step": step,
                "sent_dim": self._sent_dim}

    def _save(self, step: int) -> None:
        if self.checkpoint_path is None or self._x is None:
            return
        save_party_checkpoint(self.checkpoint_path, self._state(), self._meta(step))
        logging.info("passive %s: checkpoint at step %d", self.config.name, step)

    def _restore(self, resume_step: int) -> int:
        """Loads this party's own checkpoint when the active party resumes; returns its step.

        The passive checkpoint may be older than the active one (the passive party was lost
        before the active party's last save): its modules only assist, so training goes on
        from them. A passive checkpoint newer than the active one is refused.
        """
        path = self.checkpoint_path
        if resume_step == 0 or path is None or not os.path.exists(path):
            if resume_step:
                logging.warning("passive %s: no checkpoint, fresh modules at active step %d",
                                self.config.name, resume_step)
            return 0
        state, meta = load_party_checkpoint(path, self._state())
        if meta["step"] > resume_step or meta["variant"] != self.config.variant:
            raise PartyConfigError(f"{path}: APFed-{meta['variant']} checkpoint at step {meta['step']} does not "
                                   f"fit APFed-{self.config.variant} resuming at active step {resume_step}")
        state = jax.tree.map(jnp.asarray, state)
        self._params, self._opt_state = state["params"], state["opt_state"]
        return int(meta["step"])
