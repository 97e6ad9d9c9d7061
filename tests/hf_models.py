"""Tiny random transformers models for parity tests (built locally, never downloaded)."""

from __future__ import annotations

import torch
import transformers

ARCHITECTURES = ("glm", "glm4", "qwen2")


def make_hf_model(
    architecture: str,
    *,
    vocab_size: int = 251,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 2,
    intermediate_size: int = 96,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> transformers.PreTrainedModel:
    """A randomly initialised fp32 model of the given architecture, in eval mode.

    Biases and norm scales are randomised too so that every tensor matters in parity checks.
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        initializer_range=0.1,
    )
    if architecture == "glm":
        config = transformers.GlmConfig(**common, rms_norm_eps=1e-5)
        model_cls = transformers.GlmForCausalLM
    elif architecture == "glm4":
        config = transformers.Glm4Config(**common, rms_norm_eps=1e-5)
        model_cls = transformers.Glm4ForCausalLM
    elif architecture == "qwen2":
        config = transformers.Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1000.0)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(architecture)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return model
