"""Objectives the trainer optimises (gin swaps them): LM now; distillation, DPO and RL build on it."""

from glmjax.objectives.base import Batch, LossOutput, Mean, Objective, StateContext, StepInputs
from glmjax.objectives.lm import LMObjective
from glmjax.objectives.losses import chunked_cross_entropy

__all__ = ["Batch", "LMObjective", "LossOutput", "Mean", "Objective", "StateContext", "StepInputs",
           "chunked_cross_entropy"]
