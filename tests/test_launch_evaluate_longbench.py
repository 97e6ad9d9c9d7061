"""``launch.evaluate longbench_write|longbench_v2`` end to end against a scripted OpenAI-compatible
server on loopback (tests/fake_openai_server.py), and the jobs of glmjax.evals.longbench_jobs with
a scripted client: report values against hand-computed ones, resume without new calls, bad input."""

import json
import os

import pytest

import glmjax
from glmjax.data.chat_format import chat_format_for
from glmjax.data.tokenizer import default_tokenizer, save_tokenizer
from glmjax.evals import longbench_jobs as jobs
from glmjax.evals import longbench_v2 as lb2
from glmjax.inference.llm_client import LLMClient, LLMClientError
from fake_openai_server import Behaviour, FakeOpenAIServer
from training_helpers import tiny_run_dir
from evaluate_cli import evaluate_cli

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))

def _write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- LongBench-Write ---------------------------------------------------------------------------

# prompt -> (required words, produced words, judge scores of the six dimensions, in order; None: the
# judge never scores that dimension)
WRITE_CASES = {
    "Write a haiku sequence about rain.": (10, 10, (5, 5, 5, 5, 5, 5)),
    "Describe a harbour at dawn.": (20, 40, (4, 4, 4, 4, 4, 4)),
    "Report on the town council vote.": (600, 200, (3, 3, 3, 3, 3, 3)),
    "Write a monograph chapter on tides.": (2500, 2000, (5, 4, 3, 2, 1, None)),
}
WRITE_TYPES = {"Write a haiku sequence about rain.": "Literature and Creative Writing",
               "Describe a harbour at dawn.": "Literature and Creative Writing",
               "Report on the town council vote.": "News Report",
               "Write a monograph chapter on tides.": "Academic and Monograph"}
TITLES = ("Relevance", "Accuracy", "Coherence", "Clarity", "Breadth and Depth", "Reading Experience")


def _write_prompts(path):
    return _write_jsonl(path, [{"prompt": p, "type": WRITE_TYPES[p], "length": length}
                               for p, (length, _, _) in WRITE_CASES.items()])


def _write_server_reply(request):
    text = request["messages"][-1]["content"]
    if request["model"] == "judge":
        prompt = next(p for p in WRITE_CASES if p in text)
        scores = {t: s for t, s in zip(TITLES, WRITE_CASES[prompt][2]) if s is not None}
        return "Here is my verdict:\n```json\n" + json.dumps({"Analysis": "fine", **scores}) + "\n```"
    assert request["model"] == "writer"
    return " ".join(["word"] * WRITE_CASES[text][1]) + "."


def _expected_write():
    """Hand-computed: S_l of 10/10 = 100; 40 for 20 = 100 * (1 - (2 - 1) / 3); 200 for 600 =
    100 * max(0, 1 - (3 - 1) / 2) = 0; 2000 for 2500 = 100 * (1 - (1.25 - 1) / 2) = 87.5.
    S_q = mean((score - 1) * 25) with a missing dimension counted as 3: 100, 75, 50, and
    (100 + 75 + 50 + 25 + 0 + 50) / 6 = 50."""
    s_l = [100.0, 100 * (1 - 1 / 3), 0.0, 87.5]
    s_q = [100.0, 75.0, 50.0, 50.0]
    return s_l, s_q


def test_longbench_write_cli_http_report_resume_and_retry(tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    with FakeOpenAIServer(reply=_write_server_reply) as server:
        server.script(Behaviour.error(400, "bad request"))  # the first call fails (4xx: not retried)
        args = ["longbench_write", f"--prompts={prompts}", f"--output_dir={out}", "--client=http",
                f"--base_url={server.base_url}", "--model=writer", f"--judge_base_url={server.base_url}",
                "--judge_model=judge", "--max_new_tokens=4096", "--concurrency=2", "--seed=3", "--noprogress"]
        codes, lines, stderr = evaluate_cli([args, args, args])
        requests = list(server.requests)
    assert codes == [1, 0, 0], stderr[-3000:]
    first, second, third = (json.loads(line) for line in lines)
    assert (first["unfinished"], first["failed"], first["scored"]) == (1, 1, 3)
    assert "evaluate longbench_write: 1 of 4 items unfinished" in stderr
    (error,) = _rows(out / "responses.errors.jsonl")
    assert "HTTP 400: bad request" in error["error"] and error["stage"] == "responses"
    assert second["stages"]["responses"]["already_done"] == 3 and second["stages"]["responses"]["finished"] == 1
    assert third["stages"]["responses"]["finished"] == third["stages"]["scores"]["finished"] == 0
    assert third["stages"]["scores"]["already_done"] == 4
    # Every call, over the three runs: 4 + 1 retried generations, 3 judge calls of a full reply and 5
    # of the one that never scores Reading Experience; the third run called nothing.
    generations = [r for r in requests if r.body["model"] == "writer"]
    judgements = [r for r in requests if r.body["model"] == "judge"]
    assert (len(generations), len(judgements), len(requests)) == (5, 8, 13)
    assert {(r.body["temperature"], r.body["max_tokens"]) for r in generations} == {(0.5, 4096)}
    assert {(r.body["temperature"], r.body["max_tokens"]) for r in judgements} == {(0.5, 1024)}
    tides = [r.body["seed"] for r in judgements if "monograph chapter on tides" in r.body["messages"][0]["content"]]
    assert tides == [tides[0] + k for k in range(5)]  # retries draw with seed + k
    texts = [r.body["messages"][0]["content"] for r in generations]
    (again,) = [text for text in set(texts) if texts.count(text) == 2]  # the failed one, retried
    assert len({r.body["seed"] for r in generations if r.body["messages"][0]["content"] == again}) == 1
    assert len({r.body["seed"] for r in generations}) == 4  # one seed per item

    s_l, s_q = _expected_write()
    scores = {row["prompt"]: row for row in _rows(out / "scores.jsonl")}
    for (prompt, (length, words, _)), want_l, want_q in zip(WRITE_CASES.items(), s_l, s_q):
        row = scores[prompt]
        assert (row["length"], row["words"]) == (length, words)
        assert row["s_l"] == pytest.approx(want_l) and row["s_q"] == pytest.approx(want_q)
    assert scores["Write a monograph chapter on tides."]["missing"] == ["reading_experience"]
    assert scores["Write a monograph chapter on tides."]["tries"] == 5
    responses = _rows(out / "responses.jsonl")
    assert sorted(r["prompt"] for r in responses) == sorted(WRITE_CASES)
    assert all(set(r) >= {"id", "prompt", "type", "length", "response"} for r in responses)

    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary == third["summary"] and report["unfinished"] == 0
    # The finished items' calls (the fake server reports no token counts): 4 responses, 8 judgements.
    assert report["usage"] == {"calls": 12, "prompt_tokens": 0, "completion_tokens": 0, "unreported": 12}
    mean_l, mean_q = sum(s_l) / 4, sum(s_q) / 4
    assert summary["overall"]["s_l"] == pytest.approx(mean_l)
    assert summary["overall"]["s_q"] == pytest.approx(mean_q)
    assert summary["overall"]["overall"] == pytest.approx((mean_l + mean_q) / 2)
    assert summary["overall"]["with_missing"] == 1
    short = summary["by_length"]["[0, 500)"]
    assert short["count"] == 2 and short["s_l"] == pytest.approx((s_l[0] + s_l[1]) / 2)
    assert summary["by_length"]["[2k, 4k)"]["overall"] == pytest.approx((87.5 + 50) / 2)
    assert summary["by_length"]["[4k, 20k]"] == {"s_l": None, "s_q": None, "overall": None, "count": 0,
                                                 "with_missing": 0}
    assert summary["by_type"]["News Report"]["overall"] == pytest.approx(25.0)
    markdown = (out / "report.md").read_text()
    assert "4 of 4 items scored" in markdown
    assert f"| Overall | 4 | {mean_l:.1f} | {mean_q:.1f} | {(mean_l + mean_q) / 2:.1f} | 1 |" in markdown


class _ScriptedClient(LLMClient):
    """Replies with ``reply(prompt)``; counts calls."""

    def __init__(self, reply):
        self.reply, self.calls = reply, 0

    def complete(self, messages, sampling=None):
        self.calls += 1
        return self.reply(messages[-1]["content"])

    def complete_batch(self, conversations, sampling=None):
        return [self.complete(messages, sampling) for messages in conversations]

    def assistant_turns(self, conversations, sampling=None, tools=None):
        raise AssertionError("not used")


def test_write_item_ids_follow_content_and_stale_scores_are_refused(tmp_path):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "A", "type": "T", "length": 5}, {"prompt": "B", "type": "T", "length": 5},
        {"prompt": "A", "type": "T", "length": 5}])
    items = jobs.write_items(jobs.lbw.load_prompts(prompts))
    assert items[2].id == items[0].id + "-2" and items[1].id != items[0].id
    assert [item.location for item in items] == [f"{prompts}:{n}" for n in (1, 2, 3)]
    judge_json = json.dumps(dict.fromkeys(TITLES, 4))
    writer = _ScriptedClient(lambda prompt: "one two three four five")
    judge = _ScriptedClient(lambda prompt: judge_json)
    report = jobs.longbench_write_job(prompts, tmp_path / "out", writer, judge, progress=False)
    assert (writer.calls, judge.calls, report["scored"]) == (3, 3, 3)
    assert report["summary"]["overall"]["overall"] == pytest.approx((100 + 75) / 2)
    # The responses redone (another text) while the scores stayed: refused, naming the file.
    responses = tmp_path / "out" / "responses.jsonl"
    rows = _rows(responses)
    rows[1]["response"] = "another text"
    _write_jsonl(responses, rows)
    with pytest.raises(jobs.StaleStageError, match="scores.jsonl: the score of id .* judged another response"):
        jobs.longbench_write_job(prompts, tmp_path / "out", writer, judge, progress=False)


# -- LongBench v2 ------------------------------------------------------------------------------

V2_ITEMS = [  # (_id, difficulty, length, answer, the scripted model's zero-shot reply)
    ("q1", "easy", "short", "A", "The correct answer is (A)"),
    ("q2", "hard", "short", "B", "**The correct answer is B**"),
    ("q3", "hard", "medium", "C", "The correct answer is (D)"),
    ("q4", "hard", "long", "D", "I cannot tell."),
]


def _v2_data(path, long_context):
    rows = []
    for item_id, difficulty, length, answer, _ in V2_ITEMS:
        context = f"[doc {item_id}] " + (long_context if item_id == "q4" else "A short text.")
        rows.append({"_id": item_id, "domain": "Single-Document QA", "sub_domain": "x", "difficulty": difficulty,
                     "length": length, "question": f"Question {item_id}: which one?", "choice_A": "a",
                     "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": answer, "context": context})
    path.write_text(json.dumps(rows))
    return path


def _v2_item(text):
    """The V2_ITEMS entry a prompt asks about (by the marker at the document's start or in the
    question: middle truncation keeps at least one)."""
    return next(item for item in V2_ITEMS if f"[doc {item[0]}]" in text or f"Question {item[0]}:" in text)


def _v2_server_reply(request):
    text = request["messages"][-1]["content"]
    item = _v2_item(text)
    if "Step-by-step reasoning:" in text and "<document>" in text:  # the cot's first pass
        return f"Thinking about {item[0]} ... it must be {item[3]}."
    if "Step-by-step reasoning about the document" in text:  # the cot's answer pass
        return f"The correct answer is ({item[3]})"
    return item[4]


def test_longbench_v2_cli_http_truncation_report_resume_and_cot(tmp_path):
    tokenizer = default_tokenizer(tmp_path / "tokenizers")
    save_tokenizer(tokenizer, tmp_path / "tok")
    data = _v2_data(tmp_path / "data.json", long_context="filler words " * 400)
    items = lb2.load_items(data)

    def tokens(item):
        return len(tokenizer.encode(lb2.build_prompt(item, "zero_shot"), add_special_tokens=False))

    budget = max(tokens(item) for item in items[:3]) + 4  # only q4's prompt is over it
    assert tokens(items[3]) > budget
    zero, cot = tmp_path / "zero", tmp_path / "cot"
    with FakeOpenAIServer(reply=_v2_server_reply) as server:
        common = [f"--data={data}", "--client=http", f"--base_url={server.base_url}", "--model=reader",
                  "--noprogress", "--concurrency=2"]
        zero_args = ["longbench_v2", *common, f"--output_dir={zero}", "--mode=zero_shot",
                     f"--tokenizer_dir={tmp_path / 'tok'}", f"--budget={budget}"]
        codes, lines, stderr = evaluate_cli([zero_args, zero_args,
                                          ["longbench_v2", *common, f"--output_dir={cot}", "--mode=cot"]])
        requests = list(server.requests)
    assert codes == [0, 0, 0], stderr[-3000:]
    first, second, third = (json.loads(line) for line in lines)
    # Zero-shot: q1 and q2 right (q2 once "*" is stripped), q3 wrong, q4 no answer.
    result = first["result"]
    assert result["overall"] == {"accuracy": 50.0, "correct": 2, "count": 4}
    assert result["easy"]["accuracy"] == 100.0 and result["hard"]["accuracy"] == pytest.approx(100 / 3)
    assert result["short"]["accuracy"] == 100.0 and result["medium"]["accuracy"] == 0.0
    assert result["long"]["accuracy"] == 0.0 and result["no_answer"] == 1
    assert first["truncation"] == {"budget": budget, "truncated": 1}
    assert first["usage"] == second["usage"] == {"calls": 4, "prompt_tokens": 0, "completion_tokens": 0,
                                                 "unreported": 4}
    assert second["result"] == result and second["stage"]["already_done"] == 4 and second["stage"]["finished"] == 0
    zero_requests, cot_requests = requests[:4], requests[4:]
    assert len(zero_requests) == 4  # the rerun called nothing
    sent = {_v2_item(r.body["messages"][0]["content"])[0]: r.body["messages"][0]["content"] for r in zero_requests}
    assert sent["q4"] == lb2.truncate_prompt(lb2.build_prompt(items[3], "zero_shot"), tokenizer, budget)
    assert sent["q1"] == lb2.build_prompt(items[0], "zero_shot")
    assert {(r.body["temperature"], r.body["max_tokens"]) for r in zero_requests} == {(0.1, 128)}
    predictions = {row["id"]: row for row in _rows(zero / "predictions.jsonl")}
    assert [predictions[i[0]]["prediction"] for i in V2_ITEMS] == ["A", "B", "D", None]
    assert [predictions[i[0]]["truncated"] for i in V2_ITEMS] == [False, False, False, True]
    markdown = (zero / "report.md").read_text()
    assert "| reader | 50.0 | 100.0 | 33.3 | 100.0 | 0.0 | 0.0 |" in markdown
    assert json.loads((zero / "report.json").read_text())["result"] == result
    # CoT: two calls an item, the answer pass without the document; every answer right.
    assert third["result"]["overall"]["accuracy"] == 100.0 and third["truncation"] is None
    assert third["usage"]["calls"] == 8
    assert len(cot_requests) == 8
    answer_passes = [r for r in cot_requests if "Step-by-step reasoning about" in r.body["messages"][0]["content"]]
    assert len(answer_passes) == 4 and not any("[doc " in r.body["messages"][0]["content"] for r in answer_passes)
    assert {r.body["max_tokens"] for r in cot_requests if r not in answer_passes} == {1024}
    assert {r.body["max_tokens"] for r in answer_passes} == {128}


def test_v2_failed_calls_are_retried_and_other_modes_refused(tmp_path):
    data = _v2_data(tmp_path / "data.json", long_context="more")
    calls = []

    def reply(prompt):
        calls.append(prompt)
        if len(calls) == 1:
            raise LLMClientError("server down")
        return "The correct answer is (A)"

    client = _ScriptedClient(reply)
    report = jobs.longbench_v2_job(data, tmp_path / "out", client, mode="no_context", concurrency=1,
                                   progress=False)
    assert (report["scored"], report["unfinished"], report["failed"]) == (3, 1, 1)
    (error,) = _rows(tmp_path / "out" / "predictions.errors.jsonl")
    assert error["id"] == "q1" and "server down" in error["error"]
    report = jobs.longbench_v2_job(data, tmp_path / "out", client, mode="no_context", progress=False)
    assert (report["scored"], report["unfinished"], len(calls)) == (4, 0, 5)
    assert report["result"]["overall"]["correct"] == 1  # only q1's answer is A
    rows = json.loads(data.read_text())
    rows.append(dict(rows[0], _id="q5"))
    data.write_text(json.dumps(rows))  # a new item too: refused before it is asked
    with pytest.raises(jobs.StaleStageError, match="answered in mode 'no_context', not 'zero_shot'"):
        jobs.longbench_v2_job(data, tmp_path / "out", client, mode="zero_shot", progress=False)
    assert len(calls) == 5


# -- bad input ---------------------------------------------------------------------------------

def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    bad_prompts = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "type": "t", "length": 5},
                                                        {"prompt": "y", "type": "t", "length": "long"}])
    data = _v2_data(tmp_path / "data.json", long_context="x")
    broken = tmp_path / "broken.json"
    rows = json.loads(data.read_text())
    del rows[2]["choice_C"]
    broken.write_text(json.dumps(rows))
    http = ["--client=http", "--base_url=http://127.0.0.1:9/v1", "--model=m"]
    out = f"--output_dir={tmp_path / 'o'}"
    cases = [
        (["longbench_write", f"--prompts={tmp_path / 'none.jsonl'}", out, *http], "none.jsonl: cannot read"),
        (["longbench_write", f"--prompts={bad_prompts}", out, *http],
         f"{bad_prompts}:2: field 'length' must be a positive int (words), got 'long'"),
        (["longbench_write", f"--prompts={prompts}", out], "this evaluation needs --client"),
        (["longbench_write", f"--prompts={prompts}", out, *http, "--judge_base_url=http://x/v1"],
         "--judge_base_url and --judge_model go together"),
        (["longbench_write", f"--prompts={prompts}", *http], "needs --output_dir"),
        (["longbench_v2", f"--data={broken}", out, *http], "item 2"),
        (["longbench_v2", f"--data={data}", out, *http, "--mode=rag"], "item _id q1 has no 'retrieved_context'"),
        (["longbench_v2", f"--data={data}", out, "--client=local"], "this evaluation needs --run_dir"),
        (["longbench_v2", f"--data={data}", out, *http, "--attention_backend=sample"],
         "--attention_backend and --sample_attention_alpha apply to --client=local only"),
    ]
    codes, _, stderr = evaluate_cli([args for args, _ in cases])
    assert codes == [2] * len(cases)
    lines = [line for line in stderr.splitlines() if line.startswith("evaluate longbench_")]
    assert len(lines) == len(cases), stderr[-3000:]
    for line, (_, message) in zip(lines, cases):
        assert message in line, line
    assert "choice_C" in lines[5]
    assert not (tmp_path / "o").exists()


# -- the local engine of a tiny random run --------------------------------------------------------

@pytest.mark.slow
def test_local_engine_writes_and_answers(tmp_path):
    """--client=local: the tiny run writes (judged by the fake server) and answers LongBench v2 with
    its own tokenizer cutting every prompt to --budget."""
    run, tokenizer = tiny_run_dir(tmp_path)
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    data = _v2_data(tmp_path / "data.json", long_context="filler words " * 100)
    judge_json = json.dumps(dict.fromkeys(TITLES, 2))
    with FakeOpenAIServer(reply=lambda request: judge_json) as server:
        codes, lines, stderr = evaluate_cli([
            ["longbench_write", f"--prompts={prompts}", f"--output_dir={tmp_path / 'w'}", "--client=local",
             f"--run_dir={run}", f"--judge_base_url={server.base_url}", "--judge_model=judge",
             "--max_new_tokens=8", "--concurrency=2", "--noprogress"],
            ["longbench_v2", f"--data={data}", f"--output_dir={tmp_path / 'v'}", "--client=local",
             f"--run_dir={run}", "--mode=zero_shot", "--budget=96", "--max_new_tokens=4", "--noprogress",
             "--attention_backend=sample", "--sample_attention_alpha=0.9"],
        ], timeout=600)
        judged = len(server.requests)
    assert codes == [0, 0], stderr[-3000:]
    write, v2 = (json.loads(line) for line in lines)
    assert write["scored"] == 4 and judged == 4
    # Token counts: the engine's for the 4 responses (at most 8 new tokens each), none from the judge.
    usage = write["usage"]
    assert (usage["calls"], usage["unreported"]) == (8, 4) and usage["prompt_tokens"] > 0
    assert 4 <= usage["completion_tokens"] <= 32
    assert v2["usage"]["calls"] == 4 and v2["usage"]["unreported"] == 0
    assert v2["usage"]["prompt_tokens"] == sum(
        len(chat_format_for(tokenizer).prompt_ids([{"role": "user", "content": lb2.truncate_prompt(
            lb2.build_prompt(item, "zero_shot"), tokenizer, 96)}])) for item in lb2.load_items(data))
    assert write["summary"]["overall"]["s_q"] == pytest.approx(25.0)
    for row in _rows(tmp_path / "w" / "scores.jsonl"):  # the length score of what the model wrote
        assert row["words"] == jobs.lbw.count_words(row["response"])
        assert row["s_l"] == pytest.approx(jobs.lbw.length_score(row["length"], row["words"]))
    assert v2["scored"] == 4 and v2["truncation"] == {"budget": 96, "truncated": 4}
    assert v2["result"]["overall"]["count"] == 4 and 0 <= v2["result"]["overall"]["correct"] <= 4
