"""Language-modelling objective (pre-training and SFT): next-token cross-entropy over a mask."""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin
import jax
import jax.numpy as jnp

from glmjax.data.spec import BatchSpec, lm_batch_spec
from glmjax.models.decoder import Decoder
from glmjax.objectives.base import Batch, LossOutput, Mean, StepInputs
from glmjax.objectives.losses import chunked_cross_entropy


def segment_token_weights(mask: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per-token weights that average within each document first.

    Args:
      mask: [batch, seq] 0/1 loss mask.
      segment_ids: int [batch, seq] packed-document ids (0 = padding), or None (one document per row).

    Returns:
      (weights fp32 [batch, seq]: mask / loss tokens of the token's document, documents: fp32
      scalar, the number of documents with at least one loss token).
    """
    mask = mask.astype(jnp.float32)
    batch, seq = mask.shape
    segments = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    # One id per (row, segment): segment ids are < seq + 1 within a row.
    flat = (jnp.arange(batch, dtype=jnp.int32)[:, None] * (seq + 1) + segments).reshape(-1)
    counts = jax.ops.segment_sum(mask.reshape(-1), flat, num_segments=batch * (seq + 1))
    per_token = counts[flat].reshape(batch, seq)
    weights = jnp.where(per_token > 0, mask / jnp.maximum(per_token, 1.0), 0.0)
    return weights, (counts > 0).sum().astype(jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LMObjective:
    """Cross-entropy of ``targets`` given ``inputs`` where ``loss_mask`` is 1.

    Batch keys (all int32 [batch, seq]): ``inputs``, ``targets`` (the next token), ``loss_mask``
    (0/1), ``positions`` and ``segment_ids`` (packed documents, 0 = padding).

    Attributes:
      averaging: "token" weighs every loss token of the global batch equally; "sequence" averages
        within each document (packed segment) first, then over documents (documents without loss
        tokens are skipped). A document cut into windows counts once per window.
      chunk_size: sequence chunk of the cross-entropy (bounds fp32 logits memory).
      z_loss: coefficient of the log(Z)^2 regulariser.

    Metrics: ``accuracy`` (argmax == target) and ``token_loss`` (mean cross-entropy), both per
    loss token.
    """

    averaging: Literal["token", "sequence"] = "token"
    chunk_size: int = 512
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.averaging not in ("token", "sequence"):
            raise ValueError(f"LMObjective.averaging={self.averaging!r}: use 'token' or 'sequence'")

    def batch_spec(self) -> BatchSpec:
        return lm_batch_spec()

    def loss(self, model: Decoder, batch: Batch, inputs: StepInputs) -> LossOutput:
        del inputs
        segment_ids = batch.get("segment_ids")
        hidden = model.hidden_states(batch["inputs"], batch.get("positions"), segment_ids)
        token_loss, correct = chunked_cross_entropy(
            hidden, model.head_kernel(), batch["targets"], chunk_size=self.chunk_size, z_loss=self.z_loss
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        if self.averaging == "token":
            total, weight = (token_loss * mask).sum(), mask.sum()
        else:
            weights, weight = segment_token_weights(mask, segment_ids)
            total = (token_loss * weights).sum()
        return LossOutput(total=total, weight=weight, metrics={
            "accuracy": Mean.of(correct, mask),
            "token_loss": Mean.of(token_loss, mask),
        })
