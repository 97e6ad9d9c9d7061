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

Each evaluation is a function of no arguments in ``EVALUATIONS`` reading the shared flags; bad
input ends it with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import gin
from absl import app, flags

from glmjax.checkpoints.hf_config import CheckpointError
from glmjax.checkpoints.training_runs import run_tokenizer_dir
from glmjax.data.chat_format import ChatFormatError
from glmjax.data.sources import DataFormatError, EmptyDatasetError
from glmjax.data.tokenizer import TokenizerError, load_tokenizer
from glmjax.evals import inference_scaling as scaling
from glmjax.inference.llm_client import LLMClientError, OpenAIHTTPClient
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
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature of the responses.")
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
    if _TEMPERATURE.value < 0:
        raise UserError(f"--temperature must be >= 0, got {_TEMPERATURE.value}")
    checkpoints = scaling.RunCheckpoints(run_dir, _int_list(_STEPS.value, "steps"))
    tokenizer = load_tokenizer(_TOKENIZER_DIR.value or run_tokenizer_dir(run_dir))
    path = _problems_path()
    problem_format = scaling.detect_problem_format(path)
    problems = scaling.load_scaling_problems(path, tokenizer, problem_format, _MAX_PROBLEMS.value)
    checker = _CHECKER.value or problem_format
    report = scaling.evaluate_inference_scaling(
        checkpoints, tokenizer, problems, budgets, _NUM_SAMPLES.value, _TEMPERATURE.value,
        checker=checker, summarizer=_client_summarizer(checker), answer_prefix=_ANSWER_PREFIX.value,
        max_answer_tokens=_MAX_ANSWER_TOKENS.value, seed=_SEED.value, batch_size=_BATCH_SIZE.value,
        progress=_PROGRESS.value, finished_responses=_FINISHED_RESPONSES.value)
    written = scaling.write_scaling_report(report, _output_dir("inference_scaling"))
    print(report.markdown())
    print(json.dumps({key: str(value) for key, value in written.items()}))
    return 0


EVALUATIONS: dict[str, Callable[[], int]] = {"inference_scaling": inference_scaling}
"""Evaluation name -> its entry point (reads the flags, returns the exit status)."""

_USER_ERRORS = (UserError, CheckpointError, DataFormatError, EmptyDatasetError, TokenizerError, ChatFormatError,
                LLMClientError, FileNotFoundError, ValueError)


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
