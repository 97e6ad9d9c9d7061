"""Optimiser of every APFed party's modules."""

from __future__ import annotations

import dataclasses

import gin
import optax

from glmjax.federated.channel import PartyConfigError


@gin.configurable("party_optimizer")
@dataclasses.dataclass(frozen=True)
class PartyOptimizer:
    """Hashable optimiser settings (jitted steps are cached per setting); ``build()`` gives the
    optax transformation.

    ``adamw`` (default here: converges in few CPU epochs) or ``sgd`` with momentum and decoupled
    weight decay (the paper's choice: SGD, momentum 0.9, lr 1e-3, wd 1e-4, 300 epochs).
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9

    def __post_init__(self):
        if self.name not in ("adamw", "sgd"):
            raise PartyConfigError(f"party_optimizer name={self.name!r}: expected 'adamw' or 'sgd'")

    def build(self) -> optax.GradientTransformation:
        if self.name == "adamw":
            return optax.adamw(self.learning_rate, weight_decay=self.weight_decay)
        return optax.chain(optax.add_decayed_weights(self.weight_decay),
                           optax.sgd(self.learning_rate, momentum=self.momentum or None))
