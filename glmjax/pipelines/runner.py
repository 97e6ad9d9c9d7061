"""The pipeline runner: items keyed by id in, one appended JSONL row per finished item out.

Every data-construction job and evaluation runs its stages through :func:`run_stage`:

* **Items** come from a JSONL file (:func:`read_items`): one JSON object per line (blank lines are
  skipped). An item's id is its ``id`` field (a string or an integer) when it has one; otherwise
  the runner derives a stable id from the line's *content*: ``"sha256-"`` and the first 16 hex
  digits of the SHA-256 of the row re-serialised canonically (sorted keys, no whitespace), so
  reformatting a line keeps its id and editing its content gives a new one
  (:func:`derive_id`). Two lines with the same id are a malformed input.
* **Output**: one JSON object per finished item, ``{"id": ..., **result}``, appended in completion
  order, each row written with a single ``write`` and then ``fsync``-ed before the next one. The
  file is the record of what is finished: rerunning the same command skips every id it holds.
* **Errors**: an item whose work raises is not written to the output (so the next run retries
  it); its id, stage, reason and time are appended to a separate errors file
  (``<output>.errors.jsonl`` by default), a log of every failure of every run.
* **Crash safety**: a ``kill -9`` can only cut the row being written; on restart an
  unterminated last line is detected and truncated (after every complete line has been checked
  to be a row of ours: a file that is not this runner's output is refused and never modified).
  No finished row is lost (it was fsync-ed) and none is duplicated (its id is skipped). An
  exclusive ``flock`` on the output refuses a second process writing the same file at once.
* **Concurrency**: at most ``concurrency`` items are worked on at once, in threads (LLM clients
  are thread-safe and retry transient failures themselves); rows are written by the calling
  thread only, so lines never interleave.
* **Progress**: a tqdm bar on stderr with the rate and ETA, the failures and the tokens so far.
* **Token counts**: each item's work runs under a usage meter
  (``glmjax.inference.llm_client.record_usage``); every LLM call it makes, through any client,
  reports its prompt and completion tokens there. A row of an item that made calls gets them as
  ``"usage"`` (``calls``, ``prompt_tokens``, ``completion_tokens``, ``unreported``: calls whose
  server sent no ``usage``), an error row too, and :class:`StageResult` sums them over the run.

Multi-stage jobs give each stage its own output file, build a later stage's items from the rows
of the earlier ones (:func:`finished_rows`), and so can rerun any stage alone by removing its file.
Derived files (e.g. an SFT export filtered from a stage's rows) are rewritten whole and
atomically with :func:`write_jsonl_atomic`.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tqdm import tqdm

from glmjax.inference.llm_client import TokenUsage, UsageMeter, record_usage

ItemId = str | int
"""An item id: the input's ``id`` (a string or an integer), or a derived ``"sha256-..."``."""

Work = Callable[["Item"], Mapping[str, Any]]
"""A stage's work on one item: the fields of its output row (``id`` is added by the runner)."""


class InputError(ValueError):
    """A malformed input line; the message is ``file:line: problem``."""


class OutputFileError(ValueError):
    """An output or errors file that is not this runner's (the message names the file and line),
    or one another process is writing."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of work.

    Attributes:
      id: its key (see the module docstring).
      row: the input object (for a later stage, whatever the job assembled from earlier rows).
      location: ``"file:line"`` of the input line it came from.
    """

    id: ItemId
    row: Mapping[str, Any]
    location: str


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What one :func:`run_stage` call did.

    Attributes:
      name: the stage name.
      output: its output file; errors: its errors file.
      total: items given; already_done: of those, ids the output held before the run;
      finished: rows written by this run; failed: items whose work raised (retried next run).
      seconds: wall time of the run.
      usage: tokens of the LLM calls this run's items made (finished and failed), as the clients
        reported them (``glmjax.inference.llm_client.record_usage``); each row holds its own.
    """

    name: str
    output: str
    errors: str
    total: int
    already_done: int
    finished: int
    failed: int
    seconds: float
    usage: TokenUsage = TokenUsage()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def derive_id(row: Mapping[str, Any]) -> str:
    """The stable id of a row without one: ``"sha256-"`` + 16 hex digits of its canonical JSON."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _valid_id(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""


def _parse_object(raw: bytes) -> dict[str, Any]:
    """One JSONL line (without its newline) as a JSON object; raises ValueError saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row


def read_items(path: str | os.PathLike, validate: Callable[[dict[str, Any]], None] | None = None) -> list[Item]:
    """The items of a JSONL file, in file order, every line checked before any work starts.

    Args:
      path: the input JSONL.
      validate: checks one row's fields (raising ``ValueError`` with a message naming the field);
        it may normalise the row in place.

    Raises:
      InputError: ``file:line: problem`` for the first malformed line (not UTF-8, not JSON, not an
        object, a bad ``id``, a duplicate id, or what ``validate`` raised), with how many more
        malformed lines follow.
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    items: list[Item] = []
    first_line: dict[ItemId, int] = {}
    problems: list[str] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                row = _parse_object(raw)
                if "id" in row and not _valid_id(row["id"]):
                    raise ValueError(f"field 'id' must be a non-empty string or an integer, got {row['id']!r}")
                item_id = row["id"] if "id" in row else derive_id(row)
                if item_id in first_line:
                    raise ValueError(f"duplicate id {item_id!r} (first on line {first_line[item_id]})")
                if validate is not None:
                    validate(row)
            except ValueError as err:
                problems.append(f"{path}:{number}: {err}")
                continue
            first_line[item_id] = number
            items.append(Item(item_id, row, f"{path}:{number}"))
    if problems:
        more = f" (and {len(problems) - 1} more malformed lines)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    return items


class JsonlAppender:
    """An append-only JSONL file of rows with an ``id``, held under an exclusive lock.

    Opening checks every complete line (a JSON object with a valid ``id``; with ``unique``, no id
    twice), then truncates an unterminated last line; :meth:`append` writes one row with one
    ``write`` and ``fsync``-s it.

    Raises:
      OutputFileError: a line that is not such a row (``file:line``), or another process holds
        the lock; the file is left as it was.
    """

    def __init__(self, path: str | os.PathLike, *, unique: bool) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputFileError(f"{self.path}: another process is writing this file") from None
            self.rows = self._read_checked(unique)
            if created:
                _fsync_dir(parent)
        except BaseException:
            os.close(self._fd)
            raise

    def _read_checked(self, unique: bool) -> dict[ItemId, dict[str, Any]]:
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            data = f.read()
        rows = _complete_rows(data, self.path, unique)
        keep = data.rfind(b"\n") + 1
        if keep < len(data):  # the last write of a killed run: never a finished row
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
        return rows

    def append(self, row: Mapping[str, Any]) -> None:
        """Appends ``row`` as one line and makes it durable (``fsync``) before returning."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)  # releases the lock

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def errors_path_for(output: str | os.PathLike) -> str:
    """The default errors file of an output: ``x.jsonl`` -> ``x.errors.jsonl``."""
    output = os.fspath(output)
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + ".errors.jsonl"


def _complete_rows(data: bytes, path: str, unique: bool) -> dict[ItemId, dict[str, Any]]:
    """The rows of every complete (newline-terminated) line of ``data`` by id (the last row of an
    id wins when ids may repeat); raises :class:`OutputFileError` naming ``path:line`` for a line
    that is not a row of ours or, with ``unique``, an id seen twice."""
    rows: dict[ItemId, dict[str, Any]] = {}
    for number, raw in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], start=1):
        try:
            row = _parse_object(raw)
            if not _valid_id(row.get("id")):
                raise ValueError("no valid 'id'")
        except ValueError as err:
            raise OutputFileError(f"{path}:{number}: not a row of the pipeline runner ({err}); refusing "
                                  "to append to (or truncate) this file") from None
        if unique and row["id"] in rows:
            raise OutputFileError(f"{path}:{number}: id {row['id']!r} appears twice; refusing to append "
                                  "to this file")
        rows[row["id"]] = row
    return rows


def finished_rows(output: str | os.PathLike) -> dict[ItemId, dict[str, Any]]:
    """The rows of a stage output by id (empty when the file does not exist yet); a torn last line
    is ignored here (the next :func:`run_stage` on the file truncates it).

    Raises:
      OutputFileError: the file holds a line that is not a row of ours, or an id twice.
    """
    output = os.fspath(output)
    if not os.path.exists(output):
        return {}
    with open(output, "rb") as f:
        return _complete_rows(f.read(), output, unique=True)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Replaces ``path`` with ``rows`` as JSONL in one step (temp file, fsync, rename): readers see
    the old file or the new one, never a part. Returns the number of rows."""
    path = os.fspath(path)
    temp = f"{path}.tmp-{os.getpid()}"
    count = 0
    with open(temp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return count


def _output_row(item: Item, result: Any, usage: TokenUsage) -> dict[str, Any]:
    """``{"id": item.id, **result, "usage": usage}`` (``usage`` only when the work made LLM
    calls; a ``usage`` the work returned is kept), checked to be a JSON object (raises
    TypeError/ValueError)."""
    if not isinstance(result, Mapping):
        raise TypeError(f"the stage's work returned {type(result).__name__}, expected a mapping of row fields")
    if "id" in result and result["id"] != item.id:
        raise ValueError(f"the stage's work returned id {result['id']!r} for item {item.id!r}")
    row = {"id": item.id, **{k: v for k, v in result.items() if k != "id"}}
    if usage.calls:
        row.setdefault("usage", usage.to_json())
    json.dumps(row, ensure_ascii=False)  # fails here, recorded as the item's error, not mid-write
    return row


def _reason(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def run_stage(
    name: str,
    items: Sequence[Item],
    work: Work,
    output: str | os.PathLike,
    *,
    concurrency: int = 1,
    errors: str | os.PathLike | None = None,
    progress: bool = True,
) -> StageResult:
    """Runs ``work`` on every item whose id ``output`` does not hold yet and appends its rows.

    Args:
      name: stage name (progress bar, error rows).
      items: the stage's items (unique ids).
      work: ``work(item) -> row fields``; an exception is recorded as the item's error.
      output: the stage's output JSONL (created when missing).
      concurrency: items worked on at once (threads), >= 1.
      errors: the errors JSONL (default :func:`errors_path_for` of ``output``).
      progress: show the progress bar on stderr.

    Returns:
      The counts; ``failed > 0`` means a rerun has work left.

    Raises:
      OutputFileError: ``output`` or ``errors`` is not a file of this runner, or is being written
        by another process (checked before any work).
      ValueError: ``concurrency < 1`` or repeated item ids.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if len({item.id for item in items}) != len(items):
        raise ValueError(f"stage {name}: item ids must be unique")
    errors = os.fspath(errors) if errors is not None else errors_path_for(output)
    start = time.monotonic()
    with JsonlAppender(output, unique=True) as out, JsonlAppender(errors, unique=False) as error_log:
        pending = [item for item in items if item.id not in out.rows]
        already_done = len(items) - len(pending)
        finished = failed = 0
        usage = TokenUsage()
        meters: dict[ItemId, UsageMeter] = {}
        bar = tqdm(total=len(items), initial=already_done, desc=name, unit="item", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)

        def settle(future: concurrent.futures.Future, item: Item) -> None:
            nonlocal finished, failed, usage
            item_usage = meters.pop(item.id).total
            usage = usage + item_usage
            try:
                row = _output_row(item, future.result(), item_usage)
            except Exception as err:  # the item's failure: logged, retried by the next run
                failed += 1
                error_log.append({"id": item.id, "stage": name, "error": _reason(err),
                                  **({"usage": item_usage.to_json()} if item_usage.calls else {}),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            else:
                out.append(row)
                finished += 1
            bar.set_postfix(failed=failed, tokens=usage.prompt_tokens + usage.completion_tokens)
            bar.update(1)

        def metered(item: Item) -> Any:
            """``work(item)`` counting its LLM calls' tokens in the item's meter."""
            with record_usage() as meter:
                meters[item.id] = meter
                return work(item)

        queue = iter(pending)
        running: dict[concurrent.futures.Future, Item] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                   thread_name_prefix=f"pipeline-{name}") as pool:
            try:
                while True:
                    while len(running) < concurrency:
                        item = next(queue, None)
                        if item is None:
                            break
                        # In a copy of this context, so that meters around run_stage count too.
                        running[pool.submit(contextvars.copy_context().run, metered, item)] = item
                    if not running:
                        break
                    done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        settle(future, running.pop(future))
            finally:
                bar.close()
    return StageResult(name, os.fspath(output), errors, len(items), already_done, finished, failed,
                       round(time.monotonic() - start, 3), usage)
