"""A reference training loop in PyTorch: transformers model + ``torch.optim.AdamW``.

It mirrors what ``glmjax.training.trainer.train`` is meant to compute with the LM objective:
token-averaged next-token cross-entropy over the loss mask of the whole batch, gradients
accumulated over microbatches, global-norm clipping, AdamW with weight decay on matrices only
and a per-step learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
import transformers


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
    """The optimiser of both sides (the fields of ``glmjax.training.optimizer.adamw``)."""

    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float


@dataclasses.dataclass
class ReferenceRun:
    """Per-step loss, pre-clipping gradient norm and learning rate, and the final weights
    (HF tensor name -> fp32 numpy array)."""

    losses: list[float]
    grad_norms: list[float]
    learning_rates: list[float]
    weights: dict[str, np.ndarray]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices (projections, embedding, LM head) decay; norm scales
    and biases (the 1-D tensors) don't."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.ndim >= 2]
    vectors = [p for n, p in named if p.ndim < 2]
    unexpected = [n for n, p in named if p.ndim < 2 and not (n.endswith("bias") or "norm" in n)]
    if unexpected:
        raise ValueError(f"1-D parameters that are neither biases nor norm scales: {unexpected}")
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the loss mask of the token cross-entropies of ``batch``'s rows."""
    logits = model(input_ids=batch["inputs"], position_ids=batch["positions"], use_cache=False).logits
    token_loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), reduction="none"
    )
    return (token_loss * batch["loss_mask"].reshape(-1)).sum()


def train_reference(
    hf_dir: str,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    steps: int,
    schedule: Callable[[int], float],
    settings: AdamWSettings,
    num_microbatches: int = 1,
) -> ReferenceRun:
    """Trains the transformers model in ``hf_dir`` (fp32, eager attention) for ``steps`` steps
    on ``batches`` (cycled), one batch per step.

    Each step sums the masked token losses of ``num_microbatches`` contiguous row blocks,
    backpropagates each divided by the loss-token count of the whole batch, clips with
    ``clip_grad_norm_`` and takes an AdamW step at ``schedule(step)`` (``LambdaLR``, base lr 1).
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        decay_groups(model, settings.weight_decay), lr=1.0, betas=(settings.b1, settings.b2),
        eps=settings.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: float(schedule(s)))
    run = ReferenceRun([], [], [], {})
    for step in range(steps):
        batch = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batches[step % len(batches)].items()}
        batch["loss_mask"] = batch["loss_mask"].float()
        tokens = batch["loss_mask"].sum()
        total = torch.zeros(())
        for rows in np.array_split(np.arange(len(batch["inputs"])), num_microbatches):
            micro = {k: v[torch.from_numpy(rows)] for k, v in batch.items()}
            summed = _summed_token_loss(model, micro)
            (summed / tokens).backward()
            total += summed.detach()
        run.losses.append(float(total / tokens))
        run.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)))
        run.learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    run.weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return run
