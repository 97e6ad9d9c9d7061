"""Where each glmjax parameter lives in an HF checkpoint, and how it is reshaped.

Each ``TensorMapping`` converts between one glmjax parameter (for stacked layer parameters:
one layer's slice) and one or more HF tensors (``{i}`` in a name is the layer index).
HF linear weights are [out, in]; glmjax kernels are [in, ...out].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from glmjax.models.config import ModelConfig

Arrays = Sequence[np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One glmjax parameter <-> its HF tensors.

    Attributes:
      param: dotted glmjax parameter path (``layers.attention.q_kernel``).
      hf_names: HF tensor names; ``{i}`` is replaced by the layer index when ``stacked``.
      hf_shapes: expected shape of each HF tensor.
      to_ours: HF tensors -> glmjax array (one layer's slice when ``stacked``).
      to_hf: glmjax array (one layer) -> HF tensors, in ``hf_names`` order.
      stacked: the glmjax parameter has a leading layers axis.
    """

    param: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable[[Arrays], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]
    stacked: bool

    def names_for_layer(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf_names) if self.stacked else self.hf_names


def _linear(param: str, hf_name: str, out_shape: tuple[int, ...], in_dim: int) -> TensorMapping:
    """HF [out, in] weight of a layer <-> glmjax [in, *out_shape]."""
    out_size = int(np.prod(out_shape))
    return TensorMapping(
        param=param,
        hf_names=(hf_name,),
        hf_shapes=((out_size, in_dim),),
        to_ours=lambda a: a[0].T.reshape(in_dim, *out_shape),
        to_hf=lambda x: [x.reshape(in_dim, out_size).T],
        stacked=True,
    )


def _bias(param: str, hf_name: str, shape: tuple[int, ...]) -> TensorMapping:
    size = int(np.prod(shape))
    return TensorMapping(param, (hf_name,), ((size,),), lambda a: a[0].reshape(shape),
                         lambda x: [x.reshape(size)], True)


def _vector(param: str, hf_name: str, size: int, stacked: bool) -> TensorMapping:
    return TensorMapping(param, (hf_name,), ((size,),), lambda a: a[0], lambda x: [x], stacked)


def tensor_layout(config: ModelConfig) -> list[TensorMapping]:
    """All mappings for ``config``'s architecture."""
    e, m = config.hidden_size, config.intermediate_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    layer = "model.layers.{i}."
    mappings = [
        TensorMapping("embedding", ("model.embed_tokens.weight",), ((config.vocab_size, e),),
                      lambda a: a[0], lambda x: [x], False),
        _vector("final_norm.scale", "model.norm.weight", e, False),
        _linear("layers.attention.q_kernel", layer + "self_attn.q_proj.weight", (n, h), e),
        _linear("layers.attention.k_kernel", layer + "self_attn.k_proj.weight", (k, h), e),
        _linear("layers.attention.v_kernel", layer + "self_attn.v_proj.weight", (k, h), e),
        TensorMapping(
            "layers.attention.o_kernel", (layer + "self_attn.o_proj.weight",), ((e, n * h),),
            lambda a: a[0].T.reshape(n, h, e), lambda x: [x.reshape(n * h, e).T], True,
        ),
        TensorMapping(
            "layers.mlp.down_kernel", (layer + "mlp.down_proj.weight",), ((e, m),),
            lambda a: a[0].T, lambda x: [x.T], True,
        ),
        _vector("layers.input_norm.scale", layer + "input_layernorm.weight", e, True),
        _vector("layers.post_attention_norm.scale", layer + "post_attention_layernorm.weight", e, True),
    ]
    if config.qkv_bias:
        mappings += [
            _bias("layers.attention.q_bias", layer + "self_attn.q_proj.bias", (n, h)),
            _bias("layers.attention.k_bias", layer + "self_attn.k_proj.bias", (k, h)),
            _bias("layers.attention.v_bias", layer + "self_attn.v_proj.bias", (k, h)),
        ]
    if config.architecture == "qwen2":
        mappings.append(TensorMapping(
            "layers.mlp.gate_up_kernel",
            (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"), ((m, e), (m, e)),
            lambda a: np.stack([a[0].T, a[1].T], axis=1),
            lambda x: [x[:, 0].T, x[:, 1].T], True,
        ))
    else:
        mappings.append(TensorMapping(
            "layers.mlp.gate_up_kernel", (layer + "mlp.gate_up_proj.weight",), ((2 * m, e),),
            lambda a: a[0].T.reshape(e, 2, m), lambda x: [x.reshape(e, 2 * m).T], True,
        ))
    if config.post_norms:
        mappings += [
            _vector("layers.post_self_attention_norm.scale", layer + "post_self_attn_layernorm.weight", e, True),
            _vector("layers.post_mlp_norm.scale", layer + "post_mlp_layernorm.weight", e, True),
        ]
    if not config.tie_word_embeddings:
        mappings.append(TensorMapping(
            "lm_head", ("lm_head.weight",), ((config.vocab_size, e),), lambda a: a[0].T, lambda x: [x.T], False,
        ))
    return mappings
