"""Metric sinks: MODEL_DIR/metrics.jsonl, TensorBoard event files, and a console progress line.

``metrics.jsonl`` holds one JSON object per logged step, each with ``step`` and ``loss`` (the
training loss over the steps since the previous row); evaluation results of that step are in the
same row under ``eval/``. Only process 0 writes. Paths go through ``etils.epath``, so MODEL_DIR
may be a ``gs://`` URL.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping

import jax
from etils import epath

METRICS_FILE = "metrics.jsonl"


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class MetricsWriter:
    """Writes one row per logged step to ``metrics.jsonl`` and the same scalars to TensorBoard.

    Resuming at ``resume_step`` first drops the rows past it (written by the interrupted run
    after its last checkpoint), so the file holds each step once; TensorBoard is told to purge
    its events past the resume step too (``purge_step``: TensorBoard drops the older files'
    events at or after it).

    Local files are appended to; object stores (no append) get the whole file rewritten.
    """

    def __init__(self, model_dir: str | epath.Path, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(model_dir) / METRICS_FILE
        self._tb = None
        self._rows: list[str] = []
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows = self._kept_rows(resume_step)
        self.path.write_text("".join(row + "\n" for row in self._rows))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(epath.Path(model_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def _kept_rows(self, resume_step: int) -> list[str]:
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                kept.append(json.dumps(row))
        return kept

    def write(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """Appends the row ``{"step": step, **scalars}`` (non-finite values become null)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
        line = json.dumps(row)
        self._rows.append(line)
        if _is_local(self.path):
            with self.path.open("a") as f:
                f.write(line + "\n")
        else:
            self.path.write_text("".join(r + "\n" for r in self._rows))
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(value) -> float | int | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class ProgressLine:
    """A one-line console progress report per logged step (stderr, process 0)."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.start = time.time()
        self.enabled = jax.process_index() == 0

    def show(self, step: int, metrics: Mapping[str, float | None]) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        parts = [f"step {step}/{self.total}"]
        for key in ("loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "eval/loss"):
            if metrics.get(key) is not None:
                value = metrics[key]
                parts.append(f"{key} {value:.3g}" if key != "tokens_per_s" else f"tok/s {value:,.0f}")
        parts.append(f"{elapsed:,.0f}s")
        print(" | ".join(parts), file=sys.stderr, flush=True)
