"""Objectives the trainer optimises (gin swaps them): LM (pre-training, SFT), pre-training
distillation (online and offline teacher logits) and the DPO family."""

from glmjax.objectives.alpha import ConstantAlpha, LinearAlpha, WSDAlpha
from glmjax.objectives.base import Batch, LossOutput, Mean, Objective, StateContext, StepInputs
from glmjax.objectives.distill import DistillObjective, truncate_teacher_logits
from glmjax.objectives.dpo import DPOObjective, dpo_loss
from glmjax.objectives.lm import LMObjective
from glmjax.objectives.losses import chunked_cross_entropy

__all__ = ["Batch", "ConstantAlpha", "DPOObjective", "DistillObjective", "LMObjective", "LinearAlpha",
           "LossOutput", "Mean", "Objective", "StateContext", "StepInputs", "WSDAlpha",
           "chunked_cross_entropy", "dpo_loss", "truncate_teacher_logits"]
