"""Metric sinks: MODEL_DIR/metrics.jsonl, TensorBoard event files, and a console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax


class MetricsWriter:
    """Writes one JSON object per logged step (with at least ``step`` and ``loss``) and the same
    scalars to TensorBoard. Only process 0 writes.

    Resuming appends: rows at or past the resume step from an interrupted run are dropped first,
    so the file holds each step once.
    """

    def __init__(self, model_dir: str, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(model_dir, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard"))

    def _truncate_after(self, resume_step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(json.dumps(row))
        with open(self.path, "w") as f:
            f.write("".join(k + "\n" for k in kept))

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: _jsonable(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value) -> float | int | None:
    value = float(value)
    return value if math.isfinite(value) else None


class ProgressLine:
    """A one-line console progress report per logged step (stderr, process 0)."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.start = time.time()
        self.enabled = jax.process_index() == 0

    def show(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        parts = [f"step {step}/{self.total}"]
        for key in ("loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_s", "mfu"):
            if metrics.get(key) is not None:
                value = metrics[key]
                parts.append(f"{key} {value:.3g}" if key != "tokens_per_s" else f"tok/s {value:,.0f}")
        parts.append(f"{elapsed:,.0f}s")
        print(" | ".join(parts), file=sys.stderr, flush=True)
