"""RL rollouts as the trainer's batch source: K sampled responses per prompt, rewarded by rule.

Before every optimiser step the trainer hands :class:`RolloutSource` the current policy
(``glmjax.training.batch_source.BatchSource``). The source draws ``prompts_per_step`` prompts,
samples ``samples_per_prompt`` (K) responses to each with a ``GenerationEngine`` on the trainer's
mesh and the policy's own weights (one prefill per prompt; no copy through host memory), scores
them with a reward function (``glmjax.evals.rewards``), and returns the rows: prompt + response,
``loss_mask`` on the response, the K responses of a prompt consecutive (``group_size=K``).

Dynamic sampling (``dynamic_sampling``): groups whose K rewards are all equal carry no
advantage; they are dropped and more prompts drawn, for at most ``max_sampling_rounds`` rounds,
after which dropped groups fill what is still missing (counted in ``unfilled_groups``).

Several updates per rollout (``updates_per_rollout = U``): one rollout of ``U * prompts_per_step``
prompts serves U consecutive steps, one slice of ``prompts_per_step`` groups each, with
``old_logps`` (the rollout policy's log-probs, computed by the trainer's forward at rollout time)
for the PPO ratio. The checkpointed state is the prompt stream's position and the sample counter;
slices of a rollout not yet used when the run stops are dropped on resume, which then starts a
fresh rollout (keep ``checkpoint_every`` a multiple of U to lose none).

Multi-process: every process draws the same prompts and generates the same responses (the engine
returns the full list everywhere); each keeps its own contiguous share of the groups.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_template import encode_chat, stop_token_ids
from glmjax.data.sources import DataFormatError, JsonlSource
from glmjax.data.spec import BatchSpec, FeatureSpec, lm_batch_spec
from glmjax.evals.rewards import Response, Reward, score_responses
from glmjax.inference.engine import GenerationEngine, GenerationResult
from glmjax.inference.sampling import SamplingConfig
from glmjax.models.decoder import Decoder
from glmjax.objectives.rl import CORRECT, OLD_LOGPS, PENALIZED, REWARDS, ROW, SAMPLE_LOGPS, TOKEN_FLOAT
from glmjax.objectives.token_stats import token_logps_and_entropy

RewardFunction = Callable[[str, Response], Reward]


def rollout_batch_spec(samples_per_prompt: int, updates_per_rollout: int = 1) -> BatchSpec:
    """The keys of a rollout batch: the LM keys, per-row ``rewards``/``correct``/``penalized``,
    per-token ``sample_logps`` (and ``old_logps`` with several updates per rollout); groups of
    ``samples_per_prompt`` rows."""
    features: dict[str, FeatureSpec] = {REWARDS: ROW, CORRECT: ROW, PENALIZED: ROW, SAMPLE_LOGPS: TOKEN_FLOAT}
    if updates_per_rollout > 1:
        features[OLD_LOGPS] = TOKEN_FLOAT
    return lm_batch_spec(features, group_size=samples_per_prompt)


@dataclasses.dataclass(frozen=True)
class RLPrompt:
    """A prompt to sample from: ``input_ids`` int32 [n] (chat-formatted, ending in the
    generation prompt) and the ``gold`` answer its responses are checked against."""

    id: str
    input_ids: np.ndarray
    gold: str


def load_rl_prompts(path: str, tokenizer: PreTrainedTokenizerBase) -> list[RLPrompt]:
    """Prompts of a JSONL file: rows ``{"messages": [...], "answer": ...}`` (a trailing assistant
    turn is dropped: the built-in task's files) or ``{"problem": str, "answer": ...}``; an ``id``
    field is kept, else the line's index is the id.

    Raises:
      DataFormatError: naming ``file:line`` of a row with neither ``messages`` nor ``problem``.
    """
    source = JsonlSource(path, required_fields=["answer"])
    prompts = []
    for index in range(len(source)):
        record = source[index]
        if "messages" in record:
            messages = list(record["messages"])
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
        elif "problem" in record:
            messages = [{"role": "user", "content": str(record["problem"])}]
        else:
            raise DataFormatError(f"{source.location(index)}: row has neither 'messages' nor 'problem'")
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True).input_ids
        prompts.append(RLPrompt(str(record.get("id", index)), np.asarray(ids, np.int32), str(record["answer"])))
    return prompts


@dataclasses.dataclass
class _Group:
    prompt: RLPrompt
    results: list[GenerationResult]
    rewards: list[Reward]

    @property
    def constant(self) -> bool:
        return len({r.value for r in self.rewards}) == 1


class RolloutSource:
    """The RL batch source (module docstring).

    Args:
      prompts: the prompt pool, cycled through in a seeded shuffled order, epoch after epoch.
      tokenizer: decodes responses for the reward (special tokens skipped).
      reward: ``reward(gold, Response) -> Reward``.
      prompts_per_step: P, groups per optimiser step (summed over processes; divisible by the
        process count).
      samples_per_prompt: K (T1: 64).
      sampling: token selection (T1: temperature about 1.2, no top-p or min-p).
      max_new_tokens: response budget (a response that reaches it has finish reason "length").
      seed: seeds the prompt order and every sample (the samples of a rollout that starts at
        sample ``n`` of the run draw with seeds from ``numpy.random.SeedSequence([seed, n])``; the
        counter is checkpointed).
      process_index, process_count: this process and how many there are.
      dynamic_sampling, max_sampling_rounds: drop all-equal groups and draw again (docstring).
      updates_per_rollout: U (module docstring).
      seq_len: row length (default: the longest prompt + ``max_new_tokens`` - 1).
      engine_batch_size: rows per compiled generation call.
      stacked_layers: generate with the training layout, sharing the policy's buffers (no copy;
        slower decoding on CPU). False copies the weights into the per-layer inference layout at
        every rollout.
      reward_workers: threads scoring responses.
    """

    def __init__(
        self,
        prompts: Sequence[RLPrompt],
        tokenizer: PreTrainedTokenizerBase,
        reward: RewardFunction,
        *,
        prompts_per_step: int,
        samples_per_prompt: int,
        sampling: SamplingConfig,
        max_new_tokens: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
        updates_per_rollout: int = 1,
        seq_len: int | None = None,
        engine_batch_size: int = 256,
        stacked_layers: bool = True,
        reward_workers: int = 4,
    ):
        if not prompts:
            raise ValueError("RolloutSource: no prompts")
        if prompts_per_step < 1 or prompts_per_step % process_count:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be >= 1 and divisible by the "
                             f"process count {process_count}")
        if samples_per_prompt < 1 or max_new_tokens < 1 or updates_per_rollout < 1 or max_sampling_rounds < 1:
            raise ValueError("samples_per_prompt, max_new_tokens, updates_per_rollout and "
                             "max_sampling_rounds must be >= 1")
        if sampling.greedy:
            raise ValueError("RL rollouts need sampling (temperature > 0); greedy responses to one "
                             "prompt are all equal")
        longest = max(len(p.input_ids) for p in prompts)
        self.seq_len = seq_len or longest + max_new_tokens - 1
        if longest + max_new_tokens - 1 > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is shorter than the longest prompt ({longest} tokens) "
                             f"+ max_new_tokens ({max_new_tokens}) - 1")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.reward = reward
        self.prompts_per_step = prompts_per_step
        self.samples_per_prompt = samples_per_prompt
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, max_sampling_rounds
        self.updates_per_rollout = updates_per_rollout
        self.engine_batch_size = engine_batch_size
        self.stacked_layers = stacked_layers
        self.reward_workers = reward_workers
        self.stop_ids = stop_token_ids(tokenizer)
        self.batch_spec: BatchSpec = rollout_batch_spec(samples_per_prompt, updates_per_rollout)
        self._engine: GenerationEngine | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._epoch, self._position, self._samples_drawn = 0, 0, 0
        self._order = self._epoch_order(0)
        self._metrics: dict[str, list[float]] = {}

    # -- BatchSource --------------------------------------------------------------------------

    @property
    def host_rows(self) -> int:
        return self.prompts_per_step // self.process_count * self.samples_per_prompt

    def abstract_batch(self) -> Mapping[str, jax.ShapeDtypeStruct]:
        shape = (self.host_rows, self.seq_len)
        out = {}
        for key, feature in self.batch_spec.features.items():
            dims = shape if feature.ndim == 2 else shape[:1]
            out[key] = jax.ShapeDtypeStruct(dims, np.dtype(feature.dtype))
        return out

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, "samples_drawn": self._samples_drawn}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._samples_drawn = int(state["samples_drawn"])
        self._order = self._epoch_order(self._epoch)
        self._pending = []

    def next_batch(self, policy: Decoder, step: int, mesh: Mesh) -> dict[str, np.ndarray]:
        if not self._pending:
            self._pending = self._rollout(policy, mesh)
        return self._pending.pop(0)

    def pop_metrics(self) -> dict[str, float]:
        """Means of the rollout metrics since the last call: ``rollout_seconds`` (per rollout),
        ``rollout_tokens_per_s``, ``filtered_groups``, ``unfilled_groups``, ``sampling_rounds``."""
        out = {k: float(np.mean(v)) for k, v in self._metrics.items() if v}
        self._metrics = {}
        return out

    # -- prompts ------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def _draw(self, count: int) -> list[RLPrompt]:
        drawn = []
        while len(drawn) < count:
            if self._position == len(self._order):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._epoch_order(self._epoch)
            drawn.append(self.prompts[self._order[self._position]])
            self._position += 1
        return drawn

    # -- rollout ------------------------------------------------------------------------------

    def _engine_for(self, policy: Decoder, mesh: Mesh) -> GenerationEngine:
        if self._engine is None:
            self._engine = GenerationEngine(policy, mesh=mesh, max_batch_size=self.engine_batch_size,
                                            logprob_mode="scaled", stacked_layers=self.stacked_layers)
        else:
            self._engine.update_model(policy)
        return self._engine

    def _sample(self, engine: GenerationEngine, prompts: list[RLPrompt]) -> list[_Group]:
        k = self.samples_per_prompt
        count = len(prompts) * k
        seed = [int(s) for s in np.random.SeedSequence([self.seed, self._samples_drawn]).generate_state(count)]
        self._samples_drawn += count
        results = engine.generate([p.input_ids.tolist() for p in prompts], self.sampling,
                                  max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_ids,
                                  seed=seed, num_samples=k)
        responses = [Response(self.tokenizer.decode(r.tokens, skip_special_tokens=True), len(r.tokens),
                              r.finish_reason) for r in results]
        golds = [p.gold for p in prompts for _ in range(k)]
        rewards = score_responses(self.reward, golds, responses, max_workers=self.reward_workers)
        return [_Group(p, results[i * k:(i + 1) * k], rewards[i * k:(i + 1) * k]) for i, p in enumerate(prompts)]

    def _collect(self, engine: GenerationEngine) -> tuple[list[_Group], int]:
        wanted = self.prompts_per_step * self.updates_per_rollout
        kept: list[_Group] = []
        dropped: list[_Group] = []
        rounds = 0
        while len(kept) < wanted and (rounds == 0 or (self.dynamic_sampling and rounds < self.max_sampling_rounds)):
            groups = self._sample(engine, self._draw(wanted - len(kept)))
            rounds += 1
            for group in groups:
                (dropped if self.dynamic_sampling and group.constant else kept).append(group)
        unfilled = wanted - len(kept)
        self._record("filtered_groups", len(dropped))
        self._record("unfilled_groups", unfilled)
        self._record("sampling_rounds", rounds)
        return kept + dropped[:unfilled], rounds

    def _rollout(self, policy: Decoder, mesh: Mesh) -> list[dict[str, np.ndarray]]:
        jax.block_until_ready(nnx.state(policy))  # time the rollout, not the previous update
        start = time.time()
        engine = self._engine_for(policy, mesh)
        groups, _ = self._collect(engine)
        rows = self._rows(groups)
        seconds = time.time() - start
        self._record("rollout_seconds", seconds)
        generated = sum(len(r.tokens) for g in groups for r in g.results)
        self._record("rollout_tokens_per_s", generated / max(seconds, 1e-9))
        if self.updates_per_rollout > 1:
            rows[OLD_LOGPS] = _trainer_logps(policy, rows, self.sampling.temperature, mesh)
        per_update = self.prompts_per_step * self.samples_per_prompt
        share = self.prompts_per_step // self.process_count * self.samples_per_prompt
        batches = []
        for update in range(self.updates_per_rollout):
            first = update * per_update + self.process_index * share
            batches.append({key: value[first:first + share] for key, value in rows.items()})
        return batches

    def _rows(self, groups: list[_Group]) -> dict[str, np.ndarray]:
        count = sum(len(g.results) for g in groups)
        length = self.seq_len
        out = {key: np.zeros((count, length), np.int32)
               for key in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
        out[SAMPLE_LOGPS] = np.zeros((count, length), np.float32)
        for key in (REWARDS, CORRECT, PENALIZED):
            out[key] = np.zeros((count,), np.float32)
        row = 0
        for group in groups:
            prompt = group.prompt.input_ids
            for result, reward in zip(group.results, group.rewards):
                sequence = np.concatenate([prompt, np.asarray(result.tokens, np.int32)])
                n = len(sequence) - 1
                out["inputs"][row, :n] = sequence[:-1]
                out["targets"][row, :n] = sequence[1:]
                out["loss_mask"][row, len(prompt) - 1:n] = 1
                out["segment_ids"][row, :n] = 1
                out["positions"][row, :n] = np.arange(n)
                out[SAMPLE_LOGPS][row, len(prompt) - 1:n] = result.logprobs
                out[REWARDS][row] = reward.value
                out[CORRECT][row] = float(reward.correct)
                out[PENALIZED][row] = float(bool(reward.penalties))
                row += 1
        return out

    def _record(self, name: str, value: float) -> None:
        self._metrics.setdefault(name, []).append(float(value))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logps_program(graphdef: nnx.GraphDef, state: nnx.State, rows: dict[str, jax.Array],
                   temperature: float) -> jax.Array:
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(rows["inputs"], rows["positions"], rows["segment_ids"])
    logps, _ = token_logps_and_entropy(hidden, model.head_kernel(), rows["targets"], temperature=temperature)
    return jnp.where(rows["loss_mask"] > 0, logps, 0.0)


def _trainer_logps(policy: Decoder, rows: Mapping[str, np.ndarray], temperature: float, mesh: Mesh) -> np.ndarray:
    """The policy's log-probs of every row's targets (the PPO ratio's denominator), with the
    trainer's forward, fp32 [rows, seq]."""
    graphdef, state = nnx.split(policy)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Every process holds all rows (the same rollout): a replicated global array of them.
    inputs = {k: jax.make_array_from_callback(rows[k].shape, replicated, lambda index, k=k: rows[k][index])
              for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    with jax.set_mesh(mesh):
        logps = _logps_program(graphdef, state, inputs, float(temperature))
    return np.asarray(multihost_utils.process_allgather(logps, tiled=True), np.float32)


@gin.configurable
def rl_rollouts(
    *,
    seed: int,
    process_index: int,
    process_count: int,
    prompts_path: str = gin.REQUIRED,
    tokenizer: PreTrainedTokenizerBase = gin.REQUIRED,
    reward: RewardFunction = gin.REQUIRED,
    prompts_per_step: int = gin.REQUIRED,
    samples_per_prompt: int = gin.REQUIRED,
    max_new_tokens: int = gin.REQUIRED,
    temperature: float = 1.2,
    top_p: float = 1.0,
    min_p: float = 0.0,
    max_prompts: int | None = None,
    **options: Any,
) -> RolloutSource:
    """The trainer's data factory for RL (``train.train_data = @rl_rollouts``).

    ``temperature``/``top_p``/``min_p`` default to T1's (1.2, off, off); ``options`` are
    :class:`RolloutSource`'s keyword arguments (dynamic sampling, updates per rollout, ...).
    ``max_prompts`` keeps the first N prompts of the file.
    """
    prompts = load_rl_prompts(prompts_path, tokenizer)[:max_prompts]
    logging.info("RL rollouts: %d prompts from %s, %d x %d samples per step", len(prompts), prompts_path,
                 prompts_per_step, samples_per_prompt)
    return RolloutSource(prompts, tokenizer, reward, prompts_per_step=prompts_per_step,
                         samples_per_prompt=samples_per_prompt,
                         sampling=SamplingConfig(temperature=temperature, top_p=top_p, min_p=min_p),
                         max_new_tokens=max_new_tokens, seed=seed, process_index=process_index,
                         process_count=process_count, **options)
