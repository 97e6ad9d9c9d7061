"""Batched generation with a preallocated KV cache, compiled for bucketed static shapes.

One ``generate`` call runs compiled programs per chunk of prompts (``max_batch_size`` rows):

* **prefill** (:func:`prefill`): every prompt token but the last is written into a fresh
  ``KVCache`` in one forward (rows right-padded, ``valid`` masks the padding), with the model's
  attention backend (splash on TPU or cuDNN on GPU keep a long prompt's attention memory
  linear). Their logits are unused, so XLA drops the LM head, which for a large vocabulary is
  most of the prefill's memory. With ``num_samples=K`` each prompt is prefilled once and its
  cache rows copied to K decode rows (``KVCache.repeat_rows``).
* **decode** (:func:`decode`): a ``jax.lax.while_loop`` that feeds each row's last token (first
  the last prompt token), samples the next, and exits as soon as every row has hit a stop token
  or the token budget. The time to first token is the wall time of a call with
  ``max_new_tokens=1``.

Without stop strings both run in one program (one device call per chunk). Stop strings are text,
so they need the host: prefill runs as one program and decoding as calls of at most
``stop_check_every`` steps; between calls the host detokenizes the rows that grew, and a row
whose text holds a stop string is cut (:func:`stop_string_cut`) and marked finished for the next
call.

Shapes are bucketed so that calls reuse compiled programs: the batch to a power of two (padding
rows are inert), the prompt length and the new-token budget each to a length bucket (powers of
two by default). Programs are cached per (batch, samples, prompt, budget, stop-list, sampling,
log-prob mode) bucket; temperature, top-p, min-p, the exact token budget, the seeds and the stop
check interval are runtime data.

By default the engine holds the model in the per-layer layout (``unstack_layers``: whole weight
buffers and one KV cache per layer), which spares a copy of every layer's weights per decode
step on XLA:CPU; there, weights with 2 KiB row strides are also zero-padded (``pad_features``)
and untied models compile without YNNPACK fusions (both measured faster for decode).
``stacked_layers=True`` keeps the training layout instead and shares the caller's parameter
buffers (no second copy of the weights, e.g. next to an RL trainer). With a mesh the parameters are placed by their logical axes (``state_shardings``: tensor parallelism
over heads / MLP / vocabulary, FSDP over the embedding) and the programs run under
``jax.set_mesh``, so the model's activation constraints apply; the cache follows the ``cache_*``
rules (batch over data/FSDP, KV heads over tensor, or the cache sequence over tensor when the KV
heads are fewer than the tensor shards; see ``glmjax.models.attention.cache_spec``).

Multi-process (``jax.distributed``, a mesh spanning processes): every process calls ``generate``
with the same arguments; inputs enter the programs replicated, outputs leave them replicated,
and every process returns the same full list of results.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax import sharding as sharding_lib
from glmjax.inference.sampling import LOGPROB_MODES, LogprobMode, SamplingConfig, select_tokens
from glmjax.hardware import current_platform
from glmjax.models.decoder import Decoder, KVCache, pad_features, unstack_layers
from glmjax.models.params import state_shardings

# XLA:CPU runs dots as YNNPACK fusions by default; for decode-sized matmuls (M = 1-16 rows) of
# weights in the [in, out] layout XLA's Eigen kernels were faster: a greedy batch-16 step of the
# launch/benchmark_generate.py model took 11.6 ms instead of 16.7 ms (with ``pad_features``; same
# process, interleaved), batch 1 and prefill unchanged. A tied LM head ([vocab, embed] storage,
# contracted on its minor dim) is the exception: Eigen's kernel was 2.3x slower there.
_CPU_UNTIED_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

FinishReason = Literal["stop", "length"]
Detokenize = Callable[[list[int]], str]
"""Token ids -> text (e.g. ``functools.partial(tokenizer.decode, skip_special_tokens=False)``)."""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One completion.

    Attributes:
      tokens: generated ids; a stop token that ended the completion is included (last). A stop
        string cuts them before the token whose text reaches into it (``stop_string_cut``).
      logprobs: log-probability of each of ``tokens`` (see ``glmjax.inference.sampling``).
      finish_reason: "stop" (a stop token is last, or a stop string was found) or "length"
        (budget exhausted).
      text: ``detokenize(tokens)`` when ``generate`` got a ``detokenize``, else None.
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    part: Literal["generate", "prefill", "decode"]
    batch: int
    """Prompt rows (bucketed); the decode runs ``batch * num_samples`` rows."""
    num_samples: int
    prompt_len: int
    budget: int
    num_stop: int
    sampling: tuple[bool, int, bool]
    logprob_mode: LogprobMode

    @property
    def rows(self) -> int:
        return self.batch * self.num_samples


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The decode loop's state for ``rows`` rows and a budget of ``budget`` new tokens.

    Attributes:
      step: int32 scalar; decode steps run so far (all rows step together).
      cache: the KV cache holding each row's prompt and generated tokens but ``last``.
      last: int32 [rows]; the token each row feeds next.
      done: bool [rows]; rows that stopped (or padding rows); they neither write nor count.
      keys: PRNG keys [rows]; a row's n-th token is drawn with ``fold_in(keys[row], n)``.
      tokens: int32 [rows, budget]; generated ids, 0 past a row's count.
      logprobs: fp32 [rows, budget]; their log-probabilities, 0 past a row's count.
      counts: int32 [rows]; tokens generated per row.
    """

    step: jax.Array
    cache: KVCache
    last: jax.Array
    done: jax.Array
    keys: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    counts: jax.Array


def _is_abstract(state: nnx.State) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))


def _replicated(x: jax.Array) -> jax.Array:
    """``x`` constrained to be whole on every device of the ambient mesh, so that any process
    can read it (a no-op without a mesh)."""
    return sharding_lib.constrain(x, (None,) * x.ndim)


def prefill(
    model: Decoder, ids: jax.Array, lengths: jax.Array, cache: KVCache, chunk: int | None = None,
) -> tuple[KVCache, jax.Array]:
    """Writes every prompt token but the last into an empty cache (traced code).

    Args:
      model: the decoder (either layout; ``cache`` made for it).
      ids: int32 [batch, prompt_len], right-padded prompts; lengths: int32 [batch] (>= 1).
      cache: an empty ``KVCache`` of ``batch`` rows with room for the prompt and the budget.
      chunk: static; prompts longer than this many tokens are prefilled ``chunk`` tokens at a
        time in a loop (chunked prefill): each chunk's queries attend over the cache with the
        flash kernel, so activations are those of ``chunk`` tokens whatever the prompt length.
        None: one forward over the whole prompt with the model's attention backend.

    Returns:
      (cache, last): the cache holding ``lengths - 1`` tokens per row, and int32 [batch] the
      last prompt token of each row (fed by the first decode step).
    """
    with jax.named_scope("prefill"):
        valid = jnp.arange(ids.shape[1], dtype=jnp.int32)[None] < (lengths - 1)[:, None]
        last = jnp.take_along_axis(ids, (lengths - 1)[:, None], axis=1)[:, 0]
        if chunk is None or ids.shape[1] <= chunk:
            _, cache = model.forward_with_cache(ids, cache, valid=valid, prefill=True)
            return cache, last
        # A padded tail is invalid (written past each row's length, or dropped past the cache).
        pad = -ids.shape[1] % chunk
        ids, valid = jnp.pad(ids, ((0, 0), (0, pad))), jnp.pad(valid, ((0, 0), (0, pad)))

        def one_chunk(index: jax.Array, cache: KVCache) -> KVCache:
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, index * chunk, chunk, axis=1)  # noqa: E731
            _, cache = model.forward_with_cache(take(ids), cache, valid=take(valid), flash_over_cache=True)
            return cache

        cache = jax.lax.fori_loop(0, ids.shape[1] // chunk, one_chunk, cache)
    return cache, last


def decode(
    model: Decoder,
    state: DecodeState,
    stop_ids: jax.Array,
    limit: jax.Array,
    values: jax.Array,
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    logprob_mode: LogprobMode,
) -> DecodeState:
    """Decodes until ``state.step == limit`` or every row is done (traced code).

    Args:
      model: the decoder the cache was made for.
      state: the loop state (``done`` rows are skipped: they write nothing and do not count).
      stop_ids: int32 [rows, S], -1 padded; a row that draws one of its ids is done (the id is
        kept as its last token).
      limit: int32 scalar, at most the budget; values: fp32 [3] sampling values
        (``SamplingConfig.dynamic_values``); greedy, top_k, use_top_p, logprob_mode: static
        sampling settings (``select_tokens``).

    Returns:
      The state after the last step run.
    """
    budget = state.tokens.shape[1]
    rows = jnp.arange(state.tokens.shape[0])

    def cond(state: DecodeState) -> jax.Array:
        return (state.step < limit) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        with jax.named_scope("decode_step"):
            logits, cache = model.forward_with_cache(state.last[:, None], state.cache)
        with jax.named_scope("sampling"):
            new_tokens, logprobs = select_tokens(
                logits[:, 0], jax.vmap(jax.random.fold_in)(state.keys, state.counts), values,
                greedy=greedy, top_k=top_k, use_top_p=use_top_p, logprob_mode=logprob_mode)
        position = jnp.where(state.done, budget, state.counts)  # out of range: dropped
        return DecodeState(
            step=state.step + 1, cache=cache, last=new_tokens,
            done=state.done | jnp.any(new_tokens[:, None] == stop_ids, axis=-1),
            keys=state.keys,
            tokens=state.tokens.at[rows, position].set(new_tokens, mode="drop"),
            logprobs=state.logprobs.at[rows, position].set(logprobs, mode="drop"),
            counts=state.counts + (~state.done).astype(jnp.int32),
        )

    return jax.lax.while_loop(cond, body, state)


def stop_string_cut(tokens: Sequence[int], stop_strings: Sequence[str], detokenize: Detokenize) -> int | None:
    """How many leading ``tokens`` a completion keeps when its text holds a stop string.

    Let ``k`` be the fewest leading tokens whose text ``detokenize(tokens[:k])`` contains a stop
    string, and ``p`` the start of the earliest stop string in that text. The completion keeps
    the longest ``tokens[:j]`` (``j < k``) whose text is a prefix of ``text[:p]``: the token that
    straddles the start of the stop string (its text begins before ``p`` and reaches past it) is
    dropped with everything after it. So the kept text never contains a stop string, equals
    ``detokenize`` of the kept tokens, and may lack the straddling token's characters before
    ``p``.

    Args:
      tokens: the generated ids so far.
      stop_strings: non-empty strings.
      detokenize: ids -> text; assumed monotone (a stop string in the text of a prefix is also
        in the text of every longer prefix), as for the usual tokenizers.

    Returns:
      ``j``, or None when the text of all ``tokens`` contains no stop string.
    """
    tokens = list(tokens)

    def holds_stop(count: int) -> bool:
        text = detokenize(tokens[:count])
        return any(stop in text for stop in stop_strings)

    if not holds_stop(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if holds_stop(middle):
            high = middle
        else:
            low = middle + 1
    text = detokenize(tokens[:low])
    before = text[: min(text.find(stop) for stop in stop_strings if stop in text)]
    kept = low - 1
    while kept > 0 and not before.startswith(detokenize(tokens[:kept])):
        kept -= 1
    return kept


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
        raise ValueError(f"{len(seeds)} seeds for {count} results (prompts x num_samples)")
    return [int(s) % 2**32 for s in seeds]


def _bucket(value: int, buckets: Sequence[int], what: str) -> int:
    for bucket in buckets:
        if value <= bucket:
            return bucket
    raise ValueError(f"{what} {value} exceeds the largest bucket {buckets[-1]}")


def _per_prompt(values: Sequence, count: int, what: str, is_item: Callable[[object], bool]) -> list[list]:
    """``values`` as one list per prompt: a flat list of items is shared by all prompts."""
    if all(is_item(v) for v in values):
        return [list(values)] * count
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} lists for {count} prompts")
    return [list(row) for row in values]


class GenerationEngine:
    """Compiled, batched, optionally sharded generation for a ``Decoder``.

    Args:
      model: the decoder. The engine keeps its own per-layer copy of the parameters
        (``unstack_layers``, on CPU also ``pad_features``; unless ``stacked_layers``), placed on
        ``mesh`` when one is given;
        drop other references to ``model`` to free the stacked ones. An abstract model
        (``abstract_model``) gives an engine that can only ``compile`` (memory checks). In a
        multi-process run, every process passes the same model: already placed on ``mesh``, or
        built identically and not committed to a device (e.g. ``create_model``).
      mesh: device mesh over ``glmjax.sharding.MESH_AXES``; None runs on the model's devices.
      rules: logical axis rules for the mesh (default: the active rules).
      max_batch_size: rows per call of a compiled program; larger requests run in chunks of this
        size (with ``num_samples=K``, chunks of ``max(1, max_batch_size // K)`` prompts, i.e. at
        most ``max(max_batch_size, K)`` rows). Batches are padded to powers of two.
      length_buckets: allowed padded lengths for prompts and for new-token budgets, ascending
        (default: powers of two from 16 to the model's ``max_position_embeddings``).
      logprob_mode: default log-probability mode, "processed", "raw" or "scaled"
        (``glmjax.inference.sampling``); ``generate`` may override it per call.
      cache_dtype: KV cache dtype (default: the model's compute dtype).
      stacked_layers: keep the model's stacked layer weights (scanned layers, one stacked KV
        cache) instead of the per-layer layout: no copy of the weights, slower decode on CPU.
      prefill_chunk: prefill prompts longer than this many tokens in chunks of it (``prefill``):
        bounded activation memory for long prompts; the chunks' attention is exact (the flash
        kernel over the cache), so ``attention_backend="sample"`` applies only to prompts that
        fit in one chunk. None: one forward per prompt with the model's backend.
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
        prefill_chunk: int | None = None,
    ) -> None:
        _check_logprob_mode(logprob_mode)
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
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
        with self._context():
            self._on_cpu = current_platform() == "cpu"
        self._compiler_options = (_CPU_UNTIED_COMPILER_OPTIONS
                                  if self._on_cpu and not self.config.tie_word_embeddings else None)
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
        """The inference layout of ``model`` split into (graphdef, state), the state on the mesh
        (``ShapeDtypeStruct``s with shardings for an abstract model): per layer (on CPU with
        ``pad_features``), or the model's own stacked layout with ``stacked_layers``."""
        if self.stacked_layers:
            layout = model
        elif self._on_cpu:
            layout = pad_features(unstack_layers(model))
        else:
            layout = unstack_layers(model)
        graphdef, state = nnx.split(layout)
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
        *,
        num_samples: int = 1,
        stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
        detokenize: Detokenize | None = None,
        stop_check_every: int = 16,
        logprob_mode: LogprobMode | None = None,
    ) -> list[GenerationResult]:
        """Generates ``num_samples`` completions for every prompt.

        Args:
          prompts: token ids, one non-empty list per prompt (lengths may differ).
          sampling: token selection (greedy by default).
          max_new_tokens: budget per completion, including a final stop token.
          stop_token_ids: ids that end a completion: one list for all prompts, or one per prompt.
          seed: PRNG seeds, one per result (``len(prompts) * num_samples``), or an int ``s``
            meaning ``s + index`` for result ``index`` (sample ``j`` of prompt ``i`` is result
            ``i * num_samples + j``). A result's draws depend only on its own seed, not on the
            rest of the batch nor on how it was batched (up to floating-point differences
            between batch shapes): K samples of a prompt draw what K copies of the prompt with
            the same seeds draw.
          num_samples: completions per prompt (K). Each prompt is prefilled once and its KV
            cache copied to K rows.
          stop_strings: text that ends a completion, one list for all prompts or one per prompt;
            needs ``detokenize``. Found by the host between decode calls of at most
            ``stop_check_every`` steps; tokens, log-probs and text are cut by
            ``stop_string_cut`` and the finish reason is "stop".
          detokenize: ids -> text, used for stop strings and ``GenerationResult.text``.
          stop_check_every: decode steps between stop-string checks (runtime data; more steps
            mean fewer host round trips but up to that many wasted steps per stopped row).
          logprob_mode: "processed", "raw" or "scaled" for this call (default: the engine's).

        Returns:
          ``len(prompts) * num_samples`` results, prompt-major (all samples of prompt 0 first).
          In a multi-process run every process returns the same full list.

        Raises:
          ValueError: naming the prompt index for an empty prompt, an id outside the vocabulary,
            or a prompt longer than the largest length bucket; a budget beyond that bucket; stop
            strings without ``detokenize`` or an empty stop string; seeds or per-prompt lists of
            the wrong length.
        """
        if self.abstract:
            raise ValueError("this engine was built on an abstract model (no parameter values): "
                             "it can only compile()")
        if not 1 <= max_new_tokens <= self.length_buckets[-1]:
            raise ValueError(f"max_new_tokens must be in [1, {self.length_buckets[-1]}] (the largest "
                             f"length bucket), got {max_new_tokens}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
        logprob_mode = self.logprob_mode if logprob_mode is None else logprob_mode
        _check_logprob_mode(logprob_mode)
        prompts = [list(p) for p in prompts]
        stops = _per_prompt(stop_token_ids, len(prompts), "stop_token_ids",
                            lambda s: isinstance(s, (int, np.integer)))
        stops = [[int(s) for s in row] for row in stops]
        texts = _per_prompt(stop_strings, len(prompts), "stop_strings", lambda s: isinstance(s, str))
        if any(texts) and detokenize is None:
            raise ValueError("stop_strings need a detokenize function (token ids -> text)")
        if any(text == "" for row in texts for text in row):
            raise ValueError("stop_strings must not contain the empty string")
        seeds = _seed_list(seed, len(prompts) * num_samples)
        self._check_prompts(prompts)
        request = _Request(sampling, max_new_tokens, num_samples, logprob_mode, detokenize, stop_check_every)
        results: list[GenerationResult] = []
        per_chunk = max(1, self.max_batch_size // num_samples)
        for start in range(0, len(prompts), per_chunk):
            end = start + per_chunk
            results.extend(self._generate_chunk(
                request, prompts[start:end], stops[start:end], texts[start:end],
                seeds[start * num_samples:end * num_samples]))
        return results

    def compile(
        self,
        batch: int,
        prompt_len: int,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        num_stop_ids: int = 4,
        num_samples: int = 1,
    ) -> jax.stages.Compiled:
        """Compiles, without running, the program ``generate`` would use for these shapes
        (without stop strings).

        Args:
          batch, prompt_len, max_new_tokens: sizes before bucketing (as ``generate`` sees them);
            ``batch`` counts prompts.
          sampling: its static part (greedy, top-k, top-p on/off) selects the program.
          num_stop_ids: stop ids per row.
          num_samples: completions per prompt.

        Returns:
          The compiled program (``memory_analysis()`` gives bytes per device).
        """
        key = self._program_key("generate", batch, num_samples, prompt_len, max_new_tokens,
                                num_stop_ids, sampling, self.logprob_mode)
        with self._context():
            return self._program_for(key).lower(
                self._state,
                jax.ShapeDtypeStruct((key.batch, key.prompt_len), jnp.int32),
                jax.ShapeDtypeStruct((key.batch,), jnp.int32),
                jax.ShapeDtypeStruct((key.rows, key.num_stop), jnp.int32),
                jax.ShapeDtypeStruct((key.rows,), jnp.bool_),
                jax.ShapeDtypeStruct((), jnp.int32),
                jax.ShapeDtypeStruct((3,), jnp.float32),
                jax.ShapeDtypeStruct((key.rows,), jnp.uint32),
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
        """Distinct programs held (one per shape/sampling bucket and program part used)."""
        return len(self._programs)

    # -- checks -----------------------------------------------------------------------------

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

    def _put(self, array: np.ndarray) -> np.ndarray | jax.Array:
        """A host input as the programs take it: replicated over the mesh (built from every
        process's identical copy, without a cross-process check), or as is without a mesh."""
        if self.mesh is None:
            return array
        return jax.make_array_from_callback(array.shape, NamedSharding(self.mesh, PartitionSpec()),
                                            lambda index: array[index])

    def _generate_chunk(
        self,
        request: _Request,
        prompts: list[list[int]],
        stops: list[list[int]],
        stop_strings: list[list[str]],
        seeds: list[int],
    ) -> list[GenerationResult]:
        samples = request.num_samples
        chunked = any(stop_strings)
        key = self._program_key("prefill" if chunked else "generate", len(prompts), samples,
                                max(len(p) for p in prompts), request.max_new_tokens,
                                max(len(s) for s in stops), request.sampling, request.logprob_mode)
        ids = np.zeros((key.batch, key.prompt_len), np.int32)
        lengths = np.ones((key.batch,), np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            lengths[row] = len(prompt)
        rows = len(prompts) * samples
        row_stops = [stop for stop in stops for _ in range(samples)]
        stop_ids = np.full((key.rows, key.num_stop), -1, np.int32)
        for row, stop in enumerate(row_stops):
            stop_ids[row, : len(stop)] = stop
        row_seeds = np.zeros((key.rows,), np.uint32)
        row_seeds[:rows] = seeds
        active = np.arange(key.rows) < rows
        values = np.asarray(request.sampling.dynamic_values())
        with self._context():
            ids, lengths, stop_ids, active, row_seeds, values = (
                self._put(x) for x in (ids, lengths, stop_ids, active, row_seeds, values))
            if chunked:
                row_texts = [texts for texts in stop_strings for _ in range(samples)]
                tokens, logprobs, counts, cuts = self._decode_with_stop_strings(
                    key, request, (ids, lengths, active, row_seeds), stop_ids, values, row_texts, rows)
            else:
                out = self._program_for(key)(self._state, ids, lengths, stop_ids, active,
                                             self._put(np.int32(request.max_new_tokens)), values, row_seeds)
                tokens, logprobs, counts = (np.asarray(x) for x in out)
                cuts = {}
        results = []
        for row in range(rows):
            count = int(cuts.get(row, counts[row]))
            row_tokens = tokens[row, :count].tolist()
            stopped = row in cuts or (count > 0 and row_tokens[-1] in row_stops[row])
            text = None if request.detokenize is None else request.detokenize(row_tokens)
            results.append(GenerationResult(row_tokens, logprobs[row, :count].tolist(),
                                            "stop" if stopped else "length", text))
        return results

    def _decode_with_stop_strings(
        self,
        key: _ProgramKey,
        request: _Request,
        prefill_args: tuple[jax.Array, ...],
        stop_ids: jax.Array,
        values: jax.Array,
        stop_strings: list[list[str]],
        rows: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
        """Prefill, then decode calls of at most ``stop_check_every`` steps with a host check
        for stop strings between them. Runs under the engine's context.

        Returns:
          (tokens [R, budget], logprobs [R, budget], counts [R], cuts): ``cuts`` maps each row
          that hit a stop string to the number of tokens it keeps.
        """
        state = self._program_for(key)(self._state, *prefill_args)
        step_program = self._program_for(dataclasses.replace(key, part="decode"))
        finished = np.zeros((key.rows,), bool)
        checked = np.zeros((key.rows,), np.int32)
        cuts: dict[int, int] = {}
        step = 0
        while True:
            limit = min(step + request.stop_check_every, request.max_new_tokens)
            state = step_program(self._state, state, stop_ids, self._put(finished),
                                 self._put(np.int32(limit)), values)
            tokens, counts, done = (np.asarray(x) for x in (state.tokens, state.counts, state.done))
            step = int(state.step)
            for row in range(rows):
                if finished[row] or counts[row] == checked[row]:
                    continue
                checked[row] = counts[row]
                cut = stop_string_cut(tokens[row, : counts[row]].tolist(), stop_strings[row],
                                      request.detokenize)
                if cut is not None:
                    cuts[row] = cut
                    finished[row] = True
            if step >= request.max_new_tokens or np.all(done | finished):
                return tokens, np.asarray(state.logprobs), counts, cuts

    def _program_key(self, part: str, prompts: int, num_samples: int, prompt_len: int,
                     max_new_tokens: int, num_stop: int, sampling: SamplingConfig,
                     logprob_mode: LogprobMode) -> _ProgramKey:
        return _ProgramKey(
            part=part,
            batch=_bucket(prompts, self.batch_buckets, "batch"),
            num_samples=num_samples,
            prompt_len=_bucket(prompt_len, self.length_buckets, "prompt length"),
            budget=_bucket(max_new_tokens, self.length_buckets, "max_new_tokens"),
            num_stop=max(4, 1 << max(0, num_stop - 1).bit_length()),
            sampling=sampling.static_key(),
            logprob_mode=logprob_mode,
        )

    def _program_for(self, key: _ProgramKey) -> Callable:
        if key not in self._programs:
            self._programs[key] = self._build_program(key)
        return self._programs[key]

    def _build_program(self, key: _ProgramKey) -> Callable:
        """The jitted program for ``key.part``:

        * "generate": (state, ids [B, P], lengths [B], stop_ids [R, S], active [R], max_new,
          values [3], seeds [R]) -> (tokens [R, budget], logprobs [R, budget], counts [R]),
          replicated; R = B * num_samples rows, prompt-major; entries past a count are 0.
        * "prefill": (state, ids, lengths, active, seeds) -> ``DecodeState`` after the prefill.
        * "decode": (state, decode_state (donated), stop_ids, finished [R], limit, values) ->
          ``DecodeState`` after decoding to step ``limit``; rows marked ``finished`` stop first.
          Its tokens, logprobs, counts, done and step come back replicated.
        """
        graphdef, config = self._graphdef, self.config
        greedy, top_k, use_top_p = key.sampling
        cache_dtype, stacked, samples = self.cache_dtype, self.stacked_layers, key.num_samples
        sampling = dict(greedy=greedy, top_k=top_k, use_top_p=use_top_p, logprob_mode=key.logprob_mode)

        def start(model: Decoder, ids, lengths, active, seeds) -> DecodeState:
            cache = KVCache.create(config, key.batch, key.prompt_len + key.budget, cache_dtype,
                                   stacked=stacked)
            cache, last = prefill(model, ids, lengths, cache, self.prefill_chunk)
            if samples > 1:
                cache, last = cache.repeat_rows(samples), jnp.repeat(last, samples)
            return DecodeState(
                step=jnp.int32(0), cache=cache, last=last, done=~active,
                keys=jax.vmap(jax.random.key)(seeds),
                tokens=jnp.zeros((key.rows, key.budget), jnp.int32),
                logprobs=jnp.zeros((key.rows, key.budget), jnp.float32),
                counts=jnp.zeros((key.rows,), jnp.int32),
            )

        def run_generate(state, ids, lengths, stop_ids, active, max_new, values, seeds):
            self.trace_count += 1
            model = nnx.merge(graphdef, state)
            decoded = decode(model, start(model, ids, lengths, active, seeds), stop_ids, max_new, values,
                             **sampling)
            return tuple(_replicated(x) for x in (decoded.tokens, decoded.logprobs, decoded.counts))

        def run_prefill(state, ids, lengths, active, seeds):
            self.trace_count += 1
            return start(nnx.merge(graphdef, state), ids, lengths, active, seeds)

        def run_decode(state, decode_state: DecodeState, stop_ids, finished, limit, values):
            self.trace_count += 1
            decode_state = dataclasses.replace(decode_state, done=decode_state.done | finished)
            decoded = decode(nnx.merge(graphdef, state), decode_state, stop_ids, limit, values, **sampling)
            return dataclasses.replace(
                decoded, step=_replicated(decoded.step), done=_replicated(decoded.done),
                tokens=_replicated(decoded.tokens), logprobs=_replicated(decoded.logprobs),
                counts=_replicated(decoded.counts))

        options = self._compiler_options
        if key.part == "generate":
            return jax.jit(run_generate, compiler_options=options)
        if key.part == "prefill":
            return jax.jit(run_prefill, compiler_options=options)
        return jax.jit(run_decode, donate_argnums=1, compiler_options=options)


@dataclasses.dataclass(frozen=True)
class _Request:
    """The per-call settings of one ``generate`` call."""

    sampling: SamplingConfig
    max_new_tokens: int
    num_samples: int
    logprob_mode: LogprobMode
    detokenize: Detokenize | None
    stop_check_every: int


def _check_logprob_mode(mode: str) -> None:
    if mode not in LOGPROB_MODES:
        raise ValueError(f"logprob_mode must be one of {', '.join(LOGPROB_MODES)}; got {mode!r}")
