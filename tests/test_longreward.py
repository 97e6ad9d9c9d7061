"""LongReward (glmjax.pipelines.longreward): the parsers, each dimension's score against hand-computed
values with a scripted judge, retries, pair selection, the pair file through pair_data's encoder,
resume after kill -9, and the gin/prompt knobs."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import gin
import pytest

import glmjax
from glmjax.data.pairs import PairEncoder
from glmjax.data.tokenizer import default_tokenizer
from glmjax.inference.llm_client import LLMClientError
from glmjax.pipelines import longreward as lr
from glmjax.pipelines.retrieval import chunk_text
from glmjax.pipelines.runner import InputError
from glmjax.pipelines.t1_cot import PromptError, item_seed
from scripted_clients import ScriptedClient

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))

CONTEXT = ("The Old Harbour lighthouse was built in 1887 by the engineer Mara Vell. Its lamp burned whale "
           "oil until 1921. In 1921 the lamp was converted to electricity. The keeper's cottage stands "
           "north of the tower. Storms in 1953 damaged the cottage roof. The tower is 31 metres tall.")
QUERY = "What powered the lighthouse lamp over time?"
GOOD = "The lighthouse lamp burned whale oil until 1921, when it was converted to electricity."
VAGUE = "It used some kind of fuel, probably."
SHY = "I would rather not say."

# What the scripted judge answers, by response text.
HELP = {GOOD: "The answer addresses the question.\nRating: [[9]]", VAGUE: "Vague.\n**Rating:** 3/10",
        SHY: "Refuses.\nRating: [[0]]"}
LOGIC = {GOOD: "Consistent.\nScore: 8", VAGUE: "Hedges.\nRating: [[6.5]]", SHY: "Nothing to follow.\nRating: [[10]]"}
STATEMENTS = {GOOD: "Factual statements:\n- The lamp burned whale oil until 1921.\n- The lamp was converted to "
                    "electricity in 1921.\n- The lamp was converted by Mara Vell.",
              VAGUE: "1. The lamp used some kind of fuel.", SHY: "[[None]]"}
SUPPORT = {"The lamp burned whale oil until 1921.": "It says so. [[Fully supported]]",
           "The lamp was converted to electricity in 1921.": "Verdict: **fully supported**",
           "The lamp was converted by Mara Vell.": "Vell built the tower; the conversion is not attributed. "
                                                   "[[Not supported]]",
           "The lamp used some kind of fuel.": "Oil is a fuel, but 'some kind' is vague: [[Partially supported]]"}
COMPLETE = {GOOD: "Covers both.\nRating: [[10]]", VAGUE: "Misses both.\nRating: [[2]]", SHY: "None.\nRating: [[0]]"}


def section(prompt, name, end):
    return re.search(rf"\[{name}\]\n(.*?)\n\[End of {end}\]", prompt, re.S).group(1)


def kind(prompt):
    for marker, name in (("how HELPFUL", "helpfulness"), ("the LOGICALITY", "logicality"), ("FACTUAL", "statements"),
                         ("whether a statement is supported", "support"), ("Extract from this part", "relevant"),
                         ("the COMPLETENESS", "completeness")):
        if marker in prompt:
            return name
    raise AssertionError(f"not a LongReward judge prompt: {prompt[:80]!r}")


def relevant_reply(chunk):
    facts = [s.strip() + "." for s in chunk.split(".") if "lamp" in s or "oil" in s]
    return "\n".join(f"- {fact}" for fact in facts) if facts else "Nothing here. [[None]]"


def judge_reply(prompt, params):
    name = kind(prompt)
    if name == "support":
        return SUPPORT[section(prompt, "Statement", "statement")]
    if name == "relevant":
        return relevant_reply(section(prompt, "Part of the document", "part"))
    response = section(prompt, "Answer", "answer")
    return {"helpfulness": HELP, "logicality": LOGIC, "statements": STATEMENTS, "completeness": COMPLETE}[name][response]


def _judge(client, **kwargs):
    return lr.LongRewardJudge(client, **{"chunk_tokens": 8, "top_k_chunks": 2, "completeness_chunk_tokens": 16,
                                         **kwargs})


def _calls(client, name):
    return [(prompt, params) for prompt, params in client.calls if kind(prompt) == name]


# -- parsers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, score", [
    ("Analysis: fine.\nRating: [[7]]", 7.0), ("Rating: [[7/10]]", 7.0), ("**Rating:** 8", 8.0),
    ("Score = 6.5 because ...", 6.5), ("I would give 4/10.", 4.0), ("[[3]] at first, on reflection [[5]]", 5.0),
    ("Rating: [[0]]", 0.0), ("Rating: [[10]]", 10.0),
])
def test_parse_score_tolerant(reply, score):
    assert lr.parse_score(reply) == score


@pytest.mark.parametrize("reply, problem", [
    ("Rating: [[score]]", "no score"), ("The answer is good.", "no score"), ("Rating: [[11]]", "outside [0, 10]"),
    ("", "no score"),
])
def test_parse_score_refuses(reply, problem):
    with pytest.raises(lr.JudgeParseError, match=re.escape(problem)):
        lr.parse_score(reply)


def test_parse_statements_support_and_relevant():
    assert lr.parse_statements("Factual statements:\n- A is 1.\n* B is 2.\n• C is 3.\n") == ["A is 1.", "B is 2.",
                                                                                            "C is 3."]
    assert lr.parse_statements("1. A.\n2) B.\n(3) C.") == ["A.", "B.", "C."]
    assert lr.parse_statements("Statements:\nA is 1.\nB is 2.") == ["A is 1.", "B is 2."]  # no bullets
    assert lr.parse_statements("[[None]]") == lr.parse_statements("None.") == []
    assert lr.parse_statements("No factual statements") == lr.parse_statements("The answer only greets. [[None]]") == []
    with pytest.raises(lr.JudgeParseError, match="empty reply"):
        lr.parse_statements("  \n")
    with pytest.raises(lr.JudgeParseError, match="no statement line"):
        lr.parse_statements("Statements:")
    assert [lr.parse_support(r) for r in ("[[Fully supported]]", "[[Partially supported]]", "[[Not supported]]",
                                          "[[No support]]", "[[unsupported]]", "[[partial]]")] == \
        ["fully", "partially", "not", "not", "not", "partially"]
    assert lr.parse_support("Partially at first sight, but [[Fully supported]]") == "fully"  # the bracket wins
    assert lr.parse_support("This is not fully supported.") == "partially"
    assert lr.parse_support("**Not supported**") == "not" and lr.parse_support("Fully.") == "fully"
    with pytest.raises(lr.JudgeParseError, match="no verdict"):
        lr.parse_support("I cannot tell.")
    assert lr.parse_relevant(" [[None]] ") is None and lr.parse_relevant("None") is None
    assert lr.parse_relevant("Nothing about the question here. [[None]]") is None
    assert lr.parse_relevant("- The lamp burned oil.\n") == "- The lamp burned oil."
    with pytest.raises(lr.JudgeParseError, match="empty reply"):
        lr.parse_relevant("")


def test_select_pair():
    assert lr.select_pair([3.0, 5.0, 5.0, 1.0, 1.0]) == (1, 3)  # the first of tied bests / worsts
    assert lr.select_pair([2.0, 7.5]) == (1, 0)
    assert lr.select_pair([4.0, 4.0, 4.0]) is None and lr.select_pair([4.0]) is None


# -- the four dimensions -------------------------------------------------------------------------

def test_each_dimension_against_hand_computed_values():
    client = ScriptedClient(judge_reply)
    judge = _judge(client)
    information, retries = judge.relevant_information(CONTEXT, QUERY, "p")
    chunks16 = chunk_text(CONTEXT, 16)
    assert retries == 0 and len(information) == len(chunks16) == 4
    assert information == [None if "[[None]]" in relevant_reply(c.strip()) else relevant_reply(c.strip())
                           for c in chunks16]
    assert sum(info is not None for info in information) == 2

    good = judge.score(CONTEXT, QUERY, GOOD, information=information, key="p")
    # helpfulness 9, logicality 8, faithfulness 10 * (1 + 1 + 0) / 3, completeness 10.
    assert good.scores == pytest.approx({"helpfulness": 9.0, "logicality": 8.0, "faithfulness": 20 / 3,
                                         "completeness": 10.0})
    assert good.reward == pytest.approx((9 + 8 + 20 / 3 + 10) / 4)
    assert [s["support"] for s in good.statements] == ["fully", "fully", "not"]
    vague = judge.score(CONTEXT, QUERY, VAGUE, information=information, key="p")
    assert vague.scores == {"helpfulness": 3.0, "logicality": 6.5, "faithfulness": 5.0, "completeness": 2.0}
    assert vague.reward == pytest.approx(16.5 / 4)
    shy = judge.score(CONTEXT, QUERY, SHY, information=information, key="p")
    assert shy.statements == [] and shy.scores["faithfulness"] == 10.0  # claims nothing unsupported
    assert len(_calls(client, "support")) == 3 + 1  # one per statement of GOOD and of VAGUE
    assert shy.reward == pytest.approx((0 + 10 + 10 + 0) / 4)
    assert _judge(client, no_statement_score=0.0).score(CONTEXT, QUERY, SHY, information=information,
                                                         key="p").scores["faithfulness"] == 0.0


def test_retrieved_passages_and_prompts_shown_to_the_judge():
    client = ScriptedClient(judge_reply)
    judge = _judge(client)
    judge.score(CONTEXT, QUERY, GOOD, key="p")
    chunks = chunk_text(CONTEXT, 8)
    support = {section(p, "Statement", "statement"): section(p, "Passages", "passages")
               for p, _ in _calls(client, "support")}
    assert len(support) == 3
    # "whale oil until 1921" shares "lamp", "whale", "oil", "1921" with the chunks holding them.
    passages = support["The lamp burned whale oil until 1921."]
    shown = [int(n) - 1 for n in re.findall(r"\[Passage (\d+)\]", passages)]
    assert len(shown) == 2 and shown == sorted(shown)  # top 2, in document order
    assert any("whale" in chunks[i] for i in shown)
    for i in shown:
        assert f"[Passage {i + 1}]\n{chunks[i].strip()}" in passages
    # The completeness prompt holds the relevant parts only, numbered by their chunk.
    (prompt, _), = _calls(client, "completeness")
    information = section(prompt, "Relevant information from the document", "relevant information")
    parts = [i for i, c in enumerate(chunk_text(CONTEXT, 16)) if "[[None]]" not in relevant_reply(c.strip())]
    assert re.findall(r"\[Part (\d+)\]", information) == [str(i + 1) for i in parts]
    # Helpfulness and logicality see the query and the answer, never the context.
    for name in ("helpfulness", "logicality", "statements"):
        (prompt, params), = _calls(client, name)
        assert QUERY in prompt and GOOD in prompt and "Mara Vell" not in prompt and "{{" not in prompt
        assert params.temperature == 0.0 and params.max_tokens == 1024
    assert {p.seed for _, p in _calls(client, "helpfulness")} == {item_seed(0, "helpfulness", 0, "p")}


def test_no_relevant_information_and_no_passage_are_told_to_the_judge():
    client = ScriptedClient(lambda prompt, params: "[[None]]" if kind(prompt) == "relevant" else judge_reply(
        prompt, params))
    judge = _judge(client)
    info, _ = judge.relevant_information(CONTEXT, QUERY, "p")
    assert info == [None] * 4
    judge.score(CONTEXT, QUERY, VAGUE, information=info, key="p")
    (prompt, _), = _calls(client, "completeness")
    assert lr.NO_INFORMATION in prompt
    statement = "The lamp used some kind of fuel."
    unrelated = "Zebras graze quietly."  # no BM25 term in common with the context
    client = ScriptedClient(lambda prompt, params: (f"- {unrelated}" if kind(prompt) == "statements" else
                                                    "[[Not supported]]" if kind(prompt) == "support" else
                                                    judge_reply(prompt, params)))
    score, rows, _, _ = _judge(client).faithfulness(CONTEXT, QUERY, VAGUE, "p")
    assert score == 0.0 and rows == [{"statement": unrelated, "chunks": [], "support": "not"}]
    (prompt, _), = _calls(client, "support")
    assert lr.NO_PASSAGE in prompt and statement not in prompt


def test_unparsable_replies_are_retried_then_fail():
    bad = {"helpfulness": 2, "support": 1}  # replies to spoil before the good one, per kind
    seen = {}

    def flaky(prompt, params):
        name = kind(prompt)
        key = (name, prompt)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= bad.get(name, 0):
            return "I think it is quite good."  # neither a score nor a verdict
        return judge_reply(prompt, params)

    client = ScriptedClient(flaky)
    scored = _judge(client).score(CONTEXT, QUERY, GOOD, key="p")
    assert scored.scores["helpfulness"] == 9.0 and scored.retries == 2 + 3  # 2 for helpfulness, 1 per statement
    helpful = _calls(client, "helpfulness")
    assert [p.temperature for _, p in helpful] == [0.0, 1.0, 1.0]
    assert [p.seed for _, p in helpful] == [item_seed(0, "helpfulness", n, "p") for n in range(3)]
    support = _calls(client, "support")
    # the first try is one batch (seeds base + i), each retry keeps its batch index i.
    base0, base1 = item_seed(0, "support", 0, "p"), item_seed(0, "support", 1, "p")
    assert [p.seed for _, p in support] == [base0, base0 + 1, base0 + 2, base1, base1 + 1, base1 + 2]

    client = ScriptedClient(lambda prompt, params: "no idea" if kind(prompt) == "logicality" else
                            judge_reply(prompt, params))
    with pytest.raises(lr.JudgeParseError, match=r"logicality: no usable judge reply in 3 tries .*no score"):
        _judge(client).score(CONTEXT, QUERY, GOOD, key="p")
    assert len(_calls(client, "logicality")) == 3


# -- the pipeline ------------------------------------------------------------------------------

PROMPTS = [
    {"id": "lamp", "context": CONTEXT, "query": QUERY},
    {"id": "same", "context": CONTEXT, "query": "Say something about the tower."},
    {"context": CONTEXT, "query": "Who built the lighthouse?"},  # id derived from the line
]
ANSWERS = [GOOD, VAGUE, SHY, VAGUE, GOOD]  # response k of "lamp" and of the derived-id prompt


def policy_reply(prompt, params):
    if "Say something about the tower." in prompt:
        return VAGUE  # every sample the same: rewards tie
    return ANSWERS[params.seed % len(ANSWERS)]


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tmp_path, policy, judge, **kwargs):
    return lr.longreward_pipeline(tmp_path / "prompts.jsonl", tmp_path / "out", policy, judge, progress=False,
                                  **{"concurrency": 2, "chunk_tokens": 8, "top_k_chunks": 2,
                                     "completeness_chunk_tokens": 16, **kwargs})


def _expected_rewards(judge_client, prompt_id, responses):
    judge = _judge(judge_client)
    info, _ = judge.relevant_information(CONTEXT, QUERY, prompt_id)
    return [judge.score(CONTEXT, QUERY, r, information=info, key=prompt_id).reward for r in responses]


def test_pipeline_stages_pairs_and_pair_data(tmp_path):
    _write(tmp_path / "prompts.jsonl", PROMPTS)
    policy, judge = ScriptedClient(policy_reply), ScriptedClient(judge_reply)
    result = _run(tmp_path, policy, judge)
    out = tmp_path / "out"
    assert (result["prompts"], result["scored_prompts"], result["pairs"], result["ties"], result["identical"],
            result["unfinished"], result["failed"]) == (3, 3, 2, 1, 0, 0, 0)
    assert result["stages"]["scores"]["total"] == 15 and result["stages"]["relevant"]["finished"] == 3

    responses = {row["id"]: row for row in _rows(out / "responses.jsonl")}
    base = item_seed(0, "responses", 0, "lamp")
    assert responses["lamp"]["seeds"] == [base + k for k in range(5)]
    assert responses["lamp"]["responses"] == [ANSWERS[(base + k) % 5] for k in range(5)]
    assert {p for p, _ in policy.calls} == {f"{CONTEXT}\n\n{row['query']}" for row in PROMPTS}
    assert {(p.temperature, p.max_tokens) for _, p in policy.calls} == {(1.0, 1024)} and len(policy.calls) == 15

    scores = {row["id"]: row for row in _rows(out / "scores.jsonl")}
    assert set(scores) == {lr.score_key(p, k) for p in responses for k in range(5)}
    rewards = _expected_rewards(ScriptedClient(judge_reply), "lamp", responses["lamp"]["responses"])
    assert [scores[lr.score_key("lamp", k)]["reward"] for k in range(5)] == pytest.approx(rewards)
    row = scores[lr.score_key("lamp", 0)]
    assert row["prompt_id"] == "lamp" and row["index"] == 0 and set(row["scores"]) == set(lr.DIMENSIONS)
    assert row["response_sha"] == lr.response_sha(responses["lamp"]["responses"][0])

    pairs = _rows(out / "pairs.jsonl")
    derived = next(item_id for item_id in responses if item_id not in ("lamp", "same"))
    assert [p["id"] for p in pairs] == ["lamp", derived]  # input order; "same" tied
    lamp = pairs[0]
    win, lose = lr.select_pair(rewards)
    assert (lamp["win_response"], lamp["lose_response"]) == (responses["lamp"]["responses"][win],
                                                             responses["lamp"]["responses"][lose])
    assert lamp["win_response"] == GOOD and lamp["lose_response"] == VAGUE  # 8.42 > 4.12 > 5.0 (SHY)
    assert lamp["win_reward"] == pytest.approx(max(rewards)) and lamp["lose_reward"] == pytest.approx(min(rewards))
    assert (lamp["context"], lamp["query"]) == (CONTEXT, QUERY) and lamp["rewards"] == pytest.approx(rewards)

    # pair_data's encoder reads the file as LongReward records; the extra fields are ignored.
    tokenizer = default_tokenizer(str(tmp_path / "tokenizer"))
    encoder = PairEncoder(tokenizer)
    example = encoder(lamp)
    assert GOOD in tokenizer.decode(example.chosen_ids[example.chosen_mask == 1].tolist())
    assert VAGUE in tokenizer.decode(example.rejected_ids[example.rejected_mask == 1].tolist())
    plain = encoder({k: lamp[k] for k in ("context", "query", "win_response", "lose_response")})
    assert plain.chosen_ids.tolist() == example.chosen_ids.tolist()


def test_resume_skips_finished_and_retries_failed_items(tmp_path):
    _write(tmp_path / "prompts.jsonl", PROMPTS[:1])

    def failing(prompt, params):
        if kind(prompt) == "completeness" and VAGUE in prompt:
            raise LLMClientError("HTTP 503 after 4 retries")
        return judge_reply(prompt, params)

    first = _run(tmp_path, ScriptedClient(policy_reply), ScriptedClient(failing))
    vague = sum(r == VAGUE for r in _rows(tmp_path / "out" / "responses.jsonl")[0]["responses"])
    assert first["failed"] == vague >= 1 and first["pairs"] == 0 and first["unfinished"] == 1
    errors = _rows(tmp_path / "out" / "scores.errors.jsonl")
    assert len(errors) == vague and {e["error"] for e in errors} == {"LLMClientError: HTTP 503 after 4 retries"}
    assert all(e["stage"] == "scores" for e in errors)

    policy, judge = ScriptedClient(policy_reply), ScriptedClient(judge_reply)
    second = _run(tmp_path, policy, judge)
    assert not policy.calls and second["failed"] == 0 and second["pairs"] == 1
    assert second["stages"]["scores"]["already_done"] == 5 - vague and second["stages"]["scores"]["finished"] == vague
    assert {section(p, "Answer", "answer") for p, _ in judge.calls if kind(p) in ("helpfulness",)} == {VAGUE}
    pairs = (tmp_path / "out" / "pairs.jsonl").read_text()

    policy, judge = ScriptedClient(policy_reply), ScriptedClient(judge_reply)
    third = _run(tmp_path, policy, judge)
    assert not policy.calls and not judge.calls and (tmp_path / "out" / "pairs.jsonl").read_text() == pairs
    assert {n: s["already_done"] for n, s in third["stages"].items()} == {"responses": 1, "relevant": 1, "scores": 5}

    # Scores of other responses than responses.jsonl holds are refused.
    rows = _rows(tmp_path / "out" / "responses.jsonl")
    rows[0]["responses"][0] += " (edited)"
    _write(tmp_path / "out" / "responses.jsonl", rows)
    with pytest.raises(ValueError, match=r"score of response 0 of id 'lamp' is of another text"):
        _run(tmp_path, ScriptedClient(policy_reply), ScriptedClient(judge_reply), stages=["scores"])


def test_parse_failure_is_an_item_error(tmp_path):
    _write(tmp_path / "prompts.jsonl", PROMPTS[:1])
    judge = ScriptedClient(lambda prompt, params: " \n" if kind(prompt) == "statements" else judge_reply(prompt,
                                                                                                          params))
    result = _run(tmp_path, ScriptedClient(policy_reply), judge, judge_tries=2)
    assert result["failed"] == 5 and result["pairs"] == 0
    errors = _rows(tmp_path / "out" / "scores.errors.jsonl")
    assert errors[0]["error"].startswith("JudgeParseError: statements: no usable judge reply in 2 tries")


def test_identical_best_and_worst_texts_give_no_pair(tmp_path):
    _write(tmp_path / "prompts.jsonl", PROMPTS[:1])
    rewards = iter([9, 1, 5, 5, 5] * 3)  # the judge (at a temperature) rates one text differently

    def moody(prompt, params):
        if kind(prompt) == "helpfulness":
            return f"Rating: [[{next(rewards)}]]"
        return judge_reply(prompt, params)

    result = _run(tmp_path, ScriptedClient(lambda prompt, params: GOOD), ScriptedClient(moody), concurrency=1)
    assert (result["pairs"], result["ties"], result["identical"]) == (0, 0, 1)


def test_knobs_prompt_files_and_input_errors(tmp_path):
    _write(tmp_path / "prompts.jsonl", PROMPTS[:1])
    (tmp_path / "help.txt").write_text("HOW HELPFUL {{query}} || {{response}} ||")
    judge = ScriptedClient(lambda prompt, params: "Rating: [[4]]" if prompt.startswith("HOW HELPFUL") else
                           judge_reply(prompt, params))
    with gin.unlock_config():
        gin.parse_config(f"longreward_pipeline.helpfulness_prompt = '{tmp_path / 'help.txt'}'\n"
                         "longreward_pipeline.num_samples = 2\nlongreward_pipeline.policy_template = '{query}'")
    try:
        policy = ScriptedClient(policy_reply)
        result = _run(tmp_path, policy, judge)
    finally:
        gin.clear_config()
    assert result["stages"]["scores"]["total"] == 2 and {p for p, _ in policy.calls} == {QUERY}
    assert sum(p.startswith("HOW HELPFUL") for p, _ in judge.calls) == 2
    assert all(r["scores"]["helpfulness"] == 4.0 for r in _rows(tmp_path / "out" / "scores.jsonl"))

    (tmp_path / "bad.txt").write_text("{{query}}")
    with pytest.raises(PromptError, match=r"bad.txt: .*missing: \['response'\]"):
        _run(tmp_path, policy, judge, logicality_prompt=str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        _run(tmp_path, policy, judge, num_samples=1)
    with pytest.raises(ValueError, match="policy_template must be a format string"):
        _run(tmp_path, policy, judge, policy_template="{document}")
    _write(tmp_path / "prompts.jsonl", [PROMPTS[0], {"id": "x", "context": CONTEXT, "question": "?"}])
    with pytest.raises(InputError, match=r"(?m)prompts.jsonl:2: field 'query' must be a non-empty string$"):
        lr.longreward_pipeline(tmp_path / "prompts.jsonl", tmp_path / "fresh", policy, judge, progress=False)
    assert not (tmp_path / "fresh").exists()


# -- kill -9 -----------------------------------------------------------------------------------

_CLIENTS = textwrap.dedent("""
    import time

    def judge(prompt, params):
        time.sleep(0.003)
        if "Extract from this part" in prompt:
            return "- fact"
        if "FACTUAL" in prompt:
            return "- The answer says " + str(len(prompt) % 7) + "."
        if "whether a statement is supported" in prompt:
            return "[[Fully supported]]" if "says 3" not in prompt else "[[Not supported]]"
        return "Rating: [[" + str(len(prompt) % 11) + "]]"

    def policy(prompt, params):
        return "Response " + "x" * (params.seed % 13)
""")
_SETTINGS = dict(num_samples=5, concurrency=3, chunk_tokens=8, completeness_chunk_tokens=16)
_WORKER = _CLIENTS + textwrap.dedent(f"""
    import sys
    sys.path.insert(0, "tests")
    from scripted_clients import ScriptedClient
    from glmjax.pipelines import longreward as lr

    result = lr.longreward_pipeline(sys.argv[1], sys.argv[2], ScriptedClient(policy), ScriptedClient(judge),
                                    **{_SETTINGS!r})
    print(result["stages"]["scores"]["already_done"], result["stages"]["scores"]["finished"], result["pairs"])
""")


def test_kill_9_resumes_with_the_same_pairs(tmp_path):
    prompts = [{"id": f"p{i}", "context": CONTEXT + f" Note {i}.", "query": f"Question {i}?"} for i in range(30)]
    _write(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "out"
    command = [sys.executable, "-c", _WORKER, str(tmp_path / "prompts.jsonl"), str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    scores = out / "scores.jsonl"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (scores.read_bytes().count(b"\n") if scores.exists() else 0) < 25:
        assert process.poll() is None, "the worker ended before it was killed"
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {json.loads(line)["id"] for line in scores.read_bytes().split(b"\n")[:-1]}
    assert len(before) >= 25
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    already_done, finished, _ = map(int, done.stdout.split())
    assert already_done >= len(before) and already_done + finished == 150
    rows = _rows(scores)
    assert len(rows) == 150 and len({row["id"] for row in rows}) == 150
    # The same as one uninterrupted run (everything is seeded and deterministic).
    clients = {}
    exec(_CLIENTS, clients)
    lr.longreward_pipeline(tmp_path / "prompts.jsonl", tmp_path / "fresh", ScriptedClient(clients["policy"]),
                           ScriptedClient(clients["judge"]), progress=False, **_SETTINGS)
    assert (out / "pairs.jsonl").read_text() == (tmp_path / "fresh" / "pairs.jsonl").read_text()
    assert _rows(out / "pairs.jsonl")
