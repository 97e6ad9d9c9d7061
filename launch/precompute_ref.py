r"""Adds reference-model log-probs to a DPO pair file, once, so training needs no reference forward.

  python -m launch.precompute_ref --pairs=pairs.jsonl --output=pairs_ref.jsonl \
      --run_dir=runs/quickstart/sft --seq_len=128

Every input record (``glmjax.data.pairs`` formats) is written to ``--output``, in order, with
``ref_chosen_logp`` and ``ref_rejected_logp`` added: the reference's summed log-probs (nats) of the
chosen and rejected completion, encoded exactly as ``pair_data`` encodes them. Train on the output
with ``pair_data.ref_logps = True`` and ``DPOObjective.reference = "precomputed"``. A pair longer
than ``--seq_len`` is written without the fields (``pair_data`` drops it as over-long anyway).

The reference is a training run (``--run_dir``, optional ``--step``), an orbax model checkpoint
(``--orbax_dir``) or an HF directory (``--hf_dir``). The tokenizer is ``--tokenizer_dir``, else the
run's own (``--run_dir``), else the embedded default one.

Resumable: the output is appended to batch by batch (flushed and synced); a restarted command
checks that the lines already there are the first input records (with log-probs added), drops a
partial last line left by a kill, and continues after them. Progress goes to stderr, a JSON summary
to stdout; errors print one line ``precompute_ref: <message>`` and exit with status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from glmjax import sharding
from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.data.factories import tokenizer as default_or_local_tokenizer
from glmjax.data.pairs import LONG_REWARD_TEMPLATE, REF_CHOSEN_FIELD, REF_REJECTED_FIELD, PairEncoder, pair_rows
from glmjax.data.sources import DataFormatError, EmptyDatasetError, JsonlSource
from glmjax.data.tokenizer import TokenizerError
from glmjax.objectives.dpo import sequence_logps
from launch import common

_PAIRS = flags.DEFINE_string("pairs", None, "Input pair JSONL file.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL file (appended to when resuming).")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "Reference: a launch.train MODEL_DIR.")
_STEP = flags.DEFINE_integer("step", None, "With --run_dir: checkpoint step (default: newest good one).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "Reference: a glmjax orbax model checkpoint.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Reference: an HF checkpoint directory.")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer directory (default: the run's, else embedded).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per row, as in training (pair_data.seq_len).")
_BATCH_PAIRS = flags.DEFINE_integer("batch_pairs", 16, "Pairs per forward pass.")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Sequence chunk of the log-prob computation.")
_TEMPLATE = flags.DEFINE_string("prompt_template", LONG_REWARD_TEMPLATE, "LongReward records' prompt template.")
flags.mark_flags_as_required(["pairs", "output", "seq_len"])

_REF_FIELDS = (REF_CHOSEN_FIELD, REF_REJECTED_FIELD)


class PrecomputeError(ValueError):
    """Bad settings or an output that does not belong to the input (one-line message)."""


def _without_ref(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in _REF_FIELDS}


def resume_point(output: str, source: JsonlSource) -> int:
    """How many input records ``output`` already holds; cuts a partial last line (a kill during a
    write) off the file.

    Raises:
      PrecomputeError: a complete output line that is not the matching input record.
    """
    if not os.path.exists(output):
        return 0
    with open(output, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    lines = complete.splitlines()
    if len(lines) > len(source):
        raise PrecomputeError(f"{output} has {len(lines)} lines but {len(source)} input records; use a new --output")
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PrecomputeError(f"{output}:{index + 1}: malformed JSON ({err.msg})") from err
        if not isinstance(record, dict) or _without_ref(record) != _without_ref(source[index]):
            raise PrecomputeError(f"{output}:{index + 1} is not {source.location(index)} (was the output "
                                  "written for another input?); use a new --output")
    return len(lines)


def _load_reference(mesh):
    chosen = [name for name, flag in (("run_dir", _RUN_DIR), ("orbax_dir", _ORBAX_DIR), ("hf_dir", _HF_DIR))
              if flag.value]
    if len(chosen) != 1:
        raise PrecomputeError(f"give exactly one of --run_dir, --orbax_dir, --hf_dir (got {chosen or 'none'})")
    if _RUN_DIR.value:
        from glmjax.checkpoints.training_runs import load_trained_model

        return load_trained_model(_RUN_DIR.value, _STEP.value, mesh=mesh)
    if _ORBAX_DIR.value:
        from glmjax.checkpoints.orbax_io import load_model

        return load_model(_ORBAX_DIR.value, mesh=mesh)
    from glmjax.checkpoints.hf import from_pretrained

    return from_pretrained(_HF_DIR.value, mesh=mesh)


def _tokenizer():
    if _TOKENIZER_DIR.value:
        return default_or_local_tokenizer(_TOKENIZER_DIR.value)
    if _RUN_DIR.value:
        from glmjax.checkpoints.training_runs import run_tokenizer_dir

        return default_or_local_tokenizer(run_tokenizer_dir(_RUN_DIR.value))
    return default_or_local_tokenizer()


def _logps_fn(model, chunk_size: int):
    graphdef, params = nnx.split(model)

    @jax.jit
    def logps(params, batch):
        return sequence_logps(nnx.merge(graphdef, params), batch, chunk_size)[0]

    return lambda batch: np.asarray(logps(params, batch))


def _stack(rows: list[dict[str, np.ndarray]], pairs: int, seq_len: int) -> dict[str, np.ndarray]:
    """``pairs`` pairs of rows as [2 * pairs, seq_len] (zero rows fill a short last batch)."""
    keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    out = {key: np.zeros((2 * pairs, seq_len), np.int32) for key in keys}
    for index, pair in enumerate(rows):
        for key in keys:
            out[key][2 * index: 2 * index + 2] = pair[key]
    return out


def precompute() -> dict[str, Any]:
    if os.path.abspath(_PAIRS.value) == os.path.abspath(_OUTPUT.value):
        raise PrecomputeError("--output must differ from --pairs")
    if _SEQ_LEN.value < 1 or _BATCH_PAIRS.value < 1:
        raise PrecomputeError("--seq_len and --batch_pairs must be >= 1")
    source = JsonlSource(_PAIRS.value)
    done = resume_point(_OUTPUT.value, source)
    mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    summary = {"pairs": len(source), "resumed_at": done, "written": 0, "overlong": 0, "output": _OUTPUT.value}
    if done == len(source):
        return summary
    encoder = PairEncoder(_tokenizer(), prompt_template=_TEMPLATE.value)
    logps = _logps_fn(_load_reference(mesh), _CHUNK.value)
    start = time.time()
    with open(_OUTPUT.value, "a", encoding="utf-8") as out:
        for first in range(done, len(source), _BATCH_PAIRS.value):
            indices = range(first, min(first + _BATCH_PAIRS.value, len(source)))
            records, rows = [], []
            for index in indices:
                record = source[index]
                try:
                    pair = pair_rows(encoder(record), _SEQ_LEN.value)
                except (KeyError, TypeError, ValueError) as err:
                    message = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                    raise DataFormatError(f"{source.location(index)}: {message}") from err
                records.append((_without_ref(record), pair))
                if pair is not None:
                    rows.append(pair)
            values = iter(logps(_stack(rows, _BATCH_PAIRS.value, _SEQ_LEN.value)).reshape(-1, 2) if rows else [])
            lines = []
            for record, pair in records:
                if pair is None:
                    summary["overlong"] += 1
                else:
                    chosen, rejected = next(values)
                    record = {**record, REF_CHOSEN_FIELD: float(chosen), REF_REJECTED_FIELD: float(rejected)}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            summary["written"] += len(lines)
            finished = first + len(lines)
            rate = summary["written"] / max(time.time() - start, 1e-9)
            print(f"precompute_ref: {finished}/{len(source)} pairs ({summary['overlong']} over-long), "
                  f"{rate:.1f} pairs/s", file=sys.stderr, flush=True)
    return summary


_ERRORS = (PrecomputeError, DataFormatError, EmptyDatasetError, CheckpointError, TokenizerError,
           FileNotFoundError)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"precompute_ref: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return 1
    common.quiet_library_logs()
    try:
        summary = precompute()
    except _ERRORS as err:
        message = "; ".join(part.strip() for part in str(err).splitlines() if part.strip())
        print(f"precompute_ref: {message}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    app.run(main)
