"""Pre-training distillation: ``(1 - alpha) * LM + alpha * KD`` against a truncated teacher.

Reproduces "Pre-training Distillation for Large Language Models: A Design Space Exploration"
(GLM-4-9B teacher): the teacher's logits are truncated top-p-k and renormalised with a
temperature (:func:`truncate_teacher_logits`); the student's loss against them is soft
cross-entropy, KL or MSE (``glmjax.objectives.distill_losses``); alpha follows a schedule
(``glmjax.objectives.alpha``).

Two modes:

* ``"offline"``: the batch carries the truncated teacher (``launch.dump_logits`` writes it; the
  data pipeline reads it): ``teacher_ids`` int32 and ``teacher_probs`` float32
  ``[batch, seq, k]``, aligned with the student's predictions (the slots at input position t
  are a distribution over the token at ``targets[t]``); positions whose probabilities are all 0
  have no teacher and no KD loss. ``student_side="tail"`` also reads ``teacher_tail`` float32
  ``[batch, seq]`` (the teacher's mass outside the kept ids).
* ``"online"``: the teacher (a model config + weights) is frozen state on the training mesh,
  sharded by the same logical-axis rules, and runs forward inside the step without gradients;
  its logits are truncated one sequence chunk at a time and never exist for the whole sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.data.spec import BatchSpec, FeatureSpec, lm_batch_spec
from glmjax.models.config import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.objectives.alpha import AlphaSchedule, ConstantAlpha
from glmjax.objectives.base import Batch, LossOutput, Mean, StateContext, StepInputs
from glmjax.objectives.distill_losses import (
    LOSS_TYPES,
    STUDENT_SIDES,
    LossType,
    StudentSide,
    check_truncation,
    chunked_distill_losses,
    chunked_teacher_truncation,
    truncate_teacher_logits,
)
from glmjax.training.run_config import check_same_function
from glmjax.training.state import init_random_params, model_graph, param_shardings

__all__ = ["DistillObjective", "TeacherError", "teacher_batch_spec", "truncate_teacher_logits"]

TEACHER_SLOTS = ("act_batch", "act_seq", None)


class TeacherError(ValueError):
    """A teacher that cannot distil into this student (the message names both sides)."""


def teacher_batch_spec(with_tail: bool = False) -> BatchSpec:
    """The LM keys plus the offline teacher keys (``teacher_tail`` only ``with_tail``)."""
    extra = {"teacher_ids": FeatureSpec("int32", TEACHER_SLOTS), "teacher_probs": FeatureSpec("float32", TEACHER_SLOTS)}
    if with_tail:
        extra["teacher_tail"] = FeatureSpec("float32", ("act_batch", "act_seq"))
    return lm_batch_spec(extra)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillObjective:
    """Pre-training distillation (defaults: the paper's vanilla PD, top-0.95-100, tau 1, soft-CE,
    alpha 1; ``configs/experiments/pd_star.gin`` is its best recipe).

    Loss per loss-mask token: ``(1 - alpha) * CE(target) + alpha * KD``, summed over
    ``loss_mask`` tokens and divided by their count (a position without a teacher adds only its
    LM part).

    Attributes:
      mode: "offline" (the batch carries the teacher) or "online" (the teacher runs in the step).
      top_p, top_k, temperature: the truncation (online: applied here; offline: what the dump
        applied; the batch's slot count must equal ``top_k``).
      loss_type: "kl", "soft_ce" or "mse" (on probabilities; see ``distill_losses``).
      student_side: "full", "renormalized" or "tail" (see ``distill_losses``).
      alpha: schedule of the KD weight (``ConstantAlpha``, ``LinearAlpha``, ``WSDAlpha``).
      chunk_size: sequence chunk of the fp32 logits (student and online teacher).
      teacher: the online teacher's model config (e.g. ``@teacher/preset()``). Its vocabulary
        must equal the student's.
      teacher_hf_dir, teacher_orbax_dir, teacher_run_dir: where the online teacher's weights
        come from (exactly one, or ``teacher_seed``): an HF directory, a ``save_model`` orbax
        directory, or a ``launch.train`` MODEL_DIR (its newest good checkpoint).
      teacher_seed: a randomly initialised teacher (benchmarks and compile checks only).

    Metrics (each a ``Mean`` with its own count): ``lm_token_loss`` and ``accuracy`` per loss
    token, ``kd_token_loss`` and ``teacher_agreement`` (student argmax == teacher top-1) per
    loss token with a teacher, ``alpha`` per microbatch.
    """

    mode: Literal["offline", "online"] = "offline"
    top_p: float = 0.95
    top_k: int = 100
    temperature: float = 1.0
    loss_type: LossType = "soft_ce"
    student_side: StudentSide = "full"
    alpha: AlphaSchedule = ConstantAlpha(1.0)
    chunk_size: int = 512
    teacher: ModelConfig | None = None
    teacher_hf_dir: str | None = None
    teacher_orbax_dir: str | None = None
    teacher_run_dir: str | None = None
    teacher_seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online"):
            raise ValueError(f"DistillObjective.mode={self.mode!r}: use 'offline' or 'online'")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DistillObjective.loss_type={self.loss_type!r}: use one of {LOSS_TYPES}")
        if self.student_side not in STUDENT_SIDES:
            raise ValueError(f"DistillObjective.student_side={self.student_side!r}: use one of {STUDENT_SIDES}")
        try:
            check_truncation(top_p=self.top_p, top_k=self.top_k, temperature=self.temperature)
        except ValueError as err:
            raise ValueError(f"DistillObjective.{err}") from None
        if self.chunk_size < 1:
            raise ValueError(f"DistillObjective.chunk_size={self.chunk_size!r}: must be >= 1")
        sources = [name for name in ("teacher_hf_dir", "teacher_orbax_dir", "teacher_run_dir", "teacher_seed")
                   if getattr(self, name) is not None]
        if self.mode == "online":
            if self.teacher is None:
                raise ValueError("DistillObjective.mode='online' needs DistillObjective.teacher (a model config)")
            if len(sources) > 1:
                raise ValueError(f"DistillObjective: set one teacher source, not {', '.join(sources)}")
        elif self.teacher is not None or sources:
            raise ValueError("DistillObjective.mode='offline' reads the teacher from the batch: unset "
                             f"{', '.join(['teacher'] * (self.teacher is not None) + sources)}")

    # -- the trainer's interface ------------------------------------------------------------

    def batch_spec(self) -> BatchSpec:
        if self.mode == "online":
            return lm_batch_spec()
        return teacher_batch_spec(with_tail=self.student_side == "tail")

    def frozen_state(self, context: StateContext) -> dict | None:
        """Online: the teacher's parameters (nested dict) on ``context.mesh``, sharded like a
        model of its config by the active logical-axis rules; ``ShapeDtypeStruct``s with those
        shardings when ``context.abstract``. Offline: None."""
        if self.mode == "offline":
            return None
        teacher = self.teacher
        student_vocab = context.model_config.vocab_size
        if teacher.vocab_size != student_vocab:
            raise TeacherError(
                f"DistillObjective.teacher has vocabulary {teacher.vocab_size} but the student "
                f"(train.model_config) has {student_vocab}: distillation needs one vocabulary")
        shardings = param_shardings(teacher, context.mesh)
        if context.abstract:
            _, shapes = model_graph(teacher)
            return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        return _load_teacher(self, context, shardings)

    def loss(self, model: Decoder, batch: Batch, inputs: StepInputs) -> LossOutput:
        segment_ids, positions = batch.get("segment_ids"), batch.get("positions")
        if self.mode == "online":
            ids, probs, tail = self._online_teacher(inputs.frozen, batch["inputs"], positions, segment_ids)
        else:
            ids, probs, tail = batch["teacher_ids"], batch["teacher_probs"], batch.get("teacher_tail")
            if ids.shape[-1] != self.top_k:
                raise TeacherError(
                    f"the batch's teacher_ids have {ids.shape[-1]} slots but DistillObjective.top_k="
                    f"{self.top_k}: the offline logits were dumped with another top_k")
        hidden = model.hidden_states(batch["inputs"], positions, segment_ids)
        out = chunked_distill_losses(
            hidden, model.head_kernel(), batch["targets"], ids, probs, tail, loss_type=self.loss_type,
            student_side=self.student_side, chunk_size=self.chunk_size)
        mask = batch["loss_mask"].astype(jnp.float32)
        kd_mask = mask * out.has_teacher
        alpha = self.alpha(inputs.step)
        total = (1.0 - alpha) * (out.lm * mask).sum() + alpha * (out.kd * kd_mask).sum()
        one = jnp.ones((), jnp.float32)
        return LossOutput(total=total, weight=mask.sum(), metrics={
            "lm_token_loss": Mean.of(out.lm, mask),
            "kd_token_loss": Mean.of(out.kd, kd_mask),
            "accuracy": Mean.of(out.correct, mask),
            "teacher_agreement": Mean.of(out.agree, kd_mask),
            "alpha": Mean(alpha, one),
        })

    # -- online teacher -----------------------------------------------------------------------

    @functools.cached_property
    def _teacher_graphdef(self) -> nnx.GraphDef:
        return model_graph(self.teacher)[0]

    def _online_teacher(self, params: Any, input_ids, positions, segment_ids):
        if params is None:
            raise TeacherError("DistillObjective.mode='online' without the teacher's frozen state")
        teacher = nnx.merge(self._teacher_graphdef, jax.lax.stop_gradient(params))
        with jax.named_scope("teacher"):
            hidden = jax.lax.stop_gradient(teacher.hidden_states(input_ids, positions, segment_ids))
            return chunked_teacher_truncation(
                hidden, teacher.head_kernel(), top_p=self.top_p, top_k=self.top_k,
                temperature=self.temperature, chunk_size=self.chunk_size)


def _load_teacher(objective: DistillObjective, context: StateContext, shardings: dict) -> dict:
    """The online teacher's parameters from its one source, checked against its config."""
    teacher = objective.teacher
    mesh = context.mesh
    if objective.teacher_seed is not None:
        return init_random_params(teacher, mesh, objective.teacher_seed, shardings)
    runtime = {"param_dtype": teacher.param_dtype, "compute_dtype": teacher.compute_dtype}
    if objective.teacher_hf_dir:
        from glmjax.checkpoints.hf import from_pretrained

        source = objective.teacher_hf_dir
        model = from_pretrained(source, teacher.param_dtype, mesh=mesh, compute_dtype=teacher.compute_dtype)
    elif objective.teacher_orbax_dir:
        from glmjax.checkpoints.orbax_io import load_model

        source = objective.teacher_orbax_dir
        model = load_model(source, mesh=mesh, **runtime)
    elif objective.teacher_run_dir:
        from glmjax.checkpoints.training_runs import load_trained_model

        source = objective.teacher_run_dir
        model = load_trained_model(source, mesh=mesh, **runtime)
    else:
        raise TeacherError("DistillObjective.mode='online' needs the teacher's weights: set teacher_hf_dir, "
                           "teacher_orbax_dir or teacher_run_dir (or teacher_seed for a random teacher)")
    check_same_function(model.config, teacher, source, "teacher checkpoint")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.device_put(params, shardings)
