"""LongBench-Write and LongBench v2 as resumable jobs on the pipeline runner.

Both jobs write every finished item as one JSONL row through :func:`glmjax.pipelines.runner.run_stage`
in an output directory, so that rerunning the same job skips finished items and retries failed ones,
and then write a report (``report.json`` and ``report.md``) over the rows finished so far.

* :func:`longbench_write_job` (``glmjax.evals.longbench_write``): stage ``responses`` asks the model
  for each writing prompt (``responses.jsonl``: ``{id, prompt, type, length, response}``); stage
  ``scores`` has a judge score each response (``scores.jsonl``: the rows of
  :func:`~glmjax.evals.longbench_write.score_item`); the report is
  :func:`~glmjax.evals.longbench_write.summarize` of the score rows. An item's id is
  :func:`~glmjax.pipelines.runner.derive_id` of its ``prompt``, ``type`` and ``length`` (the k-th
  repeat of identical content gets ``-k``), so an edited prompt is a new item and a reordered
  file resumes as before.
* :func:`longbench_v2_job` (``glmjax.evals.longbench_v2``): stage ``predictions`` runs
  :func:`~glmjax.evals.longbench_v2.evaluate` on each one-item list (``predictions.jsonl``, id =
  the item's ``_id``); the report is :func:`~glmjax.evals.longbench_v2.score` of the finished rows.
  The ``"rag"`` mode shows the data's ``retrieved_context``, or, with a ``retriever``, chunks of
  each item's own context that it retrieves (:func:`~glmjax.evals.longbench_v2.retrieve_context`).

A call that fails (the client's retries spent, or a LongBench v2 row whose ``error`` is set) is an
item failure: recorded in the stage's ``*.errors.jsonl``, no row written, retried on the next run.
Reports cover finished items only and say how many are unfinished.

Every item samples with its own seed, derived from the job seed, the stage and the item id
(:func:`item_seed`), so a rerun of one item draws what the first run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from glmjax.evals import longbench_v2 as lb2
from glmjax.evals import longbench_write as lbw
from glmjax.inference.llm_client import LLMClient, SamplingParams, TokenUsage
from glmjax.pipelines.retrieval import Retriever
from glmjax.pipelines.runner import Item, derive_id, finished_rows, run_stage

WRITE_STAGES = ("responses", "scores")
V2_STAGE = "predictions"

DEFAULT_WRITE_SAMPLING = SamplingParams(max_tokens=32768, temperature=0.5)
"""The official generation settings of LongBench-Write (``pred.py``: 32,768 new tokens, 0.5)."""


class StaleStageError(ValueError):
    """A later stage's rows were made from other rows than the earlier stage now holds."""


def item_seed(seed: int, stage: str, item_id: str | int) -> int:
    """The sampling seed of one item in one stage: below 2**30 so that ``seed + k`` (judge
    retries) stays in int32; independent of the order items run in."""
    key = json.dumps([seed, stage, item_id]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 2**30


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _write_files(output_dir: Path) -> dict[str, str]:
    return {stage: str(output_dir / f"{stage}.jsonl") for stage in WRITE_STAGES}


def total_usage(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The summed ``usage`` (``calls``, ``prompt_tokens``, ``completion_tokens``, ``unreported``) of
    stage rows: what every finished item cost over all runs (a row without LLM calls has none)."""
    total = TokenUsage()
    for row in rows:
        if "usage" in row:
            total = total + TokenUsage(**row["usage"])
    return total.to_json()


def usage_line(usage: Mapping[str, int]) -> str:
    """The reports' token-count sentence for a :func:`total_usage` dict."""
    unreported = f" ({usage['unreported']} without a count from the server)" if usage["unreported"] else ""
    return (f"Tokens of the finished items: {usage['prompt_tokens']} prompt, {usage['completion_tokens']} "
            f"completion, over {usage['calls']} calls{unreported}.\n")


def write_report(output_dir: Path, report: Mapping[str, Any], markdown: str) -> dict[str, str]:
    """Writes ``report.json`` and ``report.md`` (each replaced whole); returns their paths."""
    paths = {"report_json": str(output_dir / "report.json"), "report_md": str(output_dir / "report.md")}
    for path, text in ((paths["report_json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       (paths["report_md"], markdown)):
        temp = f"{path}.tmp-{os.getpid()}"
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    return paths


# ----------------------------------------------------------------------------- LongBench-Write


def write_items(prompts: Sequence[lbw.WritePrompt]) -> list[Item]:
    """One runner item per prompt: id from the content (module docstring), row
    ``{prompt, type, length}``, location ``file:line``."""
    items: list[Item] = []
    seen: dict[str, int] = {}
    for prompt in prompts:
        row = {"prompt": prompt.prompt, "type": prompt.type, "length": prompt.length}
        base = derive_id(row)
        seen[base] = seen.get(base, 0) + 1
        items.append(Item(base if seen[base] == 1 else f"{base}-{seen[base]}", row, prompt.location))
    return items


def check_write_files(prompts_path: str | os.PathLike, output_dir: str | os.PathLike) -> list[Item]:
    """The items of a prompts file, after checking it and every stage file already in
    ``output_dir`` (a command line calls this before it loads a model).

    Raises:
      LongBenchWriteError: a bad prompts file (``file:line: problem``).
      OutputFileError: a stage file that is not the runner's.
    """
    items = write_items(lbw.load_prompts(prompts_path))
    for path in _write_files(Path(output_dir)).values():
        finished_rows(path)
    return items


def longbench_write_job(
    prompts_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    client: LLMClient,
    judge: LLMClient,
    *,
    sampling: SamplingParams = DEFAULT_WRITE_SAMPLING,
    judge_sampling: SamplingParams = lbw.DEFAULT_JUDGE_SAMPLING,
    judge_tries: int = 5,
    seed: int = 0,
    concurrency: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates, judges and summarises LongBench-Write (module docstring).

    Args:
      prompts_path: the benchmark JSONL (``prompt``, ``type``, ``length``).
      output_dir: where ``responses.jsonl``, ``scores.jsonl``, their ``*.errors.jsonl`` and
        ``report.json`` / ``report.md`` go (created).
      client: the model under test; judge: the quality judge (may be the same client).
      sampling: generation settings (the seed is replaced per item).
      judge_sampling: judge settings (the seed is replaced per item; retry ``k`` adds ``k``).
      judge_tries: judge calls per response at most (malformed replies are asked again).
      seed: base of every per-item seed (:func:`item_seed`).
      concurrency: items worked on at once in each stage.
      progress: progress bars on stderr.

    Returns:
      The report written to ``report.json``: ``benchmark``, ``items`` (in the file), ``scored``,
      ``unfinished`` (items without a score row yet), ``failed`` (item failures this run),
      ``summary`` (:func:`~glmjax.evals.longbench_write.summarize`), ``usage`` (:func:`total_usage`
      of both stages' finished rows), ``stages`` (each
      ``StageResult.as_dict()``) and ``files``.

    Raises:
      LongBenchWriteError: a bad prompts file; OutputFileError: a stage file not the runner's.
      StaleStageError: a score row judged another response than ``responses.jsonl`` holds for its
        id (remove ``scores.jsonl`` to judge again).
    """
    items = check_write_files(prompts_path, output_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_files(out)
    prompts = {item.id: lbw.WritePrompt(item.row["prompt"], item.row["type"], item.row["length"],
                                        item.location) for item in items}

    def respond(item: Item) -> dict[str, Any]:
        params = dataclasses.replace(sampling, seed=item_seed(seed, "responses", item.id))
        return {**item.row, "response": client.complete(_user(item.row["prompt"]), params)}

    def judge_one(item: Item) -> dict[str, Any]:
        params = dataclasses.replace(judge_sampling, seed=item_seed(seed, "scores", item.id))
        judgement = lbw.judge_quality(judge, item.row["prompt"], item.row["response"], tries=judge_tries,
                                      sampling=params)
        return lbw.score_item(prompts[item.id], item.row["response"], judgement)

    stages = {"responses": run_stage("responses", items, respond, files["responses"],
                                     concurrency=concurrency, progress=progress).as_dict()}
    responses = finished_rows(files["responses"])
    _check_scores_match(finished_rows(files["scores"]), responses, files)
    judged = [Item(item.id, responses[item.id], item.location) for item in items if item.id in responses]
    stages["scores"] = run_stage("scores", judged, judge_one, files["scores"], concurrency=concurrency,
                                 progress=progress).as_dict()
    scores = finished_rows(files["scores"])
    rows = [scores[item.id] for item in items if item.id in scores]
    summary = lbw.summarize(rows)
    usage = total_usage([*(responses[item.id] for item in items if item.id in responses), *rows])
    report = {"benchmark": "longbench_write", "items": len(items), "scored": len(rows),
              "unfinished": len(items) - len(rows),
              "failed": sum(stage["failed"] for stage in stages.values()),
              "summary": summary, "usage": usage, "stages": stages, "files": files}
    unfinished = "" if not report["unfinished"] else (
        f"\n{report['unfinished']} of {len(items)} items are not scored yet (failed items are listed in "
        "the stages' *.errors.jsonl); rerun the same command to finish them.\n")
    markdown = (f"# LongBench-Write\n\n{len(rows)} of {len(items)} items scored.\n\n"
                + lbw.render_markdown(summary) + "\n" + usage_line(usage) + unfinished)
    files.update(write_report(out, report, markdown))
    return report


def _check_scores_match(scores: Mapping[Any, Mapping[str, Any]], responses: Mapping[Any, Mapping[str, Any]],
                        files: Mapping[str, str]) -> None:
    for item_id, row in scores.items():
        response = responses.get(item_id)
        if response is not None and row.get("response") != response.get("response"):
            raise StaleStageError(f"{files['scores']}: the score of id {item_id!r} judged another response than "
                                  f"{files['responses']} holds (was the responses stage rerun?); remove "
                                  "scores.jsonl to judge again")


# ------------------------------------------------------------------------------- LongBench v2


def check_v2_files(data_path: str | os.PathLike, output_dir: str | os.PathLike,
                   mode: str, *, retrieves: bool = False) -> list[lb2.LongBenchV2Item]:
    """The items of a LongBench v2 data file, after checking it (and, for ``"rag"`` without
    ``retrieves``, that every item has retrieved chunks) and the stage file already in ``output_dir``.

    Raises:
      LongBenchV2FormatError: a malformed data file, or an item without ``retrieved_context`` in
        the ``"rag"`` mode (named by ``_id``).
      ValueError: an unknown mode; OutputFileError: a stage file that is not the runner's.
      StaleStageError: the stage file holds rows of another mode.
    """
    if mode not in lb2.MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {', '.join(lb2.MODES)}")
    items = lb2.load_items(data_path)
    if not items:
        raise lb2.LongBenchV2FormatError(f"{os.fspath(data_path)}: no items")
    if retrieves and mode != "rag":
        raise ValueError(f"a retriever is for the 'rag' mode, not {mode!r}")
    if mode == "rag" and not retrieves:
        bare = [item.id for item in items if not item.retrieved]
        if bare:
            raise lb2.LongBenchV2FormatError(
                f"{os.fspath(data_path)}: item _id {bare[0]} has no 'retrieved_context', which the 'rag' mode "
                f"needs without a retriever ({len(bare)} items lack it)")
    path = Path(output_dir) / f"{V2_STAGE}.jsonl"
    rows = finished_rows(path)
    wrong_mode = [item_id for item_id, row in rows.items() if row.get("mode") != mode]
    if wrong_mode:
        raise StaleStageError(f"{path}: id {wrong_mode[0]!r} was answered in mode "
                              f"{rows[wrong_mode[0]].get('mode')!r}, not {mode!r}: give each mode its own "
                              "output directory")
    return items


class ItemCallError(RuntimeError):
    """A LongBench v2 item whose client call failed (its row's ``error``); retried next run."""


def longbench_v2_job(
    data_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    client: LLMClient,
    *,
    mode: str = "zero_shot",
    tokenizer: lb2.TokenizerLike | None = None,
    budget: int = lb2.DEFAULT_BUDGET,
    sampling: SamplingParams | None = None,
    answer_sampling: SamplingParams | None = None,
    rag_top_k: int | None = None,
    retriever: Callable[[Sequence[str]], Retriever] | None = None,
    rag_chunk_tokens: int = lb2.RAG_CHUNK_TOKENS,
    name: str = "model",
    seed: int = 0,
    concurrency: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Asks, grades and scores LongBench v2 in ``mode`` (module docstring).

    Args:
      data_path: the official ``data.json`` (or JSONL).
      output_dir: where ``predictions.jsonl``, ``predictions.errors.jsonl`` and ``report.json`` /
        ``report.md`` go (created).
      client: the model under test.
      mode: one of ``longbench_v2.MODES``.
      tokenizer, budget: middle truncation of each prompt to ``budget`` tokens (none without a
        tokenizer).
      sampling, answer_sampling: the first pass and the cot answer pass (defaults as
        ``longbench_v2.evaluate``); the seed is replaced per item.
      rag_top_k: retrieved chunks shown in the ``"rag"`` mode (None: all).
      retriever: ``"rag"`` only: ``chunks -> retriever`` (e.g. ``BM25Retriever``); each item's
        context is then cut into ``rag_chunk_tokens``-token chunks (with ``tokenizer`` when given)
        and searched for its question (``longbench_v2.retrieve_context``), in place of the data's
        ``retrieved_context``. Rows record the indices of the chunks shown (``retrieved``).
      name: the row label of the Markdown table.
      seed: base of every per-item seed (:func:`item_seed`).
      concurrency: items worked on at once.
      progress: a progress bar on stderr.

    Returns:
      The report written to ``report.json``: ``benchmark``, ``mode``, ``items``, ``scored``,
      ``unfinished``, ``failed`` (this run), ``truncation`` (``{"budget", "truncated"}``, or None
      without a tokenizer), ``result`` (:func:`~glmjax.evals.longbench_v2.score` of the finished
      items), ``usage`` (:func:`total_usage` of the finished rows), ``stage`` and ``files``.
    """
    items = check_v2_files(data_path, output_dir, mode, retrieves=retriever is not None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {V2_STAGE: str(out / f"{V2_STAGE}.jsonl")}
    by_id = {item.id: item for item in items}
    first = sampling or (lb2.COT_SAMPLING if mode == "cot" else lb2.DIRECT_SAMPLING)
    second = answer_sampling or lb2.DIRECT_SAMPLING

    def predict(item: Item) -> dict[str, Any]:
        question = by_id[item.id]
        if retriever is not None:
            question = lb2.retrieve_context(question, retriever, chunk_tokens=rag_chunk_tokens,
                                            tokenizer=tokenizer, top_k=rag_top_k)
        (row,) = lb2.evaluate(
            [question], client, mode=mode, tokenizer=tokenizer, budget=budget, rag_top_k=rag_top_k,
            sampling=dataclasses.replace(first, seed=item_seed(seed, V2_STAGE, item.id)),
            answer_sampling=dataclasses.replace(second, seed=item_seed(seed, "answer", item.id)))
        if row["error"] is not None:
            raise ItemCallError(row["error"])
        if retriever is not None:
            row["retrieved"] = [index for index, _ in question.retrieved]
        return row

    runner_items = [Item(item.id, {"_id": item.id}, f"{os.fspath(data_path)}: item {index}")
                    for index, item in enumerate(items)]
    stage = run_stage(V2_STAGE, runner_items, predict, files[V2_STAGE], concurrency=concurrency,
                      progress=progress).as_dict()
    rows = finished_rows(files[V2_STAGE])
    scored = [item for item in items if item.id in rows]
    result = lb2.score(scored, {item.id: rows[item.id]["prediction"] for item in scored})
    usage = total_usage(rows[item.id] for item in scored)
    report = {"benchmark": "longbench_v2", "mode": mode, "items": len(items), "scored": len(scored),
              "unfinished": len(items) - len(scored), "failed": stage["failed"],
              "truncation": None if tokenizer is None else {
                  "budget": budget, "truncated": sum(bool(rows[item.id]["truncated"]) for item in scored)},
              "retrieval": None if retriever is None else {
                  "retriever": getattr(retriever, "__name__", type(retriever).__name__),
                  "chunk_tokens": rag_chunk_tokens, "top_k": rag_top_k},
              "result": result, "usage": usage, "stage": stage, "files": files}
    unfinished = "" if not report["unfinished"] else (
        f"\n{report['unfinished']} of {len(items)} items are not answered yet (failures in "
        "predictions.errors.jsonl); rerun the same command to finish them.\n")
    markdown = (f"# LongBench v2 ({mode})\n\n{len(scored)} of {len(items)} items scored; accuracy in %.\n\n"
                + lb2.markdown_table(result, name=name) + "\n\n" + usage_line(usage) + unfinished)
    files.update(write_report(out, report, markdown))
    return report
