"""Policy-gradient RL for reasoning (T1): group advantages, KL to a moving anchor, entropy bonus.

A batch holds ``P`` groups of ``K`` rows: the K sampled responses to one prompt are consecutive
rows (the objective declares ``group_size=K``, so a microbatch never splits a group). Each row is
prompt + response, unpacked; ``loss_mask`` is 1 on the response's tokens. Per-row keys come from
the rollout (``glmjax.rl.rollouts``): ``rewards`` (the rule reward with its penalties), and for
metrics ``correct``, ``penalized`` and the engine's ``sample_logps``; ``old_logps`` only when a
rollout serves several updates.

One step, for response ``i`` of a group with reward ``r_i`` (T1's form, ``../shared/reference/t1.md``):

1. KL to the anchor per response, ``KL_i = sum_t k(log pi(y_t) - log ref(y_t))`` (estimator
   ``k1``/``k2``/``k3``), either folded into the reward centred on the group,
   ``r~_i = r_i - beta (KL_i - mean_j KL_j)`` (``kl_mode="reward"``), or added to the loss as
   ``beta * aggregate(k(.))`` with its gradient (``kl_mode="loss"``), or left out (``"none"``).
2. Advantages over the group: RLOO ``A_i = r~_i - mean_{j != i} r~_j`` (T1), GRPO
   ``(r~_i - mean) / (std + eps)`` or Dr.GRPO ``r~_i - mean``; the same for every token of the
   response.
3. Per-token surrogate ``-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)`` with
   ``rho = pi / pi_old`` (1 in value, the plain policy gradient in derivative, when the rollout
   came from the current policy), minus ``entropy_coef`` times the token entropy of the policy.
4. Aggregation over tokens: ``token_mean`` (all response tokens of the batch), ``seq_mean_token_mean``
   (each response's token mean, then the mean over responses) or ``seq_sum`` (token sums divided by
   a constant ``seq_sum_divisor``, then the mean over responses: Dr.GRPO).

The anchor (``anchor``): ``"ema"`` follows the policy, ``ref <- decay * ref + (1 - decay) * policy``
every ``anchor_update_every`` steps (T1's dynamic anchor; ``ref_ema_decay`` is its own knob, apart
from ``entropy_coef``: the paper writes alpha for both); ``"sync"`` copies the policy every
``anchor_update_every`` steps; ``"frozen"`` keeps the initial weights. Moving anchors are evolving
state, checkpointed with the train state; a frozen one is rebuilt from the initial weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.data.spec import BatchSpec, FeatureSpec, lm_batch_spec
from glmjax.models.decoder import Decoder
from glmjax.objectives.anchor import blend_toward
from glmjax.objectives.base import Batch, LossOutput, Mean, StateContext, StepInputs
from glmjax.objectives.token_stats import token_logps_and_entropy

ADVANTAGES = ("rloo", "grpo", "drgrpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_MODES = ("reward", "loss", "none")
ANCHORS = ("ema", "sync", "frozen")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum")

ROW = FeatureSpec("float32", ("act_batch",))
"""One float per row (a response)."""
TOKEN_FLOAT = FeatureSpec("float32", ("act_batch", "act_seq"))
"""One float per position of a row."""

REWARDS, CORRECT, PENALIZED = "rewards", "correct", "penalized"
SAMPLE_LOGPS, OLD_LOGPS = "sample_logps", "old_logps"


# -- advantages ---------------------------------------------------------------------------------


def _check_groups(rewards: jax.Array, minimum: int) -> None:
    if rewards.ndim != 2 or rewards.shape[-1] < minimum:
        raise ValueError(f"rewards must be [prompts, K] with K >= {minimum}, got shape {rewards.shape}")


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """Leave-one-out advantages: each reward minus the mean of the other ``K - 1`` in its group.

    Args:
      rewards: [P, K] rewards of K responses to each of P prompts (K >= 2).

    Returns:
      [P, K] float32, ``r_i - (sum_j r_j - r_i) / (K - 1)`` = ``K / (K - 1) * (r_i - mean)``.
    """
    _check_groups(rewards, 2)
    rewards = jnp.asarray(rewards, jnp.float32)
    k = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdims=True) - rewards) / (k - 1)


def grpo_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """GRPO's group-normalised advantages ``(r_i - mean) / (std + eps)``, ``std`` with Bessel's
    correction (as TRL's GRPOTrainer computes it). [P, K] -> [P, K] float32, K >= 2."""
    _check_groups(rewards, 2)
    rewards = jnp.asarray(rewards, jnp.float32)
    centred = rewards - rewards.mean(-1, keepdims=True)
    return centred / (jnp.std(rewards, axis=-1, ddof=1, keepdims=True) + eps)


def drgrpo_advantages(rewards: jax.Array) -> jax.Array:
    """Dr.GRPO's advantages: the reward minus its group mean, no std normalisation.
    [P, K] -> [P, K] float32."""
    _check_groups(rewards, 1)
    rewards = jnp.asarray(rewards, jnp.float32)
    return rewards - rewards.mean(-1, keepdims=True)


def group_advantages(rewards: jax.Array, kind: str) -> jax.Array:
    """Dispatches to ``rloo``, ``grpo`` or ``drgrpo`` advantages ([P, K] -> [P, K])."""
    if kind == "rloo":
        return rloo_advantages(rewards)
    if kind == "grpo":
        return grpo_advantages(rewards)
    if kind == "drgrpo":
        return drgrpo_advantages(rewards)
    raise ValueError(f"unknown advantage {kind!r}; valid: {', '.join(ADVANTAGES)}")


# -- KL -----------------------------------------------------------------------------------------


def kl_per_token(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimates of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3).

    With ``x = log pi(y) - log ref(y)``: k1 ``x``; k2 ``x^2 / 2``; k3 ``exp(-x) - 1 + x``
    (unbiased and never negative). Shapes broadcast; float32 out.
    """
    x = jnp.asarray(logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * jnp.square(x)
    if estimator == "k3":
        return jnp.expm1(-x) + x
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def kl_centered_rewards(rewards: jax.Array, kl: jax.Array, beta: float) -> jax.Array:
    """T1's KL-shaped reward ``r_i - beta * (KL_i - mean_j KL_j)`` over each group.

    Args:
      rewards: [P, K] rewards.
      kl: [P, K] per-response KL to the anchor (e.g. summed k1 over the response's tokens).
      beta: the KL coefficient.
    """
    kl = jnp.asarray(kl, jnp.float32)
    return jnp.asarray(rewards, jnp.float32) - beta * (kl - kl.mean(-1, keepdims=True))


# -- surrogate and aggregation --------------------------------------------------------------------


def clipped_surrogate(
    logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
    clip_low: float | None, clip_high: float | None,
) -> tuple[jax.Array, jax.Array]:
    """PPO's per-token loss ``-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)``.

    Args:
      logps: [R, S] log-probs under the policy being trained (differentiable).
      old_logps: [R, S] log-probs under the policy that sampled (no gradient).
      advantages: broadcastable to [R, S].
      clip_low, clip_high: the clip range's lower and upper margins; None for both disables
        clipping (``-rho A``).

    Returns:
      (loss [R, S] float32, clipped [R, S] bool: the clipped branch was taken, i.e. the token
      gives no gradient).
    """
    ratio = jnp.exp(logps - jax.lax.stop_gradient(old_logps))
    unclipped = ratio * advantages
    if clip_low is None and clip_high is None:
        return -unclipped, jnp.zeros(unclipped.shape, bool)
    clipped_ratio = jnp.clip(ratio, 1.0 - (clip_low if clip_low is not None else jnp.inf),
                             1.0 + (clip_high if clip_high is not None else jnp.inf))
    clipped = clipped_ratio * advantages
    return -jnp.minimum(unclipped, clipped), clipped < unclipped


def aggregate(values: jax.Array, mask: jax.Array, mode: str,
              divisor: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(total, weight) of per-token ``values`` [R, S] over ``mask`` [R, S], so that the
    trainer's ``sum(total) / sum(weight)`` is the chosen mean.

    * ``token_mean``: total = sum of masked values, weight = masked tokens.
    * ``seq_mean_token_mean``: total = sum over rows of each row's token mean, weight = rows with
      at least one token.
    * ``seq_sum``: total = sum of masked values / ``divisor``, weight = rows (Dr.GRPO's constant
      normaliser, e.g. the response budget).
    """
    values = values.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    sums = (values * mask).sum(-1)
    if mode == "token_mean":
        return sums.sum(), mask.sum()
    lengths = mask.sum(-1)
    if mode == "seq_mean_token_mean":
        return (sums / jnp.maximum(lengths, 1.0)).sum(), (lengths > 0).sum().astype(jnp.float32)
    if mode == "seq_sum":
        if not divisor:
            raise ValueError("aggregation 'seq_sum' needs a positive divisor")
        return sums.sum() / divisor, jnp.asarray(values.shape[0], jnp.float32)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


# -- the objective --------------------------------------------------------------------------------


def _copy(params: Any) -> Any:
    return jax.tree.map(jnp.copy, params)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLObjective:
    """T1-style policy-gradient objective over groups of K responses (module docstring).

    Attributes:
      group_size: K, responses per prompt (must equal the rollout's ``samples_per_prompt``;
        T1: 64).
      advantage: ``"rloo"`` (T1), ``"grpo"`` or ``"drgrpo"``.
      kl_coef: beta of the KL to the anchor (T1: not published).
      kl_mode: ``"reward"`` (T1: folded into the reward, centred on the group), ``"loss"`` or
        ``"none"``.
      kl_estimator: ``"k1"`` (T1's summed log-ratio), ``"k2"`` or ``"k3"``.
      entropy_coef: weight of the token-entropy bonus (T1: used, value not published).
      anchor: ``"ema"`` (T1's dynamic anchor), ``"sync"`` or ``"frozen"``.
      ref_ema_decay: the EMA's decay (``"ema"``; T1: not published).
      anchor_update_every: steps between anchor updates (``"ema"`` and ``"sync"``).
      clip_low, clip_high: PPO clip margins (None, None: no clipping). They matter only when a
        rollout serves several updates (``old_logps`` in the batch).
      loss_aggregation: one of :data:`AGGREGATIONS`.
      seq_sum_divisor: the constant of ``seq_sum`` (e.g. the response budget in tokens).
      temperature: the rollout's sampling temperature; the policy's log-probs and entropy are
        those of ``softmax(logits / temperature)``, the distribution that sampled.
      chunk_size: sequence chunk of the log-prob / entropy computation.

    Metrics: per response ``reward``, ``accuracy``, ``penalized``, ``response_length``,
    ``advantage_abs``, ``kl`` (summed over its tokens); per token ``entropy``, ``kl_token``,
    ``clip_fraction``, ``logprob_gap`` (mean |trainer - engine| log-prob of the sampled token, a
    known cause of collapse when it grows), ``pg_loss``.
    """

    group_size: int = 4
    advantage: str = "rloo"
    kl_coef: float = 0.0
    kl_mode: str = "reward"
    kl_estimator: str = "k1"
    entropy_coef: float = 0.0
    anchor: str = "ema"
    ref_ema_decay: float = 0.99
    anchor_update_every: int = 1
    clip_low: float | None = 0.2
    clip_high: float | None = 0.2
    loss_aggregation: str = "token_mean"
    seq_sum_divisor: float | None = None
    temperature: float = 1.0
    chunk_size: int = 512

    def __post_init__(self) -> None:
        choices = (("advantage", ADVANTAGES), ("kl_mode", KL_MODES), ("kl_estimator", KL_ESTIMATORS),
                   ("anchor", ANCHORS), ("loss_aggregation", AGGREGATIONS))
        for name, valid in choices:
            if getattr(self, name) not in valid:
                raise ValueError(f"RLObjective.{name}={getattr(self, name)!r}; valid: {', '.join(valid)}")
        minimum = 1 if self.advantage == "drgrpo" else 2
        if self.group_size < minimum:
            raise ValueError(f"RLObjective.group_size={self.group_size}: {self.advantage} needs >= {minimum}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"RLObjective.kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, "
                             f"{self.entropy_coef}")
        if not 0.0 <= self.ref_ema_decay < 1.0:
            raise ValueError(f"RLObjective.ref_ema_decay must be in [0, 1), got {self.ref_ema_decay}")
        if self.anchor_update_every < 1:
            raise ValueError(f"RLObjective.anchor_update_every must be >= 1, got {self.anchor_update_every}")
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"RLObjective.{name} must be > 0 or None, got {value}")
        if self.loss_aggregation == "seq_sum" and not (self.seq_sum_divisor or 0) > 0:
            raise ValueError("RLObjective.loss_aggregation='seq_sum' needs seq_sum_divisor > 0 "
                             "(e.g. the response budget in tokens)")
        if not self.temperature > 0:
            raise ValueError(f"RLObjective.temperature must be > 0, got {self.temperature}")

    # -- state ----------------------------------------------------------------------------------

    @property
    def uses_anchor(self) -> bool:
        """Whether the loss reads an anchor (a KL term with a nonzero coefficient)."""
        return self.kl_mode != "none" and self.kl_coef > 0

    def batch_spec(self) -> BatchSpec:
        return lm_batch_spec({REWARDS: ROW}, group_size=self.group_size)

    def frozen_state(self, context: StateContext) -> Any:
        """A copy of the initial parameters for a frozen anchor, else None."""
        if not self.uses_anchor or self.anchor != "frozen":
            return None
        params = context.initial_params()
        return params if context.abstract else _copy(params)

    def extra_state(self, context: StateContext) -> Any:
        """The moving anchor (``"ema"``/``"sync"``): the initial parameters, else None."""
        if not self.uses_anchor or self.anchor == "frozen":
            return None
        params = context.initial_params()
        return params if context.abstract else _copy(params)

    def update_extra(self, extra: Any, params: dict, step: jax.Array) -> Any:
        """Moves the anchor toward the policy when ``step`` (updates taken) is a multiple of
        ``anchor_update_every``: by ``1 - ref_ema_decay`` (``"ema"``) or all the way (``"sync"``)."""
        if extra is None:
            return None
        rate = 1.0 if self.anchor == "sync" else 1.0 - self.ref_ema_decay
        return blend_toward(extra, params, rate, (step % self.anchor_update_every) == 0)

    # -- loss -----------------------------------------------------------------------------------

    def _stats(self, model: Decoder, batch: Batch) -> tuple[jax.Array, jax.Array]:
        hidden = model.hidden_states(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
        return token_logps_and_entropy(hidden, model.head_kernel(), batch["targets"],
                                       temperature=self.temperature, chunk_size=self.chunk_size)

    def _anchor_logps(self, model: Decoder, batch: Batch, inputs: StepInputs) -> jax.Array:
        params = inputs.frozen if self.anchor == "frozen" else inputs.extra
        anchor = nnx.merge(nnx.graphdef(model), jax.lax.stop_gradient(params))
        return jax.lax.stop_gradient(self._stats(anchor, batch)[0])

    def loss(self, model: Decoder, batch: Batch, inputs: StepInputs) -> LossOutput:
        logps, entropy = self._stats(model, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        rows = mask.shape[0]
        groups = (rows // self.group_size, self.group_size)
        rewards = batch[REWARDS].astype(jnp.float32)
        metrics: dict[str, Mean] = {}
        shaped = rewards
        kl_tokens = None
        if self.uses_anchor:
            ref_logps = self._anchor_logps(model, batch, inputs)
            kl_tokens = kl_per_token(logps, ref_logps, self.kl_estimator)
            kl_seq = jax.lax.stop_gradient((kl_tokens * mask).sum(-1))
            metrics["kl"] = Mean.of(kl_seq)
            metrics["kl_token"] = Mean.of(jax.lax.stop_gradient(kl_tokens), mask)
            if self.kl_mode == "reward":
                shaped = kl_centered_rewards(rewards.reshape(groups), kl_seq.reshape(groups),
                                             self.kl_coef).reshape(rows)
        advantages = jax.lax.stop_gradient(group_advantages(shaped.reshape(groups), self.advantage).reshape(rows))
        old_logps = batch[OLD_LOGPS] if OLD_LOGPS in batch else jax.lax.stop_gradient(logps)
        pg_tokens, clipped = clipped_surrogate(logps, old_logps, advantages[:, None], self.clip_low,
                                               self.clip_high)
        pg_total, weight = aggregate(pg_tokens, mask, self.loss_aggregation, self.seq_sum_divisor)
        total = pg_total
        if self.entropy_coef:
            total = total - self.entropy_coef * aggregate(entropy, mask, self.loss_aggregation,
                                                          self.seq_sum_divisor)[0]
        if self.kl_mode == "loss" and kl_tokens is not None:
            total = total + self.kl_coef * aggregate(kl_tokens, mask, self.loss_aggregation,
                                                     self.seq_sum_divisor)[0]
        metrics.update({
            "pg_loss": Mean(jax.lax.stop_gradient(pg_total), weight),
            "reward": Mean.of(rewards),
            "response_length": Mean.of(mask.sum(-1)),
            "advantage_abs": Mean.of(jnp.abs(advantages)),
            "entropy": Mean.of(jax.lax.stop_gradient(entropy), mask),
            "clip_fraction": Mean.of(clipped, mask),
        })
        if CORRECT in batch:
            metrics["accuracy"] = Mean.of(batch[CORRECT])
        if PENALIZED in batch:
            metrics["penalized"] = Mean.of(batch[PENALIZED])
        if SAMPLE_LOGPS in batch:
            gap = jnp.abs(jax.lax.stop_gradient(logps) - batch[SAMPLE_LOGPS].astype(jnp.float32))
            metrics["logprob_gap"] = Mean.of(gap, mask)
        return LossOutput(total=total, weight=weight, metrics=metrics)
