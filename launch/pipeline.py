r"""Runs a data pipeline (``glmjax.pipelines``) with LLM clients from the command line.

  # T1 CoT synthesis with the local engine of a launch.train run on the built-in task:
  python -m launch.pipeline builtin_problems --output=/tmp/t1/problems.jsonl --num_problems=32
  python -m launch.pipeline t1_cot --input=/tmp/t1/problems.jsonl --output=/tmp/t1/out \
      --client=local --run_dir=runs/quickstart/sft --gin.t1_cot_pipeline.num_attempts=4

  # ... or with any OpenAI-compatible endpoint (vLLM, SGLang, launch.serve, a hosted API); several
  # --model names sample the attempts, the first (or --critic_model / --writer_model) critiques
  # and rewrites:
  python -m launch.pipeline t1_cot --input=problems.jsonl --output=DIR --client=http \
      --base_url=http://localhost:8000/v1 --model=m1,m2 --api_key_env=OPENAI_API_KEY --concurrency=16

  # AgentWrite (LongWriter): plan each instruction, write it paragraph by paragraph, export SFT rows:
  python -m launch.pipeline agentwrite --input=instructions.jsonl --output=DIR --client=http \
      --base_url=http://localhost:8000/v1 --model=m --concurrency=8 --gin.agentwrite_pipeline.max_steps=50

  # CoF (LongCite): questions and answers from long documents, then chunk- and sentence-level
  # citations; BM25 retrieval by default, or dense retrieval through an /v1/embeddings endpoint:
  python -m launch.pipeline cof --input=documents.jsonl --output=DIR --client=http \
      --base_url=http://localhost:8000/v1 --model=m --retriever=embeddings --embeddings_model=e

  # LongReward: sample responses from a local run, score them with an HTTP judge, write DPO pairs:
  python -m launch.pipeline longreward --input=prompts.jsonl --output=DIR --client=local \
      --run_dir=runs/sft --judge_base_url=https://api.example.com/v1 --judge_model=judge \
      --judge_api_key_env=JUDGE_KEY --gin.longreward_pipeline.num_samples=5

Pipelines:
  ``cof``: ``glmjax.pipelines.cof.cof_pipeline`` on ``{"id"?, "context", "query"?, "answer"?}`` rows;
    ``--output`` is its directory (``qa.jsonl``, ``chunk_cites.jsonl``, ``sentence_cites.jsonl``,
    ``sft.jsonl``, ``rejected.jsonl``). The first ``--model`` runs every stage. ``--retriever``:
    ``bm25`` (default), ``embeddings`` (``--embeddings_model`` at ``--embeddings_base_url``,
    default ``--base_url``), ``wordllama`` (a local model shipped in the ``wordllama`` package).
    Chunks count the tokens of ``--tokenizer_dir`` (``--client=local``: the run's tokenizer by
    default), else words and CJK characters.
  ``longreward``: ``glmjax.pipelines.longreward.longreward_pipeline`` on ``{"id"?, "context",
    "query"}`` rows; ``--output`` is its directory (``responses.jsonl``, ``relevant.jsonl``,
    ``scores.jsonl``, ``pairs.jsonl`` for ``pair_data``). The policy is the model of the usual
    flags (the engine of ``--client=local --run_dir``, or the first ``--model`` at ``--base_url``);
    the judge is ``--judge_model`` at ``--judge_base_url`` (key in ``--judge_api_key_env``), and
    without them the policy judges itself. ``--retriever`` and the chunk tokenizer as for ``cof``
    (the chunks of the faithfulness statements).
  ``agentwrite``: ``glmjax.pipelines.agentwrite.agentwrite_pipeline`` on ``{"id"?, "instruction"}``
    rows; ``--output`` is its directory (``plans.jsonl``, ``writes.jsonl``, ``sft.jsonl``). The
    first ``--model`` (or ``--planner_model`` / ``--writer_model``) plans and writes.
  ``t1_cot``: ``glmjax.pipelines.t1_cot.t1_cot_pipeline`` (knobs by ``--gin_file`` /
    ``--gin_bindings`` / ``--gin.NAME=VALUE``); ``--output`` is its directory.
  ``builtin_problems``: writes ``--num_problems`` problems of the built-in arithmetic task
    (``--split``, ``--seed``) to the file ``--output`` as ``{"id", "problem", "answer"}`` rows.

Rerunning the same command resumes: finished items are skipped, failed ones retried. Exit codes:
0 done; 1 some items failed (their reasons are in the stage's errors file; rerun to retry them);
2 a usage, input, config, model or output-file error (one line on stderr, nothing written).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from transformers import PreTrainedTokenizerBase

from glmjax.checkpoints import CheckpointError
from glmjax.checkpoints.training_runs import load_trained_model, run_tokenizer_dir
from glmjax.data.chat_format import ChatFormatError
from glmjax.data.tokenizer import TokenizerError, load_tokenizer
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import LLMClient, OpenAIHTTPClient
from glmjax.inference.local_client import LocalEngineClient
from glmjax.pipelines import agentwrite, cof, longreward, t1_cot
from glmjax.pipelines.agentwrite import agentwrite_pipeline
from glmjax.pipelines.longreward import longreward_pipeline
from glmjax.pipelines.retrieval import EmbedderUnavailable
from glmjax.pipelines.runner import InputError, OutputFileError
from glmjax.pipelines.t1_cot import PromptError, t1_cot_pipeline, write_builtin_problems
from launch import common
from launch.train import GinConfigError, parse_gin, split_gin_shorthand  # also --gin_file, --gin_bindings

PIPELINES = ("t1_cot", "builtin_problems", "agentwrite", "cof", "longreward")

_INPUT = flags.DEFINE_string("input", None, "Input JSONL of the pipeline's items.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Output directory (t1_cot, agentwrite, cof, longreward) or file (builtin_problems).")
_CLIENT = flags.DEFINE_enum("client", None, ["local", "http"],
                            "local: the engine of --run_dir; http: an OpenAI-compatible --base_url.")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "--client=local: a launch.train MODEL_DIR.")
_STEP = flags.DEFINE_integer("step", None, "--client=local: checkpoint step (default: the newest good one).")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None,
                                     "--client=local: tokenizer directory (default: the run's); cof, longreward: the "
                                     "tokenizer whose tokens the chunks count (also with --client=http).")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 16, "--client=local: rows per engine call.")
_BASE_URL = flags.DEFINE_string("base_url", None, "--client=http: API root, e.g. http://localhost:8000/v1.")
_MODEL = flags.DEFINE_list("model", None, "--client=http: model name(s); each one samples attempts.")
_CRITIC_MODEL = flags.DEFINE_string("critic_model", None, "--client=http: critic model (default: the first --model).")
_WRITER_MODEL = flags.DEFINE_string("writer_model", None, "--client=http: writer model (default: the first --model).")
_PLANNER_MODEL = flags.DEFINE_string("planner_model", None,
                                     "--client=http, agentwrite: planner model (default: the first --model).")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", None, "--client=http: environment variable holding the API key.")
_JUDGE_BASE_URL = flags.DEFINE_string(
    "judge_base_url", None, "longreward: OpenAI-compatible API root of the judge; without it the policy (the "
    "local engine, or the first --model at --base_url) judges itself.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "longreward: model name sent to --judge_base_url.")
_JUDGE_API_KEY_ENV = flags.DEFINE_string("judge_api_key_env", None,
                                         "longreward: environment variable holding the judge's API key.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 600.0, "--client=http: socket timeout per request attempt.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", None, "Items worked on at once (default: the pipeline's).")
_NUM_PROBLEMS = flags.DEFINE_integer("num_problems", 32, "builtin_problems: how many.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["train", "eval"], "builtin_problems: the task split.")
_SEED = flags.DEFINE_integer("seed", 0, "builtin_problems: generator seed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on stderr.")
_RETRIEVER = flags.DEFINE_enum("retriever", "bm25", list(common.RETRIEVERS),
                               "cof, longreward: chunk retrieval: BM25, an /v1/embeddings endpoint, or the local "
                               "WordLlama model (pip install wordllama).")
_EMBEDDINGS_BASE_URL = flags.DEFINE_string("embeddings_base_url", None,
                                           "cof --retriever=embeddings: API root (default: --base_url).")
_EMBEDDINGS_MODEL = flags.DEFINE_string("embeddings_model", None, "cof --retriever=embeddings: model name.")
_EMBEDDINGS_API_KEY_ENV = flags.DEFINE_string("embeddings_api_key_env", None,
                                              "cof --retriever=embeddings: variable holding the API key "
                                              "(default: --api_key_env).")

_USER_ERRORS = (InputError, OutputFileError, PromptError, CheckpointError, TokenizerError, ChatFormatError,
                GinConfigError, FileNotFoundError, ValueError, EmbedderUnavailable)


class UserError(ValueError):
    """A flag combination that cannot work."""


def _require(**values: object) -> None:
    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
        raise UserError(f"this command needs {', '.join(missing)}")


def _clients() -> tuple[list[LLMClient], LLMClient, LLMClient, LLMClient]:
    """(attempt clients, critic, writer, planner) from the flags."""
    _require(client=_CLIENT.value)
    if _CLIENT.value == "local":
        _require(run_dir=_RUN_DIR.value)
        tokenizer = load_tokenizer(_TOKENIZER_DIR.value or run_tokenizer_dir(_RUN_DIR.value))
        engine = GenerationEngine(load_trained_model(_RUN_DIR.value, _STEP.value),
                                  max_batch_size=_MAX_BATCH_SIZE.value)
        client = LocalEngineClient(engine, tokenizer)
        return [client], client, client, client
    _require(base_url=_BASE_URL.value, model=_MODEL.value)

    def http(model: str) -> OpenAIHTTPClient:
        return OpenAIHTTPClient(_BASE_URL.value, model, api_key_env=_API_KEY_ENV.value,
                                timeout_s=_TIMEOUT_S.value)

    attempts = [http(model) for model in _MODEL.value]
    critic = http(_CRITIC_MODEL.value) if _CRITIC_MODEL.value else attempts[0]
    writer = http(_WRITER_MODEL.value) if _WRITER_MODEL.value else attempts[0]
    planner = http(_PLANNER_MODEL.value) if _PLANNER_MODEL.value else attempts[0]
    return attempts, critic, writer, planner


def _retriever_factory() -> cof.RetrieverFactory:
    """The chunk retriever of ``--retriever`` (``--embeddings_*`` for "embeddings")."""
    return common.retriever_factory(
        _RETRIEVER.value, base_url=_EMBEDDINGS_BASE_URL.value or _BASE_URL.value, model=_EMBEDDINGS_MODEL.value,
        api_key_env=_EMBEDDINGS_API_KEY_ENV.value or _API_KEY_ENV.value, timeout_s=_TIMEOUT_S.value)


def _chunk_tokenizer() -> PreTrainedTokenizerBase | None:
    """The tokenizer whose tokens the chunks count: --tokenizer_dir, else (--client=local) the run's,
    else None (words and CJK characters)."""
    tokenizer_dir = _TOKENIZER_DIR.value
    if tokenizer_dir is None and _CLIENT.value == "local" and _RUN_DIR.value is not None:
        tokenizer_dir = run_tokenizer_dir(_RUN_DIR.value)
    return load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None


def _run_cof(overrides: dict[str, int]) -> dict:
    cof.check_files(_INPUT.value, _OUTPUT.value)  # bad files are refused before a model loads
    factory, tokenizer = _retriever_factory(), _chunk_tokenizer()
    _, client, _, _ = _clients()
    return cof.cof_pipeline(_INPUT.value, _OUTPUT.value, client, retriever_factory=factory, tokenizer=tokenizer,
                            progress=_PROGRESS.value, **overrides)


def _judge() -> LLMClient | None:
    """The judge of --judge_base_url / --judge_model, or None (the policy judges itself)."""
    if (_JUDGE_BASE_URL.value is None) != (_JUDGE_MODEL.value is None):
        raise UserError("--judge_base_url and --judge_model go together")
    if _JUDGE_BASE_URL.value is None:
        return None
    return OpenAIHTTPClient(_JUDGE_BASE_URL.value, _JUDGE_MODEL.value, api_key_env=_JUDGE_API_KEY_ENV.value,
                            timeout_s=_TIMEOUT_S.value)


def _run_longreward(overrides: dict[str, int]) -> dict:
    longreward.check_files(_INPUT.value, _OUTPUT.value)  # bad files are refused before a model loads
    judge, factory, tokenizer = _judge(), _retriever_factory(), _chunk_tokenizer()
    policy = _clients()[0][0]  # the first --model (or the local engine)
    return longreward_pipeline(_INPUT.value, _OUTPUT.value, policy, judge or policy, retriever_factory=factory,
                               tokenizer=tokenizer, progress=_PROGRESS.value, **overrides)


def _run(name: str) -> int:
    if name == "builtin_problems":
        _require(output=_OUTPUT.value)
        written = write_builtin_problems(_OUTPUT.value, _NUM_PROBLEMS.value, split=_SPLIT.value,
                                         seed=_SEED.value)
        print(json.dumps({"written": written, "output": _OUTPUT.value}))
        return 0
    _require(input=_INPUT.value, output=_OUTPUT.value)
    overrides = {} if _CONCURRENCY.value is None else {"concurrency": _CONCURRENCY.value}
    if name == "cof":
        return _report(_run_cof(overrides))
    if name == "longreward":
        return _report(_run_longreward(overrides))
    job = agentwrite if name == "agentwrite" else t1_cot
    job.check_files(_INPUT.value, _OUTPUT.value)  # bad files are refused before a model loads
    attempt_clients, critic, writer, planner = _clients()
    if name == "agentwrite":
        result = agentwrite_pipeline(_INPUT.value, _OUTPUT.value, planner, writer, progress=_PROGRESS.value,
                                     **overrides)
    else:
        result = t1_cot_pipeline(_INPUT.value, _OUTPUT.value, attempt_clients, critic, writer,
                                 progress=_PROGRESS.value, **overrides)
    return _report(result)


def _report(result: dict) -> int:
    """Prints a pipeline's summary; the exit code: 1 when items failed, else 0."""
    print(json.dumps(result))
    if result["failed"]:
        errors = [stage["errors"] for stage in result["stages"].values() if stage["failed"]]
        print(f"pipeline: {result['failed']} items failed (reasons in {', '.join(errors)}); rerun the "
              "same command to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str], extra_bindings: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in PIPELINES:
        print(f"pipeline: give one pipeline name, one of {', '.join(PIPELINES)}; got {argv[1:]}",
              file=sys.stderr)
        return 2
    common.quiet_library_logs()
    try:
        parse_gin(flags.FLAGS.gin_file, [*flags.FLAGS.gin_bindings, *extra_bindings])
        return _run(argv[1])
    except _USER_ERRORS as err:  # gin adds an "In call to configurable ..." line: not printed
        print(f"pipeline: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
              file=sys.stderr)
        return 2


def run() -> None:
    argv, extra_bindings = split_gin_shorthand(sys.argv)
    app.run(lambda args: main(args, extra_bindings), argv=argv)


if __name__ == "__main__":
    run()
