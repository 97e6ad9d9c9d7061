"""The decoder family: GLM-4, GLM-4-0414 and Qwen2.5 switched by ``ModelConfig``.

Parameters carry ``logical_axes`` metadata (see ``glmjax.sharding``). The layers are
stacked along a leading ``layers`` axis and run with ``jax.lax.scan`` (one compiled layer
body; unrolled for stacks of at most 8 layers), optionally rematerialised. ``unstack_layers``
gives the inference layout: one module per layer, each with whole weight buffers and its own
KV cache, so a decode step reads its weights in place instead of slicing them out of the
stack (which XLA:CPU copies on every step); ``pad_features`` then zero-pads weights whose row
strides slow XLA:CPU's small-batch matmuls. ``forward_with_cache`` runs attention in "prefill"
mode (the new tokens among themselves, then written to the cache) or "decode" mode (written,
then attending over the whole cache); the blocks carry ``jax.named_scope`` names (``embed``,
``layers`` / ``layer_<i>``, ``attention``, ``mlp``, ``final_norm``, ``lm_head``, ...) for
profiles.

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
import functools
from typing import Any, Literal

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
        Under a mesh they are laid out by ``attention.cache_spec`` (batch over data/FSDP, KV
        heads over tensor, else the sequence over tensor).
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
        """An empty cache; ``stacked`` must match the decoder's layout (``Decoder.stacked``).
        Under an ambient mesh (``jax.set_mesh``) it is created in its sharded layout."""
        dtype = jnp.dtype(config.compute_dtype if dtype is None else dtype)
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        if stacked:
            k = jnp.zeros((config.num_layers, *shape), dtype)
            v = jnp.zeros((config.num_layers, *shape), dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(k=k, v=v, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32)).constrained()

    def constrained(self) -> "KVCache":
        """The cache with sharding constraints for its layout under the ambient mesh (a no-op
        without one)."""
        layers = () if isinstance(self.k, tuple) else ("layers",)

        def place(kv: jax.Array | tuple[jax.Array, ...]) -> jax.Array | tuple[jax.Array, ...]:
            if isinstance(kv, tuple):
                return tuple(constrain(layer, attention_lib.CACHE_AXES) for layer in kv)
            return constrain(kv, (*layers, *attention_lib.CACHE_AXES))

        return KVCache(k=place(self.k), v=place(self.v),
                       segment_ids=constrain(self.segment_ids, ("cache_batch", None)),
                       lengths=constrain(self.lengths, ("cache_batch",)))

    def repeat_rows(self, times: int) -> "KVCache":
        """Each row copied ``times`` times in a row (row r becomes rows r*times .. r*times+times-1):
        one prompt's prefilled keys and values shared by ``times`` samples."""
        repeat = functools.partial(jnp.repeat, repeats=times, axis=0 if isinstance(self.k, tuple) else 1)
        per_layer = (lambda kv: tuple(repeat(x) for x in kv)) if isinstance(self.k, tuple) else repeat
        return KVCache(k=per_layer(self.k), v=per_layer(self.v),
                       segment_ids=jnp.repeat(self.segment_ids, times, axis=0),
                       lengths=jnp.repeat(self.lengths, times, axis=0)).constrained()


AttentionMode = Literal["full", "prefill", "decode", "chunk"]


@dataclasses.dataclass(frozen=True)
class _AttentionInputs:
    """What every layer's attention needs besides its input.

    ``mode``: "full" (no cache: causal self-attention over ``segment_ids``), "prefill" (the cache
    is empty: attention among the new tokens with the configured backend, then the keys and
    values are written), "decode" (the new tokens' keys and values are written, then the
    queries attend densely over the whole cache) or "chunk" (as "decode", with the flash kernel
    over the filled part of the cache: one chunk of a chunked prefill).
    """

    cos: jax.Array
    sin: jax.Array
    segment_ids: jax.Array | None
    cache_segment_ids: jax.Array | None
    cache_lengths: jax.Array | None
    mode: AttentionMode = "full"


def _write_rows(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Scatters new [batch, t, ...] into cache [batch, max_len, ...] at per-row offsets.

    Positions past ``max_len`` are dropped (never wrapped or clamped onto other tokens).
    """
    batch, t = new.shape[:2]
    rows = jnp.arange(batch)[:, None]
    columns = starts[:, None] + jnp.arange(t)[None]
    return cache.at[rows, columns].set(new.astype(cache.dtype), mode="drop")


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
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        layer_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [batch, seq, embed] -> ([batch, seq, embed], updated (k, v) cache or None).

        ``cache_kv`` (modes "prefill", "decode" and "chunk") is either this layer's cache ([batch, kv_heads,
        max_len, head_dim] each; ``layer_index`` None) or the whole stacked cache ([layers, batch,
        kv_heads, max_len, head_dim] each), of which this layer writes and reads slot
        ``layer_index``.
        """
        config = self.config
        with jax.named_scope("qkv"):
            q = apply_rotary(self._project(x, "q"), inputs.cos, inputs.sin, interleaved=config.rope_interleaved)
            k = apply_rotary(self._project(x, "k"), inputs.cos, inputs.sin, interleaved=config.rope_interleaved)
            v = self._project(x, "v")
        new_cache = None
        if inputs.mode == "full":
            out = self._self_attention(q, k, v, inputs.segment_ids)
        elif inputs.mode == "prefill":
            out = self._self_attention(q, k, v, None)
            new_cache = self._write_cache(cache_kv, k, v, inputs.cache_lengths, layer_index)
        else:
            new_cache = self._write_cache(cache_kv, k, v, inputs.cache_lengths, layer_index)
            out = self._attend_cache(q, new_cache, inputs, layer_index)
        out = checkpoint_name(out, "attention_out")
        with jax.named_scope("out_proj"):
            # One contraction over heads * head_dim (contiguous in both operands): with two,
            # XLA:CPU may transpose the kernel to the activation's layout on every step.
            batch, seq, heads, head_dim = out.shape
            kernel = self.o_kernel[...].astype(x.dtype).reshape(heads * head_dim, -1)
            projected = jnp.einsum("btd,de->bte", out.reshape(batch, seq, heads * head_dim), kernel)
            if projected.shape[-1] != x.shape[-1]:  # zero-padded output features (``pad_features``)
                projected = projected[..., : x.shape[-1]]
        return constrain(projected, ("act_batch", "act_seq", "act_embed")), new_cache

    def _self_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None
    ) -> jax.Array:
        """Causal attention among the new tokens with the configured backend (a prefill passes no
        segment ids: right-padding comes after every valid token, so causality hides it)."""
        with jax.named_scope("self_attention"):
            return attention_lib.attend(
                q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_offsets=None,
                backend=self.config.attention_backend, sample_alpha=self.config.sample_attention_alpha,
            )

    @staticmethod
    def _write_cache(
        cache_kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, starts: jax.Array,
        layer_index: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        with jax.named_scope("cache_write"):
            return (attention_lib.write_cache(cache_kv[0], k, starts, layer_index),
                    attention_lib.write_cache(cache_kv[1], v, starts, layer_index))

    @staticmethod
    def _attend_cache(
        q: jax.Array, cache_kv: tuple[jax.Array, jax.Array], inputs: _AttentionInputs,
        layer_index: jax.Array | None,
    ) -> jax.Array:
        """Queries (already in the cache) against every cached position of their rows."""
        cache_k, cache_v = cache_kv
        if layer_index is not None:
            cache_k, cache_v = cache_k[layer_index], cache_v[layer_index]
        if inputs.mode == "chunk":
            with jax.named_scope("chunk_attention"):
                return attention_lib.chunk_attention(
                    q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), q_segment_ids=inputs.segment_ids,
                    kv_segment_ids=inputs.cache_segment_ids, q_offsets=inputs.cache_lengths)
        with jax.named_scope("decode_attention"):
            return attention_lib.decode_attention(
                q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), q_segment_ids=inputs.segment_ids,
                kv_segment_ids=inputs.cache_segment_ids, q_offsets=inputs.cache_lengths)


class MLP(nnx.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_up_kernel = _param(rngs, "normal", (e, 2, m), ("embed", "gate_up", "mlp"), config)
        self.down_kernel = _param(rngs, "normal", (m, e), ("mlp", "embed"), config)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed]."""
        gate_up = jnp.einsum("bte,ecm->btcm", x, self.gate_up_kernel[...].astype(x.dtype))
        hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
        out = jnp.einsum("btm,me->bte", hidden, self.down_kernel[...].astype(x.dtype))
        if out.shape[-1] != x.shape[-1]:  # zero-padded output features (``pad_features``)
            out = out[..., : x.shape[-1]]
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

    def __call__(
        self,
        x: jax.Array,
        inputs: _AttentionInputs,
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        layer_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [batch, seq, embed] -> (same shape, updated cache); see ``Attention.__call__``."""
        with jax.named_scope("attention"):
            attn_out, new_cache = self.attention(self.input_norm(x), inputs, cache_kv, layer_index)
            if self.post_norms:
                attn_out = self.post_self_attention_norm(attn_out)
        x = x + attn_out
        with jax.named_scope("mlp"):
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
        with jax.named_scope("embed"):
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
        with jax.named_scope("lm_head"):
            out = jnp.einsum("bte,ev->btv", hidden, self.head_kernel())
            if out.shape[-1] != self.config.vocab_size:  # zero-padded vocabulary (``pad_features``)
                out = out[..., : self.config.vocab_size]
            return constrain(out, ("act_batch", "act_seq", "act_vocab"))

    @property
    def stacked(self) -> bool:
        """True for the scanned layout (one module with stacked layer weights), False after
        ``unstack_layers``."""
        return not isinstance(self.layers, nnx.List)

    def _run_layers(
        self, x: jax.Array, inputs: _AttentionInputs, cache: KVCache | None
    ) -> tuple[jax.Array, tuple[Any, Any] | None]:
        """Runs every layer on hidden [batch, seq, embed]; returns (hidden, (k, v)) with the
        updated cache arrays (None without a cache)."""
        caches = None if cache is None else (cache.k, cache.v)
        if self.stacked:
            return self._run_stacked(x, inputs, caches)
        return self._run_unstacked(x, inputs, caches)

    def _run_stacked(
        self, x: jax.Array, inputs: _AttentionInputs, caches: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """The scanned layout: one layer body over the stacked weights (unrolled up to
        ``_MAX_UNROLLED_LAYERS``); each layer writes slot ``index`` of the stacked cache."""
        graphdef, state = nnx.split(self.layers)
        layer_indices = jnp.arange(self.config.num_layers)
        unroll = self.config.num_layers <= _MAX_UNROLLED_LAYERS
        with jax.named_scope("layers"):
            (x, caches), _ = jax.lax.scan(
                _layer_step(graphdef, inputs, self.config.remat_policy), (x, caches),
                (state, layer_indices), unroll=unroll)
        return x, caches

    def _run_unstacked(
        self, x: jax.Array, inputs: _AttentionInputs,
        caches: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None,
    ) -> tuple[jax.Array, tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]] | None]:
        """The per-layer layout: each layer with its own weights and its own cache arrays."""
        new_k, new_v = [], []
        for index, layer in enumerate(self.layers):
            graphdef, layer_state = nnx.split(layer)
            layer_cache = None if caches is None else (caches[0][index], caches[1][index])
            with jax.named_scope(f"layer_{index}"):
                (x, layer_cache), _ = _layer_step(graphdef, inputs, self.config.remat_policy)(
                    (x, layer_cache), (layer_state, None))
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        return x, None if caches is None else (tuple(new_k), tuple(new_v))

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
        cos, sin = rotary_angles(positions, self.config.rotary_dim, self.config.rope_theta,
                                 self.config.rope_scaling, None if segment_ids is None else segment_ids > 0)
        inputs = _AttentionInputs(cos, sin, segment_ids, None, None)
        x, _ = self._run_layers(self.embed(input_ids), inputs, None)
        with jax.named_scope("final_norm"):
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
        flash_over_cache: bool = False,
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
          flash_over_cache: static; without ``prefill``, the new tokens attend over the cache with
            the flash kernel (``attention.chunk_attention``: the cache's empty tail is skipped, no
            [t, max_len] scores) instead of densely: one chunk of a chunked prefill.

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
        cos, sin = rotary_angles(positions, self.config.rotary_dim, self.config.rope_theta,
                                 self.config.rope_scaling, valid)
        inputs = _AttentionInputs(cos, sin, None if prefill else new_segments, cache_segment_ids,
                                  cache.lengths,
                                  "prefill" if prefill else "chunk" if flash_over_cache else "decode")
        x, (k, v) = self._run_layers(self.embed(input_ids), inputs, cache)
        with jax.named_scope("final_norm"):
            x = self.final_norm(x)
        logits = self.logits(x)
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


def _stride_padding(row_elements: int, itemsize: int) -> int:
    """Extra elements per row so that a row stride is not a multiple of 2 KiB (0 if it is not)."""
    return 256 // itemsize if row_elements * itemsize % 2048 == 0 else 0


def _pad_last_dims(variable: nnx.Variable, *widths: int) -> None:
    """Appends ``widths[i]`` zeros to the i-th of the trailing dims of ``variable`` (in place)."""
    if not any(widths):
        return
    value = variable.get_value()
    padding = [(0, 0)] * (value.ndim - len(widths)) + [(0, w) for w in widths]
    shape = tuple(d + after for d, (_, after) in zip(value.shape, padding))
    if isinstance(value, jax.ShapeDtypeStruct):
        variable.set_value(jax.ShapeDtypeStruct(shape, value.dtype))
    else:
        variable.set_value(jnp.pad(value, padding))


def pad_features(model: Decoder) -> Decoder:
    """A copy of a per-layer ``model`` (``unstack_layers``) with zero-padded weights whose row
    strides are multiples of 2 KiB: the MLP width, the output features of the attention and
    MLP output projections (then sliced back to ``hidden_size``) and an untied LM head's
    vocabulary (sliced back to ``vocab_size``). The outputs are unchanged.

    XLA:CPU's matmuls with M = 1-16 rows (decode) slow down up to ~2x on such strides, where
    successive rows of the weight map to the same cache sets ([16, 512] x [512, 512]: 173 us;
    x [512, 576]: 104 us; [512, 3072] vs [512, 3136]: 775 vs 477 us on the 2-core benchmark
    machine). Costs ~4-12% more weight memory and FLOPs in the padded matmuls.
    """
    if model.stacked:
        raise ValueError("pad_features needs the per-layer layout (unstack_layers)")
    padded = nnx.clone(model)
    itemsize = jnp.dtype(model.config.param_dtype).itemsize
    config = model.config
    embed_pad = _stride_padding(config.hidden_size, itemsize)
    mlp_pad = _stride_padding(2 * config.intermediate_size, itemsize) // 2
    for layer in padded.layers:
        _pad_last_dims(layer.attention.o_kernel, embed_pad)
        _pad_last_dims(layer.mlp.gate_up_kernel, mlp_pad)
        _pad_last_dims(layer.mlp.down_kernel, mlp_pad, embed_pad)
    if not config.tie_word_embeddings:
        _pad_last_dims(padded.lm_head, _stride_padding(config.vocab_size, itemsize))
    return padded


def _layer_slice(stacked: jax.Array | jax.ShapeDtypeStruct, index: int) -> jax.Array | jax.ShapeDtypeStruct:
    if isinstance(stacked, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
    return stacked[index]


def _default_positions(input_ids: jax.Array) -> jax.Array:
    batch, seq = input_ids.shape
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
