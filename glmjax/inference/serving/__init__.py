"""Serving: an OpenAI-compatible HTTP API (``app``) over continuous batching (``scheduler``).

Needs the ``fastapi`` and ``uvicorn`` packages (``launch.serve`` is the command line).
"""

from glmjax.inference.serving.app import BackgroundServer, ServedModel, create_app
from glmjax.inference.serving.scheduler import (
    ChoiceDelta,
    ChoiceResult,
    ContinuousScheduler,
    GenerationRequest,
    RequestFailed,
    SchedulerBusy,
    SchedulerClosed,
)

__all__ = [
    "BackgroundServer",
    "ChoiceDelta",
    "ChoiceResult",
    "ContinuousScheduler",
    "GenerationRequest",
    "RequestFailed",
    "SchedulerBusy",
    "SchedulerClosed",
    "ServedModel",
    "create_app",
]
