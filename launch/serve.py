r"""An OpenAI-compatible HTTP server on a glmjax model, with continuous batching.

  python -m launch.serve --hf_dir=/ckpt/glm-4-9b-chat --port=8000 --max_slots=16 --max_len=4096
  python -m launch.serve --run_dir=/runs/sft --step=2000 --served_model_name=sft

Routes: ``/health``, ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (tools, ``n``,
``seed``, ``stop``, ``max_tokens``, ``temperature`` / ``top_p`` / ``top_k`` / ``min_p``,
``logprobs``, ``stream``), described in ``glmjax.inference.serving.app``. Once listening it prints
one JSON line ``{"url": "http://HOST:PORT/v1", "model": NAME, ...}`` (``--port=0`` picks a free
port); SIGINT or SIGTERM stops it.

The model comes from ``--hf_dir``, ``--orbax_dir`` or ``--run_dir`` (+ ``--step``), the tokenizer
from ``--tokenizer_dir``, else ``--hf_dir``, else the run's recorded tokenizer, as in
``launch.generate``.

Continuous batching (``glmjax.inference.serving.scheduler``): ``--max_slots`` rows decode together
in one KV cache of ``--max_len`` positions per row (prompt + completion); a finished row's slot is
refilled at once. ``--batching=static`` admits a new batch only when the whole batch has finished
(for comparisons).

Multi-process (``launch.train``'s flags: ``--coordinator_address``, ``--num_processes``,
``--process_id``, or ``--distributed``; a ``--mesh_shape`` spanning the processes): process 0
serves HTTP and schedules; every other process follows its schedule, receiving each program call's
inputs from process 0 (``multihost_utils.broadcast_one_to_all``) and making the same call, so one
model sharded over all processes serves one request stream. Clients talk to process 0 only; the
others listen on no port. Stopping process 0 stops them; if it dies, they wait in the broadcast
and must be killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import jax
from absl import app, flags

from glmjax import sharding
from glmjax.checkpoints import CheckpointError, from_pretrained
from glmjax.checkpoints.orbax_io import load_model
from glmjax.checkpoints.training_runs import load_trained_model, run_tokenizer_dir
from glmjax.data.tokenizer import TokenizerError, load_tokenizer
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.serving import (
    BackgroundServer,
    ContinuousScheduler,
    ServedModel,
    create_app,
)
from launch import common

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + safetensors).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "glmjax orbax model checkpoint directory.")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "A launch.train MODEL_DIR: its model config and "
                               "the parameters of checkpoint --step.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --run_dir (default: the latest).")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer directory (default: --hf_dir, "
                                     "else the one --run_dir recorded).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Parameter and compute dtype for --hf_dir models.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", None,
                                "data,fsdp,tensor,sequence mesh; default: no mesh (one device).")
_ATTENTION_BACKEND = flags.DEFINE_enum(
    "attention_backend", None, ["xla", "blockwise", "fused", "splash", "sample"],
    "Attention for the prefill (default: the model config's).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 for every one).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: a free one, printed).")
_SERVED_MODEL_NAME = flags.DEFINE_string("served_model_name", None,
                                         "Model id clients send (default: the model directory's name).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 16, "Completions decoded together (KV cache rows).")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None, "Prefill prompts longer than this many tokens in chunks of it (bounded "
    "activation memory for long prompts); default: one forward per prompt.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Prompt + completion tokens per request at most "
                                "(default: the model's max_position_embeddings, at most 4096).")
_DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", 8, "Decode steps per device call at most "
                                     "(streaming and stop strings are handled between calls).")
_MAX_PREFILL_BATCH = flags.DEFINE_integer("max_prefill_batch", 4, "Prompts prefilled together at most.")
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 256, "Requests waiting for a slot at most (then 429).")
_BATCHING = flags.DEFINE_enum("batching", "continuous", ["continuous", "static"],
                              "continuous: a finished row's slot is refilled at once; static: a new "
                              "batch only when the whole batch has finished.")
_LOGPROB_MODE = flags.DEFINE_enum("logprob_mode", "raw", ["raw", "processed", "scaled"],
                                  "Log-probabilities reported (glmjax.inference.sampling).")


class UserError(ValueError):
    """A flag combination that cannot work."""


def _load(mesh):
    sources = (_HF_DIR.value, _ORBAX_DIR.value, _RUN_DIR.value)
    if sum(source is not None for source in sources) != 1:
        raise UserError("give exactly one of --hf_dir, --orbax_dir and --run_dir")
    overrides = {} if _ATTENTION_BACKEND.value is None else {"attention_backend": _ATTENTION_BACKEND.value}
    if _HF_DIR.value is not None:
        return from_pretrained(_HF_DIR.value, dtype=_DTYPE.value, mesh=mesh, **overrides)
    if _RUN_DIR.value is not None:
        return load_trained_model(_RUN_DIR.value, _STEP.value, mesh=mesh, **overrides)
    return load_model(_ORBAX_DIR.value, mesh=mesh, **overrides)


def _tokenizer():
    directory = _TOKENIZER_DIR.value or _HF_DIR.value
    if directory is None and _RUN_DIR.value is not None:
        directory = run_tokenizer_dir(_RUN_DIR.value)
    if directory is None:
        raise UserError("serving needs a tokenizer: pass --tokenizer_dir (the model's tokenizer directory)")
    return load_tokenizer(directory)


def _model_name() -> str:
    if _SERVED_MODEL_NAME.value:
        return _SERVED_MODEL_NAME.value
    source = _HF_DIR.value or _ORBAX_DIR.value or _RUN_DIR.value
    return os.path.basename(os.path.normpath(source))


def _run() -> int:
    common.quiet_library_logs()
    common.initialize_distributed()
    tokenizer = _tokenizer()  # before the weights: a missing tokenizer fails fast
    mesh = None if _MESH_SHAPE.value is None else sharding.make_mesh([int(s) for s in _MESH_SHAPE.value])
    engine = GenerationEngine(_load(mesh), mesh=mesh, max_batch_size=_MAX_SLOTS.value,
                              prefill_chunk=_PREFILL_CHUNK.value)
    max_len = _MAX_LEN.value or min(4096, engine.config.max_position_embeddings)
    if max_len > engine.config.max_position_embeddings:
        raise UserError(f"--max_len={max_len} exceeds the model's max_position_embeddings "
                        f"({engine.config.max_position_embeddings})")
    options = dict(max_slots=_MAX_SLOTS.value, max_len=max_len, decode_chunk=_DECODE_CHUNK.value,
                   max_prefill_batch=_MAX_PREFILL_BATCH.value, max_waiting=_MAX_WAITING.value,
                   batching=_BATCHING.value, logprob_mode=_LOGPROB_MODE.value)
    if jax.process_index() != 0:
        ContinuousScheduler(engine, lambda ids: "", **options).programs.follow()
        return 0
    served = ServedModel(_model_name(), engine, tokenizer, **options)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with BackgroundServer(create_app(served), _HOST.value, _PORT.value) as server:
            print(json.dumps({"url": server.base_url, "model": served.name, "max_slots": _MAX_SLOTS.value,
                              "max_len": max_len, "batching": _BATCHING.value,
                              "processes": jax.process_count()}), flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        served.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"serve: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        return _run()
    except (CheckpointError, TokenizerError, UserError, FileNotFoundError, ValueError, OSError) as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
