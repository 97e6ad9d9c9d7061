"""The decoder family: GLM-4, GLM-4-0414 and Qwen2.5 switched by ``ModelConfig``.

Parameters carry ``logical_axes`` metadata (see ``glmjax.sharding``). The layers are
stacked along a leading ``layers`` axis and run with ``jax.lax.scan`` (one compiled layer
body; unrolled for stacks of at most 8 layers), optionally rematerialised. ``unstack_layers``
gives the inference layout: one module per layer, each with whole weight buffers and its own
KV cache, so a decode step reads its weights in place instead of slicing them out of the
stack (which XLA:CPU copies on every step).

Parameter layout (shapes for one layer; the stack adds a leading ``num_layers`` axis):
  attention.q_kernel [embed, heads, head_dim],   q_bias [heads, head_dim]
  attention.k_kernel [embed, kv_heads, head_dim], k_bias [kv_heads, head_dim]
  attention.v_kernel [embed, kv_heads, head_dim], v_bias [kv_heads, head_dim]
  attention.o_kernel [heads, head_dim, embed]
  mlp.gate_up_kernel [embed, 2, mlp]  (index 0 = gate, 1 = up)
  mlp.down_kernel    [mlp, embed]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glmjax.models import attention as attention_lib
from glmjax.models.config import ModelConfig
from glmjax.models.rotary import apply_rotary, rotary_angles
from glmjax.sharding import LogicalAxes, constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}

# Stacks up to this depth are unrolled: a rolled scan zero-fills its stacked residual and
# gradient buffers and writes them slice by slice every step (about 3% of a CPU train step
# of a 4-layer model); deeper stacks stay rolled to bound compile time.
_MAX_UNROLLED_LAYERS = 8


def _param(
    rngs: nnx.Rngs, init: str, shape: tuple[int, ...], axes: LogicalAxes, config: ModelConfig
) -> nnx.Param:
    dtype = jnp.dtype(config.param_dtype)
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(init)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, computed in fp32."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.scale = _param(rngs, "ones", (config.hidden_size,), ("norm",), config)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed.astype(x.dtype) * self.scale[...].astype(x.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated key/value cache for all layers.

    Attributes:
      k, v: [num_layers, batch, kv_heads, max_len, head_dim] for a stacked decoder, or one
        [batch, kv_heads, max_len, head_dim] array per layer (a tuple) for an unstacked one.
        Heads-major, so that attention reads each head's keys and values without a transpose.
      segment_ids: int32 [batch, max_len]; 0 = empty slot, else the segment of the token stored.
      lengths: int32 [batch]; tokens stored per row (the next write index).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    segment_ids: jax.Array
    lengths: jax.Array

    @classmethod
    def create(
        cls, config: ModelConfig, batch: int, max_len: int, dtype: Any | None = None,
        stacked: bool = True,
    ) -> "KVCache":
        """An empty cache; ``stacked`` must match the decoder's layout (``Decoder.stacked``)."""
        dtype = jnp.dtype(config.compute_dtype if dtype is None else dtype)
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        if stacked:
            k = jnp.zeros((config.num_layers, *shape), dtype)
            v = jnp.zeros((config.num_layers, *shape), dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(k=k, v=v, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class _AttentionInputs:
    cos: jax.Array
    sin: jax.Array
    segment_ids: jax.Array | None
    cache_segment_ids: jax.Array | None
    cache_lengths: jax.Array | None
    prefill: bool = False
    """The cache is empty: attention runs among the new tokens with the configured backend."""


def _write_rows(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Scatters new [batch, t, ...] into cache [batch, max_len, ...] at per-row offsets.

    Positions past ``max_len`` are dropped (never wrapped or clamped onto other tokens).
    """
    batch, t = new.shape[:2]
    rows = jnp.arange(batch)[:, None]
    columns = starts[:, None] + jnp.arange(t)[None]
    return cache.at[rows, columns].set(new.astype(cache.dtype), mode="drop")


def _write_kv(cache: jax.Array, new: jax.Array, starts: jax.Array, layer: jax.Array | None) -> jax.Array:
    """Scatters new keys or values [batch, t, kv_heads, head_dim] into a heads-major cache
    [batch, kv_heads, max_len, head_dim] (``layer`` None) or into slot ``layer`` of a stacked one
    [layers, batch, kv_heads, max_len, head_dim], at per-row offsets ``starts`` [batch].

    Only the new entries are written (the cache is a loop carry, updated in place); positions
    past ``max_len`` are dropped.
    """
    batch, t = new.shape[:2]
    rows = jnp.arange(batch)[:, None]
    columns = starts[:, None] + jnp.arange(t)[None]
    index = (rows, slice(None), columns) if layer is None else (layer, rows, slice(None), columns)
    return cache.at[index].set(new.astype(cache.dtype), mode="drop")


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions and q/k/v bias."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        e, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_kernel = _param(rngs, "normal", (e, n, h), ("embed", "heads", "head_dim"), config)
        self.k_kernel = _param(rngs, "normal", (e, k, h), ("embed", "kv_heads", "head_dim"), config)
        self.v_kernel = _param(rngs, "normal", (e, k, h), ("embed", "kv_heads", "head_dim"), config)
        self.o_kernel = _param(rngs, "normal", (n, h, e), ("heads", "head_dim", "embed"), config)
        if config.qkv_bias:
            self.q_bias = _param(rngs, "zeros", (n, h), ("heads", "head_dim"), config)
            self.k_bias = _param(rngs, "zeros", (k, h), ("kv_heads", "head_dim"), config)
            self.v_bias = _param(rngs, "zeros", (k, h), ("kv_heads", "head_dim"), config)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        dtype = x.dtype
        out = jnp.einsum("bte,enh->btnh", x, getattr(self, f"{name}_kernel")[...].astype(dtype))
        if self.config.qkv_bias:
            out = out + getattr(self, f"{name}_bias")[...].astype(dtype)
        axes = "act_heads" if name == "q" else "act_kv_heads"
        return constrain(out, ("act_batch", "act_seq", axes, "act_head_dim"))

    def __call__(
        self,
        x: jax.Array,
        inputs: _AttentionInputs,
        cache_kv: tuple[jax.Array, jax.Array] | None,
        layer_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [batch, seq, embed] -> ([batch, seq, embed], updated (k, v) cache or None).

        ``cache_kv`` is either this layer's cache ([batch, kv_heads, max_len, head_dim] each;
        ``layer_index`` None) or the whole stacked cache ([layers, batch, kv_heads, max_len,
        head_dim] each), of which this layer reads and writes slot ``layer_index``.
        """
        config = self.config
        q = apply_rotary(self._project(x, "q"), inputs.cos, inputs.sin, interleaved=config.rope_interleaved)
        k = apply_rotary(self._project(x, "k"), inputs.cos, inputs.sin, interleaved=config.rope_interleaved)
        v = self._project(x, "v")
        new_cache = None
        if cache_kv is None or inputs.prefill:
            out = attention_lib.attend(
                q, k, v,
                q_segment_ids=inputs.segment_ids, kv_segment_ids=inputs.segment_ids,
                q_offsets=None, backend=config.attention_backend,
                sample_alpha=config.sample_attention_alpha,
            )
        if cache_kv is not None:
            cache_k = _write_kv(cache_kv[0], k, inputs.cache_lengths, layer_index)
            cache_v = _write_kv(cache_kv[1], v, inputs.cache_lengths, layer_index)
            new_cache = (cache_k, cache_v)
            if not inputs.prefill:
                if layer_index is not None:
                    cache_k, cache_v = cache_k[layer_index], cache_v[layer_index]
                q_seg = inputs.segment_ids if inputs.segment_ids is not None else jnp.ones(x.shape[:2], jnp.int32)
                out = attention_lib.cached_attention(
                    q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), q_segment_ids=q_seg,
                    kv_segment_ids=inputs.cache_segment_ids, q_offsets=inputs.cache_lengths)
        out = checkpoint_name(out, "attention_out")
        projected = jnp.einsum("btnh,nhe->bte", out, self.o_kernel[...].astype(x.dtype))
        return constrain(projected, ("act_batch", "act_seq", "act_embed")), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_up_kernel = _param(rngs, "normal", (e, 2, m), ("embed", "gate_up", "mlp"), config)
        self.down_kernel = _param(rngs, "normal", (m, e), ("mlp", "embed"), config)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = jnp.einsum("bte,ecm->btcm", x, self.gate_up_kernel[...].astype(x.dtype))
        hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
        out = jnp.einsum("btm,me->bte", hidden, self.down_kernel[...].astype(x.dtype))
        return constrain(out, ("act_batch", "act_seq", "act_embed"))


class DecoderLayer(nnx.Module):
    """Pre-norm block; GLM-4-0414 adds norms on the attention and MLP outputs."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.post_norms = config.post_norms
        self.input_norm = RMSNorm(config, rngs)
        self.attention = Attention(config, rngs)
        self.post_attention_norm = RMSNorm(config, rngs)
        self.mlp = MLP(config, rngs)
        if config.post_norms:
            self.post_self_attention_norm = RMSNorm(config, rngs)
            self.post_mlp_norm = RMSNorm(config, rngs)

    def __call__(self, x, inputs: _AttentionInputs, cache_kv=None, layer_index=None):
        attn_out, new_cache = self.attention(self.input_norm(x), inputs, cache_kv, layer_index)
        if self.post_norms:
            attn_out = self.post_self_attention_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.post_attention_norm(x))
        if self.post_norms:
            mlp_out = self.post_mlp_norm(mlp_out)
        return x + mlp_out, new_cache


class Decoder(nnx.Module):
    """Causal language model: embeddings, a scanned stack of decoder layers, final norm, LM head."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.embedding = _param(
            rngs, "normal", (config.vocab_size, config.hidden_size), ("vocab", "embed"), config
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(
            in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
        )
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(
                rngs, "normal", (config.hidden_size, config.vocab_size), ("embed", "vocab"), config
            )

    # -- pieces -----------------------------------------------------------------------------

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int [batch, seq] -> [batch, seq, embed] in the compute dtype."""
        table = self.embedding[...].astype(jnp.dtype(self.config.compute_dtype))
        return constrain(jnp.take(table, input_ids, axis=0), ("act_batch", "act_seq", "act_embed"))

    def head_kernel(self) -> jax.Array:
        """LM head as [embed, vocab] in the compute dtype (the embedding transposed when tied)."""
        dtype = jnp.dtype(self.config.compute_dtype)
        if self.config.tie_word_embeddings:
            return self.embedding[...].astype(dtype).T
        return self.lm_head[...].astype(dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [batch, seq, embed] -> logits [batch, seq, vocab] (compute dtype)."""
        out = jnp.einsum("bte,ev->btv", hidden, self.head_kernel())
        return constrain(out, ("act_batch", "act_seq", "act_vocab"))

    @property
    def stacked(self) -> bool:
        """True for the scanned layout (one module with stacked layer weights), False after
        ``unstack_layers``."""
        return not isinstance(self.layers, nnx.List)

    def _run_layers(
        self, x: jax.Array, inputs: _AttentionInputs, cache: KVCache | None
    ) -> tuple[jax.Array, tuple[Any, Any] | None]:
        policy = self.config.remat_policy
        if not self.stacked:
            new_k, new_v = [], []
            for index, layer in enumerate(self.layers):
                graphdef, layer_state = nnx.split(layer)
                caches = None if cache is None else (cache.k[index], cache.v[index])
                (x, caches), _ = _layer_step(graphdef, inputs, policy)((x, caches), (layer_state, None))
                if caches is not None:
                    new_k.append(caches[0])
                    new_v.append(caches[1])
            return x, None if cache is None else (tuple(new_k), tuple(new_v))
        graphdef, state = nnx.split(self.layers)
        caches = None if cache is None else (cache.k, cache.v)
        layer_indices = jnp.arange(self.config.num_layers)
        unroll = self.config.num_layers <= _MAX_UNROLLED_LAYERS
        (x, caches), _ = jax.lax.scan(
            _layer_step(graphdef, inputs, policy), (x, caches), (state, layer_indices), unroll=unroll)
        return x, caches

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [batch, seq, embed] for a full (uncached) forward.

        Args:
          input_ids: int [batch, seq].
          positions: int [batch, seq]; defaults to 0..seq-1 in every row.
          segment_ids: int [batch, seq] for packed rows (0 = padding); None = one segment per row.
        """
        positions = _default_positions(input_ids) if positions is None else positions
        cos, sin = rotary_angles(positions, self.config.rotary_dim, self.config.rope_theta)
        inputs = _AttentionInputs(cos, sin, segment_ids, None, None)
        x, _ = self._run_layers(self.embed(input_ids), inputs, None)
        return self.final_norm(x)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [batch, seq, vocab] for int ``input_ids`` [batch, seq] (causal)."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def forward_with_cache(
        self,
        input_ids: jax.Array,
        cache: KVCache,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        prefill: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Appends tokens to the cache and returns their logits (prefill or decode).

        Args:
          input_ids: int [batch, t], written at each row's ``cache.lengths`` offset.
          cache: the cache; ``max_len`` must leave room for ``t`` more tokens per row.
          positions: int [batch, t]; defaults to ``cache.lengths + arange(t)``.
          valid: bool [batch, t]; False marks right-padding that is neither attended to nor
            counted in ``lengths`` (defaults to all True).
          prefill: static; the caller promises that the cache is empty and that each row of
            ``valid`` is True then False (right-padding). Attention then runs among the new
            tokens with the configured backend (memory linear in ``t`` for splash and fused)
            instead of densely against the whole cache; padding queries' outputs are
            unspecified.

        Returns:
          (logits [batch, t, vocab], updated cache).
        """
        if isinstance(cache.k, tuple) == self.stacked:
            raise ValueError(
                f"a {'stacked' if self.stacked else 'per-layer'} decoder needs a cache made with "
                f"KVCache.create(..., stacked={self.stacked})")
        batch, t = input_ids.shape
        if positions is None:
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        valid = jnp.ones((batch, t), bool) if valid is None else valid
        new_segments = valid.astype(jnp.int32)
        cache_segment_ids = _write_rows(cache.segment_ids, new_segments, cache.lengths)
        cos, sin = rotary_angles(positions, self.config.rotary_dim, self.config.rope_theta)
        inputs = _AttentionInputs(cos, sin, None if prefill else new_segments, cache_segment_ids,
                                  cache.lengths, prefill)
        x, (k, v) = self._run_layers(self.embed(input_ids), inputs, cache)
        logits = self.logits(self.final_norm(x))
        lengths = cache.lengths + valid.sum(axis=1).astype(jnp.int32)
        return logits, KVCache(k=k, v=v, segment_ids=cache_segment_ids, lengths=lengths)


def _layer_step(graphdef: nnx.GraphDef, inputs: _AttentionInputs, remat_policy: str):
    """A scan body running one decoder layer: ((hidden, caches), (layer_state, layer_index)) ->
    ((hidden, caches), None); ``layer_index`` None for a layer with its own cache."""

    def step(carry, scanned):
        hidden, caches = carry
        layer_state, index = scanned
        layer = nnx.merge(graphdef, layer_state)
        hidden, caches = layer(hidden, inputs, caches, index)
        return (hidden, caches), None

    if remat_policy == "none":
        return step
    return jax.checkpoint(step, policy=_REMAT_POLICIES[remat_policy], prevent_cse=False)


def unstack_layers(model: Decoder) -> Decoder:
    """The inference layout of ``model``: the same parameters, with the layer stack split into
    ``num_layers`` separate ``DecoderLayer`` modules (logical axes without ``layers``).

    A decode step then reads each layer's weights as whole buffers; with the stacked layout
    XLA:CPU copies every layer's weights out of the stack on every step. Use caches made with
    ``KVCache.create(..., stacked=False)``. The returned model holds new arrays (slices); the
    argument is unchanged. An abstract model (``ShapeDtypeStruct`` parameters, see
    ``glmjax.models.params.abstract_model``) gives an abstract result.
    """
    if not model.stacked:
        return model
    config = model.config
    stacked_values = nnx.to_pure_dict(nnx.state(model.layers))
    layers = []
    for index in range(config.num_layers):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(config, nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: _layer_slice(x, index), stacked_values))
        layers.append(nnx.merge(graphdef, state))
    unstacked = nnx.clone(model)
    unstacked.layers = nnx.List(layers)
    return unstacked


def _layer_slice(stacked: jax.Array | jax.ShapeDtypeStruct, index: int) -> jax.Array | jax.ShapeDtypeStruct:
    if isinstance(stacked, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
    return stacked[index]


def _default_positions(input_ids: jax.Array) -> jax.Array:
    batch, seq = input_ids.shape
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
