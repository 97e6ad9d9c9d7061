"""Language-modelling objective (pre-training and SFT): next-token cross-entropy over a mask."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from glmjax.models.decoder import Decoder
from glmjax.objectives.base import Batch, LossOutput
from glmjax.objectives.losses import chunked_cross_entropy


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LMObjective:
    """Cross-entropy of ``targets`` given ``inputs`` where ``loss_mask`` is 1.

    Batch keys (all [batch, seq]): ``inputs`` (int32 token ids), ``targets`` (int32, the next
    token), ``loss_mask`` (0/1), and optionally ``positions`` and ``segment_ids`` for packed rows.

    Attributes:
      averaging: "token" weighs every loss token in the global batch equally; "sequence"
        averages within each row first, then over rows (rows without loss tokens are skipped).
      chunk_size: sequence chunk of the cross-entropy (bounds fp32 logits memory).
      z_loss: coefficient of the log(Z)^2 regulariser.
    """

    averaging: Literal["token", "sequence"] = "token"
    chunk_size: int = 512
    z_loss: float = 0.0

    def extra_state(self, mesh: Mesh, params: Any) -> None:
        return None

    def update_extra(self, extra: Any, params: Any, step: jax.Array) -> None:
        return extra

    def loss(self, model: Decoder, batch: Batch, rng: jax.Array, extra: Any) -> LossOutput:
        del rng, extra
        hidden = model.hidden_states(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        token_loss, correct = chunked_cross_entropy(
            hidden, model.head_kernel(), batch["targets"], chunk_size=self.chunk_size, z_loss=self.z_loss
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        tokens = mask.sum()
        if self.averaging == "token":
            total, weight = (token_loss * mask).sum(), tokens
            accuracy = (correct * mask).sum()
        elif self.averaging == "sequence":
            per_row = jnp.maximum(mask.sum(axis=1), 1.0)
            has_tokens = (mask.sum(axis=1) > 0).astype(jnp.float32)
            total = ((token_loss * mask).sum(axis=1) / per_row).sum()
            weight = has_tokens.sum()
            accuracy = ((correct * mask).sum(axis=1) / per_row).sum()
        else:
            raise ValueError(f"averaging={self.averaging!r}: use 'token' or 'sequence'")
        return LossOutput(total=total, weight=weight, metrics={"accuracy": accuracy})
