"""Stop requests: SIGTERM/SIGINT (or a caller's event) turned into a clean stop at a step boundary.

One process: the flag is read every step (no communication). Several processes: every process
must stop at the same step, so the flags are all-gathered only at sync points, every
``sync_every`` steps (MaxText checks preemption the same way); a stop is honoured at the next
sync point.

Signal handlers can only be installed from the main thread. When ``train()`` runs in another
thread, no handler is installed and a stop is requested through ``stop_event`` (a
``threading.Event`` the caller sets, e.g. from its own SIGTERM handler on the main thread).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
    """Collects stop requests from signals (main thread only) and an optional event.

    Args:
      sync_every: in multi-process runs, steps between agreements on the flag.
      stop_event: set by the caller to request a stop (works from any thread).
    """

    def __init__(self, sync_every: int = 10, stop_event: threading.Event | None = None):
        if sync_every < 1:
            raise ValueError(f"train.preemption_sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self.event = stop_event if stop_event is not None else threading.Event()
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        elif stop_event is None:
            logging.warning(
                "train() is running off the main thread: no SIGTERM handler is installed; pass "
                "stop_event (a threading.Event set by the caller) to stop it cleanly")

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.event.set()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step``; the same answer on every process."""
        if jax.process_count() == 1:
            return self.event.is_set()
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.array([self.event.is_set()], np.int32))
        return bool(np.max(flags))

    def close(self) -> None:
        """Puts back the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
