"""Batched generation with a preallocated KV cache, compiled for bucketed static shapes.

One ``generate`` call runs one compiled program per chunk of prompts (``max_batch_size`` rows):

* **prefill**: every prompt token but the last is written into a fresh ``KVCache`` in one
  forward (rows right-padded, ``valid`` masks the padding), with the model's attention backend
  (splash on TPU or cuDNN on GPU keep a long prompt's attention memory linear). Their
  logits are unused, so XLA drops the LM head, which for a large vocabulary is most of the
  prefill's memory.
* **decode**: a ``jax.lax.while_loop`` that feeds each row's last token (first the last prompt
  token), samples the next, and exits as soon as every row has hit a stop token or the token
  budget. The time to first token is the wall time of a call with ``max_new_tokens=1``.

Shapes are bucketed so that calls reuse compiled programs: the batch to a power of two (padding
rows are inert), the prompt length and the new-token budget each to a length bucket (powers of
two by default). Programs are cached per (batch, prompt, budget, stop-list, sampling) bucket;
temperature, top-p, min-p, the exact token budget and the seed are runtime data.

By default the engine holds the model in the per-layer layout (``unstack_layers``: whole weight
buffers and one KV cache per layer), which spares a copy of every layer's weights per decode
step on XLA:CPU; ``stacked_layers=True`` keeps the training layout instead and shares the
caller's parameter buffers (no second copy of the weights, e.g. next to an RL trainer). With a mesh the parameters are placed by their logical axes (``state_shardings``: tensor
parallelism over heads / MLP / vocabulary, FSDP over the embedding) and the programs run under
``jax.set_mesh``, so the model's activation constraints apply; the cache's batch and KV-head axes
follow the activation rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from glmjax import sharding as sharding_lib
from glmjax.inference.sampling import LogprobMode, SamplingConfig, select_tokens
from glmjax.models.decoder import Decoder, KVCache, unstack_layers
from glmjax.models.params import state_shardings

FinishReason = Literal["stop", "length"]
_CACHE_AXES = ("act_batch", "act_kv_heads", None, "act_head_dim")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One completion.

    Attributes:
      tokens: generated ids; a stop token that ended the completion is included (last).
      logprobs: log-probability of each generated token (see ``glmjax.inference.sampling``).
      finish_reason: "stop" (the last token is a stop token) or "length" (budget exhausted).
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    batch: int
    prompt_len: int
    budget: int
    num_stop: int
    sampling: tuple[bool, int, bool]


def _is_abstract(state: nnx.State) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))


def _constrain_cache(kv: jax.Array | tuple[jax.Array, ...]) -> jax.Array | tuple[jax.Array, ...]:
    """Shards a stacked [layers, batch, kv_heads, len, head_dim] cache or per-layer ones by the
    activation rules (batch and KV heads)."""
    if isinstance(kv, tuple):
        return tuple(sharding_lib.constrain(layer, _CACHE_AXES) for layer in kv)
    return sharding_lib.constrain(kv, ("layers", *_CACHE_AXES))


def power_of_two_buckets(minimum: int, maximum: int) -> tuple[int, ...]:
    """(minimum, 2*minimum, ...) up to the first value >= maximum; ``minimum`` a power of two."""
    if minimum < 1 or minimum & (minimum - 1):
        raise ValueError(f"minimum bucket must be a power of two, got {minimum}")
    buckets = [minimum]
    while buckets[-1] < maximum:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def _seed_list(seed: int | Sequence[int], count: int) -> list[int]:
    seeds = [seed + index for index in range(count)] if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts")
    return [int(s) % 2**32 for s in seeds]


def _bucket(value: int, buckets: Sequence[int], what: str) -> int:
    for bucket in buckets:
        if value <= bucket:
            return bucket
    raise ValueError(f"{what} {value} exceeds the largest bucket {buckets[-1]}")


class GenerationEngine:
    """Compiled, batched, optionally sharded generation for a ``Decoder``.

    Args:
      model: the decoder. The engine keeps its own per-layer copy of the parameters
        (``unstack_layers``; unless ``stacked_layers``), placed on ``mesh`` when one is given;
        drop other references to ``model`` to free the stacked ones. An abstract model
        (``abstract_model``) gives an engine that can only ``compile`` (memory checks).
      mesh: device mesh over ``glmjax.sharding.MESH_AXES``; None runs on the model's devices.
      rules: logical axis rules for the mesh (default: the active rules).
      max_batch_size: rows per call of a compiled program; larger requests run in chunks of this
        size. Batches are padded to powers of two.
      length_buckets: allowed padded lengths for prompts and for new-token budgets, ascending
        (default: powers of two from 16 to the model's ``max_position_embeddings``).
      logprob_mode: "processed" or "raw" (``glmjax.inference.sampling``).
      cache_dtype: KV cache dtype (default: the model's compute dtype).
      stacked_layers: keep the model's stacked layer weights (scanned layers, one stacked KV
        cache) instead of the per-layer layout: no copy of the weights, slower decode on CPU.
    """

    def __init__(
        self,
        model: Decoder,
        *,
        mesh: Mesh | None = None,
        rules: sharding_lib.AxisRules | None = None,
        max_batch_size: int = 32,
        length_buckets: Sequence[int] | None = None,
        logprob_mode: LogprobMode = "processed",
        cache_dtype: str | None = None,
        stacked_layers: bool = False,
    ) -> None:
        if logprob_mode not in ("processed", "raw"):
            raise ValueError(f"logprob_mode must be 'processed' or 'raw', got {logprob_mode!r}")
        self.config = model.config
        self.mesh = mesh
        self.rules = rules
        self.batch_buckets = power_of_two_buckets(1, max_batch_size)
        self.max_batch_size = max_batch_size
        self.length_buckets = tuple(
            length_buckets or power_of_two_buckets(16, self.config.max_position_embeddings)
        )
        if list(self.length_buckets) != sorted(set(self.length_buckets)) or self.length_buckets[0] < 1:
            raise ValueError(f"length_buckets must be ascending positive ints, got {self.length_buckets}")
        self.logprob_mode = logprob_mode
        self.cache_dtype = cache_dtype or self.config.compute_dtype
        self.stacked_layers = stacked_layers
        self._graphdef, self._state = self._placed(model)
        self._programs: dict[_ProgramKey, Callable] = {}
        self.trace_count = 0
        """How many times a program was traced (each trace is one compilation)."""

    def update_model(self, model: Decoder) -> None:
        """Generates with ``model``'s parameters from now on (e.g. the policy after an RL step),
        reusing the compiled programs.

        Raises:
          ValueError: ``model`` has another config, or parameter shapes or dtypes that differ.
        """
        if model.config != self.config:
            raise ValueError(f"update_model needs a model of the engine's config; got {model.config}, "
                             f"engine has {self.config}")
        graphdef, state = self._placed(model)

        def shapes(tree: nnx.State) -> nnx.State:
            return jax.tree.map(lambda x: (x.shape, x.dtype), tree)

        if graphdef != self._graphdef or shapes(state) != shapes(self._state):
            raise ValueError("update_model: the model's parameter shapes or dtypes differ from the engine's")
        self._state = state

    def _placed(self, model: Decoder) -> tuple[nnx.GraphDef, nnx.State]:
        """The per-layer layout of ``model`` split into (graphdef, state), the state on the mesh
        (``ShapeDtypeStruct``s with shardings for an abstract model)."""
        graphdef, state = nnx.split(model if self.stacked_layers else unstack_layers(model))
        if self.mesh is None:
            return graphdef, state
        with self._context():
            shardings = state_shardings(state, self.mesh, self.rules)
            if _is_abstract(state):
                return graphdef, jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
            return graphdef, jax.device_put(state, shardings)

    # -- public -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig = SamplingConfig(),
        max_new_tokens: int = 128,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
        seed: int | Sequence[int] = 0,
    ) -> list[GenerationResult]:
        """Generates a completion for every prompt.

        Args:
          prompts: token ids, one non-empty list per prompt (lengths may differ).
          sampling: token selection (greedy by default).
          max_new_tokens: budget per prompt, including a final stop token.
          stop_token_ids: ids that end a completion: one list for all prompts, or one per prompt.
          seed: PRNG seeds, one per prompt, or an int ``s`` meaning ``s + index`` for prompt
            ``index``. A prompt's draws depend only on its own seed, not on the rest of the batch
            (up to floating-point differences between batch shapes).

        Returns:
          One ``GenerationResult`` per prompt, in order.

        Raises:
          ValueError: naming the prompt index for an empty prompt, an id outside the vocabulary,
            or a prompt longer than the largest length bucket; or a budget beyond that bucket.
        """
        if self.abstract:
            raise ValueError("this engine was built on an abstract model (no parameter values): "
                             "it can only compile()")
        if not 1 <= max_new_tokens <= self.length_buckets[-1]:
            raise ValueError(f"max_new_tokens must be in [1, {self.length_buckets[-1]}] (the largest "
                             f"length bucket), got {max_new_tokens}")
        prompts = [list(p) for p in prompts]
        stops = self._stop_lists(stop_token_ids, len(prompts))
        seeds = _seed_list(seed, len(prompts))
        self._check_prompts(prompts)
        results: list[GenerationResult] = []
        for start in range(0, len(prompts), self.max_batch_size):
            end = start + self.max_batch_size
            results.extend(
                self._generate_chunk(prompts[start:end], stops[start:end], sampling, max_new_tokens,
                                     seeds[start:end])
            )
        return results

    def compile(
        self,
        batch: int,
        prompt_len: int,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        num_stop_ids: int = 4,
    ) -> jax.stages.Compiled:
        """Compiles, without running, the program ``generate`` would use for these shapes.

        Args:
          batch, prompt_len, max_new_tokens: sizes before bucketing (as ``generate`` sees them).
          sampling: its static part (greedy, top-k, top-p on/off) selects the program.
          num_stop_ids: stop ids per row.

        Returns:
          The compiled program (``memory_analysis()`` gives bytes per device).
        """
        key = self._program_key(batch, prompt_len, max_new_tokens, num_stop_ids, sampling)
        with self._context():
            return self._program_for(key).lower(
                self._state,
                jax.ShapeDtypeStruct((key.batch, key.prompt_len), jnp.int32),
                jax.ShapeDtypeStruct((key.batch,), jnp.int32),
                jax.ShapeDtypeStruct((key.batch, key.num_stop), jnp.int32),
                jax.ShapeDtypeStruct((key.batch,), jnp.bool_),
                jax.ShapeDtypeStruct((), jnp.int32),
                jax.ShapeDtypeStruct((3,), jnp.float32),
                jax.ShapeDtypeStruct((key.batch,), jnp.uint32),
            ).compile()

    @property
    def abstract(self) -> bool:
        """True while the engine holds an abstract model's parameters (it can only compile)."""
        return _is_abstract(self._state)

    @property
    def state(self) -> nnx.State:
        """The model parameters as the programs use them (placed on the mesh, if any)."""
        return self._state

    @property
    def num_programs(self) -> int:
        """Distinct programs held (one per shape/sampling bucket used)."""
        return len(self._programs)

    # -- checks -----------------------------------------------------------------------------

    def _stop_lists(
        self, stop_token_ids: Sequence[int] | Sequence[Sequence[int]], count: int
    ) -> list[list[int]]:
        if all(isinstance(s, (int, np.integer)) for s in stop_token_ids):
            return [[int(s) for s in stop_token_ids]] * count
        if len(stop_token_ids) != count:
            raise ValueError(f"stop_token_ids has {len(stop_token_ids)} lists for {count} prompts")
        return [[int(s) for s in row] for row in stop_token_ids]

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        vocab = self.config.vocab_size
        limit = self.length_buckets[-1]
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            if len(prompt) > limit:
                raise ValueError(
                    f"prompt {index}: {len(prompt)} tokens exceed the largest length bucket {limit}")

    # -- running ----------------------------------------------------------------------------

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
        if self.rules is not None:
            stack.enter_context(sharding_lib.use_rules(self.rules))
        return stack

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        stops: list[list[int]],
        sampling: SamplingConfig,
        max_new_tokens: int,
        seeds: list[int],
    ) -> list[GenerationResult]:
        rows = len(prompts)
        key = self._program_key(rows, max(len(p) for p in prompts), max_new_tokens,
                                max(len(s) for s in stops), sampling)
        ids = np.zeros((key.batch, key.prompt_len), np.int32)
        lengths = np.ones((key.batch,), np.int32)
        stop_ids = np.full((key.batch, key.num_stop), -1, np.int32)
        row_seeds = np.zeros((key.batch,), np.uint32)
        row_seeds[:rows] = seeds
        for row, (prompt, stop) in enumerate(zip(prompts, stops)):
            ids[row, : len(prompt)] = prompt
            lengths[row] = len(prompt)
            stop_ids[row, : len(stop)] = stop
        active = np.arange(key.batch) < rows
        program = self._program_for(key)
        with self._context():
            out = program(self._state, ids, lengths, stop_ids, active, np.int32(max_new_tokens),
                          sampling.dynamic_values(), row_seeds)
            tokens, logprobs, counts = (np.asarray(x) for x in out)
        results = []
        for row in range(rows):
            count = int(counts[row])
            row_tokens = tokens[row, :count].tolist()
            stopped = row_tokens[-1] in stops[row]
            results.append(GenerationResult(row_tokens, logprobs[row, :count].tolist(),
                                            "stop" if stopped else "length"))
        return results

    def _program_key(self, rows: int, prompt_len: int, max_new_tokens: int, num_stop: int,
                     sampling: SamplingConfig) -> _ProgramKey:
        return _ProgramKey(
            batch=_bucket(rows, self.batch_buckets, "batch"),
            prompt_len=_bucket(prompt_len, self.length_buckets, "prompt length"),
            budget=_bucket(max_new_tokens, self.length_buckets, "max_new_tokens"),
            num_stop=max(4, 1 << max(0, num_stop - 1).bit_length()),
            sampling=sampling.static_key(),
        )

    def _program_for(self, key: _ProgramKey) -> Callable:
        if key not in self._programs:
            self._programs[key] = self._build_program(key)
        return self._programs[key]

    def _build_program(self, key: _ProgramKey) -> Callable:
        graphdef, config = self._graphdef, self.config
        greedy, top_k, use_top_p = key.sampling
        cache_len = key.prompt_len + key.budget
        logprob_mode, cache_dtype, stacked = self.logprob_mode, self.cache_dtype, self.stacked_layers

        def run(state, ids, lengths, stop_ids, active, max_new, values, seeds):
            """Prefill, then decode until every row stops or has ``max_new`` tokens.

            Args:
              state: the model's nnx state.
              ids: int32 [B, P] right-padded prompts; lengths: int32 [B] (>= 1).
              stop_ids: int32 [B, S], -1 padded; active: bool [B], False for padding rows.
              max_new: int32 scalar <= budget; values: fp32 [3] sampling values;
              seeds: uint32 [B] per-row PRNG seeds.

            Returns:
              (tokens int32 [B, budget], logprobs fp32 [B, budget], counts int32 [B]); entries
              past a row's count are 0.
            """
            self.trace_count += 1
            model = nnx.merge(graphdef, state)
            keys = jax.vmap(jax.random.key)(seeds)
            cache = KVCache.create(config, key.batch, cache_len, cache_dtype, stacked=stacked)
            cache = dataclasses.replace(cache, k=_constrain_cache(cache.k), v=_constrain_cache(cache.v))
            # All prompt tokens but the last: their logits are unused, so XLA drops the LM head.
            valid = jnp.arange(key.prompt_len, dtype=jnp.int32)[None] < (lengths - 1)[:, None]
            _, cache = model.forward_with_cache(ids, cache, valid=valid, prefill=True)
            last = jnp.take_along_axis(ids, (lengths - 1)[:, None], axis=1)[:, 0]

            def cond(carry):
                index, _, _, done, _, _, _ = carry
                return (index < max_new) & ~jnp.all(done)

            def body(carry):
                index, cache, tokens, done, out_tokens, out_logprobs, counts = carry
                logits, cache = model.forward_with_cache(tokens[:, None], cache)
                new_tokens, logprobs = select_tokens(
                    logits[:, 0], jax.vmap(jax.random.fold_in, (0, None))(keys, index), values,
                    greedy=greedy, top_k=top_k, use_top_p=use_top_p, logprob_mode=logprob_mode,
                )
                out_tokens = jax.lax.dynamic_update_slice_in_dim(
                    out_tokens, jnp.where(done, 0, new_tokens)[:, None], index, axis=1)
                out_logprobs = jax.lax.dynamic_update_slice_in_dim(
                    out_logprobs, jnp.where(done, 0.0, logprobs)[:, None], index, axis=1)
                counts = counts + (~done).astype(jnp.int32)
                done = done | jnp.any(new_tokens[:, None] == stop_ids, axis=-1)
                return index + 1, cache, new_tokens, done, out_tokens, out_logprobs, counts

            carry = (
                jnp.int32(0), cache, last, ~active,
                jnp.zeros((key.batch, key.budget), jnp.int32),
                jnp.zeros((key.batch, key.budget), jnp.float32),
                jnp.zeros((key.batch,), jnp.int32),
            )
            _, _, _, _, out_tokens, out_logprobs, counts = jax.lax.while_loop(cond, body, carry)
            return out_tokens, out_logprobs, counts

        return jax.jit(run)
