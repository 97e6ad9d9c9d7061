"""Lambda x seed sweeps of APFed-R and APFed-C on a built-in multi-view data set.

Every run trains the active party with the passive parties behind in-process channels (the
same messages, byte encoding and party code as the gRPC runs) and reports the active-alone test
accuracy, argmax h(f_A(x_A)). lambda = 0 calls no passive party: it is the active-alone baseline,
the same run for both variants (trained once per seed, shown in both rows).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import gin
import numpy as np
from absl import logging

from glmjax.federated.channel import InProcessChannel
from glmjax.federated.data import builtin_party
from glmjax.federated.passive import PassiveConfig, PassiveParty
from glmjax.federated.training import ActiveConfig, train_active


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """accuracies[(variant, lambda)] = test accuracies, one per seed (seed order)."""

    dataset: str
    num_views: int
    active_view: int
    seeds: tuple[int, ...]
    accuracies: dict[tuple[str, float], list[float]]
    seconds: float

    def table(self) -> str:
        """Markdown table: one row per variant, one column per lambda, mean ± std (population
        std over seeds) of the test accuracy in %."""
        lambdas = sorted({lam for _, lam in self.accuracies})
        variants = sorted({v for v, _ in self.accuracies}, key=("R", "C").index)
        head = "| variant | " + " | ".join(f"λ={lam:g}" for lam in lambdas) + " |"
        rows = [head, "|---|" + "---|" * len(lambdas)]
        for variant in variants:
            cells = []
            for lam in lambdas:
                acc = 100.0 * np.asarray(self.accuracies[(variant, lam)])
                cells.append(f"{acc.mean():.2f} ± {acc.std():.2f}")
            rows.append(f"| APFed-{variant} | " + " | ".join(cells) + " |")
        caption = (f"{self.dataset}, {self.num_views} views, active view {self.active_view}, "
                   f"test accuracy % (mean ± std over seeds {list(self.seeds)}), {self.seconds:.0f} s")
        return caption + "\n\n" + "\n".join(rows)


def run_once(dataset: str, num_views: int, active_view: int, active: ActiveConfig,
             passive: PassiveConfig) -> float:
    """One in-process run: the active view plus every other view as a passive party; test accuracy."""
    data = builtin_party(dataset, active_view, num_views, with_labels=True)
    channels = []
    for view in range(num_views):
        if view != active_view:
            name = f"view{view}"
            party = PassiveParty(builtin_party(dataset, view, num_views, with_labels=False),
                                 dataclasses.replace(passive, name=name, seed=active.seed + 1000 * (view + 1)))
            channels.append(InProcessChannel(name, party))
    return train_active(data, channels, active).test_accuracy


@gin.configurable
def apfed_sweep(dataset: str = "digits", num_views: int = 3, active_view: int = 0,
                variants: Sequence[str] = ("R", "C"), trade_offs: Sequence[float] = (0.0, 0.1, 1.0, 10.0),
                seeds: Sequence[int] = (0, 1, 2)) -> SweepResult:
    """Runs every (variant, lambda, seed); the rest of the settings come from ``ActiveConfig`` and
    ``PassiveConfig`` as bound in gin (their variant, trade_off and seed are set per run)."""
    start = time.perf_counter()
    base_active, base_passive = ActiveConfig(), PassiveConfig()
    accuracies: dict[tuple[str, float], list[float]] = {}
    for seed in seeds:
        baseline = None
        for variant in variants:
            for lam in trade_offs:
                if lam == 0.0 and baseline is not None:
                    accuracies.setdefault((variant, lam), []).append(baseline)
                    continue
                active = dataclasses.replace(base_active, variant=variant, trade_off=lam, seed=seed,
                                             trade_offs=None, checkpoint_dir=None)
                passive = dataclasses.replace(base_passive, variant=variant, checkpoint_dir=None)
                acc = run_once(dataset, num_views, active_view, active, passive)
                if lam == 0.0:
                    baseline = acc
                accuracies.setdefault((variant, lam), []).append(acc)
                logging.info("sweep %s APFed-%s lambda=%g seed=%d: test accuracy %.4f",
                             dataset, variant, lam, seed, acc)
    return SweepResult(dataset, num_views, active_view, tuple(seeds), accuracies,
                       time.perf_counter() - start)


@gin.configurable
def apfed_experiments(sweeps: Sequence[str] = ("digits",)) -> list[SweepResult]:
    """Runs ``apfed_sweep`` once per gin scope name in ``sweeps`` (e.g. scopes ``digits`` and
    ``breast_cancer`` binding ``apfed_sweep``, ``ActiveConfig``, ``PassiveConfig`` each)."""
    results = []
    for scope in sweeps:
        with gin.config_scope(scope):
            results.append(apfed_sweep())
    return results
