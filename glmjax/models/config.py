"""Model configuration for the decoder family (GLM-4, GLM-4-0414, Qwen2.5) and presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import gin

from glmjax.models.rotary import RopeScaling

Architecture = Literal["glm", "glm4", "qwen2"]
AttentionBackend = Literal["xla", "blockwise", "fused", "splash", "sample"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "save_attention_out"]

# HF architecture class name <-> our architecture switch.
HF_ARCHITECTURES: dict[str, Architecture] = {
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    "Qwen2ForCausalLM": "qwen2",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one decoder.

    Attributes:
      architecture: "glm" (GLM-4-9B), "glm4" (GLM-4-0414: extra post-attention and
        post-MLP norms) or "qwen2" (Qwen2.5: full rotary, half-split layout).
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
        num_kv_heads, head_dim: shapes. ``num_heads`` must be a multiple of ``num_kv_heads``.
      rope_theta: rotary base.
      rope_scaling: None (plain RoPE) or a ``RopeScaling`` (linear, dynamic NTK, yarn); a
        mapping of its fields (as ``dataclasses.asdict`` writes it) is converted. Its
        ``original_max_position_embeddings``, when None for dynamic or yarn, is set to
        ``max_position_embeddings`` here, so the scaling alone fixes the function and
        ``max_position_embeddings`` stays metadata.
      partial_rotary_factor: fraction of each head's dims that rotate (0.5 for GLM).
      rms_norm_eps: RMSNorm epsilon.
      qkv_bias: bias on the q/k/v projections (never on the output projection).
      tie_word_embeddings: LM head shares the embedding matrix.
      max_position_embeddings: longest position the checkpoint was trained for (metadata).
      param_dtype: storage dtype of parameters ("float32" or "bfloat16").
      compute_dtype: dtype of matmuls and activations; norms, softmax and rotary run in fp32.
      remat_policy: what the scanned layer body saves for the backward pass.
      attention_backend: "xla" (dense einsum reference), "blockwise" (causal attention that
        skips the masked key blocks: the fast path on CPU), "fused"
        (``jax.nn.dot_product_attention``: cuDNN on GPU), "splash" (TPU splash attention),
        "sample" (SampleAttention for prefill; dense elsewhere).
      sample_attention_alpha: cumulative-attention threshold for the "sample" backend.
      pad_token_id, eos_token_ids, bos_token_id: special tokens carried over from HF configs.
    """

    architecture: Architecture = "glm"
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1.5625e-07
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: RematPolicy = "none"
    attention_backend: AttentionBackend = "xla"
    sample_attention_alpha: float = 0.95
    pad_token_id: int | None = 151329
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338)
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ("glm", "glm4", "qwen2"):
            raise ValueError(f"architecture {self.architecture!r} is not one of glm, glm4, qwen2")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"rotary dim {self.rotary_dim} (head_dim {self.head_dim} x partial_rotary_factor "
                f"{self.partial_rotary_factor}) must be even and at most head_dim"
            )
        self._resolve_rope_scaling()
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{field}={getattr(self, field)!r}: use float32, bfloat16 or float16")

    def _resolve_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if isinstance(scaling, Mapping):
            known = {f.name for f in dataclasses.fields(RopeScaling)}
            unknown = sorted(set(scaling) - known)
            if unknown:
                raise ValueError(f"rope_scaling: unknown field(s) {unknown}; known: {', '.join(sorted(known))}")
            scaling = RopeScaling(**scaling)
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise ValueError(f"rope_scaling={scaling!r}: use a RopeScaling, a mapping of its fields or None")
        if scaling is not None and scaling.type != "linear" and scaling.original_max_position_embeddings is None:
            scaling = dataclasses.replace(
                scaling, original_max_position_embeddings=self.max_position_embeddings)
        if scaling is not None and scaling.type == "dynamic" and self.rotary_dim <= 2:
            raise ValueError(f"dynamic rope scaling needs more than 2 rotary dims, got {self.rotary_dim}")
        object.__setattr__(self, "rope_scaling", scaling)

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_interleaved(self) -> bool:
        """GLM rotates adjacent pairs (x0,x1),(x2,x3)...; Qwen rotates (x_i, x_{i+d/2})."""
        return self.architecture in ("glm", "glm4")

    @property
    def post_norms(self) -> bool:
        """GLM-4-0414 normalises the attention and MLP outputs before the residual add."""
        return self.architecture == "glm4"

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _glm(**kw) -> ModelConfig:
    return ModelConfig(architecture="glm", **kw)


def _qwen(**kw) -> ModelConfig:
    base = dict(
        architecture="qwen2",
        partial_rotary_factor=1.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        rope_theta=1_000_000.0,
        pad_token_id=151643,
        eos_token_ids=(151645, 151643),
        max_position_embeddings=32768,
        head_dim=128,
        vocab_size=152064,
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    # GLM-4-9B base and chat (8K / 128K), and the 1M-context chat variant.
    "glm4-9b": _glm(),
    "glm4-9b-chat": _glm(rope_theta=5_000_000.0, max_position_embeddings=131072),
    "glm4-9b-chat-1m": _glm(rope_theta=100_000_000.0, max_position_embeddings=1048576),
    # GLM-4-9B-0414: extra post-norms, 32K context.
    "glm4-9b-0414": ModelConfig(
        architecture="glm4", rms_norm_eps=1e-5, max_position_embeddings=32768
    ),
    # Pre-training distillation students (GLM-4 architecture, GLM-4 vocabulary).
    "glm4-student-1.9b": _glm(hidden_size=2048, intermediate_size=6912, num_layers=24, num_heads=16, num_kv_heads=2),
    "glm4-student-3.8b": _glm(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8),
    "glm4-student-6.8b": _glm(hidden_size=4096, intermediate_size=12800, num_layers=28, num_heads=32, num_kv_heads=8),
    # Qwen2.5 bases used by the RL work.
    "qwen2.5-0.5b": _qwen(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                          num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b": _qwen(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                          num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": _qwen(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4),
    "qwen2.5-14b": _qwen(hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40, num_kv_heads=8),
    "qwen2.5-32b": _qwen(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40, num_kv_heads=8),
    # Tiny models for tests and the quickstart.
    "glm4-tiny": _glm(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, pad_token_id=0, eos_token_ids=(1,)),
    "glm4-0414-tiny": ModelConfig(architecture="glm4", vocab_size=512, hidden_size=128, intermediate_size=352,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, pad_token_id=0,
                                  eos_token_ids=(1,)),
    "qwen2.5-tiny": _qwen(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, pad_token_id=0, eos_token_ids=(1,)),
}


@gin.configurable
def preset(name: str = gin.REQUIRED, **overrides) -> ModelConfig:
    """A named preset with optional field overrides (``preset.name = "glm4-9b"`` in gin)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
