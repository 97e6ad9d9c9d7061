"""LongBench-Cite as a resumable job on the pipeline runner (:mod:`glmjax.evals.longcite`).

Three stages, each an append-only JSONL under ``output_dir`` keyed by the item's ``idx``
(:func:`glmjax.pipelines.runner.run_stage`: a rerun skips finished items and retries failed ones):

1. ``responses.jsonl``: the model answers each question from the sentence-numbered context
   (:func:`~glmjax.evals.longcite.build_cite_prompt`; with a tokenizer the prompt is first cut to
   ``budget`` tokens from the middle, as the official 128,000). Row: ``{"id", "dataset",
   "item_sha", "num_sentences", "truncated", "response"}`` (``item_sha`` ties the row to the
   question and context it answers; ``truncated`` is None without a tokenizer).
2. ``citations.jsonl``: :func:`~glmjax.evals.longcite.judge_citations` of each response. Row:
   ``{"id", "dataset", "response_sha", "citation_recall", "citation_precision", "citation_f1",
   "total_statements", "judged_statements", "statements"}``.
3. ``correctness.jsonl``: :func:`~glmjax.evals.longcite.judge_correctness` of each response.
   Row: ``{"id", "dataset", "response_sha", "correctness", "scale", "ratings", "unparsed",
   "replies"}``.

Then ``report.json`` and ``report.md``: :func:`~glmjax.evals.longcite.summarize` of the items
with both judgements, with the citation length measured by the tokenizer given (its
``name_or_path`` is reported; without a tokenizer the length is not measured and the report says
so). A failed call, or a citation judgement no judge try answered readably, is the item's error in
the stage's ``*.errors.jsonl`` and is retried by the next run. Every item samples with seeds
derived from the job seed, the stage and its ``idx``
(:func:`glmjax.evals.longbench_jobs.item_seed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from glmjax.evals import longcite as lc
from glmjax.evals.longbench_jobs import StaleStageError, item_seed, total_usage, usage_line, write_report
from glmjax.evals.longbench_v2 import TokenizerLike, truncate_prompt
from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.pipelines.runner import Item, finished_rows, run_stage

STAGES = ("responses", "citations", "correctness")
"""The stages, in order; each writes ``output_dir/<stage>.jsonl``."""

DEFAULT_SAMPLING = SamplingParams(max_tokens=1024, temperature=0.95, top_p=0.7)
"""The official LongCite generation settings (1,024 new tokens, temperature 0.95, top-p 0.7)."""

DEFAULT_BUDGET = 128000
"""Prompt tokens kept by middle truncation (the official ``max_input_length``)."""


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def item_sha(item: lc.CiteItem) -> str:
    """A digest of what an answer depends on: the dataset, question and context."""
    return _sha([item.dataset, item.query, item.context])


def response_sha(response: str) -> str:
    """A digest of a response: ties a judgement row to the response it judged."""
    return _sha(response)


def _files(output_dir: Path) -> dict[str, str]:
    return {stage: str(output_dir / f"{stage}.jsonl") for stage in STAGES}


def _check_consistent(items: Sequence[lc.CiteItem], files: Mapping[str, str]) -> None:
    """Raises :class:`StaleStageError` when a response answers another question or context than the
    data now holds, or a judgement judged another response than ``responses.jsonl`` holds."""
    by_idx = {item.idx: item for item in items}
    responses = finished_rows(files["responses"])
    for idx, row in responses.items():
        if idx in by_idx and row.get("item_sha") != item_sha(by_idx[idx]):
            raise StaleStageError(f"{files['responses']}: the response of idx {idx!r} answers another question or "
                                  "context than the data file holds now; give the edited data its own output "
                                  "directory (or remove the stage files)")
    for stage in ("citations", "correctness"):
        for idx, row in finished_rows(files[stage]).items():
            if idx in responses and row.get("response_sha") != response_sha(responses[idx]["response"]):
                raise StaleStageError(f"{files[stage]}: the judgement of idx {idx!r} judged another response than "
                                      f"{files['responses']} holds (was the responses stage rerun?); remove "
                                      f"{stage}.jsonl to judge again")


def check_cite_files(data_path: str | os.PathLike, output_dir: str | os.PathLike) -> list[lc.CiteItem]:
    """The items of a LongBench-Cite data file, after checking it and the stage files already in
    ``output_dir`` (a command line calls this before it loads a model).

    Raises:
      LongBenchCiteError: a malformed data file; OutputFileError: a stage file that is not the
      runner's; StaleStageError: rows made from other data or responses (see
      :func:`longbench_cite_job`).
    """
    items = lc.load_cite_items(data_path)
    _check_consistent(items, _files(Path(output_dir)))
    return items


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _markdown(report: Mapping[str, Any]) -> str:
    length = (f"Citation length: tokens of the cited text per citation, by the tokenizer "
              f"`{report['citation_length_tokenizer']}` (- without citations)."
              if report["citation_length_tokenizer"] else
              "Citation length: not measured (no tokenizer was given).")
    text = (f"# LongBench-Cite: {report['model']}\n\n{report['scored']} of {report['items']} items scored.\n\n"
            + lc.render_markdown(report["summary"]) + "\nRecall, precision, F1 and correctness in percent (means "
            "per answer); the average is over the groups listed. " + length + "\n\n"
            + usage_line(report["usage"]))
    if report["unfinished"]:
        text += (f"\n{report['unfinished']} of {report['items']} items are not scored yet (failed items are listed "
                 "in the stages' *.errors.jsonl); rerun the same command to finish them.\n")
    return text


@gin.configurable(denylist=["data_path", "output_dir", "client", "judge", "tokenizer", "sampling", "seed",
                            "concurrency", "progress", "name"])
def longbench_cite_job(
    data_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    client: LLMClient,
    judge: LLMClient,
    *,
    tokenizer: TokenizerLike | None = None,
    budget: int = DEFAULT_BUDGET,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    judge_tries: int = 5,
    retry_temperature: float = lc.RETRY_TEMPERATURE,
    max_statements: int = lc.MAX_JUDGED_STATEMENTS,
    citation_judge_max_tokens: int = lc.DEFAULT_CITATION_JUDGE_SAMPLING.max_tokens,
    correctness_judge_max_tokens: int = lc.DEFAULT_CORRECTNESS_JUDGE_SAMPLING.max_tokens,
    seed: int = 0,
    concurrency: int = 4,
    progress: bool = True,
    name: str = "model",
) -> dict[str, Any]:
    """Answers, judges and summarises LongBench-Cite (module docstring).

    Args:
      data_path: ``LongBench-Cite.json`` (or JSONL) with ``idx, dataset, query, answer,
        few_shot_scores, context``.
      output_dir: where the stage files and ``report.json`` / ``report.md`` go (created).
      client: the model under test; judge: the judge of citations and correctness (may be the same).
      tokenizer: cuts each prompt to ``budget`` tokens and measures the citation length (neither
        without it).
      budget: prompt tokens kept (>= 1).
      sampling: generation settings (the seed is replaced per item).
      judge_tries: judge calls per judgement at most (unreadable replies are asked again at
        ``retry_temperature``).
      max_statements: statements of an answer the citation judge rates (the first ones).
      citation_judge_max_tokens, correctness_judge_max_tokens: the judges' reply lengths (greedy;
        the citation judge stops at "Analysis:").
      seed: base of every per-item seed.
      concurrency: items worked on at once in each stage.
      progress: progress bars on stderr.
      name: the model's name in the report.

    Returns:
      The report written to ``report.json``: ``benchmark``, ``model``, ``items``, ``scored``
      (items with both judgements), ``unfinished``, ``failed`` (item failures this run),
      ``truncation`` (``{"budget", "truncated"}`` over the finished responses, or None without a
      tokenizer), ``citation_length_tokenizer`` (None without one), ``summary``
      (:func:`~glmjax.evals.longcite.summarize`), ``usage`` (all stages' finished rows),
      ``stages`` and ``files``.

    Raises:
      LongBenchCiteError: a bad data file; OutputFileError: a stage file not the runner's;
      StaleStageError: a stage row made from other data or another response; ValueError: a knob
      out of range.
    """
    if budget < 1 or judge_tries < 1 or max_statements < 1:
        raise ValueError(f"budget, judge_tries and max_statements must be >= 1, got {budget}, {judge_tries}, "
                         f"{max_statements}")
    items = check_cite_files(data_path, output_dir)
    prompts = lc.load_judge_prompts()
    answer_template = lc.load_cite_prompt()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _files(out)
    by_idx = {item.idx: item for item in items}
    sentences: dict[Any, list[str]] = {}

    def sentences_of(idx: Any) -> list[str]:
        if idx not in sentences:  # one split per item and run (dict writes are atomic in CPython)
            sentences[idx] = lc.split_sentences(by_idx[idx].context)
        return sentences[idx]

    citation_sampling = dataclasses.replace(lc.DEFAULT_CITATION_JUDGE_SAMPLING, max_tokens=citation_judge_max_tokens)
    correctness_sampling = dataclasses.replace(lc.DEFAULT_CORRECTNESS_JUDGE_SAMPLING,
                                               max_tokens=correctness_judge_max_tokens)

    def respond(item: Item) -> dict[str, Any]:
        question = by_idx[item.id]
        context = sentences_of(item.id)
        prompt = lc.build_cite_prompt(context, question.query, answer_template)
        truncated = None
        if tokenizer is not None:
            cut = truncate_prompt(prompt, tokenizer, budget)
            truncated, prompt = cut != prompt, cut
        params = dataclasses.replace(sampling, seed=item_seed(seed, "responses", item.id))
        response = client.complete([{"role": "user", "content": prompt}], params)
        return {"dataset": question.dataset, "item_sha": item_sha(question), "num_sentences": len(context),
                "truncated": truncated, "response": response}

    def judge_cites(item: Item) -> dict[str, Any]:
        params = dataclasses.replace(citation_sampling, seed=item_seed(seed, "citations", item.id))
        result = lc.judge_citations(judge, by_idx[item.id].query, item.row["response"], sentences_of(item.id),
                                    prompts=prompts, sampling=params, tries=judge_tries,
                                    retry_temperature=retry_temperature, max_statements=max_statements)
        return {"dataset": item.row["dataset"], "response_sha": response_sha(item.row["response"]), **result}

    def judge_correct(item: Item) -> dict[str, Any]:
        stage_seed = item_seed(seed, "correctness", item.id)
        params = dataclasses.replace(correctness_sampling, seed=stage_seed)
        result = lc.judge_correctness(judge, by_idx[item.id], item.row["response"], prompts=prompts,
                                      sampling=params, tries=judge_tries, retry_temperature=retry_temperature,
                                      seed=stage_seed)
        return {"dataset": item.row["dataset"], "response_sha": response_sha(item.row["response"]), **result}

    runner_items = [Item(item.idx, {}, item.location) for item in items]
    stages = {"responses": run_stage("responses", runner_items, respond, files["responses"],
                                     concurrency=concurrency, progress=progress).as_dict()}
    responses = finished_rows(files["responses"])
    answered = [Item(item.idx, responses[item.idx], item.location) for item in items if item.idx in responses]
    for stage, work in (("citations", judge_cites), ("correctness", judge_correct)):
        stages[stage] = run_stage(stage, answered, work, files[stage], concurrency=concurrency,
                                  progress=progress).as_dict()
    cites, correct = finished_rows(files["citations"]), finished_rows(files["correctness"])
    scored = [item for item in items if item.idx in cites and item.idx in correct]
    rows = []
    for item in scored:
        count, tokens = lc.citation_token_counts(responses[item.idx]["response"], sentences_of(item.idx), tokenizer)
        rows.append({"dataset": item.dataset, **{m: cites[item.idx][m] for m in lc.METRICS[:3]},
                     "correctness": correct[item.idx]["correctness"], "citation_count": count,
                     "citation_tokens": tokens})
    finished = [row for stage_rows in (responses, cites, correct) for idx, row in stage_rows.items() if idx in by_idx]
    truncation = None if tokenizer is None else {
        "budget": budget, "truncated": sum(bool(responses[i.idx]["truncated"]) for i in items if i.idx in responses)}
    report = {"benchmark": "longbench_cite", "model": name, "items": len(items), "scored": len(scored),
              "unfinished": len(items) - len(scored), "failed": sum(s["failed"] for s in stages.values()),
              "truncation": truncation,
              "citation_length_tokenizer": None if tokenizer is None else _tokenizer_name(tokenizer),
              "summary": lc.summarize(rows), "usage": total_usage(finished), "stages": stages, "files": files}
    files.update(write_report(out, report, _markdown(report)))
    return report
