r"""LongReward -> DPO on the built-in arithmetic task, end to end on CPU, with a RULE judge.

  python -m launch.train --gin_file=configs/quickstart.gin   # once: its first stage is runs/quickstart/sft
  python -m launch.longreward_experiment                     # prints one JSON object

What it does (every step resumes when rerun; outputs under ``--work_dir``):

1. **Prompts** ``{id, context, query}``: problems of the built-in task (the quickstart's
   difficulty), the query the bare question (``Compute (7+5)*3-4.``), the context a *fact sheet*:
   the true results of the problem's steps (``Fact 3: 12*3=36.``) shuffled among ``--distractors``
   true facts of other chains. ``--num_train_prompts`` from the train split, ``--num_eval_prompts``
   held out (the eval split: no expression in common with any training problem).
2. **LongReward** (``glmjax.pipelines.longreward``) with the SFT model as the policy (the local
   engine, ``--num_samples`` samples at ``--temperature``) and ``glmjax.evals.arithmetic_judge.ArithmeticRuleJudge`` as the
   judge, on both prompt sets: ``train/pairs.jsonl`` and ``eval/pairs.jsonl``. The policy's user
   turn is the query alone (``policy_template = "{query}"``), as the SFT model was trained: the
   fact sheet is read by the judge only (the faithfulness and completeness dimensions check the
   answer against it), not by the policy.
3. **DPO** of the SFT model on the train pairs: ``launch.train`` with
   ``configs/experiments/longreward_dpo.gin`` (beta 0.15, SFT weight 0.1, as LongReward), held-out
   reward accuracy / margin on the eval pairs and held-out exact match before and after.
4. **Held-out LongReward score**, before (the SFT model) and after (the DPO model): the rule
   judge's mean reward and per-dimension means over the held-out prompts, for one greedy response
   each and for ``--num_samples`` sampled ones (the same seeds before and after).

The judge is a RULE, not an LLM: :class:`ArithmeticRuleJudge` answers the pipeline's default judge
prompts by parsing them and checking the arithmetic, so the whole pipeline (prompts, parsing,
retrieval, retries, pairing) runs as with an LLM judge, but the scores are deterministic:

* helpfulness: 10 if the final ``Answer: N`` is the problem's value, else 0;
* logicality: 10 x the fraction of sound parts, a part being each step line (every attempt's
  check written right: the inverse operation computed correctly and the verdict ``ok`` exactly
  when it gives back the left operand, as the task's solutions check; the last attempt correct;
  its left operand the previous step's result) and the answer line (it repeats the last step's
  result);
* statements: each step's last equation; support: ``fully`` when a retrieved passage states the
  equation, ``partially`` when it is arithmetically true but not in the passages, else ``not``;
* relevant information of a chunk: its facts on the problem's chain; completeness: 10 x the
  fraction of those equations that the answer writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

from glmjax.inference.llm_client import LLMClient, SamplingParams
from glmjax.evals.arithmetic_judge import JUDGE_SETTINGS, ArithmeticRuleJudge, write_prompts
from glmjax.pipelines import longreward as lr
from glmjax.pipelines.runner import finished_rows
from launch import common

_SFT_RUN = flags.DEFINE_string("sft_run", "runs/quickstart/sft", "The SFT model: a launch.train MODEL_DIR.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/longreward_dpo", "Where every output goes.")
_GIN_FILE = flags.DEFINE_string("dpo_gin_file", "configs/experiments/longreward_dpo.gin", "The DPO config.")
_DPO_NAME = flags.DEFINE_string("dpo_name", "dpo", "The DPO run's directory under --work_dir (a variant: "
                                "another name; the pairs and the before scores are reused).")
_DPO_BINDINGS = flags.DEFINE_multi_string("dpo_binding", [], "Extra gin bindings of the DPO run, e.g. "
                                          "'DPOObjective.sft_weight = 1.0'.")
_NUM_TRAIN = flags.DEFINE_integer("num_train_prompts", 96, "Prompts whose pairs DPO trains on.")
_NUM_EVAL = flags.DEFINE_integer("num_eval_prompts", 48, "Held-out prompts.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 6, "Responses per prompt.")
_DISTRACTORS = flags.DEFINE_integer("distractors", 6, "Facts of other chains in each fact sheet.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Policy sampling temperature.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 96, "Policy generation budget.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompts and of every sample.")

# ------------------------------------------------------------------------------ the steps

def _policy(run_dir: str) -> LLMClient:
    from glmjax.checkpoints.training_runs import load_trained_model, run_tokenizer_dir
    from glmjax.data.tokenizer import load_tokenizer
    from glmjax.inference.engine import GenerationEngine
    from glmjax.inference.local_client import LocalEngineClient

    engine = GenerationEngine(load_trained_model(run_dir), max_batch_size=32)
    return LocalEngineClient(engine, load_tokenizer(run_tokenizer_dir(run_dir)))


def _pipeline(prompts: Path, out: Path, policy: LLMClient, stages: Sequence[str] = lr.STAGES) -> dict[str, Any]:
    return lr.longreward_pipeline(prompts, out, policy, ArithmeticRuleJudge(), _NUM_SAMPLES.value,
                                  policy_template="{query}", policy_temperature=_TEMPERATURE.value,
                                  policy_max_tokens=_MAX_NEW_TOKENS.value, seed=_SEED.value, concurrency=2,
                                  stages=stages, progress=False, **JUDGE_SETTINGS)


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean reward, per-dimension means and exact match (helpfulness 10) of score rows."""
    out = {"reward": math.fsum(r["reward"] for r in rows) / len(rows)}
    for name in lr.DIMENSIONS:
        out[name] = math.fsum(r["scores"][name] for r in rows) / len(rows)
    out["exact_match"] = sum(r["scores"]["helpfulness"] == 10.0 for r in rows) / len(rows)
    return {k: round(v, 4) for k, v in out.items()}


def held_out_scores(policy: LLMClient, prompts: Path, out: Path) -> dict[str, Any]:
    """The rule judge's means over the held-out prompts: one greedy response each, and the
    ``--num_samples`` sampled ones (the pipeline's responses and scores stages into ``out``)."""
    judge = lr.LongRewardJudge(ArithmeticRuleJudge(), **JUDGE_SETTINGS)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    greedy = policy.complete_batch([[{"role": "user", "content": row["query"]}] for row in rows],
                                   SamplingParams(max_tokens=_MAX_NEW_TOKENS.value, temperature=0.0))
    scored = [dataclasses.asdict(judge.score(row["context"], row["query"], text, key=row["id"]))
              for row, text in zip(rows, greedy)]
    sampled = _pipeline(prompts, out, policy)
    return {"greedy": _means(scored), "sampled": _means(list(finished_rows(Path(sampled["files"]["scores"])).values())),
            "sampled_responses": len(finished_rows(Path(sampled["files"]["scores"])))}


def _train(work: Path, train_pairs: str, eval_pairs: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "launch.train", f"--gin_file={_GIN_FILE.value}",
               f"--gin.MODEL_DIR='{work / _DPO_NAME.value}'", f"--gin.SFT_MODEL='{_SFT_RUN.value}'",
               f"--gin.TRAIN_PAIRS='{train_pairs}'", f"--gin.EVAL_PAIRS='{eval_pairs}'",
               *(f"--gin_bindings={binding}" for binding in _DPO_BINDINGS.value)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"launch.train failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pick(metrics: dict[str, Any] | None) -> dict[str, float]:
    keys = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "exact_match")
    return {k: round(metrics[k], 4) for k in keys if metrics and k in metrics}


def run_experiment() -> dict[str, Any]:
    work = Path(_WORK_DIR.value)
    prompts = {split: work / split / "prompts.jsonl" for split in ("train", "eval")}
    write_prompts(prompts["train"], "train", _NUM_TRAIN.value, _SEED.value, _DISTRACTORS.value)
    write_prompts(prompts["eval"], "eval", _NUM_EVAL.value, _SEED.value, _DISTRACTORS.value)
    sft = _policy(_SFT_RUN.value)
    built = {split: _pipeline(prompts[split], work / split, sft) for split in ("train", "eval")}
    for split, result in built.items():
        if result["failed"] or result["unfinished"]:
            raise RuntimeError(f"the {split} pipeline left {result['unfinished']} prompts unfinished")
    before = held_out_scores(sft, prompts["eval"], work / "eval")  # the sampled scores are the eval run's
    summary = _train(work, built["train"]["files"]["pairs"], built["eval"]["files"]["pairs"])
    after = held_out_scores(_policy(str(work / _DPO_NAME.value)), prompts["eval"],
                            work / f"eval_after_{_DPO_NAME.value}")
    return {
        "pairs": {split: {k: built[split][k] for k in ("prompts", "pairs", "ties", "identical", "mean_reward")}
                  for split in built},
        "dpo": {"name": _DPO_NAME.value, "bindings": _DPO_BINDINGS.value, "steps": summary["step"], "before": _pick(summary["before"]), "after": _pick(summary["after"]),
                "dropped_examples": summary["dropped_examples"], "model_dir": summary["model_dir"]},
        "held_out_longreward": {"before": before, "after": after},
    }


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"longreward_experiment: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    common.quiet_library_logs()
    print(json.dumps(run_experiment()))
    return 0


if __name__ == "__main__":
    app.run(main)
