"""Parameter and FLOP counting for MFU.

Conventions (as in MaxText / PaLM): a matmul of [m, k] x [k, n] costs 2mkn FLOPs; training
costs 3x the forward (forward + two backward matmuls). Causal attention counts half of the
full score and value matmuls. Rematerialisation is not counted (MFU, not HFU).
"""

from __future__ import annotations

import dataclasses

from glmjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts by role.

    Attributes:
      embedding: the input embedding table.
      lm_head: the output projection (0 when tied to the embedding).
      layers: all decoder layers (projections, biases, norms).
      final_norm: the last RMSNorm.
    """

    embedding: int
    lm_head: int
    layers: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.layers + self.final_norm


def layer_matmul_params(config: ModelConfig) -> int:
    """Weights of one layer that take part in matmuls (no biases or norms)."""
    e, m, h = config.hidden_size, config.intermediate_size, config.head_dim
    attention = e * h * (2 * config.num_heads + 2 * config.num_kv_heads)
    return attention + 3 * e * m


def count_params(config: ModelConfig) -> ParamCount:
    """Exact parameter counts of the decoder described by ``config``."""
    e, h = config.hidden_size, config.head_dim
    bias = h * (config.num_heads + 2 * config.num_kv_heads) if config.qkv_bias else 0
    norms = e * (4 if config.post_norms else 2)
    embedding = config.vocab_size * e
    return ParamCount(
        embedding=embedding,
        lm_head=0 if config.tie_word_embeddings else embedding,
        layers=config.num_layers * (layer_matmul_params(config) + bias + norms),
        final_norm=e,
    )


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls per token: all layers' projections plus the LM head."""
    return config.num_layers * layer_matmul_params(config) + config.vocab_size * config.hidden_size


def attention_flops_per_token(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of attention scores and weighted values for one token, all layers."""
    full = 4.0 * seq_len * config.num_heads * config.head_dim * config.num_layers
    return full / 2 if causal else full


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token: 6 x matmul params + 3 x causal attention forward."""
    return 6.0 * matmul_params(config) + 3.0 * attention_flops_per_token(config, seq_len)
