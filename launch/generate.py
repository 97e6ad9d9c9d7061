r"""Batch generation (JSONL in, JSONL out) and interactive chat with a glmjax model.

Batch mode::

  python -m launch.generate --hf_dir=/ckpt/glm-4-9b-chat --input=prompts.jsonl --output=out.jsonl \
      --max_new_tokens=512 --temperature=0.7 --top_p=0.9 --batch_size=16 --mesh_shape=1,1,8,1

Each input line is a JSON object with exactly one of:
  ``prompt``: text, tokenized as is and continued until ``<|endoftext|>`` or the model's eos;
  ``messages``: a chat (``[{"role", "content"}, ...]``, optional ``tools`` specs), rendered with
    the GLM-4 template plus a generation prompt and continued until a chat stop token;
  ``input_ids``: token ids, continued until ``<|endoftext|>`` or the model's eos;
and optionally ``id``. Each output line carries ``index`` (0-based input line), ``id`` (the input's,
else the index), ``text``, ``output_ids``, ``logprobs`` and ``finish_reason`` ("stop" or "length");
the stop token is in ``output_ids``/``logprobs`` but not in ``text``.

The output is append-only and flushed after every batch; rerunning skips the indices it already
holds (a line cut short by a crash is dropped first). Row ``index`` is sampled with seed
``--seed + index``, so a resumed run draws what an uninterrupted one would. A malformed input line
is reported as ``file:line: problem`` and skipped (``--on_error=skip``) or ends the run
(``--on_error=stop``).

Interactive mode (``--interactive``): a chat on the terminal; ``--tools=python`` offers the
sandboxed Python interpreter. Commands: ``/reset`` (new conversation), ``/exit``.

The model comes from ``--hf_dir`` (safetensors + config.json), ``--orbax_dir`` (a glmjax model
checkpoint: orbax parameters + model_config.json) or ``--run_dir`` (a training run's MODEL_DIR: its
model_config.json and the parameters of checkpoint ``--step``, default the latest); the tokenizer
from ``--tokenizer_dir`` (default: ``--hf_dir``).

Memory check (``--compile_only``): compiles the generation program for ``--batch_size`` prompts
of ``--prompt_len`` tokens and ``--max_new_tokens`` (the sampling flags select the program) on
``--mesh_shape`` and prints bytes per device as JSON, without reading any weights; the model
config comes from ``--preset``, ``--hf_dir``'s config.json or the model_config.json of
``--orbax_dir`` / ``--run_dir``::

  python -m launch.generate --compile_only --preset=glm4-9b --dtype=bfloat16 --mesh_shape=1,1,8,1
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from absl import app, flags

from glmjax import flops, sharding
from glmjax.checkpoints import from_pretrained
from glmjax.checkpoints.hf_config import config_from_hf, read_hf_config
from glmjax.checkpoints.orbax_io import load_model, read_model_config
from glmjax.data.chat_template import ChatFormatError, encode_chat, stop_token_ids
from glmjax.data.tokenizer import load_tokenizer
from glmjax.inference.chat import ChatSession
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import SamplingParams
from glmjax.inference.local_client import LocalEngineClient
from glmjax.inference.python_tool import register_python_tool
from glmjax.inference.sampling import SamplingConfig
from glmjax.inference.tools import ToolRegistry
from glmjax.models import ModelConfig, abstract_model, preset
from glmjax.training.checkpointing import load_trained_model

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
_TOOLS = flags.DEFINE_list("tools", [], "Tools offered in interactive mode: python.")
_MAX_TURNS = flags.DEFINE_integer("max_turns", 8, "Assistant turns per user message (interactive).")
_ATTENTION_BACKEND = flags.DEFINE_enum(
    "attention_backend", None, ["xla", "blockwise", "fused", "splash", "sample"],
    "Attention for the prefill (default: the model config's): splash on TPU and fused (cuDNN) "
    "on GPU keep long prompts' attention memory linear; blockwise is the CPU path for short ones.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile the program, print memory per device as JSON, exit.")
_PRESET = flags.DEFINE_string("preset", None, "Model preset for --compile_only (no weights needed).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "Prompt length for --compile_only.")


class RowError(ValueError):
    """A malformed input row; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One parsed input row."""

    index: int
    row_id: Any
    input_ids: list[int]
    chat: bool


def parse_row(line: str, index: int, tokenizer, vocab_size: int, max_prompt_len: int) -> Request:
    """Parses one input line into a ``Request``.

    Raises:
      RowError: naming the field that is missing, of the wrong type, or invalid.
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise RowError(f"not valid JSON ({err})") from err
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    present = [field for field in ("prompt", "messages", "input_ids") if field in row]
    if len(present) != 1:
        raise RowError(f"needs exactly one of 'prompt', 'messages', 'input_ids'; got {present or 'none'}")
    row_id = row.get("id", index)
    field = present[0]
    value = row[field]
    if field == "prompt":
        if not isinstance(value, str) or not value:
            raise RowError("field 'prompt' must be a non-empty string")
        ids = tokenizer.encode(value)
    elif field == "messages":
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise RowError("field 'tools' must be a list of tool specs")
        try:
            ids = encode_chat(tokenizer, value, add_generation_prompt=True, tools=tools).input_ids.tolist()
        except ChatFormatError as err:
            raise RowError(f"field 'messages': {err}") from err
    else:
        if not isinstance(value, list) or not value or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise RowError("field 'input_ids' must be a non-empty list of integers")
        ids = value
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RowError(f"field {field!r}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise RowError(f"field {field!r} tokenizes to nothing")
    if len(ids) > max_prompt_len:
        raise RowError(
            f"field {field!r}: {len(ids)} prompt tokens exceed the engine's limit {max_prompt_len}")
    return Request(index, row_id, list(ids), field == "messages")


def completed_indices(path: str) -> set[int]:
    """Indices already in the output file; a last line cut short by a crash is truncated away.

    Raises:
      ValueError: a complete line that is not an output row (naming the file and line).
    """
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):  # An unterminated last line: the previous run died mid-write.
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = set()
    for number, line in enumerate(data[:keep].decode().splitlines(), start=1):
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not an output row of this script ({err!r})") from err
    return done


def read_requests(path: str, done: set[int], tokenizer, vocab_size: int, max_prompt_len: int,
                  on_error: str, report: TextIO, problems: list[str]) -> Iterator[Request]:
    """Yields the parseable rows of ``path`` whose index is not in ``done``.

    Malformed rows are reported to ``report`` as ``path:line: problem`` and appended to
    ``problems``; with ``on_error="stop"`` the first one raises ``RowError`` instead.
    """
    with open(path) as f:
        for index, line in enumerate(f):
            if index in done:
                continue
            try:
                request = parse_row(line, index, tokenizer, vocab_size, max_prompt_len)
            except RowError as err:
                message = f"{path}:{index + 1}: {err}"
                if on_error == "stop":
                    raise RowError(message) from err
                problems.append(message)
                print(f"skipped {message}", file=report, flush=True)
                continue
            yield request


def _batches(requests: Iterator[Request], size: int) -> Iterator[list[Request]]:
    batch: list[Request] = []
    for request in requests:
        batch.append(request)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_batch(engine, tokenizer, input_path: str, output_path: str, *, sampling, max_new_tokens: int,
              batch_size: int, seed: int, on_error: str, report: TextIO = sys.stderr) -> dict[str, int]:
    """Generates for every new row of ``input_path`` and appends them to ``output_path``.

    Returns:
      Counts: ``written`` rows, ``already_done`` rows skipped for resumption, ``malformed`` rows.

    Raises:
      RowError: with ``on_error="stop"``, at the first malformed row (after writing earlier batches).
    """
    chat_stops = stop_token_ids(tokenizer)
    text_stops = sorted({tokenizer.eos_token_id, *engine.config.eos_token_ids} - {None})
    done = completed_indices(output_path)
    problems: list[str] = []
    max_prompt_len = engine.length_buckets[-1]
    requests = read_requests(input_path, done, tokenizer, engine.config.vocab_size, max_prompt_len,
                             on_error, report, problems)
    written = 0
    with open(output_path, "a") as out:
        for batch in _batches(requests, batch_size):
            results = engine.generate(
                [r.input_ids for r in batch], sampling, max_new_tokens=max_new_tokens,
                stop_token_ids=[chat_stops if r.chat else text_stops for r in batch],
                seed=[seed + r.index for r in batch],
            )
            for request, result in zip(batch, results):
                body = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
                out.write(json.dumps({
                    "index": request.index,
                    "id": request.row_id,
                    "text": tokenizer.decode(body, skip_special_tokens=False),
                    "output_ids": result.tokens,
                    "logprobs": [round(x, 6) for x in result.logprobs],
                    "finish_reason": result.finish_reason,
                }, ensure_ascii=False) + "\n")
            out.flush()
            written += len(batch)
    return {"written": written, "already_done": len(done), "malformed": len(problems)}


def run_interactive(engine, tokenizer, *, sampling, tools: list[str], system: str | None,
                    max_turns: int, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """A terminal chat; tool calls and observations are shown as they happen."""
    registry = None
    if tools:
        registry = ToolRegistry()
        for name in tools:
            if name != "python":
                raise app.UsageError(f"--tools: unknown tool {name!r} (available: python)")
            register_python_tool(registry)

    def show(_: int, message: dict[str, Any]) -> None:
        if message.get("tool_calls"):
            call = message["tool_calls"][0]["function"]
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            print(f"[tool call] {call['name']} {arguments}", file=stdout)
        elif message["role"] == "observation":
            print(f"[observation] {message['content']}", file=stdout)
        else:
            print(f"assistant> {message['content']}", file=stdout)

    session = ChatSession(LocalEngineClient(engine, tokenizer), tools=registry, system=system,
                          sampling=sampling, max_turns=max_turns, on_message=show)
    print("Chat: /reset starts over, /exit quits.", file=stdout, flush=True)
    while True:
        print("user> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if line.strip():
            result = session.send(line.rstrip("\n"))
            if result.finish_reason != "answer":
                print(f"[{result.finish_reason}] {result.error or ''}".rstrip(), file=stdout)
        stdout.flush()


def _load(mesh):
    if sum(source is not None for source in (_HF_DIR.value, _ORBAX_DIR.value, _RUN_DIR.value)) != 1:
        raise app.UsageError("give exactly one of --hf_dir, --orbax_dir and --run_dir")
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
) -> dict[str, Any]:
    """Compiles the generation program for an abstract ``config`` model on ``mesh`` (None: one
    device) and reports its memory per device (XLA's figures) and the compile time."""
    engine = GenerationEngine(abstract_model(config), mesh=mesh, max_batch_size=batch)
    start = time.time()
    memory = engine.compile(batch, prompt_len, max_new_tokens, sampling).memory_analysis()
    return {
        "devices": 1 if mesh is None else mesh.size,
        "mesh": None if mesh is None else dict(zip(mesh.axis_names, mesh.axis_sizes)),
        "batch": batch, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
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
        raise app.UsageError("--compile_only needs exactly one of --preset, --hf_dir, --orbax_dir, "
                             "--run_dir")
    if _ORBAX_DIR.value is not None or _RUN_DIR.value is not None:
        return read_model_config(_ORBAX_DIR.value or _RUN_DIR.value, **_config_overrides())
    overrides = {"param_dtype": _DTYPE.value, "compute_dtype": _DTYPE.value, **_config_overrides()}
    if _PRESET.value is not None:
        return preset(_PRESET.value).replace(**overrides)
    return config_from_hf(read_hf_config(_HF_DIR.value), os.path.join(_HF_DIR.value, "config.json"),
                          **overrides)


def _config_overrides() -> dict[str, str]:
    return {} if _ATTENTION_BACKEND.value is None else {"attention_backend": _ATTENTION_BACKEND.value}


def main(argv: list[str]) -> None:
    del argv
    mesh = None if _MESH_SHAPE.value is None else sharding.make_mesh([int(s) for s in _MESH_SHAPE.value])
    sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value)
    if _COMPILE_ONLY.value:
        print(json.dumps(compile_report(_config_for_compile(), mesh, _BATCH_SIZE.value, _PROMPT_LEN.value,
                                        _MAX_NEW_TOKENS.value, sampling)))
        return
    tokenizer_dir = _TOKENIZER_DIR.value or _HF_DIR.value
    if tokenizer_dir is None:
        raise app.UsageError("--tokenizer_dir is required with --orbax_dir and --run_dir")
    if not _INTERACTIVE.value and (_INPUT.value is None or _OUTPUT.value is None):
        raise app.UsageError("batch mode needs --input and --output (or pass --interactive)")
    tokenizer = load_tokenizer(tokenizer_dir)
    engine = GenerationEngine(_load(mesh), mesh=mesh, max_batch_size=_BATCH_SIZE.value)
    if _INTERACTIVE.value:
        sampling = SamplingParams(max_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                                  top_p=_TOP_P.value, top_k=_TOP_K.value, min_p=_MIN_P.value,
                                  seed=_SEED.value)
        run_interactive(engine, tokenizer, sampling=sampling, tools=_TOOLS.value,
                        system=_SYSTEM.value, max_turns=_MAX_TURNS.value)
        return
    try:
        counts = run_batch(engine, tokenizer, _INPUT.value, _OUTPUT.value, sampling=sampling,
                           max_new_tokens=_MAX_NEW_TOKENS.value, batch_size=_BATCH_SIZE.value,
                           seed=_SEED.value, on_error=_ON_ERROR.value)
    except RowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(counts))


if __name__ == "__main__":
    app.run(main)
