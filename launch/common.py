"""Flags and set-up shared by the launch entrypoints (train, generate, serve)."""

from __future__ import annotations

import jax
from absl import flags, logging

COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() from the environment.")


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the flags (or the environment with ``--distributed``)."""
    if COORDINATOR.value:
        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    elif DISTRIBUTED.value:
        jax.distributed.initialize()


def quiet_library_logs() -> None:
    """Library INFO logs (orbax's) drown progress lines and chats; keep warnings unless the user
    asked for a verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
