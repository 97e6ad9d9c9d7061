"""AgentWrite (glmjax.pipelines.agentwrite) with scripted planner/writer clients; the launch.pipeline
CLI against the OpenAI-compatible fake server on loopback."""

import json
import os
import re
import subprocess
import sys

import gin
import numpy as np
import pytest

import glmjax
from glmjax.data.factories import lm_data
from glmjax.data.tokenizer import default_tokenizer
from glmjax.inference.llm_client import LLMClientError
from glmjax.pipelines import agentwrite
from glmjax.pipelines.agentwrite import (
    PlanError,
    PlanStep,
    PlanTooLong,
    agentwrite_pipeline,
    format_plan,
    parse_plan,
)
from glmjax.pipelines.runner import InputError
from glmjax.pipelines.t1_cot import PromptError, item_seed
from scripted_clients import ScriptedClient
from fake_openai_server import Behaviour, FakeOpenAIServer

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")

INSTRUCTIONS = [
    {"id": "story", "instruction": "Write a story about a lighthouse keeper."},
    {"id": "essay", "instruction": "Write an essay on tides."},
    {"id": "endless", "instruction": "Write an encyclopedia of everything."},
    {"id": "refuse", "instruction": "Write nothing at all."},
    {"id": "tiny", "instruction": "Write a haiku."},
]

PLANS = {  # what the scripted planner answers, by id: markdown, a preamble, odd separators
    "story": ("Here is the plan:\n\n**Paragraph 1 - Main Point: The keeper and [his lamp] - Word Count: "
              "[400 words]**\nParagraph 2 – Main Point: A storm arrives — Word Count: 1,000 words\n"
              "- Paragraph 3: Main Point: Dawn; Word Count: about 250 words\n"),
    "essay": "Paragraph 1 - Main Point: [What tides are] - Word Count: 200 words\n"
             "Paragraph 2 - Main Point: Why the moon matters - Word Count: 300-500 words",
    "endless": "\n".join(f"Paragraph {n} - Main Point: Topic {n} - Word Count: 300 words" for n in range(1, 52)),
    "refuse": "I'm sorry, I can't plan that.",
    "tiny": "Paragraph 1 - Main Point: The haiku - Word Count: 17 words",
}
STEPS = {"story": [PlanStep("The keeper and [his lamp]", 400), PlanStep("A storm arrives", 1000),
                   PlanStep("Dawn", 250)],
         "essay": [PlanStep("What tides are", 200), PlanStep("Why the moon matters", 400)]}


def _id_of(prompt):
    return next(row["id"] for row in INSTRUCTIONS if row["instruction"] in prompt)


def plan_reply(prompt, params):
    return PLANS[_id_of(prompt)]


STEP_LINE = re.compile(r"Now write the next part of the plan:\nParagraph (\d+) - ")


def write_reply(prompt, params):
    number = int(STEP_LINE.search(prompt).group(1))
    return f"  The {_id_of(prompt)} text, paragraph number {number}, with seed {params.seed}.\n"


def _clients(planner=plan_reply, writer=write_reply):
    return ScriptedClient(planner), ScriptedClient(writer)


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tmp_path, clients, **kwargs):
    planner, writer = clients
    return agentwrite_pipeline(tmp_path / "instructions.jsonl", tmp_path / "out", planner, writer,
                               progress=False, **{"concurrency": 2, **kwargs})


def _plan_steps(tmp_path, item_id):
    return next(row["steps"] for row in _rows(tmp_path / "out" / "plans.jsonl") if row["id"] == item_id)


def _paragraph(item_id, number):
    seed = item_seed(0, "writes", number - 1, item_id)
    return f"The {item_id} text, paragraph number {number}, with seed {seed}."


def test_parse_plan_tolerant_and_strict():
    assert parse_plan(PLANS["story"]) == STEPS["story"]
    assert parse_plan(PLANS["essay"]) == STEPS["essay"]
    assert parse_plan("1. ## Section 1: Main Point: x. Word Count: 1000") == [PlanStep("x.", 1000)]
    with pytest.raises(PlanTooLong, match="51 paragraphs, more than max_steps=50"):
        parse_plan(PLANS["endless"], max_steps=50)
    assert len(parse_plan(PLANS["endless"])) == 51
    with pytest.raises(PlanError, match="no 'Paragraph N - Main Point"):
        parse_plan(PLANS["refuse"])
    with pytest.raises(PlanError, match=r"plan line 1: word count 17 outside \[200, 1000\]"):
        parse_plan(PLANS["tiny"])
    with pytest.raises(PlanError, match=r"plan line 1: word count 1001 outside"):
        parse_plan("Paragraph 1 - Main Point: a - Word Count: 1001 words")
    with pytest.raises(PlanError, match="plan line 2: paragraph 3 where paragraph 2 was expected"):
        parse_plan("Paragraph 1 - Main Point: a - Word Count: 300\nParagraph 3 - Main Point: b - Word Count: 300")
    with pytest.raises(PlanError, match="plan line 1 .*expected 'Main Point: ... - Word Count: ...'"):
        parse_plan("Paragraph 1 talks about the sea.")
    with pytest.raises(PlanError, match="no number in the word count 'several'"):
        parse_plan("Paragraph 1 - Main Point: a - Word Count: several")
    assert format_plan(STEPS["essay"]) == ("Paragraph 1 - Main Point: What tides are - Word Count: 200 words\n"
                                           "Paragraph 2 - Main Point: Why the moon matters - Word Count: 400 words")


def test_plans_writes_and_sft_records(tmp_path):
    _write(tmp_path / "instructions.jsonl", INSTRUCTIONS)
    planner, writer = clients = _clients()
    result = _run(tmp_path, clients)
    assert (result["instructions"], result["planned"], result["skipped"], result["sft_records"],
            result["unfinished"], result["failed"]) == (5, 2, 1, 2, 2, 2)
    assert result["stages"]["plans"]["finished"] == 3 and result["stages"]["plans"]["failed"] == 2
    assert result["stages"]["writes"]["total"] == 2 and result["stages"]["writes"]["finished"] == 2

    plans = {row["id"]: row for row in _rows(tmp_path / "out" / "plans.jsonl")}
    assert plans.keys() == {"story", "essay", "endless"}
    assert plans["story"]["steps"] == [{"main_point": s.main_point, "words": s.words} for s in STEPS["story"]]
    assert plans["story"]["plan"] == PLANS["story"] and plans["story"]["instruction"] == INSTRUCTIONS[0]["instruction"]
    assert plans["endless"]["skipped"] == "the plan has 51 paragraphs, more than max_steps=50"
    assert "steps" not in plans["endless"]
    errors = {row["id"]: row for row in _rows(tmp_path / "out" / "plans.errors.jsonl")}
    assert errors.keys() == {"refuse", "tiny"} and {e["stage"] for e in errors.values()} == {"plans"}
    assert errors["tiny"]["error"] == "PlanError: plan line 1: word count 17 outside [200, 1000]"
    assert errors["refuse"]["error"].startswith("PlanError: no 'Paragraph N - Main Point")
    assert len(planner.calls) == 5 and {p.temperature for _, p in planner.calls} == {1.0}
    assert {p.max_tokens for _, p in planner.calls} == {4096}
    assert all(prompt.count("{{") == 0 for prompt, _ in planner.calls)

    # Writer prompts: the instruction, the whole plan and every earlier paragraph, in order.
    by_id = {}
    for prompt, params in writer.calls:
        by_id.setdefault(_id_of(prompt), []).append((prompt, params))
    assert {k: len(v) for k, v in by_id.items()} == {"story": 3, "essay": 2}
    for item_id, calls in by_id.items():
        instruction = next(r["instruction"] for r in INSTRUCTIONS if r["id"] == item_id)
        plan = format_plan(STEPS[item_id])
        for number, (prompt, params) in enumerate(sorted(calls, key=lambda c: int(STEP_LINE.search(c[0]).group(1))), start=1):
            assert params.seed == item_seed(0, "writes", number - 1, item_id)
            assert instruction in prompt and plan in prompt
            assert f"Now write the next part of the plan:\n{STEPS[item_id][number - 1].line(number)}" in prompt
            earlier = "\n\n".join(_paragraph(item_id, k) for k in range(1, number))
            assert f"What has been written so far (empty at the start):\n{earlier}\n\n" in prompt
            assert _paragraph(item_id, number) not in prompt
            assert "paragraph number" not in prompt.replace(earlier, "")  # no other text leaked in

    writes = {row["id"]: row for row in _rows(tmp_path / "out" / "writes.jsonl")}
    assert writes["story"]["paragraphs"] == [_paragraph("story", k) for k in (1, 2, 3)]
    sft = _rows(tmp_path / "out" / "sft.jsonl")
    assert [r["id"] for r in sft] == ["story", "essay"]  # input order
    for record in sft:
        user, assistant = record["messages"]
        assert user == {"role": "user", "content": next(r["instruction"] for r in INSTRUCTIONS
                                                        if r["id"] == record["id"])}
        assert assistant == {"role": "assistant", "content": "\n\n".join(
            _paragraph(record["id"], k) for k in range(1, len(STEPS[record["id"]]) + 1))}
        assert set(record) == {"id", "messages"}
    assert writes["essay"]["words"] == agentwrite.count_words(sft[1]["messages"][1]["content"]) == 14
    assert result["words"] == writes["story"]["words"] + writes["essay"]["words"]


def test_resume_makes_no_calls_and_failures_retry(tmp_path):
    _write(tmp_path / "instructions.jsonl", INSTRUCTIONS[:2])

    def flaky_writer(prompt, params):
        if _id_of(prompt) == "essay" and "paragraph number 1" in prompt:
            raise LLMClientError("HTTP 503 after 4 retries")  # paragraph 2 of the essay fails
        return write_reply(prompt, params)

    first = _run(tmp_path, _clients(writer=flaky_writer))
    assert (first["failed"], first["sft_records"], first["unfinished"]) == (1, 1, 1)
    (error,) = _rows(tmp_path / "out" / "writes.errors.jsonl")
    assert error["id"] == "essay" and error["error"] == "LLMClientError: HTTP 503 after 4 retries"
    # The essay's first paragraph is kept; finished items' paragraphs are in writes.jsonl only.
    assert _rows(tmp_path / "out" / "paragraphs.jsonl") == [
        {"id": json.dumps(["essay", agentwrite.plan_sha(_plan_steps(tmp_path, "essay")), 0]),
         "paragraph": _paragraph("essay", 1)}]
    planner, writer = clients = _clients()
    second = _run(tmp_path, clients)
    (prompt, _), = writer.calls  # only the failed paragraph is written again, after the kept one
    assert not planner.calls and _id_of(prompt) == "essay"
    assert STEP_LINE.search(prompt).group(1) == "2" and _paragraph("essay", 1) in prompt
    assert (tmp_path / "out" / "paragraphs.jsonl").read_text() == ""
    assert (second["failed"], second["sft_records"], second["unfinished"]) == (0, 2, 0)
    sft = (tmp_path / "out" / "sft.jsonl").read_text()
    planner, writer = clients = _clients()
    third = _run(tmp_path, clients)
    assert not planner.calls and not writer.calls
    assert {name: stage["already_done"] for name, stage in third["stages"].items()} == {"plans": 2, "writes": 2}
    assert (tmp_path / "out" / "sft.jsonl").read_text() == sft

    # The write stage reruns alone on the kept plans.
    (tmp_path / "out" / "writes.jsonl").unlink()
    planner, writer = clients = _clients()
    alone = _run(tmp_path, clients, stages=["writes"])
    assert alone["stages"].keys() == {"writes"} and not planner.calls and len(writer.calls) == 5
    assert (tmp_path / "out" / "sft.jsonl").read_text() == sft

    # Paragraphs that follow another plan than plans.jsonl holds are refused.
    plans = _rows(tmp_path / "out" / "plans.jsonl")
    plans[0]["steps"][0]["words"] = 999
    _write(tmp_path / "out" / "plans.jsonl", plans)
    with pytest.raises(ValueError, match="paragraphs of id 'story' follow another plan"):
        _run(tmp_path, _clients(), stages=["writes"])


def test_sft_records_train_through_lm_data(tmp_path):
    _write(tmp_path / "instructions.jsonl", INSTRUCTIONS[:2])
    _run(tmp_path, _clients())
    tokenizer = default_tokenizer(str(tmp_path / "tokenizer"))
    data = lm_data(seed=0, process_index=0, process_count=1, paths=str(tmp_path / "out" / "sft.jsonl"),
                   data_format="chat", tokenizer=tokenizer, seq_len=512, global_batch_size=2,
                   shuffle=False, num_epochs=1, packing=False, num_data_shards=1)
    (batch,) = list(data)
    assert batch["inputs"].shape == (2, 512)
    for row, record in enumerate(_rows(tmp_path / "out" / "sft.jsonl")):
        trained = np.asarray(batch["targets"][row])[np.asarray(batch["loss_mask"][row]) == 1]
        text = tokenizer.decode(trained.tolist())
        assert record["messages"][1]["content"] in text  # the long response is what the model learns
        assert record["messages"][0]["content"] not in text  # the instruction is not trained on


def test_gin_knobs_and_prompt_files(tmp_path):
    _write(tmp_path / "instructions.jsonl", [INSTRUCTIONS[1]])
    (tmp_path / "write.txt").write_text("W {{instruction}} | {{plan}} | {{text}} | {{step}}")
    with gin.unlock_config():
        gin.parse_config(f"agentwrite_pipeline.max_steps = 1\nagentwrite_pipeline.write_prompt = "
                         f"'{tmp_path / 'write.txt'}'\nagentwrite_pipeline.writer_temperature = 0.5")
    try:
        planner, writer = clients = _clients()
        result = _run(tmp_path, clients)
    finally:
        gin.clear_config()
    assert result["skipped"] == 1 and not writer.calls  # 2 paragraphs > max_steps = 1
    (tmp_path / "out" / "plans.jsonl").unlink()
    planner, writer = clients = _clients(writer=lambda prompt, params: "text")
    _run(tmp_path, clients, write_prompt=str(tmp_path / "write.txt"), writer_temperature=0.5)
    assert writer.calls[0][0] == ("W Write an essay on tides. | " + format_plan(STEPS["essay"]) + " |  | "
                                  + STEPS["essay"][0].line(1))
    assert {p.temperature for _, p in writer.calls} == {0.5}
    (tmp_path / "bad.txt").write_text("{{instruction}} {{plan}}")
    with pytest.raises(PromptError, match=r"bad.txt: .*missing: \['step', 'text'\]"):
        _run(tmp_path, _clients(), write_prompt=str(tmp_path / "bad.txt"))
    default = agentwrite.load_prompt(None, "agentwrite_write.txt", agentwrite.WRITE_FIELDS)
    assert "{{plan}}" in default


def test_input_errors_name_the_line(tmp_path):
    _write(tmp_path / "instructions.jsonl", [INSTRUCTIONS[0], {"id": "x", "prompt": "Write."}])
    with pytest.raises(InputError, match=r"(?m)instructions.jsonl:2: field 'instruction' must be a non-empty string$"):
        _run(tmp_path, _clients())
    assert not (tmp_path / "out" / "plans.jsonl").exists()


# -- launch.pipeline ---------------------------------------------------------------------------

def _launch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.pipeline", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


HTTP_INSTRUCTIONS = [
    {"id": 1, "instruction": "Write a travel guide to Lisbon in about 600 words."},
    {"instruction": "Write a letter to a future self."},  # the id is derived from the line
]


def _server_reply(request):
    prompt = request["messages"][-1]["content"]
    if prompt.startswith("You are planning"):
        assert request["model"] == "planner"
        return ("Paragraph 1 - Main Point: Opening - Word Count: 300 words\n"
                "Paragraph 2 - Main Point: Closing - Word Count: 300 words")
    assert prompt.startswith("You are writing") and request["model"] == "w"
    number = STEP_LINE.search(prompt).group(1)
    return f"Paragraph {number} of the text."


def test_cli_http_fake_server(tmp_path):
    instructions = _write(tmp_path / "instructions.jsonl", HTTP_INSTRUCTIONS)
    out = tmp_path / "out"
    args = ["agentwrite", f"--input={instructions}", f"--output={out}", "--client=http", "--model=w",
            "--planner_model=planner", "--concurrency=2", "--gin.agentwrite_pipeline.writer_max_tokens=64"]
    with FakeOpenAIServer(reply=_server_reply) as server:
        server.script(Behaviour.error(400, "bad request"))  # one plan request fails (not retried)
        first = _launch(*args, f"--base_url={server.base_url}")
        assert first.returncode == 1, first.stderr[-3000:]
        assert "plans.errors.jsonl" in first.stderr
        before = len(server.requests)
        second = _launch(*args, f"--base_url={server.base_url}")
        assert second.returncode == 0, second.stderr[-3000:]
        retried = server.requests[before:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert (summary["sft_records"], summary["unfinished"], summary["failed"]) == (2, 0, 0)
    assert summary["stages"]["plans"]["already_done"] == 1 and len(retried) == 3  # 1 plan + 2 paragraphs
    assert {r.body["max_tokens"] for r in retried if r.body["model"] == "w"} == {64}
    sft = _rows(out / "sft.jsonl")
    assert sft[0]["id"] == 1 and sft[1]["id"].startswith("sha256-")
    assert sft[0]["messages"] == [{"role": "user", "content": HTTP_INSTRUCTIONS[0]["instruction"]},
                                  {"role": "assistant", "content": "Paragraph 1 of the text.\n\nParagraph 2 of the text."}]

    bad = _write(tmp_path / "bad.jsonl", [HTTP_INSTRUCTIONS[0], '{"instruction": 3}'])
    done = _launch("agentwrite", f"--input={bad}", f"--output={tmp_path / 'o'}", "--client=http",
                   "--base_url=http://127.0.0.1:9/v1", "--model=m")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"pipeline: {bad}:2: field 'instruction' must be a non-empty string")
    assert not (tmp_path / "o").exists()
