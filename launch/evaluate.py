r"""Evaluations of trained models, by name: ``python -m launch.evaluate NAME --flags``.

``inference_scaling`` (T1's truncation probe, ``glmjax.evals.inference_scaling``): samples
``--num_samples`` responses per problem from every checkpoint of a training run (or ``--steps``),
cuts each at every ``--budgets`` token budget, has a summariser give the final answer from the cut
trace and reports pass@1 vs budget as JSON, a Markdown table and a PNG plot::

  python -m launch.evaluate inference_scaling --run_dir=runs/quickstart/sft --steps=200,400 \
      --budgets=8,16,32,64,128 --num_samples=4 --temperature=1.0

Problems: ``--problems`` (the built-in task's eval JSONL, or a math JSONL of ``{"id"?, "problem",
"answer"}``), default ``RUN_DIR/data/eval.jsonl``; the checker follows the file's format unless
``--checker`` says otherwise. The summariser is each checkpoint itself (a forced
``--answer_prefix`` continuation), or an OpenAI-compatible endpoint (``--summarizer_base_url`` and
``--summarizer_model``; prompt from ``--summarizer_prompt_file`` or a gin binding of
``ClientSummarizer.template``). Output: ``--output_dir`` (default ``RUN_DIR/evals/inference_scaling``).

``longbench_write`` (LongBench-Write, ``glmjax.evals.longbench_jobs.longbench_write_job``): the
model writes a response to each prompt of ``--prompts`` (the official ``longbench_write.jsonl``:
``prompt``, ``type``, ``length``) into ``OUTPUT_DIR/responses.jsonl``, a judge scores each on six
dimensions into ``OUTPUT_DIR/scores.jsonl``, and the summary (length score S_l, quality S_q and
their mean S, overall, by required length and by type) goes to ``report.json`` / ``report.md`` and
stdout::

  python -m launch.evaluate longbench_write --prompts=longbench_write.jsonl --output_dir=out/lbw \
      --client=http --base_url=http://localhost:8000/v1 --model=my-model \
      --judge_base_url=https://api.example.com/v1 --judge_model=judge --judge_api_key_env=JUDGE_KEY

``longbench_v2`` (``glmjax.evals.longbench_jobs.longbench_v2_job``): each question of ``--data``
(the official ``data.json``) in ``--mode`` (zero_shot, cot, no_context, rag: the data's
``retrieved_context``, or with ``--rag_retriever=bm25|embeddings|wordllama`` chunks of each
context, ``--rag_chunk_tokens`` long, retrieved for its question), graded, into
``OUTPUT_DIR/predictions.jsonl``; accuracy overall / easy / hard / short / medium / long to
``report.json`` / ``report.md`` and stdout. Prompts are cut in the middle to ``--budget`` tokens
with the tokenizer of ``--tokenizer_dir`` (default with ``--client=local``: the run's; with
``--client=http`` and no ``--tokenizer_dir`` prompts are sent whole and the report says so)::

  python -m launch.evaluate longbench_v2 --data=data.json --output_dir=out/lbv2_cot --mode=cot \
      --client=local --run_dir=runs/long/sft

``longbench_cite`` (LongBench-Cite, ``glmjax.evals.longbench_cite_jobs.longbench_cite_job``): the
model answers each question of ``--data`` (the official ``LongBench-Cite.json``, or JSONL: ``idx,
dataset, query, answer, few_shot_scores, context``) from its sentence-numbered context with
``<statement>...<cite>[a-b]</cite></statement>`` citations (``OUTPUT_DIR/responses.jsonl``); the
judge rates the citations (recall, precision, F1 of the first 40 statements:
``citations.jsonl``) and the answer without citations (correctness: ``correctness.jsonl``); the
summary per dataset group and averaged, with the citation length in tokens of ``--tokenizer_dir``
(default with ``--client=local``: the run's; none given: not measured), goes to ``report.json`` /
``report.md`` and stdout. Prompts are cut in the middle to ``--budget`` tokens (default 128000)
with that tokenizer::

  python -m launch.evaluate longbench_cite --data=LongBench-Cite.json --output_dir=out/cite \
      --client=http --base_url=http://localhost:8000/v1 --model=my-model \
      --judge_base_url=https://api.example.com/v1 --judge_model=judge --tokenizer_dir=tok/

Its prompts are ours; gin bindings replace them (``--gin_bindings='load_cite_prompt.path="p.txt"'``,
``load_judge_prompts.support``, ...; also ``longbench_cite_job.max_statements`` and the judges'
reply lengths).

The model under test is ``--client=local`` (the engine of ``--run_dir``, checkpoint ``--step``;
``--attention_backend=sample`` prefills with SampleAttention) or
``--client=http`` (``--base_url``, ``--model``: any OpenAI-compatible endpoint, ``launch.serve``
included). Both are resumable: rerunning the same command skips finished items and retries failed
ones (failures in ``OUTPUT_DIR/*.errors.jsonl``); the exit status is 1 while items are unfinished.

Each evaluation is a function of no arguments in ``EVALUATIONS`` reading the shared flags; bad
input ends it with one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import gin
from absl import app, flags

from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.training_runs import load_trained_model, run_tokenizer_dir
from glmjax.data.chat_format import ChatFormatError
from glmjax.data.sources import DataFormatError, EmptyDatasetError
from glmjax.data.tokenizer import TokenizerError, load_tokenizer
from glmjax.evals import inference_scaling as scaling
from glmjax.evals import longbench_cite_jobs as cite_jobs
from glmjax.evals import longbench_jobs as jobs
from glmjax.evals import longbench_v2 as lb2
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import LLMClient, LLMClientError, OpenAIHTTPClient, SamplingParams
from glmjax.inference.local_client import LocalEngineClient
from glmjax.models.attention import BACKENDS as ATTENTION_BACKENDS
from glmjax.pipelines.retrieval import EmbedderUnavailable, Retriever
from glmjax.pipelines.runner import InputError, OutputFileError
from launch import common

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A launch.train MODEL_DIR (model config, checkpoints, tokenizer).")
_STEPS = flags.DEFINE_list("steps", None, "Checkpoint steps to evaluate (default: all of the run's).")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer directory (default: the run's).")
_PROBLEMS = flags.DEFINE_string("problems", None, "Problems JSONL (default: RUN_DIR/data/eval.jsonl).")
_MAX_PROBLEMS = flags.DEFINE_integer("max_problems", None, "Evaluate the first N problems (default: all).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where reports go (default: RUN_DIR/evals/<name>).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Engine rows per generation call.")
_SEED = flags.DEFINE_integer("seed", 0, "Base sampling seed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars on stderr.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings (e.g. ClientSummarizer.template).")

# inference_scaling
_BUDGETS = flags.DEFINE_list("budgets", ["8", "16", "32", "64", "128"], "Reasoning-token budgets, ascending.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Responses per problem (pass@1 averages over them).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature of the responses (default: 1.0 "
                                  "for inference_scaling, 0.5 for longbench_write, 0.1 for longbench_v2, 0.95 for "
                                  "longbench_cite).")
_CHECKER = flags.DEFINE_enum("checker", None, sorted(scaling.CHECKERS),
                             "Answer checker (default: the problems file's format).")
_ANSWER_PREFIX = flags.DEFINE_string("answer_prefix", None,
                                     "Forced answer prefix of the continuation summariser (default: per checker).")
_MAX_ANSWER_TOKENS = flags.DEFINE_integer("max_answer_tokens", None, "Tokens a summariser answers with "
                                          "(default: per checker).")
_FINISHED_RESPONSES = flags.DEFINE_enum(
    "finished_responses", "summarise", ["summarise", "own_answer"],
    "A response that stopped by itself within a budget: answered by the summariser like every cut "
    "trace, or by its own final answer (budget forcing's rule).")
_SUMMARIZER_BASE_URL = flags.DEFINE_string("summarizer_base_url", None,
                                           "OpenAI-compatible API root of a summarising model (e.g. "
                                           "http://localhost:8000/v1); default: each checkpoint summarises itself.")
_SUMMARIZER_MODEL = flags.DEFINE_string("summarizer_model", None, "Model name sent to --summarizer_base_url.")
_SUMMARIZER_API_KEY_ENV = flags.DEFINE_string("summarizer_api_key_env", None,
                                              "Environment variable holding the summariser's API key.")
_SUMMARIZER_PROMPT_FILE = flags.DEFINE_string("summarizer_prompt_file", None, "Prompt template of the client "
                                              "summariser ({problem}, {reasoning}, optional {answer_format}).")


# longbench_write, longbench_v2: the model under test, the judge, the data
_CLIENT = flags.DEFINE_enum("client", None, ["local", "http"],
                            "longbench_*: local: the engine of --run_dir; http: an OpenAI-compatible --base_url.")
_STEP = flags.DEFINE_integer("step", None, "--client=local: checkpoint step (default: the newest good one).")
_ATTENTION_BACKEND = flags.DEFINE_enum(
    "attention_backend", None, list(ATTENTION_BACKENDS), "--client=local: attention backend of the engine "
    "(default: the run's); 'sample' runs SampleAttention in prefill, dense attention in decode.")
_SAMPLE_ATTENTION_ALPHA = flags.DEFINE_float("sample_attention_alpha", None, "--client=local with "
                                             "--attention_backend=sample: the cumulative-attention threshold "
                                             "(default: the run's).")
_BASE_URL = flags.DEFINE_string("base_url", None, "--client=http: API root, e.g. http://localhost:8000/v1.")
_MODEL = flags.DEFINE_string("model", None, "--client=http: model name sent to --base_url.")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", None, "--client=http: environment variable holding the API key.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 600.0, "HTTP clients: socket timeout per request attempt (s).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "longbench_*: items worked on at once.")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "longbench_*: new tokens of a response (default: 32768 for longbench_write; for "
    "longbench_v2 128 for an answer, 1024 for a chain of thought, whose answer pass keeps 128; 1024 for "
    "longbench_cite).")
_PROMPTS = flags.DEFINE_string("prompts", None, "longbench_write: the prompts JSONL (prompt, type, length).")
_JUDGE_BASE_URL = flags.DEFINE_string(
    "judge_base_url", None, "longbench_write, longbench_cite: OpenAI-compatible API root of the judge; without "
    "it the model under test judges itself (the local engine, or --model at --base_url).")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "longbench_write, longbench_cite: model name sent to "
                                   "--judge_base_url.")
_JUDGE_API_KEY_ENV = flags.DEFINE_string("judge_api_key_env", None, "longbench_write, longbench_cite: environment "
                                         "variable holding the judge's API key.")
_JUDGE_TRIES = flags.DEFINE_integer("judge_tries", 5, "longbench_write: judge calls per response at most; "
                                    "longbench_cite: per judgement.")
_DATA = flags.DEFINE_string("data", None, "longbench_v2: the data file (official data.json, or JSONL); "
                            "longbench_cite: LongBench-Cite.json (or JSONL).")
_MODE = flags.DEFINE_enum("mode", "zero_shot", list(lb2.MODES), "longbench_v2: the prompt.")
_BUDGET = flags.DEFINE_integer("budget", None, "longbench_v2, longbench_cite: prompt tokens kept by middle "
                               f"truncation (default: {lb2.DEFAULT_BUDGET} for longbench_v2, "
                               f"{cite_jobs.DEFAULT_BUDGET} for longbench_cite; needs a tokenizer: --tokenizer_dir, "
                               "or the run's with --client=local).")
_RAG_TOP_K = flags.DEFINE_integer("rag_top_k", None, "longbench_v2 --mode=rag: retrieved chunks shown (default: all).")
_RAG_RETRIEVER = flags.DEFINE_enum(
    "rag_retriever", "given", ["given", *common.RETRIEVERS],
    "longbench_v2 --mode=rag: the data's retrieved_context (given), or chunks of each context retrieved "
    "for its question by BM25, an /v1/embeddings endpoint (--embeddings_*) or the local WordLlama model.")
_RAG_CHUNK_TOKENS = flags.DEFINE_integer("rag_chunk_tokens", lb2.RAG_CHUNK_TOKENS,
                                         "longbench_v2 --rag_retriever=bm25|embeddings|wordllama: tokens per chunk.")
_EMBEDDINGS_BASE_URL = flags.DEFINE_string("embeddings_base_url", None,
                                           "--rag_retriever=embeddings: API root (default: --base_url).")
_EMBEDDINGS_MODEL = flags.DEFINE_string("embeddings_model", None, "--rag_retriever=embeddings: model name.")
_EMBEDDINGS_API_KEY_ENV = flags.DEFINE_string("embeddings_api_key_env", None,
                                              "--rag_retriever=embeddings: variable holding the API key "
                                              "(default: --api_key_env).")


class UserError(ValueError):
    """A flag value or combination that cannot work."""


def _int_list(values: list[str] | None, flag: str) -> list[int] | None:
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{flag} must be comma-separated integers, got {','.join(values)!r}") from None


def _run_dir() -> Path:
    if _RUN_DIR.value is None:
        raise UserError("--run_dir is required (a launch.train MODEL_DIR)")
    return Path(_RUN_DIR.value)


def _output_dir(name: str) -> Path:
    return Path(_OUTPUT_DIR.value) if _OUTPUT_DIR.value else _run_dir() / "evals" / name


def _problems_path() -> Path:
    path = Path(_PROBLEMS.value) if _PROBLEMS.value else _run_dir() / "data" / "eval.jsonl"
    if not path.exists():
        hint = "" if _PROBLEMS.value else " (the run has no data/eval.jsonl: pass --problems)"
        raise UserError(f"problems file {path} does not exist{hint}")
    return path


def _client_summarizer(checker: str) -> scaling.ClientSummarizer | None:
    if _SUMMARIZER_BASE_URL.value is None:
        if _SUMMARIZER_MODEL.value or _SUMMARIZER_PROMPT_FILE.value:
            raise UserError("--summarizer_model and --summarizer_prompt_file need --summarizer_base_url")
        return None
    if not _SUMMARIZER_MODEL.value:
        raise UserError("--summarizer_base_url needs --summarizer_model")
    client = OpenAIHTTPClient(_SUMMARIZER_BASE_URL.value, _SUMMARIZER_MODEL.value,
                              api_key_env=_SUMMARIZER_API_KEY_ENV.value)
    kwargs = {"answer_format": scaling.ANSWER_FORMATS[checker], "progress": _PROGRESS.value}
    if _SUMMARIZER_PROMPT_FILE.value:
        kwargs["template_file"] = _SUMMARIZER_PROMPT_FILE.value
    if _MAX_ANSWER_TOKENS.value is not None:
        kwargs["max_tokens"] = _MAX_ANSWER_TOKENS.value
    return scaling.ClientSummarizer(client, **kwargs)


def inference_scaling() -> int:
    """The truncation probe over a run's checkpoints (module docstring)."""
    run_dir = _run_dir()
    budgets = _int_list(_BUDGETS.value, "budgets")
    if not budgets or budgets != sorted(set(budgets)) or budgets[0] < 1:
        raise UserError(f"--budgets must be ascending, distinct positive integers, got {','.join(_BUDGETS.value)!r}")
    if _NUM_SAMPLES.value < 1:
        raise UserError(f"--num_samples must be >= 1, got {_NUM_SAMPLES.value}")
    temperature = 1.0 if _TEMPERATURE.value is None else _TEMPERATURE.value
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    checkpoints = scaling.RunCheckpoints(run_dir, _int_list(_STEPS.value, "steps"))
    tokenizer = load_tokenizer(_TOKENIZER_DIR.value or run_tokenizer_dir(run_dir))
    path = _problems_path()
    problem_format = scaling.detect_problem_format(path)
    problems = scaling.load_scaling_problems(path, tokenizer, problem_format, _MAX_PROBLEMS.value)
    checker = _CHECKER.value or problem_format
    report = scaling.evaluate_inference_scaling(
        checkpoints, tokenizer, problems, budgets, _NUM_SAMPLES.value, temperature,
        checker=checker, summarizer=_client_summarizer(checker), answer_prefix=_ANSWER_PREFIX.value,
        max_answer_tokens=_MAX_ANSWER_TOKENS.value, seed=_SEED.value, batch_size=_BATCH_SIZE.value,
        progress=_PROGRESS.value, finished_responses=_FINISHED_RESPONSES.value)
    written = scaling.write_scaling_report(report, _output_dir("inference_scaling"))
    print(report.markdown())
    print(json.dumps({key: str(value) for key, value in written.items()}))
    return 0


def _require(**values: object) -> None:
    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
        raise UserError(f"this evaluation needs {', '.join(missing)}")


def _longbench_output_dir(name: str) -> Path:
    if _OUTPUT_DIR.value is None and _RUN_DIR.value is None:
        raise UserError(f"this evaluation needs --output_dir (or --run_dir, whose evals/{name} is the default)")
    return _output_dir(name)


def _client_under_test() -> tuple[LLMClient, str, Path | None]:
    """(the model under test, its name for reports, its tokenizer directory or None)."""
    _require(client=_CLIENT.value)
    if _CLIENT.value == "local":
        run_dir = _run_dir()
        tokenizer_dir = Path(_TOKENIZER_DIR.value or run_tokenizer_dir(run_dir))
        overrides = {name: value for name, value in (("attention_backend", _ATTENTION_BACKEND.value),
                                                     ("sample_attention_alpha", _SAMPLE_ATTENTION_ALPHA.value))
                     if value is not None}
        engine = GenerationEngine(load_trained_model(run_dir, _STEP.value, **overrides),
                                  max_batch_size=_BATCH_SIZE.value)
        return LocalEngineClient(engine, load_tokenizer(tokenizer_dir)), run_dir.name, tokenizer_dir
    _require(base_url=_BASE_URL.value, model=_MODEL.value)
    client = OpenAIHTTPClient(_BASE_URL.value, _MODEL.value, api_key_env=_API_KEY_ENV.value,
                              timeout_s=_TIMEOUT_S.value)
    return client, _MODEL.value, Path(_TOKENIZER_DIR.value) if _TOKENIZER_DIR.value else None


def _check_client_flags() -> None:
    """Flag combinations of the model under test, checked before any file is read or model loaded."""
    _require(client=_CLIENT.value)
    if _CLIENT.value == "local":
        _require(run_dir=_RUN_DIR.value)
    else:
        _require(base_url=_BASE_URL.value, model=_MODEL.value)
        if _ATTENTION_BACKEND.value is not None or _SAMPLE_ATTENTION_ALPHA.value is not None:
            raise UserError("--attention_backend and --sample_attention_alpha apply to --client=local only")
    if _CONCURRENCY.value < 1:
        raise UserError(f"--concurrency must be >= 1, got {_CONCURRENCY.value}")


def _sampling(default: SamplingParams) -> SamplingParams:
    """``default`` with --max_new_tokens and --temperature applied."""
    changes = {}
    if _MAX_NEW_TOKENS.value is not None:
        changes["max_tokens"] = _MAX_NEW_TOKENS.value
    if _TEMPERATURE.value is not None:
        changes["temperature"] = _TEMPERATURE.value
    return dataclasses.replace(default, **changes)


def _budget(default: int) -> int:
    """--budget, or ``default`` when it is not given."""
    budget = default if _BUDGET.value is None else _BUDGET.value
    if budget < 1:
        raise UserError(f"--budget must be >= 1 token, got {budget}")
    return budget


def _check_judge_flags() -> None:
    if (_JUDGE_BASE_URL.value is None) != (_JUDGE_MODEL.value is None):
        raise UserError("--judge_base_url and --judge_model go together")
    if _JUDGE_TRIES.value < 1:
        raise UserError(f"--judge_tries must be >= 1, got {_JUDGE_TRIES.value}")


def _judge_client() -> LLMClient | None:
    """The judge at --judge_base_url, or None (the model under test judges itself)."""
    if _JUDGE_BASE_URL.value is None:
        return None
    return OpenAIHTTPClient(_JUDGE_BASE_URL.value, _JUDGE_MODEL.value, api_key_env=_JUDGE_API_KEY_ENV.value,
                            timeout_s=_TIMEOUT_S.value)


def _finish(report: dict) -> int:
    """Prints the report; 1 (with a line on stderr) while items are unfinished, else 0."""
    print(json.dumps(report))
    if report["unfinished"]:
        print(f"evaluate {report['benchmark']}: {report['unfinished']} of {report['items']} items unfinished "
              f"({report['failed']} failed this run; reasons in the *.errors.jsonl files of the output "
              "directory); rerun the same command to finish them", file=sys.stderr)
        return 1
    return 0


def longbench_write() -> int:
    """LongBench-Write: generate, judge, summarise (module docstring)."""
    _require(prompts=_PROMPTS.value)
    _check_client_flags()
    _check_judge_flags()
    output_dir = _longbench_output_dir("longbench_write")
    jobs.check_write_files(_PROMPTS.value, output_dir)  # bad files are refused before a model loads
    judge = _judge_client()
    client, _, _ = _client_under_test()
    report = jobs.longbench_write_job(
        _PROMPTS.value, output_dir, client, judge or client, sampling=_sampling(jobs.DEFAULT_WRITE_SAMPLING),
        judge_tries=_JUDGE_TRIES.value, seed=_SEED.value, concurrency=_CONCURRENCY.value,
        progress=_PROGRESS.value)
    return _finish(report)


def _rag_retriever() -> Callable[[list[str]], Retriever] | None:
    """``chunks -> retriever`` of --rag_retriever (an embedder built once, here); None: "given"."""
    if _RAG_RETRIEVER.value == "given":
        return None
    if _MODE.value != "rag":
        raise UserError(f"--rag_retriever={_RAG_RETRIEVER.value} is for --mode=rag")
    if _RAG_CHUNK_TOKENS.value < 1:
        raise UserError(f"--rag_chunk_tokens must be >= 1, got {_RAG_CHUNK_TOKENS.value}")
    return common.retriever_factory(
        _RAG_RETRIEVER.value, base_url=_EMBEDDINGS_BASE_URL.value or _BASE_URL.value, model=_EMBEDDINGS_MODEL.value,
        api_key_env=_EMBEDDINGS_API_KEY_ENV.value or _API_KEY_ENV.value, timeout_s=_TIMEOUT_S.value)


def longbench_v2() -> int:
    """LongBench v2 in --mode: ask, grade, score (module docstring)."""
    _require(data=_DATA.value)
    _check_client_flags()
    budget = _budget(lb2.DEFAULT_BUDGET)
    output_dir = _longbench_output_dir(f"longbench_v2_{_MODE.value}")
    retriever = _rag_retriever()
    jobs.check_v2_files(_DATA.value, output_dir, _MODE.value, retrieves=retriever is not None)  # before a model loads
    client, name, tokenizer_dir = _client_under_test()
    tokenizer = None if tokenizer_dir is None else load_tokenizer(tokenizer_dir)
    first = lb2.COT_SAMPLING if _MODE.value == "cot" else lb2.DIRECT_SAMPLING
    answer = lb2.DIRECT_SAMPLING if _TEMPERATURE.value is None else dataclasses.replace(
        lb2.DIRECT_SAMPLING, temperature=_TEMPERATURE.value)
    report = jobs.longbench_v2_job(
        _DATA.value, output_dir, client, mode=_MODE.value, tokenizer=tokenizer, budget=budget,
        sampling=_sampling(first), answer_sampling=answer, rag_top_k=_RAG_TOP_K.value, retriever=retriever,
        rag_chunk_tokens=_RAG_CHUNK_TOKENS.value, name=name, seed=_SEED.value, concurrency=_CONCURRENCY.value, progress=_PROGRESS.value)
    return _finish(report)


def longbench_cite() -> int:
    """LongBench-Cite: answer with citations, judge citations and correctness, summarise (module
    docstring)."""
    _require(data=_DATA.value)
    _check_client_flags()
    _check_judge_flags()
    budget = _budget(cite_jobs.DEFAULT_BUDGET)
    output_dir = _longbench_output_dir("longbench_cite")
    cite_jobs.check_cite_files(_DATA.value, output_dir)  # bad files are refused before a model loads
    judge = _judge_client()
    client, name, tokenizer_dir = _client_under_test()
    tokenizer = None if tokenizer_dir is None else load_tokenizer(tokenizer_dir)
    report = cite_jobs.longbench_cite_job(
        _DATA.value, output_dir, client, judge or client, tokenizer=tokenizer, budget=budget,
        sampling=_sampling(cite_jobs.DEFAULT_SAMPLING), judge_tries=_JUDGE_TRIES.value, seed=_SEED.value,
        concurrency=_CONCURRENCY.value, progress=_PROGRESS.value, name=name)
    return _finish(report)


EVALUATIONS: dict[str, Callable[[], int]] = {"inference_scaling": inference_scaling,
                                             "longbench_write": longbench_write, "longbench_v2": longbench_v2,
                                             "longbench_cite": longbench_cite}
"""Evaluation name -> its entry point (reads the flags, returns the exit status)."""

_USER_ERRORS = (UserError, InputError, OutputFileError, CheckpointError, DataFormatError, EmptyDatasetError, TokenizerError, ChatFormatError,
                LLMClientError, EmbedderUnavailable, FileNotFoundError, ValueError)


def main(argv: list[str]) -> int:
    names = ", ".join(sorted(EVALUATIONS))
    if len(argv) != 2 or argv[1] not in EVALUATIONS:
        given = "no evaluation" if len(argv) < 2 else f"{' '.join(argv[1:])!r}"
        print(f"evaluate: expected one evaluation name ({names}), got {given}", file=sys.stderr)
        return 2
    name = argv[1]
    common.quiet_library_logs()
    try:
        gin.parse_config(_GIN_BINDINGS.value)
    except (ValueError, SyntaxError) as err:
        print(f"evaluate {name}: gin binding error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        return EVALUATIONS[name]()
    except _USER_ERRORS as err:
        print(f"evaluate {name}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
