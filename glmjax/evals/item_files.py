"""Reading a benchmark's items: a JSON list of objects, or JSONL (one object a line)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_item_rows(path: str | os.PathLike, error: type[Exception]) -> list[tuple[Any, str]]:
    """The rows of ``path`` with where each one is (``"PATH:LINE"`` for JSONL, ``"PATH: item I"``
    for a JSON list). A name ending in ``.jsonl`` reads one object a line (blank lines skipped);
    any other name reads one JSON list.

    Raises:
      error: unreadable JSON (the file and line named), or a JSON top level that is not a list.
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{number}: invalid JSON: {err.msg}") from None
            return rows
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{err.lineno}: invalid JSON: {err.msg} (a .jsonl name reads one object "
                        "a line)") from None
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return [(row, f"{path}: item {index}") for index, row in enumerate(data)]
