"""Resumable batch generation: JSONL rows in, JSONL completions out, never losing input.

Each input line is a JSON object with exactly one of:
  ``prompt``: text, tokenized as is and continued until the model's eos;
  ``messages``: a chat (``[{"role", "content"}, ...]``, optional row-level ``tools``), rendered in
    the tokenizer's chat format with a generation prompt and continued until a chat stop token;
  ``input_ids``: token ids, continued until the model's eos (no tokenizer needed);
and optionally ``id``. Each output line carries ``index`` (0-based input line), ``id`` (the input's,
else the index), ``text`` (null without a tokenizer), ``output_ids``, ``logprobs`` and
``finish_reason`` ("stop" or "length"); a stop token is in ``output_ids``/``logprobs`` but not in
``text``.

The output is append-only and flushed after every batch; rerunning skips the indices it already
holds. A last line cut short by a crash is dropped first, but only once every complete line has
been checked to be an output row of this runner: a file that is not our own output (the input,
by mistake) is refused and never modified. Row ``index`` is sampled with seed ``seed + index``, so
a resumed run draws what an uninterrupted one would. A malformed row (not JSON, not UTF-8, an
unpaired surrogate, a wrong field) is reported as ``file:line: problem`` and skipped
(``on_error="skip"``) or ends the run (``on_error="stop"``).

In multi-process runs every process reads the input and runs the engine (generation is
collective); process 0 alone writes the output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal, TextIO

import jax
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import ChatFormat, ChatFormatError, chat_format_for
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig

OnError = Literal["skip", "stop"]
_OUTPUT_KEYS = frozenset({"index", "output_ids", "finish_reason"})


class RowError(ValueError):
    """A malformed input row; the message names the problem (and, once raised by the runner, the
    file and line)."""


class OutputFileError(ValueError):
    """``output`` names a file that is not an output of this runner (or is the input)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One parsed input row: its 0-based line index, id, prompt ids and whether it is a chat."""

    index: int
    row_id: Any
    input_ids: list[int]
    chat: bool


def _ids_field(value: Any) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RowError("field 'input_ids' must be a non-empty list of integers")
    return value


def parse_row(raw: bytes, index: int, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int,
              max_prompt_len: int, chat_format: ChatFormat | None = None) -> Request:
    """Parses one input line (bytes, without the newline) into a ``Request``; ``chat_format``
    (default: the tokenizer's, ``chat_format_for``) renders ``messages`` rows.

    Raises:
      RowError: naming the field that is missing, of the wrong type, or invalid, or the encoding
        problem (not UTF-8, an unpaired surrogate).
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowError(f"not UTF-8 ({err.reason} at byte {err.start})") from err
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise RowError(f"not valid JSON ({err})") from err
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(f"contains an unpaired surrogate ({err.reason}); not valid Unicode text") from err
    present = [field for field in ("prompt", "messages", "input_ids") if field in row]
    if len(present) != 1:
        raise RowError(f"needs exactly one of 'prompt', 'messages', 'input_ids'; got {present or 'none'}")
    field = present[0]
    value = row[field]
    if field != "input_ids" and tokenizer is None:
        raise RowError(f"field {field!r} needs a tokenizer (give one, or send 'input_ids')")
    if field == "prompt":
        if not isinstance(value, str) or not value:
            raise RowError("field 'prompt' must be a non-empty string")
        ids = tokenizer.encode(value)
    elif field == "messages":
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise RowError("field 'tools' must be a list of tool specs")
        try:
            ids = (chat_format or chat_format_for(tokenizer)).prompt_ids(value, tools=tools)
        except ChatFormatError as err:
            raise RowError(f"field 'messages': {err}") from err
    else:
        ids = _ids_field(value)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RowError(f"field {field!r}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise RowError(f"field {field!r} tokenizes to nothing")
    if len(ids) > max_prompt_len:
        raise RowError(f"field {field!r}: {len(ids)} prompt tokens exceed the engine's limit {max_prompt_len}")
    return Request(index, row.get("id", index), list(ids), field == "messages")


def _is_output_row(line: bytes) -> bool:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(row, dict) and _OUTPUT_KEYS <= set(row) and isinstance(row["index"], int)


def completed_indices(output_path: str, input_path: str | None = None, *, truncate: bool = True) -> set[int]:
    """Indices already in ``output_path``; checks that it is this runner's output first.

    Every complete line must be an output row. Only then is an unterminated last line (the
    previous run died mid-write) cut off, when ``truncate`` is set.

    Raises:
      OutputFileError: ``output_path`` is ``input_path``, or holds a line that is not an output
        row (naming the file and line); the file is left as it is.
    """
    if input_path is not None and os.path.exists(output_path) and os.path.exists(input_path) \
            and os.path.samefile(output_path, input_path):
        raise OutputFileError(f"{output_path}: the output is the input file; choose another --output")
    if not os.path.exists(output_path):
        return set()
    with open(output_path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    done = set()
    for number, line in enumerate(data[:keep].splitlines(), start=1):
        if not _is_output_row(line):
            raise OutputFileError(f"{output_path}:{number}: not an output row of launch.generate; "
                                  "refusing to append to (or truncate) this file")
        done.add(json.loads(line)["index"])
    if truncate and keep < len(data) and jax.process_index() == 0:
        with open(output_path, "r+b") as f:
            f.truncate(keep)
    return done


def read_requests(path: str, done: set[int], tokenizer: PreTrainedTokenizerBase | None, vocab_size: int,
                  max_prompt_len: int, on_error: OnError, report: TextIO, problems: list[str],
                  chat_format: ChatFormat | None = None) -> Iterator[Request]:
    """Yields the parseable rows of ``path`` whose index is not in ``done``.

    Malformed rows are reported to ``report`` as ``path:line: problem`` and appended to
    ``problems``; with ``on_error="stop"`` the first one raises ``RowError`` instead.
    """
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            if index in done:
                continue
            try:
                request = parse_row(raw.rstrip(b"\r\n"), index, tokenizer, vocab_size, max_prompt_len,
                                    chat_format)
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


def _chat_format_or_none(tokenizer: PreTrainedTokenizerBase | None) -> ChatFormat | None:
    """The tokenizer's chat format, or None when it has none (its ``messages`` rows are then
    malformed rows, each naming the reason)."""
    if tokenizer is None:
        return None
    try:
        return chat_format_for(tokenizer)
    except ChatFormatError:
        return None


def text_stop_ids(engine: GenerationEngine, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Ids that end a plain-text or ``input_ids`` continuation: the model's and tokenizer's eos."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return sorted({eos, *engine.config.eos_token_ids} - {None})


def run_batch(
    engine: GenerationEngine,
    tokenizer: PreTrainedTokenizerBase | None,
    input_path: str,
    output_path: str,
    *,
    sampling: SamplingConfig,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    on_error: OnError,
    report: TextIO = sys.stderr,
) -> dict[str, int]:
    """Generates for every new row of ``input_path`` and appends them to ``output_path``.

    Returns:
      Counts: ``written`` rows, ``already_done`` rows skipped for resumption, ``malformed`` rows.

    Raises:
      OutputFileError: ``output_path`` is not this runner's output (checked before anything runs).
      RowError: with ``on_error="stop"``, at the first malformed row (after writing earlier batches).
    """
    done = completed_indices(output_path, input_path)
    chat_format = _chat_format_or_none(tokenizer)
    chat_stops: Sequence[int] = chat_format.stop_token_ids if chat_format is not None else ()
    text_stops = text_stop_ids(engine, tokenizer)
    problems: list[str] = []
    requests = read_requests(input_path, done, tokenizer, engine.config.vocab_size, engine.length_buckets[-1],
                             on_error, report, problems, chat_format)
    writer = jax.process_index() == 0
    written = 0
    with open(output_path, "a", encoding="utf-8") if writer else open(os.devnull, "w") as out:
        for batch in _batches(requests, batch_size):
            results = engine.generate(
                [r.input_ids for r in batch], sampling, max_new_tokens=max_new_tokens,
                stop_token_ids=[list(chat_stops) if r.chat else text_stops for r in batch],
                seed=[seed + r.index for r in batch],
            )
            for request, result in zip(batch, results):
                body = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
                text = None if tokenizer is None else tokenizer.decode(body, skip_special_tokens=False)
                out.write(json.dumps({
                    "index": request.index,
                    "id": request.row_id,
                    "text": text,
                    "output_ids": result.tokens,
                    "logprobs": [round(x, 6) for x in result.logprobs],
                    "finish_reason": result.finish_reason,
                }, ensure_ascii=False) + "\n")
            out.flush()
            written += len(batch)
    return {"written": written, "already_done": len(done), "malformed": len(problems)}
