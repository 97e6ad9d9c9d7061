"""Continuous batching over a fixed set of decode slots, on a ``GenerationEngine``'s model.

A :class:`ContinuousScheduler` owns ``max_slots`` decode rows: one KV cache of ``max_slots`` rows x
``max_len`` positions that stays on the device between calls (donated through every program).
A scheduler thread repeats:

1. **admit**: waiting requests (FIFO) whose samples fit in the free slots are prefilled, up to
   ``max_prefill_batch`` prompts per program call (``glmjax.inference.engine.prefill`` into a
   small cache of the prompt's length bucket), and the prefilled rows are copied into their slots;
   a request with ``n`` samples is prefilled once and its rows copied to ``n`` slots.
2. **decode**: one compiled program runs up to ``decode_chunk`` steps over all slots. Every row has
   its own sampling settings (temperature, top-k, top-p, min-p, greedy or not), seed, token budget
   and stop ids, all runtime data, so requests of any settings share the batch. When requests are
   waiting, the program returns as soon as any row finishes, so its slot is refilled at once.
3. **finish**: new tokens go to their requests (streamed text is committed only where no stop
   string can still begin), stop strings are checked on the host (the text is cut exactly before
   the earliest one, as OpenAI's ``stop``), and a row that stopped (stop id, stop string, token
   budget, cancelled request) frees its slot for the next iteration.

No request waits for another's slowest row: each row leaves the batch when it is done. With
``batching="static"`` a new batch is admitted only when every slot is free (the classic static
batching, for comparisons in one process).

Compiled shapes are fixed: one decode program, one admission program per (prompt bucket, prefill
batch bucket); nothing recompiles per request. A row's n-th token is drawn with
``fold_in(key(seed), n)`` from the same per-row selection as the engine's (``select_tokens``
semantics per row), so a request sampled here with seed ``s`` draws what
``GenerationEngine.generate(..., seed=s)`` draws (up to floating-point differences between batch
shapes).

Multi-process (a mesh spanning ``jax.distributed`` processes): process 0 schedules; before each
program call it broadcasts the call's inputs (``multihost_utils.broadcast_one_to_all``), and every
other process runs :meth:`SlotPrograms.follow`, making the same calls in the same order.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from glmjax import sharding as sharding_lib
from glmjax.inference.engine import (
    GenerationEngine,
    power_of_two_buckets,
    prefill,
    stop_string_cut,
)
from glmjax.inference.sampling import (
    LOGPROB_MODES,
    LogprobMode,
    SamplingConfig,
    first_argmax,
    process_logits,
    token_logprobs,
)
from glmjax.models.decoder import Decoder, KVCache

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's ``top_logprobs`` limit)."""
MAX_STOP_IDS = 8
"""Most stop token ids per request."""
TOP_K_LIMIT = 256
"""Largest per-request ``top_k`` (the decode program takes the top ``TOP_K_LIMIT`` once per step
when any row filters by top-k)."""

Batching = Literal["continuous", "static"]
FinishReason = Literal["stop", "length"]
Detokenize = Callable[[list[int]], str]

_OP_STOP, _OP_ADMIT, _OP_DECODE, _OP_IDLE = 0, 1, 2, 3
_IDLE_BROADCAST_S = 10.0
"""How often an idle multi-process leader tells its followers it is alive (a collective that
waits too long may time out)."""


class SchedulerBusy(RuntimeError):
    """The waiting queue is full; retry later."""


class SchedulerClosed(RuntimeError):
    """The scheduler is shut down, or stopped on an error."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete ``len(seeds)`` times.

    Attributes:
      prompt: token ids (non-empty).
      max_tokens: new tokens per completion at most (a final stop id included).
      sampling: token selection (``temperature == 0`` is greedy).
      seeds: one PRNG seed per completion (sample ``j`` draws with ``seeds[j]``).
      stop_token_ids: ids that end a completion (kept as its last token).
      stop_strings: text that ends a completion; its text is cut before the earliest one.
      top_logprobs: alternatives (id, log-prob) reported per token, 0 to ``MAX_TOP_LOGPROBS``.
      stream: deliver :class:`ChoiceDelta` events while generating.
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    seeds: Sequence[int] = (0,)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    top_logprobs: int = 0
    stream: bool = False

    @property
    def n(self) -> int:
        """Completions asked for."""
        return len(self.seeds)


@dataclasses.dataclass(frozen=True)
class ChoiceDelta:
    """Newly committed output of completion ``index`` (streaming): ``text`` is the text of
    ``tokens``, which will not be cut by a stop string any more."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


@dataclasses.dataclass(frozen=True)
class ChoiceResult:
    """Completion ``index`` of a request, finished.

    Attributes:
      tokens: generated ids; a stop id that ended it is included (last).
      text: the text of ``tokens`` without that stop id; when a stop string ended it, the text
        before the earliest stop string (``tokens`` then end with the token that completed it).
      logprobs: one per token, in the scheduler's ``logprob_mode``.
      top_logprobs: per token, the request's ``top_logprobs`` most likely (id, log-prob) pairs.
      finish_reason: "stop" (stop id or stop string) or "length" (``max_tokens`` reached).
    """

    index: int
    tokens: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: FinishReason


@dataclasses.dataclass(frozen=True)
class RequestFailed:
    """The request cannot complete (the scheduler stopped); no further events follow."""

    message: str


Event = ChoiceDelta | ChoiceResult | RequestFailed


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """The device state of all slots (donated through every program).

    Attributes:
      cache: KV cache of ``max_slots`` rows x ``max_len``; each row holds its prompt and generated
        tokens but ``last``.
      last: int32 [slots]; the token each row feeds next.
      done: bool [slots]; rows that stopped or are free (they run but neither count nor report).
      keys: PRNG keys [slots]; a row's n-th token is drawn with ``fold_in(keys[row], n)``.
      counts: int32 [slots]; tokens generated per row.
    """

    cache: KVCache
    last: jax.Array
    done: jax.Array
    keys: jax.Array
    counts: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSettings:
    """Per-row decode settings, fp32/int32/bool [slots] (stop_ids [slots, MAX_STOP_IDS], -1
    padded)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    greedy: jax.Array
    max_tokens: jax.Array
    stop_ids: jax.Array
    wants_top: jax.Array


def select_rows(
    logits: jax.Array, keys: jax.Array, rows: RowSettings, *, logprob_mode: LogprobMode,
    top_k_limit: int, top_logprobs: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Next tokens with per-row settings (traced code): per row what ``select_tokens`` picks with
    that row's ``SamplingConfig``.

    Top-k keeps the tokens at least as likely as the row's k-th (ties kept) before the
    temperature, which selects the same tokens as after it; the nucleus applies to the rows with
    ``top_p < 1`` only. Work nobody needs is skipped at run
    time (``lax.cond`` on the whole batch): the sampling path when every row is greedy, top-k
    and top-p when no row uses them, the alternatives when no row wants them.

    Args:
      logits: [rows, vocab]; keys: PRNG keys [rows] for this step.
      rows: the settings; logprob_mode: as ``glmjax.inference.sampling`` (greedy rows always
        report the raw log-softmax); top_k_limit: static, >= every row's top_k.
      top_logprobs: static number of alternatives computed per row.

    Returns:
      (tokens int32 [rows], logprobs fp32 [rows], top ids int32 [rows, top_logprobs], top
      log-probs fp32 [rows, top_logprobs]).
    """
    raw = logits.astype(jnp.float32)
    greedy_tokens = first_argmax(raw)
    temperature = jnp.where(rows.greedy, 1.0, rows.temperature)
    values = jnp.stack([temperature, rows.top_p, rows.min_p], axis=1)

    def sampled(use_top_p: bool) -> Callable[[], tuple[jax.Array, jax.Array]]:
        def run() -> tuple[jax.Array, jax.Array]:
            filtered = jax.lax.cond(jnp.any(rows.top_k > 0), lambda: _top_k_filter(raw, rows.top_k, top_k_limit),
                                    lambda: raw)

            def process(nucleus: bool) -> jax.Array:
                return jax.vmap(lambda row, value: process_logits(
                    row[None], value, top_k=0, use_top_p=nucleus)[0])(filtered, values)

            processed = process(False)
            if use_top_p:  # only the rows with top_p < 1 take the nucleus (as the engine's programs)
                processed = jnp.where((rows.top_p < 1.0)[:, None], process(True), processed)
            gumbel = jax.vmap(lambda key: jax.random.gumbel(key, raw.shape[-1:]))(keys)
            tokens = first_argmax(processed + gumbel)
            if logprob_mode == "processed":
                return tokens, processed
            return tokens, raw / temperature[:, None] if logprob_mode == "scaled" else raw
        return run

    use_top_p = jnp.any(~rows.greedy & (rows.top_p < 1.0))
    tokens, scored = jax.lax.cond(
        jnp.all(rows.greedy), lambda: (greedy_tokens, raw),
        lambda: jax.lax.cond(use_top_p, sampled(True), sampled(False)))
    tokens = jnp.where(rows.greedy, greedy_tokens, tokens)
    scored = jnp.where(rows.greedy[:, None], raw, scored)

    def alternatives() -> tuple[jax.Array, jax.Array]:
        values, ids = jax.lax.top_k(scored, top_logprobs)
        return ids, values - jax.nn.logsumexp(scored, axis=-1, keepdims=True)

    top_ids, top_values = jax.lax.cond(
        jnp.any(rows.wants_top), alternatives,
        lambda: (jnp.zeros((raw.shape[0], top_logprobs), jnp.int32),
                 jnp.zeros((raw.shape[0], top_logprobs), jnp.float32)))
    return tokens, token_logprobs(scored, tokens), top_ids, top_values


def _top_k_filter(logits: jax.Array, top_k: jax.Array, limit: int) -> jax.Array:
    """``logits`` with every token less likely than the row's ``top_k``-th set to -inf (rows with
    ``top_k == 0`` unchanged)."""
    _, indices = jax.lax.top_k(logits, limit)
    # Read back through the indices, as sampling.process_logits does (XLA:CPU would otherwise
    # rewrite the top_k into a full sort).
    kept = jnp.take_along_axis(logits, indices, axis=-1)
    threshold = jnp.take_along_axis(kept, jnp.clip(top_k - 1, 0, limit - 1)[:, None], axis=-1)
    return jnp.where((top_k[:, None] > 0) & (logits < threshold), -jnp.inf, logits)


def _replicated(x: jax.Array) -> jax.Array:
    return sharding_lib.constrain(x, (None,) * x.ndim)


@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """What one decode call returns (host arrays).

    Attributes:
      tokens, logprobs: [slots, decode_chunk]; row r's new tokens are the first
        ``counts[r] - counts_before[r]`` entries.
      top_ids, top_logprobs: [slots, decode_chunk, min(MAX_TOP_LOGPROBS, vocab)] (filled for the
        rows that want them).
      counts: int32 [slots] after the call; done: bool [slots] after the call.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    counts: np.ndarray
    done: np.ndarray


class SlotPrograms:
    """The device side: the slot state and the compiled admit / decode programs.

    Args:
      engine: supplies the model (its placed parameters: updates through
        ``engine.update_model`` are picked up at the next call), mesh, rules and cache layout.
      max_slots: decode rows; max_len: positions per row (prompt + completion).
      decode_chunk: most decode steps per call.
      prompt_buckets: prefill lengths (ascending, the last one ``max_len``).
      max_prefill_batch: prompts prefilled per admission call at most.
      logprob_mode: "processed", "raw" or "scaled" (``glmjax.inference.sampling``).
    """

    def __init__(self, engine: GenerationEngine, *, max_slots: int, max_len: int, decode_chunk: int,
                 prompt_buckets: Sequence[int], max_prefill_batch: int, logprob_mode: LogprobMode) -> None:
        self.engine = engine
        self.max_slots = max_slots
        self.max_len = max_len
        self.decode_chunk = decode_chunk
        self.prompt_buckets = tuple(prompt_buckets)
        self.prefill_buckets = power_of_two_buckets(1, max_prefill_batch)
        self.logprob_mode = logprob_mode
        self.top_k_limit = min(TOP_K_LIMIT, engine.config.vocab_size)
        self.top_logprobs = min(MAX_TOP_LOGPROBS, engine.config.vocab_size)
        self.multiprocess = jax.process_count() > 1
        self._admit_programs: dict[tuple[int, int], Callable] = {}
        self._decode_program = jax.jit(self._decode, donate_argnums=1)
        with self._context():
            self._state = jax.jit(self._initial_state)()

    # -- host entry points ------------------------------------------------------------------

    def admit(self, ids: np.ndarray, lengths: np.ndarray, src: np.ndarray, dst: np.ndarray,
              seeds: np.ndarray) -> None:
        """Prefills ``ids`` [G, P] (right-padded, ``lengths`` [G]) and copies prefilled row
        ``src[i]`` to slot ``dst[i]`` (i < max_slots; ``dst == max_slots`` entries are unused),
        whose draws then use ``seeds[i]``."""
        inputs = {"ids": ids, "lengths": lengths, "src": src, "dst": dst, "seeds": seeds}
        if self.multiprocess:
            inputs = self._broadcast(_OP_ADMIT, ids.shape, inputs)
        self._run_admit(inputs)

    def decode(self, rows: dict[str, np.ndarray], force_done: np.ndarray, limit: int,
               exit_on_finish: bool) -> DecodeOutput:
        """Runs up to ``limit`` decode steps over all slots (rows marked ``force_done`` stop
        first); returns early when every row is done, or when a row finishes and
        ``exit_on_finish``."""
        inputs = {**rows, "force_done": force_done, "limit": np.int32(limit),
                  "exit_on_finish": np.bool_(exit_on_finish)}
        if self.multiprocess:
            inputs = self._broadcast(_OP_DECODE, (0, 0), inputs)
        return self._run_decode(inputs)

    def stop_followers(self) -> None:
        """Ends :meth:`follow` on the other processes (multi-process leader only)."""
        if self.multiprocess:
            self._broadcast(_OP_STOP, (0, 0), {})

    def keep_alive(self) -> None:
        """Tells the followers that the leader is idle, not gone (multi-process leader only)."""
        if self.multiprocess:
            self._broadcast(_OP_IDLE, (0, 0), {})

    def follow(self) -> None:
        """On a process other than 0: makes the calls process 0's scheduler makes, until it
        stops."""
        while True:
            op, batch, length = (int(x) for x in multihost_utils.broadcast_one_to_all(
                np.zeros((3,), np.int32), is_source=False))
            if op == _OP_STOP:
                return
            if op == _OP_IDLE:
                continue
            template = self._templates(op, (batch, length))
            inputs = multihost_utils.broadcast_one_to_all(template, is_source=False)
            if op == _OP_ADMIT:
                self._run_admit(inputs)
            else:
                self._run_decode(inputs)

    @property
    def num_programs(self) -> int:
        """Admission programs built (one per prompt and prefill-batch bucket) plus the decode one."""
        return len(self._admit_programs) + 1

    # -- plumbing ---------------------------------------------------------------------------

    def _broadcast(self, op: int, shape: tuple[int, int], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        multihost_utils.broadcast_one_to_all(np.asarray([op, *shape], np.int32), is_source=True)
        if op in (_OP_STOP, _OP_IDLE):
            return inputs
        return multihost_utils.broadcast_one_to_all(inputs, is_source=True)

    def _templates(self, op: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Zero arrays shaped like the inputs of ``op`` (what a follower receives into)."""
        slots = self.max_slots
        if op == _OP_ADMIT:
            return {"ids": np.zeros(shape, np.int32), "lengths": np.zeros(shape[:1], np.int32),
                    "src": np.zeros((slots,), np.int32), "dst": np.zeros((slots,), np.int32),
                    "seeds": np.zeros((slots,), np.uint32)}
        return {**empty_rows(slots), "force_done": np.zeros((slots,), bool), "limit": np.int32(0),
                "exit_on_finish": np.bool_(False)}

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.engine.mesh is not None:
            stack.enter_context(jax.set_mesh(self.engine.mesh))
        if self.engine.rules is not None:
            stack.enter_context(sharding_lib.use_rules(self.engine.rules))
        return stack

    def _put(self, array: np.ndarray) -> np.ndarray | jax.Array:
        """A host input replicated over the mesh (every process holds the same copy)."""
        if self.engine.mesh is None:
            return array
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, NamedSharding(self.engine.mesh, PartitionSpec()),
                                            lambda index: array[index])

    def _model(self, params: nnx.State) -> Decoder:
        # TODO(engine): a public GenerationEngine.graphdef would spare reading the private one.
        return nnx.merge(self.engine._graphdef, params)

    def _run_admit(self, inputs: dict[str, np.ndarray]) -> None:
        key = inputs["ids"].shape
        if key not in self._admit_programs:
            self._admit_programs[key] = jax.jit(self._admit, donate_argnums=1)
        with self._context():
            self._state = self._admit_programs[key](
                self.engine.state, self._state, *(self._put(inputs[name]) for name in
                                                  ("ids", "lengths", "src", "dst", "seeds")))

    def _run_decode(self, inputs: dict[str, np.ndarray]) -> DecodeOutput:
        rows = RowSettings(**{field.name: self._put(inputs[field.name])
                              for field in dataclasses.fields(RowSettings)})
        with self._context():
            self._state, *out = self._decode_program(
                self.engine.state, self._state, rows, self._put(inputs["force_done"]),
                self._put(inputs["limit"]), self._put(inputs["exit_on_finish"]))
        return DecodeOutput(*(np.asarray(x) for x in out))

    # -- traced programs --------------------------------------------------------------------

    def _initial_state(self) -> SlotState:
        slots = self.max_slots
        cache = KVCache.create(self.engine.config, slots, self.max_len, self.engine.cache_dtype,
                               stacked=self.engine.stacked_layers)
        return SlotState(cache=cache, last=jnp.zeros((slots,), jnp.int32), done=jnp.ones((slots,), bool),
                         keys=jax.vmap(jax.random.key)(jnp.zeros((slots,), jnp.uint32)),
                         counts=jnp.zeros((slots,), jnp.int32))

    def _admit(self, params, state: SlotState, ids, lengths, src, dst, seeds) -> SlotState:
        model = self._model(params)
        batch, prompt_len = ids.shape
        small = KVCache.create(self.engine.config, batch, prompt_len, self.engine.cache_dtype,
                               stacked=self.engine.stacked_layers)
        small, last = prefill(model, ids, lengths, small, self.engine.prefill_chunk)
        stacked = not isinstance(small.k, tuple)

        def copy(big: jax.Array, new: jax.Array) -> jax.Array:
            if stacked:
                return big.at[:, dst, :, :prompt_len].set(new[:, src], mode="drop")
            return big.at[dst, :, :prompt_len].set(new[src], mode="drop")

        def copy_layers(big, new):
            return copy(big, new) if stacked else tuple(copy(b, n) for b, n in zip(big, new))

        segments = jnp.zeros((src.shape[0], self.max_len), jnp.int32).at[:, :prompt_len].set(small.segment_ids[src])
        cache = KVCache(k=copy_layers(state.cache.k, small.k), v=copy_layers(state.cache.v, small.v),
                        segment_ids=state.cache.segment_ids.at[dst].set(segments, mode="drop"),
                        lengths=state.cache.lengths.at[dst].set(small.lengths[src], mode="drop")).constrained()
        return SlotState(
            cache=cache,
            last=state.last.at[dst].set(last[src], mode="drop"),
            done=state.done.at[dst].set(False, mode="drop"),
            keys=state.keys.at[dst].set(jax.vmap(jax.random.key)(seeds), mode="drop"),
            counts=state.counts.at[dst].set(0, mode="drop"),
        )

    def _decode(self, params, state: SlotState, rows: RowSettings, force_done, limit, exit_on_finish):
        model = self._model(params)
        slots, chunk = self.max_slots, self.decode_chunk
        select = dict(logprob_mode=self.logprob_mode, top_k_limit=self.top_k_limit,
                      top_logprobs=self.top_logprobs)
        windows = (jnp.zeros((slots, chunk), jnp.int32), jnp.zeros((slots, chunk), jnp.float32),
                   jnp.zeros((slots, chunk, self.top_logprobs), jnp.int32),
                   jnp.zeros((slots, chunk, self.top_logprobs), jnp.float32))
        state = dataclasses.replace(state, done=state.done | force_done)

        def cond(carry) -> jax.Array:
            step, state, _, finished = carry
            return (step < limit) & ~jnp.all(state.done) & ~(exit_on_finish & finished)

        def body(carry):
            step, state, windows, finished = carry
            with jax.named_scope("decode_step"):
                logits, cache = model.forward_with_cache(state.last[:, None], state.cache)
            with jax.named_scope("sampling"):
                keys = jax.vmap(jax.random.fold_in)(state.keys, state.counts)
                new = select_rows(logits[:, 0], keys, rows, **select)
            windows = tuple(window.at[:, step].set(value) for window, value in zip(windows, new))
            tokens = new[0]
            live = ~state.done
            counts = state.counts + live.astype(jnp.int32)
            stopped = live & (jnp.any(tokens[:, None] == rows.stop_ids, axis=-1) | (counts >= rows.max_tokens))
            state = SlotState(cache=cache, last=jnp.where(live, tokens, state.last), done=state.done | stopped,
                              keys=state.keys, counts=counts)
            return step + 1, state, windows, finished | jnp.any(stopped)

        _, state, windows, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), state, windows, jnp.bool_(False)))
        return (state, *(_replicated(x) for x in (*windows, state.counts, state.done)))


def empty_rows(slots: int) -> dict[str, np.ndarray]:
    """Host arrays of :class:`RowSettings` for ``slots`` free rows."""
    return {
        "temperature": np.ones((slots,), np.float32), "top_k": np.zeros((slots,), np.int32),
        "top_p": np.ones((slots,), np.float32), "min_p": np.zeros((slots,), np.float32),
        "greedy": np.ones((slots,), bool), "max_tokens": np.ones((slots,), np.int32),
        "stop_ids": np.full((slots, MAX_STOP_IDS), -1, np.int32), "wants_top": np.zeros((slots,), bool),
    }


class Submission:
    """A submitted request: :meth:`cancel` frees its slots at the next scheduler iteration."""

    def __init__(self, scheduler: ContinuousScheduler, job: _Job) -> None:
        self._scheduler = scheduler
        self._job = job

    def cancel(self) -> None:
        """Stops the request; no further events are delivered."""
        self._scheduler._cancel(self._job)


@dataclasses.dataclass(eq=False)
class _Job:
    request: GenerationRequest
    on_event: Callable[[Event], None]
    prompt: list[int]
    stop_ids: frozenset[int]
    unfinished: int
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _Choice:
    """One completion being generated in a slot."""

    job: _Job
    index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    committed: int = 0
    """Leading tokens already delivered as :class:`ChoiceDelta` text (streaming)."""
    sent_text: str = ""


class ContinuousScheduler:
    """Serves :class:`GenerationRequest` s with continuous batching (module docstring).

    Args:
      engine: the model to serve (``GenerationEngine``; its compiled programs are not used).
      detokenize: token ids -> text (stop strings, streamed and final text); called from the
        scheduler thread.
      max_slots: decode rows (concurrent completions).
      max_len: positions per row, prompt + completion (default: the model's
        ``max_position_embeddings``).
      decode_chunk: decode steps per program call at most (stop strings and streaming are
        handled between calls).
      max_prefill_batch: prompts prefilled together at most.
      max_waiting: requests waiting for slots at most; :meth:`submit` raises
        :class:`SchedulerBusy` beyond that.
      batching: "continuous", or "static" (admit only into an idle batch).
      logprob_mode: the log-probabilities reported ("processed", "raw" or "scaled").

    Call :meth:`start` before submitting and :meth:`close` at the end (or use ``with``).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        detokenize: Detokenize,
        *,
        max_slots: int = 16,
        max_len: int | None = None,
        decode_chunk: int = 8,
        max_prefill_batch: int = 4,
        max_waiting: int = 256,
        batching: Batching = "continuous",
        logprob_mode: LogprobMode = "raw",
    ) -> None:
        max_len = engine.config.max_position_embeddings if max_len is None else max_len
        if max_slots < 1 or max_len < 2 or decode_chunk < 1 or max_prefill_batch < 1 or max_waiting < 1:
            raise ValueError("max_slots, decode_chunk, max_prefill_batch and max_waiting must be >= 1 "
                             f"and max_len >= 2; got {max_slots}, {decode_chunk}, {max_prefill_batch}, "
                             f"{max_waiting}, {max_len}")
        if logprob_mode not in LOGPROB_MODES:
            raise ValueError(f"logprob_mode must be one of {', '.join(LOGPROB_MODES)}; got {logprob_mode!r}")
        self.batching = batching
        self.detokenize = detokenize
        self.max_waiting = max_waiting
        self.max_prefill_batch = max_prefill_batch
        buckets = [b for b in power_of_two_buckets(16, max_len) if b < max_len] + [max_len]
        self.programs = SlotPrograms(engine, max_slots=max_slots, max_len=max_len, decode_chunk=decode_chunk,
                                     prompt_buckets=buckets, max_prefill_batch=max_prefill_batch,
                                     logprob_mode=logprob_mode)
        self.vocab_size = engine.config.vocab_size
        self._rows = empty_rows(max_slots)
        self._force_done = np.zeros((max_slots,), bool)
        self._slots: list[_Choice | None] = [None] * max_slots
        self._waiting: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="glmjax-scheduler", daemon=True)
        self.steps = 0
        """Decode steps run so far (all slots step together)."""

    # -- public -----------------------------------------------------------------------------

    @property
    def max_slots(self) -> int:
        return self.programs.max_slots

    @property
    def max_len(self) -> int:
        """Positions per slot: prompt + completion tokens of one request at most."""
        return self.programs.max_len

    @property
    def error(self) -> BaseException | None:
        """What stopped the scheduler thread, if it failed."""
        return self._error

    def stats(self) -> dict[str, int | str | bool]:
        """Occupied slots, waiting requests, steps run, batching mode, whether it is running."""
        with self._lock:
            return {"slots": self.max_slots, "active": sum(s is not None for s in self._slots),
                    "waiting": len(self._waiting), "steps": self.steps, "batching": self.batching,
                    "running": self._thread.is_alive() and self._error is None}

    def start(self) -> ContinuousScheduler:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops the thread; requests still waiting or running get :class:`RequestFailed`."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.programs.stop_followers()

    def __enter__(self) -> ContinuousScheduler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check(self, request: GenerationRequest) -> None:
        """Raises ValueError (one line) when ``request`` cannot be served by this scheduler."""
        prompt = list(request.prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(prompt) + request.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({request.max_tokens}) "
                             f"exceed the context of {self.max_len} tokens")
        if not 1 <= request.n <= self.max_slots:
            raise ValueError(f"n must be in [1, {self.max_slots}] (the server's slots), got {request.n}")
        if len(set(request.stop_token_ids)) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(set(request.stop_token_ids))}")
        if request.sampling.top_k > self.programs.top_k_limit:
            raise ValueError(f"top_k must be <= {self.programs.top_k_limit}, got {request.sampling.top_k}")
        if not 0 <= request.top_logprobs <= self.programs.top_logprobs:
            raise ValueError(f"top_logprobs must be in [0, {self.programs.top_logprobs}], "
                             f"got {request.top_logprobs}")
        if any(not stop for stop in request.stop_strings):
            raise ValueError("stop strings must not be empty")

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Submission:
        """Queues ``request``; ``on_event`` gets its events from the scheduler thread: for every
        completion, :class:`ChoiceDelta` s (streaming) then one :class:`ChoiceResult`; or one
        :class:`RequestFailed`.

        Raises:
          ValueError: the request does not fit (:meth:`check`).
          SchedulerBusy: ``max_waiting`` requests are already waiting.
          SchedulerClosed: the scheduler is not running.
        """
        self.check(request)
        job = _Job(request, on_event, list(request.prompt), frozenset(request.stop_token_ids), request.n)
        with self._lock:
            if self._closing or self._error is not None or not self._thread.is_alive():
                raise SchedulerClosed("the generation scheduler is not running"
                                      + (f" (it failed: {self._error})" if self._error else ""))
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerBusy(f"{len(self._waiting)} requests are waiting (the limit); retry later")
            self._waiting.append(job)
            self._wake.notify_all()
        return Submission(self, job)

    def generate(self, request: GenerationRequest) -> list[ChoiceResult]:
        """Submits ``request`` and waits for its completions (index order).

        Raises:
          as :meth:`submit`, and SchedulerClosed when the scheduler stops before it finishes.
        """
        results: dict[int, ChoiceResult] = {}
        finished = threading.Event()
        failure: list[str] = []

        def on_event(event: Event) -> None:
            if isinstance(event, ChoiceResult):
                results[event.index] = event
            elif isinstance(event, RequestFailed):
                failure.append(event.message)
            if len(results) == request.n or failure:
                finished.set()

        self.submit(request, on_event)
        finished.wait()
        if failure:
            raise SchedulerClosed(failure[0])
        return [results[index] for index in range(request.n)]

    # -- scheduler thread -------------------------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            self._wake.notify_all()

    def _loop(self) -> None:
        wait_s = _IDLE_BROADCAST_S if self.programs.multiprocess else None
        try:
            while True:
                with self._lock:
                    for slot, choice in enumerate(self._slots):
                        if choice is not None and choice.job.cancelled:
                            self._release(slot)
                    if self._closing:
                        break
                    admitted = self._take_admissions()
                    idle = not admitted and not any(self._slots)
                    timed_out = idle and not self._wake.wait(wait_s)
                    exit_on_finish = self.batching == "continuous" and bool(self._waiting)
                if timed_out:
                    self.programs.keep_alive()
                if idle:
                    continue
                for group in admitted:
                    self._admit(group)
                if any(self._slots):
                    self._decode(exit_on_finish)
        except BaseException as error:  # noqa: BLE001 - every waiting request must hear of it
            self._error = error
            message = f"generation failed: {type(error).__name__}: {error}"
        else:
            message = "the server is shutting down"
        with self._lock:
            jobs = list(self._waiting) + list({id(c.job): c.job for c in self._slots if c is not None}.values())
            self._waiting.clear()
            self._slots = [None] * self.max_slots
        for job in jobs:
            if not job.cancelled:
                self._deliver(job, RequestFailed(message))

    def _take_admissions(self) -> list[list[tuple[_Job, list[int]]]]:
        """Waiting jobs (FIFO) that fit in the free slots, with their slots, in prefill groups.
        Called under the lock."""
        free = [slot for slot, choice in enumerate(self._slots) if choice is None]
        if self.batching == "static" and len(free) < self.max_slots:
            return []
        taken: list[tuple[_Job, list[int]]] = []
        while self._waiting and self._waiting[0].request.n <= len(free):
            job = self._waiting.popleft()
            slots, free = free[: job.request.n], free[job.request.n:]
            for index, slot in enumerate(slots):
                self._slots[slot] = _Choice(job, index)
            taken.append((job, slots))
        return [taken[i: i + self.max_prefill_batch] for i in range(0, len(taken), self.max_prefill_batch)]

    def _admit(self, group: list[tuple[_Job, list[int]]]) -> None:
        longest = max(len(job.prompt) for job, _ in group)
        prompt_len = next(b for b in self.programs.prompt_buckets if b >= longest)
        batch = next(b for b in self.programs.prefill_buckets if b >= len(group))
        ids = np.zeros((batch, prompt_len), np.int32)
        lengths = np.ones((batch,), np.int32)
        src = np.zeros((self.max_slots,), np.int32)
        dst = np.full((self.max_slots,), self.max_slots, np.int32)
        seeds = np.zeros((self.max_slots,), np.uint32)
        entry = 0
        for row, (job, slots) in enumerate(group):
            ids[row, : len(job.prompt)] = job.prompt
            lengths[row] = len(job.prompt)
            for index, slot in enumerate(slots):
                src[entry], dst[entry], seeds[entry] = row, slot, int(job.request.seeds[index]) % 2**32
                entry += 1
                self._set_row(slot, job)
        self.programs.admit(ids, lengths, src, dst, seeds)

    def _set_row(self, slot: int, job: _Job) -> None:
        request, rows = job.request, self._rows
        rows["temperature"][slot] = request.sampling.temperature
        rows["top_k"][slot] = request.sampling.top_k
        rows["top_p"][slot] = request.sampling.top_p
        rows["min_p"][slot] = request.sampling.min_p
        rows["greedy"][slot] = request.sampling.greedy
        rows["max_tokens"][slot] = request.max_tokens
        rows["stop_ids"][slot] = -1
        rows["stop_ids"][slot, : len(job.stop_ids)] = sorted(job.stop_ids)
        rows["wants_top"][slot] = request.top_logprobs > 0
        self._force_done[slot] = False

    def _release(self, slot: int) -> None:
        self._slots[slot] = None
        self._force_done[slot] = True
        self._rows["greedy"][slot] = True
        self._rows["wants_top"][slot] = False

    def _decode(self, exit_on_finish: bool) -> None:
        before = {slot: len(choice.tokens) for slot, choice in enumerate(self._slots) if choice is not None}
        out = self.programs.decode(self._rows, self._force_done.copy(), self.programs.decode_chunk, exit_on_finish)
        self._force_done[:] = False
        self.steps += int(max((out.counts[slot] - count for slot, count in before.items()), default=0))
        for slot, count in before.items():
            choice = self._slots[slot]
            new = int(out.counts[slot]) - count
            choice.tokens.extend(out.tokens[slot, :new].tolist())
            choice.logprobs.extend(out.logprobs[slot, :new].tolist())
            if choice.job.request.top_logprobs:
                k = choice.job.request.top_logprobs
                choice.top.extend(
                    [(int(i), float(v)) for i, v in zip(ids[:k], values[:k]) if np.isfinite(v)]
                    for ids, values in zip(out.top_ids[slot, :new], out.top_logprobs[slot, :new]))
            self._advance(slot, choice, bool(out.done[slot]))

    def _advance(self, slot: int, choice: _Choice, done: bool) -> None:
        """Delivers what ``choice`` generated; finishes it and frees its slot when it stopped."""
        job = choice.job
        request = job.request
        ended_by_id = done and bool(choice.tokens) and choice.tokens[-1] in job.stop_ids
        body = choice.tokens[:-1] if ended_by_id else choice.tokens
        finish: FinishReason | None = ("stop" if ended_by_id else "length") if done else None
        text = None
        if request.stop_strings:
            cut = self._stop_cut(body, request.stop_strings)
            if cut is not None:
                count, text = cut
                del choice.tokens[count:], choice.logprobs[count:], choice.top[count:]
                body, finish = choice.tokens, "stop"
        if finish is None:
            if request.stream:
                self._commit(choice, body, None)
            return
        text = self.detokenize(body) if text is None else text
        if request.stream:
            self._commit(choice, body, text)
        with self._lock:
            self._release(slot)
            job.unfinished -= 1
        self._deliver(job, ChoiceResult(choice.index, list(choice.tokens), text, list(choice.logprobs),
                                        list(choice.top), finish))

    def _stop_cut(self, body: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
        """(tokens kept, text) when the text of ``body`` holds a stop string: the tokens through
        the one that completes the earliest stop string, and the text before that stop string."""
        before = stop_string_cut(body, stops, self.detokenize)
        if before is None:
            return None
        count = before + 1
        text = self.detokenize(body[:count])
        while not any(stop in text for stop in stops):
            count += 1
            text = self.detokenize(body[:count])
        return count, text[: min(text.find(stop) for stop in stops if stop in text)]

    def _commit(self, choice: _Choice, body: list[int], final_text: str | None) -> None:
        """Delivers the text of the leading ``body`` tokens that no stop string can cut any more
        and that ends on a whole character; at the end (``final_text``), the rest."""
        if final_text is not None:
            text, end = final_text, len(body)
        else:
            text = self.detokenize(body)
            end = len(body)
            safe = text.rstrip("\ufffd")
            held = max((k for stop in choice.job.request.stop_strings
                        for k in range(1, len(stop)) if safe.endswith(stop[:k])), default=0)
            safe = safe[: len(safe) - held]
            while end > choice.committed and not safe.startswith(text):
                end -= 1
                text = self.detokenize(body[:end])
        if not text.startswith(choice.sent_text) or (end <= choice.committed and text == choice.sent_text):
            return
        start = choice.committed
        delta = ChoiceDelta(choice.index, text[len(choice.sent_text):], body[start:end],
                            choice.logprobs[start:end], choice.top[start:end])
        choice.committed, choice.sent_text = end, text
        self._deliver(choice.job, delta)

    def _deliver(self, job: _Job, event: Event) -> None:
        if not job.cancelled:
            job.on_event(event)
