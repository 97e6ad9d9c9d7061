"""``launch.evaluate longbench_cite`` end to end against a scripted OpenAI-compatible server on
loopback (tests/fake_openai_server.py; the model and judge of tests/longcite_script.py on the
fixture tests/longcite_fixture.json): report values against hand-computed ones, retries and
resume without new calls, gin-selected prompts, stale files and bad input (one line, exit 2).
Resume after ``kill -9``: tests/test_longcite_kill.py."""

import json

import pytest

import longcite_script as script
from fake_openai_server import Behaviour, FakeOpenAIServer
from glmjax.data.tokenizer import load_tokenizer
from glmjax.evals import longcite as lc

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return script.tokenizer_dir(tmp_path_factory.mktemp("tok"))


def test_cli_http_report_retry_and_resume(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    with FakeOpenAIServer(reply=script.reply) as server:
        server.script(Behaviour.error(400, "bad request"))  # the first model call fails (4xx: not retried)
        args = script.cli_args(server, out, f"--tokenizer_dir={tokenizer_dir}", "--concurrency=2", "--seed=5")
        codes, lines, stderr = script.evaluate_cli([args, args, args])
        requests = list(server.requests)
    assert codes == [1, 0, 0], stderr[-3000:]
    first, second, third = map(json.loads, lines)
    assert (first["items"], first["scored"], first["unfinished"], first["failed"]) == (6, 5, 1, 1)
    assert "evaluate longbench_cite: 1 of 6 items unfinished" in stderr
    (error,) = script.rows(out / "responses.errors.jsonl").values()
    assert "HTTP 400: bad request" in error["error"]
    assert second["stages"]["responses"]["finished"] == 1 and second["stages"]["responses"]["already_done"] == 5
    assert all(third["stages"][s]["finished"] == 0 and third["stages"][s]["already_done"] == 6
               for s in ("responses", "citations", "correctness"))
    model = [r for r in requests if r.body["model"] == "reader"]
    judge = [r for r in requests if r.body["model"] == "judge"]
    assert (len(model), len(judge)) == (7, script.JUDGE_CALLS)  # the third run called nothing
    assert {(r.body["temperature"], r.body["top_p"], r.body["max_tokens"]) for r in model} == {(0.95, 0.7, 1024)}
    items = {item.query: item for item in lc.load_cite_items(script.FIXTURE)}
    for request in model:  # the numbered context and question, whole (far below --budget)
        prompt = request.body["messages"][0]["content"]
        item = next(item for query, item in items.items() if prompt.endswith(query))
        assert prompt == lc.build_cite_prompt(lc.split_sentences(item.context), item.query)
    citation_calls = [r for r in judge if "[Assistant's" not in r.body["messages"][0]["content"]]
    assert len(citation_calls) == 15
    assert {(r.body["temperature"], r.body["max_tokens"], tuple(r.body["stop"])) for r in citation_calls} == {
        (0.0, 10, ("Analysis:",))}
    retried = [r for r in judge if "\n两万多公里\n" in r.body["messages"][0]["content"]]
    assert [r.body["temperature"] for r in retried] == [0.0, 1.0]
    assert retried[1].body["seed"] == retried[0].body["seed"] + 1

    script.check_report(third, load_tokenizer(tokenizer_dir))
    assert third["citation_length_tokenizer"] and third["truncation"] == {"budget": 128000, "truncated": 0}
    cites = script.rows(out / "citations.jsonl")
    for idx, (recall, precision, f1, _) in script.EXPECTED.items():
        assert [cites[idx]["citation_recall"], cites[idx]["citation_precision"], cites[idx]["citation_f1"]] == \
            pytest.approx([recall, precision, f1])
    spans = [(c["start"], c["end"]) for s in cites[0]["statements"] for c in s["citations"]]
    assert spans == [(0, 0), (2, 3)]  # [2-2][3-3] merged
    assert cites[3]["statements"][1]["citations"] == [] and cites[3]["statements"][1]["needs_citation"] is False
    correct = script.rows(out / "correctness.jsonl")
    assert {idx: row["correctness"] for idx, row in correct.items()} == pytest.approx(
        {idx: expected[3] for idx, expected in script.EXPECTED.items()})
    assert correct[5]["replies"] == [["good", "[[3]]"]] and correct[4]["scale"] == "fewshot"
    responses = script.rows(out / "responses.jsonl")
    assert {row["response"] for row in responses.values()} == set(script.RESPONSES.values())
    assert responses[2]["num_sentences"] == 4 and responses[2]["truncated"] is False
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == third["summary"] and report["unfinished"] == 0
    # The finished items' calls (the fake server reports no token counts): 6 answers and every judgement.
    assert report["usage"] == {"calls": 6 + script.JUDGE_CALLS, "prompt_tokens": 0, "completion_tokens": 0,
                               "unreported": 6 + script.JUDGE_CALLS}
    markdown = (out / "report.md").read_text()
    assert "# LongBench-Cite: reader\n\n6 of 6 items scored." in markdown
    assert "| multifieldqa | 2 | 62.5 | 50.0 | 50.0 | 75.0 |" in markdown
    assert "| dureader | 1 | 50.0 | 100.0 | 66.7 | 100.0 |" in markdown
    assert "| Average | 6 | 62.5 | 70.0 | 63.3 | 82.0 |" in markdown


def test_cli_gin_prompts_stale_files_and_bad_input(tmp_path):
    qa_prompt = tmp_path / "qa.txt"
    qa_prompt.write_text("OUR QA JUDGE {{question}} | {{reference}} | {{answer}}", encoding="utf-8")
    one = tmp_path / "one.json"
    one.write_text(json.dumps([script.load_fixture()[0]]), encoding="utf-8")
    bad = tmp_path / "bad.json"
    rows = script.load_fixture()
    rows[3]["dataset"] = "qasper"
    bad.write_text(json.dumps(rows), encoding="utf-8")
    bad_prompt = tmp_path / "bad_prompt.txt"
    bad_prompt.write_text("{{question}} only", encoding="utf-8")
    gin_out = tmp_path / "gin"

    def qa_reply(body):
        if body["messages"][0]["content"].startswith("OUR QA JUDGE"):
            return "[[2]]"
        return script.reply(body)

    with FakeOpenAIServer(reply=qa_reply) as server:
        http = ["--client=http", f"--base_url={server.base_url}", "--model=reader", "--noprogress"]
        judge = [f"--judge_base_url={server.base_url}", "--judge_model=judge"]
        gin_case = ["longbench_cite", f"--data={one}", f"--output_dir={gin_out}", *http, *judge,
                    f"--gin_bindings=load_judge_prompts.correct_qa = '{qa_prompt}'",
                    "--gin_bindings=longbench_cite_job.max_statements = 1"]
        # After the gin case, its answers stay while the data's context changes: refused.
        edited = tmp_path / "edited.json"
        changed = [dict(script.load_fixture()[0], context="Another context entirely.")]
        edited.write_text(json.dumps(changed), encoding="utf-8")
        out = f"--output_dir={tmp_path / 'o'}"
        cases = [
            (["longbench_cite", f"--data={tmp_path / 'none.json'}", out, *http], "No such file"),
            (["longbench_cite", f"--data={bad}", out, *http],
             f"{bad}: item 3 (idx 3): field 'dataset' must be one of longbench-chat,"),
            (["longbench_cite", f"--data={one}", out], "this evaluation needs --client"),
            (["longbench_cite", out, *http], "this evaluation needs --data"),
            (["longbench_cite", f"--data={one}", out, *http, "--judge_model=j"],
             "--judge_base_url and --judge_model go together"),
            (["longbench_cite", f"--data={one}", out, *http, "--budget=0"], "--budget must be >= 1 token, got 0"),
            (["longbench_cite", f"--data={one}", *http], "needs --output_dir"),
            (["longbench_cite", f"--data={edited}", f"--output_dir={gin_out}", *http],
             "responses.jsonl: the response of idx 0 answers another question or context"),
            (["longbench_cite", f"--data={one}", out, *http,
              f"--gin_bindings=load_cite_prompt.path = '{bad_prompt}'"],
             "bad_prompt.txt: the prompt must use the placeholders ['context', 'question']"),
            (["longbench_cite", f"--data={one}", out, *http, "--gin_bindings=load_judge_prompts.nope = 1"],
             "gin binding error"),
        ]
        codes, lines, stderr = script.evaluate_cli([gin_case, *(args for args, _ in cases)])
        # only the gin case called: 1 answer, 1 support and 1 relevance judgement (of the first
        # statement only), 1 correctness
        assert len(server.requests) == 4
    assert codes == [0] + [2] * len(cases)
    (report,) = map(json.loads, lines)
    assert report["summary"]["groups"]["hotpotqa"]["correctness"] == 0.5  # our prompt's [[2]] of 1-3
    cites = script.rows(gin_out / "citations.jsonl")[0]
    assert (cites["total_statements"], cites["judged_statements"]) == (2, 1)
    errors = [line for line in stderr.splitlines() if line.startswith("evaluate longbench_cite")]
    assert len(errors) == len(cases), stderr[-3000:]
    for line, (_, message) in zip(errors, cases):
        assert message in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_local_engine_of_a_tiny_run(tmp_path):
    """--client=local: a tiny random run answers (its tokenizer cuts every prompt to --budget and
    measures the citation length); the fake server judges with a reply every parser reads."""
    from training_helpers import tiny_run_dir

    run, _ = tiny_run_dir(tmp_path)
    every = "Rating: [[Fully supported]] [[Relevant]] Need Citation: [[No]] [[3]]"
    with FakeOpenAIServer(reply=lambda body: every) as server:
        codes, lines, stderr = script.evaluate_cli([
            ["longbench_cite", f"--data={script.FIXTURE}", f"--output_dir={tmp_path / 'out'}", "--client=local",
             f"--run_dir={run}", f"--judge_base_url={server.base_url}", "--judge_model=judge", "--budget=96",
             "--max_new_tokens=8", "--concurrency=2", "--noprogress"]], timeout=600)
    assert codes == [0], stderr[-3000:]
    (report,) = map(json.loads, lines)
    assert report["scored"] == 6 and report["truncation"] == {"budget": 96, "truncated": 6}
    assert report["citation_length_tokenizer"]
    usage = report["stages"]["responses"]["usage"]
    assert usage["calls"] == 6 and usage["unreported"] == 0 and usage["prompt_tokens"] > 6 * 96
    assert 6 <= usage["completion_tokens"] <= 48
    responses = script.rows(tmp_path / "out" / "responses.jsonl")
    cites = script.rows(tmp_path / "out" / "citations.jsonl")
    for idx, row in responses.items():  # the scores follow the rules on whatever the model wrote
        statements = lc.parse_cited_response(row["response"], row["num_sentences"])
        assert cites[idx]["total_statements"] == len(statements)
        assert cites[idx]["citation_recall"] == (1.0 if statements else 0.0)
