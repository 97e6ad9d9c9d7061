"""Direct preference optimisation and its relatives (IPO, SLiC, cDPO, rDPO, EXO, NCA, SPPO, APO,
DiscoPOP, BCO), as one gin-swappable objective.

Notation (``../shared/reference/dpo-losses.md``): for a pair, ``pc``/``pr`` are the policy's summed
log-probs of the chosen/rejected completion, ``rc``/``rr`` the reference's; ``h_c = pc - rc``,
``h_r = pr - rr`` are the log-ratios and ``delta = h_c - h_r``. Rewards are ``beta * h``.

Batch layout: rows ``2i`` (chosen) and ``2i + 1`` (rejected) are one pair sharing its prompt; the
objective declares ``group_size=2`` so a microbatch split never separates them
(``glmjax.data.spec``). Rows are unpacked (one sequence per row, ``glmjax.data.pairs``), and the
completion is where ``loss_mask`` is 1.

Reference (``reference``):

* ``"policy"``: a copy of the run's initial parameters, run forward without gradients in the loss.
  It is frozen state (rebuilt from the initial weights at every start, never checkpointed), or,
  with ``ref_sync_every`` (TR-DPO), evolving state: every ``ref_sync_every`` optimiser steps
  ``ref <- ref_mix_rate * policy + (1 - ref_mix_rate) * ref``, checkpointed with the train state.
* ``"precomputed"``: per-row reference log-probs stored with the data (batch key ``ref_logps``,
  float32 ``[rows]``; ``python -m launch.precompute_ref`` writes them, ``glmjax.data.pairs`` reads
  them). No reference forward in the step.

SFT mixing (``sft_weight`` = lambda): the optimised quantity is
``mean_pairs(dpo) + lambda * NLL_tok``, where ``NLL_tok`` is the token-mean negative log-likelihood
of the chosen completions. The trainer optimises ``sum(total) / sum(weight)`` over microbatches
with ``weight`` = pairs, so each microbatch contributes
``total = sum_pairs(dpo) + lambda * pairs_mb * NLL_tok_mb`` with ``NLL_tok_mb`` its own token mean.
With one microbatch (any number of devices) this is exact. With ``n`` microbatches (every one holds
the same number of pairs) the SFT term becomes ``lambda * mean_mb(NLL_tok_mb)``: the mean of the
microbatches' token means, which differs from the global token mean only when the microbatches
hold different numbers of chosen tokens (the ``sft_loss`` metric is always the exact global token
mean). ``sum_pairs(dpo) + lambda * sum_tokens(nll)`` would instead weigh the SFT term by tokens per
pair, and ``lambda * pairs * global_mean`` cannot be formed inside one microbatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax.data.spec import BatchSpec, FeatureSpec, lm_batch_spec
from glmjax.models.decoder import Decoder
from glmjax.objectives.anchor import blend_toward
from glmjax.objectives.base import Batch, LossOutput, Mean, StateContext, StepInputs
from glmjax.objectives.losses import chunked_cross_entropy

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
              "apo_down", "discopop", "bco_pair")
"""The ``loss_type`` values of :func:`dpo_loss`."""

DISCOPOP_TAU = 0.05
"""DiscoPOP's temperature of the mixing gate (the paper's and TRL's ``discopop_tau``)."""

REF_LOGPS = "ref_logps"
"""Batch key of precomputed reference log-probs: float32 ``[rows]``, one summed completion
log-prob per row (chosen rows even, rejected rows odd)."""

REF_LOGPS_FEATURE = FeatureSpec("float32", ("act_batch",))


def check_loss_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Raises ``ValueError`` for an unknown ``loss_type`` or settings it cannot use.

    ``label_smoothing`` (epsilon) is used by ``sigmoid`` (cDPO, in [0, 0.5]), ``robust``
    (rDPO, in [0, 0.5)) and ``exo_pair`` (in (0, 1), the EXO paper uses 1e-3); the other
    types refuse a nonzero value rather than ignore it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    eps = label_smoothing
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"loss_type 'sigmoid' needs label_smoothing in [0, 0.5], got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"loss_type 'robust' needs label_smoothing in [0, 0.5), got {eps}")
    if loss_type == "exo_pair" and not 0.0 < eps < 1.0:
        raise ValueError(f"loss_type 'exo_pair' needs label_smoothing in (0, 1) (the EXO paper "
                         f"uses 1e-3), got {eps}")
    if loss_type not in ("sigmoid", "robust", "exo_pair") and eps != 0.0:
        raise ValueError(f"loss_type {loss_type!r} does not use label_smoothing; got {eps} "
                         "(only sigmoid, robust and exo_pair do)")


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-pair losses of the DPO family.

    Args:
      chosen_logps, rejected_logps: [B] policy log-probs (nats) of the chosen / rejected
        completions: summed over tokens, or averaged (length-normalised, e.g. IPO as TRL runs it).
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model.
      beta: inverse temperature (> 0).
      loss_type: one of :data:`LOSS_TYPES`; with ``z = beta * delta``:
        sigmoid ``-(1-e) logsig(z) - e logsig(-z)`` (e > 0: conservative DPO); hinge (SLiC)
        ``max(0, 1 - z)``; ipo ``(delta - 1/(2 beta))^2``; robust (rDPO)
        ``(-(1-e) logsig(z) + e logsig(-z)) / (1 - 2e)``; exo_pair
        ``sig(z)(logsig(z) - log(1-e)) + sig(-z)(logsig(-z) - log e)``; nca_pair
        ``-logsig(beta h_c) - logsig(-beta h_c)/2 - logsig(-beta h_r)/2``; sppo_hard
        ``(h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2``; apo_zero
        ``1 - sig(beta h_c) + sig(beta h_r)``; apo_down ``sig(beta h_c) + 1 - sig(z)``;
        discopop ``(1 - m)(-logsig(z)) + m exp(-z)`` with ``m = sig(z / 0.05)``; bco_pair
        ``-logsig(beta h_c) - logsig(-beta h_r)`` (no running reward shift, as current TRL).
      label_smoothing: epsilon (see :func:`check_loss_settings`).

    Returns:
      [B] losses in the floating dtype of the inputs (at least float32).

    Raises:
      ValueError: an unknown loss type (the message lists the valid ones) or settings it
        cannot use.
    """
    check_loss_settings(loss_type, beta, label_smoothing)
    dtype = jnp.result_type(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            jnp.float32)
    h_c = jnp.asarray(chosen_logps, dtype) - jnp.asarray(ref_chosen_logps, dtype)
    h_r = jnp.asarray(rejected_logps, dtype) - jnp.asarray(ref_rejected_logps, dtype)
    delta = h_c - h_r
    z = beta * delta
    eps = label_smoothing
    log_sig = jax.nn.log_sigmoid
    if loss_type == "sigmoid":
        return -(1.0 - eps) * log_sig(z) - eps * log_sig(-z)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    if loss_type == "ipo":
        return jnp.square(delta - 1.0 / (2.0 * beta))
    if loss_type == "robust":
        return (-(1.0 - eps) * log_sig(z) + eps * log_sig(-z)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":
        return (jax.nn.sigmoid(z) * (log_sig(z) - np.log1p(-eps))
                + jax.nn.sigmoid(-z) * (log_sig(-z) - np.log(eps)))
    if loss_type == "nca_pair":
        return -log_sig(beta * h_c) - 0.5 * log_sig(-beta * h_c) - 0.5 * log_sig(-beta * h_r)
    if loss_type == "sppo_hard":
        return jnp.square(h_c - 0.5 / beta) + jnp.square(h_r + 0.5 / beta)
    if loss_type == "apo_zero":
        return (1.0 - jax.nn.sigmoid(beta * h_c)) + jax.nn.sigmoid(beta * h_r)
    if loss_type == "apo_down":
        return jax.nn.sigmoid(beta * h_c) + (1.0 - jax.nn.sigmoid(z))
    if loss_type == "discopop":
        log_gate = log_sig(z / DISCOPOP_TAU)
        # m * exp(-z) as exp(log m - z): no inf * 0 when z is very negative.
        return (1.0 - jnp.exp(log_gate)) * -log_sig(z) + jnp.exp(log_gate - z)
    # bco_pair (check_loss_settings admitted nothing else)
    return -log_sig(beta * h_c) - log_sig(-beta * h_r)


def sequence_logps(
    model: Decoder, batch: Batch, chunk_size: int = 512
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed completion log-probs per row, from hidden states and the head kernel (chunked; no
    full fp32 ``[rows, seq, vocab]`` logits).

    Args:
      model: the decoder.
      batch: int32 [rows, seq] ``inputs``, ``targets``, ``loss_mask`` (1 on completion targets),
        ``positions`` and ``segment_ids``.
      chunk_size: sequence chunk of the cross-entropy.

    Returns:
      (logps fp32 [rows]: sum of ``log p(target)`` over the mask, token_nll fp32 [rows, seq]:
      ``-log p(target)`` per position, mask fp32 [rows, seq]).
    """
    hidden = model.hidden_states(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
    token_nll, _ = chunked_cross_entropy(hidden, model.head_kernel(), batch["targets"],
                                         chunk_size=chunk_size)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -(token_nll * mask).sum(-1), token_nll, mask


def _copy(params: Any) -> Any:
    return jax.tree.map(jnp.copy, params)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """A DPO-family loss over pairs of rows (module docstring), optionally mixed with SFT.

    Attributes:
      beta: inverse temperature of the implicit reward (LongReward: 0.15).
      loss_type: one of :data:`LOSS_TYPES` (:func:`dpo_loss`).
      label_smoothing: epsilon of cDPO / rDPO / EXO.
      sft_weight: lambda, the weight of the chosen completions' token-mean NLL (LongReward: 0.1;
        module docstring for how it folds over microbatches).
      reference: ``"policy"`` (a copy of the initial parameters, frozen or TR-DPO synced) or
        ``"precomputed"`` (batch key ``ref_logps``).
      average_logps: divide each row's summed log-probs (policy and reference) by its number of
        completion tokens before the loss (IPO's length averaging as TRL runs it; any type).
      ref_sync_every: TR-DPO: mix the policy into the reference every this many optimiser steps
        (None: a frozen reference). Only with ``reference="policy"``.
      ref_mix_rate: TR-DPO's alpha in ``ref <- alpha * policy + (1 - alpha) * ref`` (1: hard
        update). TRL's defaults are 0.6 every 512 steps.
      chunk_size: sequence chunk of the cross-entropy.

    Metrics (``Mean``, each with its own count): per pair ``dpo_loss``, ``reward_accuracy``
    (chosen reward > rejected reward), ``reward_margin``, ``chosen_reward``, ``rejected_reward``,
    ``chosen_logp``, ``rejected_logp`` (the policy log-probs the loss used: summed, or averaged
    with ``average_logps``); per chosen completion token ``sft_loss``.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    reference: Literal["policy", "precomputed"] = "policy"
    average_logps: bool = False
    ref_sync_every: int | None = None
    ref_mix_rate: float = 0.6
    chunk_size: int = 512

    def __post_init__(self) -> None:
        check_loss_settings(self.loss_type, self.beta, self.label_smoothing)
        if self.reference not in ("policy", "precomputed"):
            raise ValueError(f"DPOObjective.reference={self.reference!r}: use 'policy' or 'precomputed'")
        if self.sft_weight < 0:
            raise ValueError(f"DPOObjective.sft_weight must be >= 0, got {self.sft_weight}")
        if self.ref_sync_every is not None:
            if self.reference != "policy":
                raise ValueError("DPOObjective.ref_sync_every (TR-DPO) needs reference='policy'; "
                                 "precomputed reference log-probs cannot follow the policy")
            if self.ref_sync_every < 1 or not 0.0 < self.ref_mix_rate <= 1.0:
                raise ValueError(f"TR-DPO needs ref_sync_every >= 1 and ref_mix_rate in (0, 1], got "
                                 f"{self.ref_sync_every}, {self.ref_mix_rate}")

    # -- state ----------------------------------------------------------------------------------

    @property
    def _synced(self) -> bool:
        return self.ref_sync_every is not None

    def batch_spec(self) -> BatchSpec:
        extra = {REF_LOGPS: REF_LOGPS_FEATURE} if self.reference == "precomputed" else None
        return lm_batch_spec(extra, group_size=2)

    def frozen_state(self, context: StateContext) -> Any:
        """A copy of the initial parameters (ShapeDtypeStructs when abstract), or None."""
        if self.reference != "policy" or self._synced:
            return None
        params = context.initial_params()
        return params if context.abstract else _copy(params)

    def extra_state(self, context: StateContext) -> Any:
        """TR-DPO's evolving reference: the initial parameters, or None without syncing."""
        if not self._synced:
            return None
        params = context.initial_params()
        return params if context.abstract else _copy(params)

    def update_extra(self, extra: Any, params: dict, step: jax.Array) -> Any:
        """Mixes the policy into the reference when ``step`` (updates taken) is a multiple of
        ``ref_sync_every``."""
        if extra is None:
            return None
        return blend_toward(extra, params, self.ref_mix_rate, (step % self.ref_sync_every) == 0)

    # -- loss -----------------------------------------------------------------------------------

    def _reference_logps(self, model: Decoder, batch: Batch, inputs: StepInputs) -> jax.Array:
        if self.reference == "precomputed":
            return batch[REF_LOGPS].astype(jnp.float32)
        params = inputs.extra if self._synced else inputs.frozen
        reference = nnx.merge(nnx.graphdef(model), jax.lax.stop_gradient(params))
        logps, _, _ = sequence_logps(reference, batch, self.chunk_size)
        return jax.lax.stop_gradient(logps)

    def loss(self, model: Decoder, batch: Batch, inputs: StepInputs) -> LossOutput:
        logps, token_nll, mask = sequence_logps(model, batch, self.chunk_size)
        ref_logps = self._reference_logps(model, batch, inputs)
        lengths = mask.sum(-1)
        if self.average_logps:
            logps = logps / jnp.maximum(lengths, 1.0)
            ref_logps = ref_logps / jnp.maximum(lengths, 1.0)
        pairs = logps.reshape(-1, 2)
        ref_pairs = ref_logps.reshape(-1, 2)
        losses = dpo_loss(pairs[:, 0], pairs[:, 1], ref_pairs[:, 0], ref_pairs[:, 1], beta=self.beta,
                          loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        num_pairs = jnp.asarray(losses.shape[0], jnp.float32)
        chosen_mask = mask.reshape(-1, 2, mask.shape[-1])[:, 0]
        chosen_nll = token_nll.reshape(-1, 2, mask.shape[-1])[:, 0]
        sft_sum, sft_tokens = (chosen_nll * chosen_mask).sum(), chosen_mask.sum()
        total = losses.sum()
        if self.sft_weight:
            total = total + self.sft_weight * num_pairs * sft_sum / jnp.maximum(sft_tokens, 1.0)
        rewards = self.beta * jax.lax.stop_gradient(pairs - ref_pairs)
        chosen_reward, rejected_reward = rewards[:, 0], rewards[:, 1]
        policy = jax.lax.stop_gradient(pairs)
        return LossOutput(total=total, weight=num_pairs, metrics={
            "dpo_loss": Mean.of(jax.lax.stop_gradient(losses)),
            "reward_accuracy": Mean.of(chosen_reward > rejected_reward),
            "reward_margin": Mean.of(chosen_reward - rejected_reward),
            "chosen_reward": Mean.of(chosen_reward),
            "rejected_reward": Mean.of(rejected_reward),
            "chosen_logp": Mean.of(policy[:, 0]),
            "rejected_logp": Mean.of(policy[:, 1]),
            "sft_loss": Mean(jax.lax.stop_gradient(sft_sum), sft_tokens),
        })
