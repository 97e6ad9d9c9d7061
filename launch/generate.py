r"""Batch generation (JSONL in, JSONL out) and interactive chat with a glmjax model.

Batch mode::

  python -m launch.generate --hf_dir=/ckpt/glm-4-9b-chat --input=prompts.jsonl --output=out.jsonl \
      --max_new_tokens=512 --temperature=0.7 --top_p=0.9 --batch_size=16 --mesh_shape=1,1,8,1

Rows (``prompt``, ``messages`` or ``input_ids``, optional ``id``) and output lines are described in
``glmjax.inference.batch_runner``: the output is append-only and resumable, row ``index`` samples
with seed ``--seed + index``, a malformed row is reported as ``file:line: problem`` and skipped
(``--on_error=skip``) or ends the run (``--on_error=stop``), and a file that is not this runner's
output is never modified.

Interactive mode (``--interactive``): a chat on the terminal in the tokenizer's chat format;
``--tools=python,simple_browser`` offers GLM-4's All Tools (the sandboxed interpreter, and a browser
over a local BM25 index of ``--documents``). Commands: ``/reset`` (new conversation), ``/exit``.

The model comes from ``--hf_dir`` (safetensors + config.json), ``--orbax_dir`` (a glmjax model
checkpoint: orbax parameters + model_config.json) or ``--run_dir`` (a training run's MODEL_DIR: its
model_config.json and the parameters of checkpoint ``--step``, default the latest); the tokenizer
from ``--tokenizer_dir``, else ``--hf_dir``, else the one the run recorded (``MODEL_DIR/tokenizer``).
Rows of ``input_ids`` need no tokenizer. Multi-process runs take ``launch.train``'s flags
(``--coordinator_address``, ``--num_processes``, ``--process_id`` or ``--distributed``).

Memory check (``--compile_only``): compiles the generation program for ``--batch_size`` prompts
of ``--prompt_len`` tokens and ``--max_new_tokens`` (the sampling flags select the program) on
``--mesh_shape`` and prints bytes per device as JSON, without reading any weights; the model
config comes from ``--preset``, ``--hf_dir``'s config.json or the model_config.json of
``--orbax_dir`` / ``--run_dir``::

  python -m launch.generate --compile_only --preset=glm4-9b --dtype=bfloat16 --mesh_shape=1,1,8,1
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
from absl import app, flags
from transformers import PreTrainedTokenizerBase

from glmjax import flops, hardware, sharding
from glmjax.checkpoints import CheckpointError, from_pretrained
from glmjax.checkpoints.hf_config import config_from_hf, read_hf_config
from glmjax.checkpoints.orbax_io import load_model, read_model_config
from glmjax.checkpoints.training_runs import load_trained_model, run_tokenizer_dir
from glmjax.data.chat_format import ChatFormatError
from glmjax.data.tokenizer import TokenizerError, load_tokenizer
from glmjax.inference.batch_runner import OutputFileError, RowError, completed_indices, run_batch
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import SamplingParams
from glmjax.inference.sampling import SamplingConfig
from glmjax.inference.terminal_chat import run_interactive
from glmjax.models import ModelConfig, abstract_model, preset
from launch import common

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory (config.json + safetensors).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "glmjax orbax model checkpoint directory.")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "A launch.train MODEL_DIR: its model config and "
                               "the parameters of checkpoint --step.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --run_dir (default: the latest).")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer directory (default: --hf_dir).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Parameter and compute dtype for --hf_dir models.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", None,
                                "data,fsdp,tensor,sequence mesh; default: no mesh (one device).")
_INPUT = flags.DEFINE_string("input", None, "Input JSONL (batch mode).")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL, appended to (batch mode).")
_ON_ERROR = flags.DEFINE_enum("on_error", "skip", ["skip", "stop"],
                              "On a malformed input line: report and skip it, or stop the run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Prompts per engine call.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Generated tokens per row at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus filter (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Min-p filter (0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed; row i uses seed + i.")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "Chat on the terminal instead of batch mode.")
_SYSTEM = flags.DEFINE_string("system", None, "System prompt (interactive mode).")
_TOOLS = flags.DEFINE_list("tools", [], "GLM-4 All Tools offered in interactive mode: python, simple_browser.")
_DOCUMENTS = flags.DEFINE_list("documents", [], "Files and directories simple_browser searches (a local BM25 index).")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 8, "Assistant turns per user message (interactive).")
_ATTENTION_BACKEND = flags.DEFINE_enum(
    "attention_backend", None, ["xla", "blockwise", "fused", "splash", "sample"],
    "Attention for the prefill (default: the model config's): splash on TPU and fused (cuDNN) "
    "on GPU keep long prompts' attention memory linear; blockwise (flash in XLA loops) anywhere.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile the program, print memory per device as JSON, exit.")
_PRESET = flags.DEFINE_string("preset", None, "Model preset for --compile_only (no weights needed).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "Prompt length for --compile_only.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: compile for this TPU topology (e.g. v5p:2x2x1) through "
    "libtpu on this host; --mesh_shape then defaults to 1,-1,1,1 over its chips.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None, "Prefill prompts longer than this many tokens in chunks of it (bounded "
    "activation memory for long prompts); default: one forward per prompt.")


def _load(mesh):
    if sum(source is not None for source in (_HF_DIR.value, _ORBAX_DIR.value, _RUN_DIR.value)) != 1:
        raise UserError("give exactly one of --hf_dir, --orbax_dir and --run_dir")
    if _HF_DIR.value is not None:
        return from_pretrained(_HF_DIR.value, dtype=_DTYPE.value, mesh=mesh, **_config_overrides())
    if _RUN_DIR.value is not None:
        return load_trained_model(_RUN_DIR.value, _STEP.value, mesh=mesh, **_config_overrides())
    return load_model(_ORBAX_DIR.value, mesh=mesh, **_config_overrides())


def compile_report(
    config: ModelConfig,
    mesh,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    prefill_chunk: int | None = None,
) -> dict[str, Any]:
    """Compiles the generation program for an abstract ``config`` model on ``mesh`` (None: one
    device) and reports its memory per device (XLA's figures) and the compile time."""
    engine = GenerationEngine(abstract_model(config), mesh=mesh, max_batch_size=batch,
                              prefill_chunk=prefill_chunk)
    start = time.time()
    memory = engine.compile(batch, prompt_len, max_new_tokens, sampling).memory_analysis()
    return {
        "devices": 1 if mesh is None else mesh.size,
        "mesh": None if mesh is None else dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "batch": batch, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
        "prefill_chunk": prefill_chunk, "attention_backend": config.attention_backend,
        "parameters": flops.count_params(config).total,
        "param_dtype": config.param_dtype, "compute_dtype": config.compute_dtype,
        "argument_bytes_per_device": memory.argument_size_in_bytes,
        "output_bytes_per_device": memory.output_size_in_bytes,
        "temp_bytes_per_device": memory.temp_size_in_bytes,
        "compile_seconds": round(time.time() - start, 2),
    }


def _config_for_compile() -> ModelConfig:
    sources = [_PRESET.value, _HF_DIR.value, _ORBAX_DIR.value, _RUN_DIR.value]
    if sum(source is not None for source in sources) != 1:
        raise UserError("--compile_only needs exactly one of --preset, --hf_dir, --orbax_dir, --run_dir")
    if _ORBAX_DIR.value is not None or _RUN_DIR.value is not None:
        return read_model_config(_ORBAX_DIR.value or _RUN_DIR.value, **_config_overrides())
    overrides = {"param_dtype": _DTYPE.value, "compute_dtype": _DTYPE.value, **_config_overrides()}
    if _PRESET.value is not None:
        return preset(_PRESET.value).replace(**overrides)
    return config_from_hf(read_hf_config(_HF_DIR.value), os.path.join(_HF_DIR.value, "config.json"),
                          **overrides)


def _config_overrides() -> dict[str, str]:
    return {} if _ATTENTION_BACKEND.value is None else {"attention_backend": _ATTENTION_BACKEND.value}


def _tokenizer(required: bool) -> PreTrainedTokenizerBase | None:
    directory = _TOKENIZER_DIR.value or _HF_DIR.value
    if directory is None and _RUN_DIR.value is not None:
        try:
            directory = run_tokenizer_dir(_RUN_DIR.value)
        except CheckpointError:
            if required:
                raise
    if directory is None:
        if required:
            raise UserError("this mode needs a tokenizer: pass --tokenizer_dir (the model's tokenizer directory)")
        return None
    return load_tokenizer(directory)


class UserError(ValueError):
    """A flag combination that cannot work."""


def _run() -> int:
    common.quiet_library_logs()
    common.initialize_distributed()
    if _TOPOLOGY.value is not None and not _COMPILE_ONLY.value:
        raise UserError("--topology needs --compile_only")
    sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value)
    if _TOPOLOGY.value is not None:
        shape = [int(s) for s in _MESH_SHAPE.value] if _MESH_SHAPE.value is not None else [1, -1, 1, 1]
        try:
            mesh = hardware.tpu_topology_mesh(_TOPOLOGY.value, shape)
        except RuntimeError as err:  # libtpu missing, or a topology it rejects: the message says which
            raise UserError(str(err)) from None
        with jax.default_matmul_precision("default"):
            report = compile_report(_config_for_compile(), mesh,
                                    _BATCH_SIZE.value, _PROMPT_LEN.value, _MAX_NEW_TOKENS.value, sampling,
                                    _PREFILL_CHUNK.value)
        print(json.dumps({"topology": _TOPOLOGY.value, **report}))
        return 0
    mesh = None if _MESH_SHAPE.value is None else sharding.make_mesh([int(s) for s in _MESH_SHAPE.value])
    if _COMPILE_ONLY.value:
        print(json.dumps(compile_report(_config_for_compile(), mesh, _BATCH_SIZE.value, _PROMPT_LEN.value,
                                        _MAX_NEW_TOKENS.value, sampling, _PREFILL_CHUNK.value)))
        return 0
    if not _INTERACTIVE.value and (_INPUT.value is None or _OUTPUT.value is None):
        raise UserError("batch mode needs --input and --output (or pass --interactive)")
    if not _INTERACTIVE.value:
        completed_indices(_OUTPUT.value, _INPUT.value, truncate=False)  # refuse a wrong --output first
    tokenizer = _tokenizer(required=_INTERACTIVE.value)
    engine = GenerationEngine(_load(mesh), mesh=mesh, max_batch_size=_BATCH_SIZE.value,
                              prefill_chunk=_PREFILL_CHUNK.value)
    if _INTERACTIVE.value:
        params = SamplingParams(max_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                                top_p=_TOP_P.value, top_k=_TOP_K.value, min_p=_MIN_P.value, seed=_SEED.value)
        run_interactive(engine, tokenizer, sampling=params, tools=_TOOLS.value, system=_SYSTEM.value,
                        max_turns=_MAX_TURNS.value, documents=_DOCUMENTS.value)
        return 0
    counts = run_batch(engine, tokenizer, _INPUT.value, _OUTPUT.value, sampling=sampling,
                       max_new_tokens=_MAX_NEW_TOKENS.value, batch_size=_BATCH_SIZE.value,
                       seed=_SEED.value, on_error=_ON_ERROR.value)
    if jax.process_index() == 0:
        print(json.dumps(counts))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"generate: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        return _run()
    except (CheckpointError, TokenizerError, OutputFileError, RowError, UserError, ChatFormatError,
            FileNotFoundError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
