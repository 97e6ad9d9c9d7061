"""The LongReward experiment's pieces (launch/longreward_experiment.py): the fact-sheet prompts and the
rule judge, through LongRewardJudge and the pipeline's default prompts, against hand-computed scores."""

import json
import random

import pytest
from scripted_clients import ScriptedClient

from glmjax.data.synthetic import generate_problems
from glmjax.pipelines import longreward as lr
from glmjax.evals import arithmetic_judge as ex

CORRECT = "Step 1: 9-2=7. Check: 7+2=9, ok.\nStep 2: 7-1=6. Check: 6+1=7, ok.\nAnswer: 6"
REDONE = ("Step 1: 9-2=8. Check: 8+2=10!=9, wrong. Redo: 9-2=7. Check: 7+2=9, ok.\n"
          "Step 2: 7-1=6. Check: 6+1=7, ok.\nAnswer: 6")
CARRIED = "Step 1: 9-2=8. Check: 8+2=9, ok.\nStep 2: 8-1=7. Check: 7+1=8, ok.\nAnswer: 7"  # a false check
NO_STEPS = "Answer: 6"
SLOPPY = "Step 1: 9-2=7. Check: 7+2=8, ok.\nStep 2: 7-1=6. Check: 6+1=7, ok.\nAnswer: 6"  # 7+2 is not 8
QUERY = "Compute 9-2-1."
CONTEXT = "Fact 1: 2+2=4.\nFact 2: 9-2=7.\nFact 3: 9+5=14.\nFact 4: 7-1=6.\nFact 5: 8*5=40."


def _score(answer):
    return lr.LongRewardJudge(ex.ArithmeticRuleJudge(), **ex.JUDGE_SETTINGS).score(CONTEXT, QUERY, answer, key="k")


def test_chain_and_fact_sheet():
    assert ex.chain_of("Compute (2+6)*4.") == [(2, "+", 6, 8), (8, "*", 4, 32)]
    assert ex.chain_of(QUERY) == [(9, "-", 2, 7), (7, "-", 1, 6)]
    sheet = ex.fact_sheet(ex.chain_of(QUERY), random.Random(0), 6)
    lines = sheet.splitlines()
    assert len(lines) == 8 and [line.split(":")[0] for line in lines] == [f"Fact {i}" for i in range(1, 9)]
    assert "9-2=7." in sheet and "7-1=6." in sheet
    for line in lines:  # every fact is true
        a, op, b, r = ex._FACT.fullmatch(line).groups()
        assert ex._OPS[op](int(a), int(b)) == int(r)


def test_rule_judge_scores(tmp_path):
    assert _score(CORRECT).scores == {d: 10.0 for d in lr.DIMENSIONS}
    assert _score(REDONE).scores == {d: 10.0 for d in lr.DIMENSIONS}  # a caught and redone slip is sound
    carried = _score(CARRIED)
    # helpfulness 0 (7 != 6); logicality: step 1 passes a false check, step 2 follows from what step 1
    # wrote and the answer repeats step 2: 2 of 3 parts sound; faithfulness: 9-2=8 false (0), 8-1=7
    # true but not in the sheet (0.5); completeness: neither chain fact is written (0 of 2).
    assert carried.scores == pytest.approx({"helpfulness": 0.0, "logicality": 20 / 3, "faithfulness": 2.5,
                                            "completeness": 0.0}, abs=1e-4)  # the judge writes 4 decimals
    assert [s["support"] for s in carried.statements] == ["not", "partially"]
    assert ex.logicality(QUERY, SLOPPY) == pytest.approx(20 / 3)  # the answer is right, one check is not
    assert ex.expected_check(12, "*", 3, 35) == "Check: 35/3!=12, wrong."
    assert ex.expected_check(7, "-", 3, 3) == "Check: 3+3=6!=7, wrong."
    assert ex.expected_check(7, "+", 5, 12) == "Check: 12-5=7, ok."
    assert ex.expected_check(7, "*", 0, 0) is None  # a sample multiplying by 0: no right check
    assert ex.logicality("Compute 7*2.", "Step 1: 7*0=0. Check: 0/0=7, ok.\nAnswer: 0") == 5.0
    bare = _score(NO_STEPS)
    assert bare.statements == [] and bare.scores == {"helpfulness": 10.0, "logicality": 0.0, "faithfulness": 10.0,
                                                     "completeness": 0.0}


def test_rule_judge_through_the_pipeline(tmp_path):
    path = tmp_path / "train" / "prompts.jsonl"
    assert ex.write_prompts(path, "train", 3, 0, 4) == 3
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    problems = generate_problems(3, seed=0, split="train", config=ex.TASK)
    assert [r["query"] for r in rows] == [p.question for p in problems]
    solutions = {p.question: p.solution for p in problems}
    policy = ScriptedClient(lambda prompt, params: solutions[prompt] if params.seed % 2 else "Answer: 0")
    result = lr.longreward_pipeline(path, tmp_path / "out", policy, ex.ArithmeticRuleJudge(), 4,
                                    policy_template="{query}", progress=False, **ex.JUDGE_SETTINGS)
    assert result["pairs"] == 3 and result["failed"] == 0
    for pair in (json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()):
        assert pair["win_response"] == solutions[pair["query"]] and pair["lose_response"] == "Answer: 0"
        assert pair["win_reward"] == 10.0
