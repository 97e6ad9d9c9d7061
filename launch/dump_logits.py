r"""Runs a teacher over a corpus and stores its truncated next-token distributions (offline KD).

  python -m launch.dump_logits --teacher_orbax_dir=/ckpt/teacher --corpus=train.jsonl \
      --tokenizer_dir=/ckpt/tokenizer --output_dir=/data/teacher_logits \
      --top_p=0.95 --top_k=50 --temperature=2.0 --batch_size=8 --seq_len=4096

The teacher comes from ``--teacher_hf_dir`` (safetensors + config.json), ``--teacher_orbax_dir``
(a glmjax model checkpoint) or ``--teacher_run_dir`` (a ``launch.train`` MODEL_DIR, checkpoint
``--teacher_step``, default the newest); it is sharded over ``--mesh_shape``. The corpus is read
and tokenized exactly as ``lm_data`` reads it (``--data_format`` text / chat JSONL or tokens
array_record files, ``--field``); the output (``glmjax.data.teacher_logits``) has one record per
document, read back by ``glmjax.data.distill_data.offline_distill_data``.

Documents are cut into pieces of at most ``--seq_len`` tokens; a longer document continues in
pieces that start ``--context`` tokens before their first new position (default ``seq_len // 2``),
so every position but those of the first piece sees at least ``context`` tokens. Pieces are packed
into ``--batch_size`` rows (segments attend only within themselves).

Resumable: each shard of ``--documents_per_shard`` documents is written under a temporary name,
renamed when complete and then marked done; a rerun with the same flags skips done shards and
redoes the others, so a run killed at any moment never leaves a duplicated or missing record.
Multi-process runs (``launch.train``'s ``--coordinator_address``, ``--num_processes``,
``--process_id`` or ``--distributed``) give shard ``j`` to process ``j % process_count``; every
process feeds its rows of each global batch. Progress: one line per shard on stderr. At the end
process 0 prints JSON: documents, tokens, bytes, bytes per token and the ratio to full-vocabulary
fp32 logits (``bytes_per_token``: record bytes per corpus token; ``file_bytes_per_token`` adds
array_record's container overhead, which is large for tiny shards). Bad input is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from glmjax import sharding
from glmjax.checkpoints import CheckpointError, config_from_hf, from_pretrained
from glmjax.checkpoints.hf_config import read_hf_config
from glmjax.checkpoints.orbax_io import config_to_json, load_model, read_model_config
from glmjax.checkpoints.training_runs import load_trained_model, run_tokenizer_dir
from glmjax.data.global_batch import make_global_batch
from glmjax.data.pipeline import record_encoder, record_source
from glmjax.data.sources import DataFormatError, EmptyDatasetError
from glmjax.data.teacher_logits import (
    METADATA_FILE,
    LogitsFormat,
    ShardWriter,
    TeacherLogitsError,
    config_sha256,
    metadata_for,
    read_metadata,
    shard_done,
    shard_name,
    tokenizer_fingerprint,
    write_json_atomic,
)
from glmjax.data.tokenizer import TokenizerError, load_tokenizer
from glmjax.models import ModelConfig
from glmjax.models.decoder import Decoder
from glmjax.objectives.distill_losses import check_truncation, chunked_teacher_truncation
from launch import common

_HF_DIR = flags.DEFINE_string("teacher_hf_dir", None, "Teacher HF checkpoint directory.")
_ORBAX_DIR = flags.DEFINE_string("teacher_orbax_dir", None, "Teacher glmjax orbax model directory.")
_RUN_DIR = flags.DEFINE_string("teacher_run_dir", None, "Teacher launch.train MODEL_DIR.")
_STEP = flags.DEFINE_integer("teacher_step", None, "Checkpoint step of --teacher_run_dir (default: newest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Parameter and compute dtype for --teacher_hf_dir.")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer directory (default: the "
                                     "teacher's HF directory or the run's recorded tokenizer).")
_CORPUS = flags.DEFINE_list("corpus", None, "Corpus files (JSONL for text/chat, array_record for tokens).")
_DATA_FORMAT = flags.DEFINE_enum("data_format", "text", ["text", "chat", "tokens"], "Corpus format.")
_FIELD = flags.DEFINE_string("field", None, "Record field with the text / messages / ids.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards and metadata.json go.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Top-p of the truncation.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Top-k of the truncation (slots per position).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Temperature of the kept probabilities.")
_PROB_BITS = flags.DEFINE_integer("prob_bits", 12, "Bits per stored probability.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per teacher forward (all processes).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per row (the teacher's window).")
_CONTEXT = flags.DEFINE_integer("context", None, "Context tokens before a continued piece (default seq_len // 2).")
_DOCS_PER_SHARD = flags.DEFINE_integer("documents_per_shard", 10000, "Documents per output shard.")
_CHUNK = flags.DEFINE_integer("logits_chunk", 512, "Sequence chunk for the teacher's logits.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", None, "data,fsdp,tensor,sequence mesh (default: all "
                                "devices on the data axis).")
_KILL_AFTER = flags.DEFINE_integer("testing_kill_after_records", None,
                                   "Testing: SIGKILL this process after writing this many records.")


class UserError(ValueError):
    """Flags or inputs that cannot work."""


@dataclasses.dataclass(frozen=True)
class DumpConfig:
    """Everything one dump depends on (the flags)."""

    corpus: Sequence[str]
    output_dir: str
    teacher_hf_dir: str | None = None
    teacher_orbax_dir: str | None = None
    teacher_run_dir: str | None = None
    teacher_step: int | None = None
    dtype: str = "float32"
    tokenizer_dir: str | None = None
    data_format: str = "text"
    field: str | None = None
    top_p: float = 0.95
    top_k: int = 50
    temperature: float = 1.0
    prob_bits: int = 12
    batch_size: int = 8
    seq_len: int = 2048
    context: int | None = None
    documents_per_shard: int = 10000
    logits_chunk: int = 512
    mesh_shape: Sequence[int] | None = None
    kill_after_records: int | None = None


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


# -- the teacher ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Teacher:
    config: ModelConfig
    description: dict[str, Any]
    tokenizer_dir: str | None


def _teacher(cfg: DumpConfig) -> _Teacher:
    """The teacher's config and identity, without loading weights."""
    given = [d for d in (cfg.teacher_hf_dir, cfg.teacher_orbax_dir, cfg.teacher_run_dir) if d is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --teacher_hf_dir, --teacher_orbax_dir and --teacher_run_dir")
    if cfg.teacher_hf_dir is not None:
        config = config_from_hf(read_hf_config(cfg.teacher_hf_dir),
                                os.path.join(cfg.teacher_hf_dir, "config.json"),
                                param_dtype=cfg.dtype, compute_dtype=cfg.dtype)
        return _Teacher(config, {"source": "hf", "path": _absolute(cfg.teacher_hf_dir), "step": None,
                                 "config_sha256": config_sha256(config_to_json(config))},
                        cfg.teacher_hf_dir)
    if cfg.teacher_orbax_dir is not None:
        config = read_model_config(cfg.teacher_orbax_dir)
        return _Teacher(config, {"source": "orbax", "path": _absolute(cfg.teacher_orbax_dir), "step": None,
                                 "config_sha256": config_sha256(config_to_json(config))}, None)
    config = read_model_config(cfg.teacher_run_dir)
    step = cfg.teacher_step
    if step is None:
        steps = ocp.utils.checkpoint_steps(epath.Path(cfg.teacher_run_dir) / "checkpoints")
        if not steps:
            raise CheckpointError(f"{cfg.teacher_run_dir}: no checkpoints")
        step = max(steps)
    try:
        tokenizer_dir = run_tokenizer_dir(cfg.teacher_run_dir)
    except CheckpointError:
        tokenizer_dir = None
    return _Teacher(config, {"source": "run", "path": _absolute(cfg.teacher_run_dir), "step": int(step),
                             "config_sha256": config_sha256(config_to_json(config))}, tokenizer_dir)


def _load_teacher(cfg: DumpConfig, teacher: _Teacher, mesh) -> Decoder:
    if cfg.teacher_hf_dir is not None:
        return from_pretrained(cfg.teacher_hf_dir, dtype=cfg.dtype, mesh=mesh)
    if cfg.teacher_orbax_dir is not None:
        return load_model(cfg.teacher_orbax_dir, mesh=mesh)
    return load_trained_model(cfg.teacher_run_dir, teacher.description["step"], mesh=mesh)


def make_forward(model: Decoder, *, top_p: float, top_k: int, temperature: float, chunk: int):
    """A jitted ``(inputs, positions, segment_ids) [B, L] -> (ids, probs, tail)``: the
    truncated teacher at every position (``glmjax.objectives.distill_losses``), its fp32 logits
    one sequence chunk at a time."""
    graphdef, state = nnx.split(model)
    vocab = model.config.vocab_size

    @jax.jit
    def forward(state, inputs, positions, segment_ids):
        teacher = nnx.merge(graphdef, state)
        hidden = teacher.hidden_states(inputs, positions, segment_ids)
        return chunked_teacher_truncation(hidden, teacher.head_kernel()[:, :vocab], top_p=top_p,
                                          top_k=top_k, temperature=temperature, chunk_size=chunk)

    return lambda inputs, positions, segment_ids: forward(state, inputs, positions, segment_ids)


# -- pieces and rows ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Piece:
    """Tokens ``[start, stop)`` of a document fed to the teacher; positions ``[first, stop)`` are
    new (the ones before are context)."""

    document: int
    start: int
    first: int
    stop: int


def document_pieces(document: int, num_tokens: int, seq_len: int, context: int) -> list[Piece]:
    """Pieces covering positions ``0 .. num_tokens - 2`` (every token with a next one)."""
    positions = num_tokens - 1
    pieces, first = [], 0
    while first < positions:
        start = max(0, first - context) if first else 0
        stop = min(start + seq_len, positions)
        pieces.append(Piece(document, start, first, stop))
        first = stop
    return pieces


def pack_rows(pieces: Sequence[Piece], seq_len: int) -> Iterator[list[tuple[Piece, int]]]:
    """Rows of (piece, offset), filled in order until the next piece does not fit."""
    row, used = [], 0
    for piece in pieces:
        length = piece.stop - piece.start
        if used + length > seq_len:
            yield row
            row, used = [], 0
        row.append((piece, used))
        used += length
    if row:
        yield row


# -- the dump -----------------------------------------------------------------------------------


class _ShardJob:
    """One shard's documents, their teacher arrays as batches come back, and its writer."""

    def __init__(self, cfg: DumpConfig, fmt: LogitsFormat, shard: int, num_shards: int,
                 documents: list[np.ndarray], first: int):
        self.shard, self.documents, self.fmt = shard, documents, fmt
        self.writer = ShardWriter(cfg.output_dir, shard, num_shards, first)
        # a document's arrays exist from its first returned piece until its record is written
        self.ids: list[np.ndarray | None] = [None] * len(documents)
        self.probs: list[np.ndarray | None] = [None] * len(documents)
        self.tail: list[np.ndarray | None] = [None] * len(documents)
        self.pieces = [piece for index, ids in enumerate(documents)
                       for piece in document_pieces(index, len(ids), cfg.seq_len, cfg.context)]
        self.remaining = np.zeros(len(documents), np.int64)
        for piece in self.pieces:
            self.remaining[piece.document] += 1
        self.written = 0

    def arrays(self, document: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, probs, tail) of a document, allocated on first use."""
        if self.ids[document] is None:
            positions = max(len(self.documents[document]) - 1, 0)
            self.ids[document] = np.zeros((positions, self.fmt.top_k), np.int32)
            self.probs[document] = np.zeros((positions, self.fmt.top_k), np.float32)
            self.tail[document] = np.zeros(positions, np.float32)
        return self.ids[document], self.probs[document], self.tail[document]

    def ready_records(self) -> Iterator[tuple[bytes, int, int]]:
        """(record, tokens, kept ids) of the next documents in order whose pieces are all back."""
        while self.written < len(self.documents) and self.remaining[self.written] == 0:
            d = self.written
            ids, probs, tail = self.arrays(d)
            yield (self.fmt.pack(self.documents[d], ids, probs, tail), len(self.documents[d]),
                   int((probs > 0).sum()))
            self.ids[d] = self.probs[d] = self.tail[d] = None
            self.written += 1


def _rows_of(jobs: Iterator[_ShardJob], seq_len: int) -> Iterator[tuple[_ShardJob, list[tuple[Piece, int]]]]:
    for job in jobs:
        for row in pack_rows(job.pieces, seq_len):
            yield job, row
        yield job, []  # end of shard marker (an empty row is never fed)


def _row_arrays(job: _ShardJob, row: list[tuple[Piece, int]], seq_len: int) -> tuple[np.ndarray, ...]:
    inputs, positions, segments = (np.zeros(seq_len, np.int32) for _ in range(3))
    for segment, (piece, offset) in enumerate(row, start=1):
        length = piece.stop - piece.start
        inputs[offset:offset + length] = job.documents[piece.document][piece.start:piece.stop]
        positions[offset:offset + length] = np.arange(length)
        segments[offset:offset + length] = segment
    return inputs, positions, segments


def _check_config(cfg: DumpConfig) -> None:
    if not cfg.corpus:
        raise UserError("--corpus is required")
    if not cfg.output_dir:
        raise UserError("--output_dir is required")
    check_truncation(top_p=cfg.top_p, top_k=cfg.top_k, temperature=cfg.temperature)
    if cfg.seq_len < 2 or not 0 <= cfg.context < cfg.seq_len:
        raise UserError(f"need seq_len >= 2 and 0 <= context < seq_len, got {cfg.seq_len}, {cfg.context}")
    if cfg.batch_size < 1 or cfg.batch_size % jax.process_count():
        raise UserError(f"--batch_size {cfg.batch_size} must be a positive multiple of the "
                        f"{jax.process_count()} processes")
    if cfg.documents_per_shard < 1 or cfg.logits_chunk < 1:
        raise UserError("--documents_per_shard and --logits_chunk must be >= 1")


def _corpus(cfg: DumpConfig, tokenizer, vocab_size: int):
    encoder = record_encoder(cfg.data_format, tokenizer, cfg.field)
    source = record_source(list(cfg.corpus), cfg.data_format, getattr(encoder, "required_fields", ()))

    def document(index: int) -> np.ndarray:
        try:
            ids = encoder(source[index])["input_ids"]
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, DataFormatError):
                raise
            raise DataFormatError(f"{source.location(index)}: {err}") from err
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataFormatError(f"{source.location(index)}: token id {int(ids.max())} outside the "
                                  f"teacher's vocabulary of {vocab_size}")
        return ids

    return source, document


def _prepare_output(cfg: DumpConfig, metadata: dict[str, Any]) -> None:
    """Writes metadata.json (process 0), or checks that an existing one has the same settings."""
    directory = epath.Path(cfg.output_dir)
    if (directory / METADATA_FILE).exists():
        old = read_metadata(directory)
        differ = sorted(k for k in set(old) | set(metadata) if old.get(k) != metadata.get(k))
        if differ:
            raise TeacherLogitsError(
                f"{directory / METADATA_FILE}: a dump with other settings is there (differs in "
                f"{', '.join(differ)}); use another --output_dir")
    elif jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / METADATA_FILE, metadata)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dump_logits_metadata")


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def dump(cfg: DumpConfig) -> dict[str, Any]:
    """Runs the dump (module docstring); returns the summary (complete on process 0)."""
    cfg = dataclasses.replace(cfg, context=cfg.seq_len // 2 if cfg.context is None else cfg.context)
    _check_config(cfg)
    teacher = _teacher(cfg)
    vocab_size = teacher.config.vocab_size
    if cfg.top_k > vocab_size:
        raise UserError(f"--top_k {cfg.top_k} exceeds the teacher's vocabulary ({vocab_size})")
    tokenizer_dir = cfg.tokenizer_dir or teacher.tokenizer_dir
    tokenizer = None
    if cfg.data_format != "tokens" or cfg.tokenizer_dir:
        if tokenizer_dir is None:
            raise UserError(f"--data_format={cfg.data_format} needs --tokenizer_dir")
        tokenizer = load_tokenizer(tokenizer_dir)
        if len(tokenizer) > vocab_size:
            raise UserError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the "
                            f"teacher's vocabulary is {vocab_size}")
    source, document = _corpus(cfg, tokenizer, vocab_size)
    fmt = LogitsFormat(vocab_size, cfg.top_k, cfg.prob_bits)
    metadata = metadata_for(
        fmt, top_p=cfg.top_p, temperature=cfg.temperature, teacher=teacher.description,
        tokenizer=None if tokenizer is None or cfg.data_format == "tokens" else tokenizer_fingerprint(tokenizer),
        corpus_paths=[_absolute(p) for p in cfg.corpus], data_format=cfg.data_format, field=cfg.field,
        num_documents=len(source), documents_per_shard=cfg.documents_per_shard, seq_len=cfg.seq_len,
        context=cfg.context)
    _prepare_output(cfg, metadata)
    num_shards = metadata["num_shards"]
    mine = [s for s in range(jax.process_index(), num_shards, jax.process_count())
            if shard_done(cfg.output_dir, s, num_shards) is None]
    skipped = len(range(jax.process_index(), num_shards, jax.process_count())) - len(mine)
    _log(f"{num_shards} shards, {len(mine)} to write here ({skipped} already done)")

    mesh = sharding.make_mesh(cfg.mesh_shape or (-1, 1, 1, 1))
    with jax.set_mesh(mesh):
        model = _load_teacher(cfg, teacher, mesh)
        forward = make_forward(model, top_p=cfg.top_p, top_k=cfg.top_k, temperature=cfg.temperature,
                               chunk=min(cfg.logits_chunk, cfg.seq_len))
        _run_shards(cfg, fmt, mine, num_shards, document, len(source), forward, mesh)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dump_logits_done")
    return summary(cfg.output_dir, num_shards, fmt)


def _jobs(cfg: DumpConfig, fmt: LogitsFormat, shards: list[int], num_shards: int, document,
          num_documents: int) -> Iterator[_ShardJob]:
    for shard in shards:
        first = shard * cfg.documents_per_shard
        stop = min(first + cfg.documents_per_shard, num_documents)
        yield _ShardJob(cfg, fmt, shard, num_shards, [document(i) for i in range(first, stop)], first)


def _run_shards(cfg, fmt, shards, num_shards, document, num_documents, forward, mesh) -> None:
    rows_here = cfg.batch_size // jax.process_count()
    batch_sharding = sharding.named_sharding(("act_batch", "act_seq"), (cfg.batch_size, cfg.seq_len), mesh)
    out_spec = batch_sharding.spec
    rows = _rows_of(_jobs(cfg, fmt, shards, num_shards, document, num_documents), cfg.seq_len)
    state = {"records": 0, "start": time.time(), "job": None}
    exhausted = False
    while True:
        batch: list[tuple[_ShardJob, list[tuple[Piece, int]]]] = []  # rows and end-of-shard markers
        real: list[tuple[_ShardJob, list[tuple[Piece, int]]]] = []
        while not exhausted and len(real) < rows_here:
            item = next(rows, None)
            if item is None:
                exhausted = True
                break
            batch.append(item)
            if item[1]:
                real.append(item)
        if not _any_process(bool(real)):
            _finish(batch, cfg, state)
            break
        arrays = np.zeros((3, rows_here, cfg.seq_len), np.int32)
        for index, (job, row) in enumerate(real):
            arrays[:, index] = _row_arrays(job, row, cfg.seq_len)
        inputs = make_global_batch({"inputs": arrays[0], "positions": arrays[1], "segment_ids": arrays[2]},
                                   batch_sharding)
        outputs = forward(inputs["inputs"], inputs["positions"], inputs["segment_ids"])
        ids, probs, tail = (_local(x, mesh, out_spec) for x in outputs)
        for index, (job, row) in enumerate(real):
            for piece, offset in row:
                lo, hi = offset + piece.first - piece.start, offset + piece.stop - piece.start
                doc_ids, doc_probs, doc_tail = job.arrays(piece.document)
                doc_ids[piece.first:piece.stop] = ids[index, lo:hi]
                doc_probs[piece.first:piece.stop] = probs[index, lo:hi]
                doc_tail[piece.first:piece.stop] = tail[index, lo:hi]
                job.remaining[piece.document] -= 1
        _finish(batch, cfg, state)


def _local(x: jax.Array, mesh, spec: PartitionSpec) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    spec = PartitionSpec(*spec, *([None] * (x.ndim - len(spec))))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def _finish(batch, cfg: DumpConfig, state: dict[str, Any]) -> None:
    """Writes the records the batch completed and commits shards whose end marker came."""
    for job, row in batch:
        for record, tokens, kept in job.ready_records():
            job.writer.write(record, tokens, kept)
            state["records"] += 1
            if cfg.kill_after_records is not None and state["records"] >= cfg.kill_after_records:
                os.kill(os.getpid(), signal.SIGKILL)
        if not row:
            info = job.writer.commit()
            rate = info["tokens"] / max(time.time() - state["start"], 1e-9)
            _log(f"shard {job.shard} done: {info['documents']} documents, {info['tokens']} tokens, "
                 f"{info['bytes'] / max(info['tokens'], 1):.1f} bytes/token ({rate:.0f} tokens/s)")
            state["start"] = time.time()


def summary(output_dir: str, num_shards: int, fmt: LogitsFormat) -> dict[str, Any]:
    """Totals over the done markers and shard files."""
    directory = epath.Path(output_dir)
    markers = [shard_done(output_dir, s, num_shards) for s in range(num_shards)]
    if any(m is None for m in markers):
        raise TeacherLogitsError(f"{output_dir}: {sum(m is None for m in markers)} shards incomplete")
    totals = {k: sum(m[k] for m in markers) for k in ("documents", "tokens", "positions", "kept", "bytes")}
    file_bytes = sum((directory / shard_name(s, num_shards)).stat().length for s in range(num_shards))
    tokens = max(totals["tokens"], 1)
    per_token = totals["bytes"] / tokens
    full = 4 * fmt.vocab_size
    return {
        **totals, "shards": num_shards, "file_bytes": file_bytes,
        "kept_per_position": round(totals["kept"] / max(totals["positions"], 1), 3),
        "bytes_per_token": round(per_token, 3), "file_bytes_per_token": round(file_bytes / tokens, 3),
        "full_fp32_bytes_per_token": full,
        "ratio_to_full_fp32": round(full / per_token, 1) if per_token else None,
        "max_bytes_per_position": fmt.bytes_per_position(), "output_dir": str(output_dir),
    }


def _log(message: str) -> None:
    print(f"dump_logits[{jax.process_index()}]: {message}", file=sys.stderr, flush=True)


def _config_from_flags() -> DumpConfig:
    return DumpConfig(
        corpus=_CORPUS.value or [], output_dir=_OUTPUT_DIR.value, teacher_hf_dir=_HF_DIR.value,
        teacher_orbax_dir=_ORBAX_DIR.value, teacher_run_dir=_RUN_DIR.value, teacher_step=_STEP.value,
        dtype=_DTYPE.value, tokenizer_dir=_TOKENIZER_DIR.value, data_format=_DATA_FORMAT.value,
        field=_FIELD.value, top_p=_TOP_P.value, top_k=_TOP_K.value, temperature=_TEMPERATURE.value,
        prob_bits=_PROB_BITS.value, batch_size=_BATCH_SIZE.value, seq_len=_SEQ_LEN.value,
        context=_CONTEXT.value, documents_per_shard=_DOCS_PER_SHARD.value, logits_chunk=_CHUNK.value,
        mesh_shape=None if _MESH_SHAPE.value is None else [int(s) for s in _MESH_SHAPE.value],
        kill_after_records=_KILL_AFTER.value)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"dump_logits: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    common.quiet_library_logs()
    common.initialize_distributed()
    try:
        result = dump(_config_from_flags())
    except (CheckpointError, TokenizerError, DataFormatError, EmptyDatasetError, UserError,
            FileNotFoundError, ValueError) as err:
        print(f"dump_logits: {'; '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    app.run(main)
