"""The pipeline runner (glmjax.pipelines.runner): ids, resume, retries of failed items, kill -9
safety with a real subprocess, the concurrency limit, malformed input lines, stage files."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import glmjax
from glmjax.pipelines.runner import (
    InputError,
    Item,
    JsonlAppender,
    OutputFileError,
    derive_id,
    errors_path_for,
    finished_rows,
    read_items,
    run_stage,
    write_jsonl_atomic,
)

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _items(n):
    return [Item(f"i{k}", {"x": k}, f"in.jsonl:{k + 1}") for k in range(n)]


def test_ids_given_or_derived_from_the_content(tmp_path):
    _write(tmp_path / "in.jsonl", ['{"id": "a", "x": 1}', "", '{"x": 2,  "y": [1, 2]}', '{"id": 7}'])
    items = read_items(tmp_path / "in.jsonl")
    assert [item.id for item in items] == ["a", derive_id({"y": [1, 2], "x": 2}), 7]
    assert items[1].id.startswith("sha256-") and len(items[1].id) == len("sha256-") + 16
    assert [item.location for item in items] == [f"{tmp_path / 'in.jsonl'}:{n}" for n in (1, 3, 4)]
    assert derive_id({"x": 2, "y": [1, 2]}) != derive_id({"x": 3, "y": [1, 2]})


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"id": true}', "field 'id' must be a non-empty string or an integer"),
    ('{"id": "a"}', "duplicate id 'a' (first on line 1)"),
    ('{"id": "b", "bad": 1}', "field 'bad' is not allowed"),
])
def test_malformed_line_is_named_by_file_and_line(tmp_path, line, problem):
    _write(tmp_path / "in.jsonl", ['{"id": "a"}', line, '{"id": "c"}'])

    def validate(row):
        if "bad" in row:
            raise ValueError("field 'bad' is not allowed")

    with pytest.raises(InputError) as info:
        read_items(tmp_path / "in.jsonl", validate)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'in.jsonl'}:2: ") and problem in message
    assert "\n" not in message


def test_every_malformed_line_is_counted(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"id": 1}\n\xff\xfe\n[]\n{}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: not UTF-8 .* \(and 1 more malformed lines\)$"):
        read_items(tmp_path / "in.jsonl")


def test_resume_skips_finished_and_retries_failed_items(tmp_path):
    output = tmp_path / "out.jsonl"
    calls = []

    def flaky(item):
        calls.append(item.id)
        if item.row["x"] % 3 == 0:
            raise RuntimeError(f"server said no\nto {item.id}")
        return {"double": 2 * item.row["x"]}

    first = run_stage("double", _items(7), flaky, output, concurrency=2, progress=False)
    assert (first.total, first.already_done, first.finished, first.failed) == (7, 0, 4, 3)
    assert sorted(row["id"] for row in _lines(output)) == ["i1", "i2", "i4", "i5"]
    errors = _lines(tmp_path / "out.errors.jsonl")
    assert first.errors == errors_path_for(output) == str(tmp_path / "out.errors.jsonl")
    assert sorted(e["id"] for e in errors) == ["i0", "i3", "i6"]
    assert {e["stage"] for e in errors} == {"double"}
    assert errors[0]["error"] == f"RuntimeError: server said no to {errors[0]['id']}" and errors[0]["time"]

    calls.clear()
    second = run_stage("double", _items(7), lambda item: {"double": 2 * item.row["x"]}, output,
                       progress=False)
    assert (second.already_done, second.finished, second.failed) == (4, 3, 0)
    rows = _lines(output)
    assert sorted(r["id"] for r in rows) == [f"i{k}" for k in range(7)]
    assert all(r["double"] == 2 * int(r["id"][1:]) for r in rows)
    assert len(_lines(tmp_path / "out.errors.jsonl")) == 3  # the log keeps the old failures

    third = run_stage("double", _items(7), lambda item: pytest.fail("nothing is left to do"), output,
                      progress=False)
    assert (third.already_done, third.finished, third.failed) == (7, 0, 0)


def test_work_results_that_are_not_rows_are_item_errors(tmp_path):
    results = {"i0": ["a list"], "i1": {"id": "other"}, "i2": {"value": {1, 2}}, "i3": {"ok": True}}
    outcome = run_stage("s", _items(4), lambda item: results[item.id], tmp_path / "out.jsonl",
                        progress=False)
    assert (outcome.finished, outcome.failed) == (1, 3)
    assert _lines(tmp_path / "out.jsonl") == [{"id": "i3", "ok": True}]
    reasons = {e["id"]: e["error"] for e in _lines(tmp_path / "out.errors.jsonl")}
    assert reasons["i0"].startswith("TypeError: the stage's work returned list")
    assert reasons["i1"] == "ValueError: the stage's work returned id 'other' for item 'i1'"
    assert reasons["i2"].startswith("TypeError: Object of type set is not JSON serializable")


def test_concurrency_limit_is_respected_and_reached(tmp_path):
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def slow(item):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return {}

    result = run_stage("slow", _items(12), slow, tmp_path / "out.jsonl", concurrency=3, progress=False)
    assert result.finished == 12 and state["max"] == 3
    state["max"] = 0
    run_stage("slow", _items(16), slow, tmp_path / "one.jsonl", concurrency=1, progress=False)
    assert state["max"] == 1


def test_torn_last_line_is_truncated_and_redone(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "i0", "v": 0}\n{"id": "i1", "v": 1}\n{"id": "i2", "v"')
    result = run_stage("v", _items(3), lambda item: {"v": item.row["x"]}, output, progress=False)
    assert (result.already_done, result.finished) == (2, 1)
    assert output.read_text() == '{"id": "i0", "v": 0}\n{"id": "i1", "v": 1}\n{"id": "i2", "v": 2}\n'


@pytest.mark.parametrize("content, problem", [
    ('{"id": "i0"}\nnot json\n', "out.jsonl:2: not a row of the pipeline runner"),
    ('{"text": "no id"}\n', "out.jsonl:1: not a row of the pipeline runner (no valid 'id')"),
    ('{"id": "i0"}\n{"id": "i0"}\n', "out.jsonl:2: id 'i0' appears twice"),
])
def test_a_file_that_is_not_ours_is_refused_and_untouched(tmp_path, content, problem):
    output = tmp_path / "out.jsonl"
    output.write_text(content + '{"id": "torn')
    with pytest.raises(OutputFileError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        run_stage("s", _items(2), lambda item: pytest.fail("must not run"), output, progress=False)
    assert output.read_text() == content + '{"id": "torn'


def test_a_second_writer_is_refused(tmp_path):
    with JsonlAppender(tmp_path / "out.jsonl", unique=True):
        with pytest.raises(OutputFileError, match="another process is writing this file"):
            run_stage("s", _items(1), lambda item: {}, tmp_path / "out.jsonl", progress=False)
    assert run_stage("s", _items(1), lambda item: {}, tmp_path / "out.jsonl", progress=False).finished == 1


def test_stage_files_let_a_later_stage_rerun_alone(tmp_path):
    calls = {"first": 0, "second": 0}

    def first(item):
        calls["first"] += 1
        return {"y": item.row["x"] + 1}

    def second(item):
        calls["second"] += 1
        return {"z": item.row["y"] * 10}

    def run_both():
        run_stage("first", _items(4), first, tmp_path / "first.jsonl", progress=False)
        done = finished_rows(tmp_path / "first.jsonl")
        items = [Item(i.id, {**i.row, **done[i.id]}, i.location) for i in _items(4)]
        run_stage("second", items, second, tmp_path / "second.jsonl", progress=False)

    run_both()
    assert calls == {"first": 4, "second": 4}
    (tmp_path / "second.jsonl").unlink()
    run_both()
    assert calls == {"first": 4, "second": 8}
    assert {r["id"]: r["z"] for r in _lines(tmp_path / "second.jsonl")} == {
        f"i{k}": (k + 1) * 10 for k in range(4)}


def test_write_jsonl_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text("old\n")
    assert write_jsonl_atomic(path, ({"id": k} for k in range(3))) == 3
    assert _lines(path) == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert os.listdir(tmp_path) == ["export.jsonl"]


_WORKER = textwrap.dedent("""
    import sys, time
    from glmjax.pipelines.runner import Item, run_stage

    def work(item):
        time.sleep(0.004)
        return {"payload": f"{item.id}:" + "x" * 20000}   # 20 KB rows: kills land mid-write at times

    items = [Item(k, {}, f"in:{k}") for k in range(int(sys.argv[2]))]
    result = run_stage("kill", items, work, sys.argv[1], concurrency=4)
    print(result.finished, result.already_done)
""")


def _complete_rows(path):
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def test_kill_9_loses_no_finished_row_and_duplicates_none(tmp_path):
    output, total = tmp_path / "out.jsonl", 400
    command = [sys.executable, "-c", _WORKER, str(output), str(total)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    seen_before_kill: set[int] = set()
    for round_, target in enumerate((40, 120, 230)):
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (output.stat().st_size if output.exists() else 0) < target * 20000:
            assert process.poll() is None, "the worker ended before it was killed"
            assert time.monotonic() < deadline, f"round {round_}: the worker made no progress"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        rows = _complete_rows(output)
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), "a kill left a duplicated row"
        assert seen_before_kill <= set(ids), "a finished row was lost"
        assert all(row["payload"] == f"{row['id']}:" + "x" * 20000 for row in rows)
        seen_before_kill = set(ids)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    finished, already_done = map(int, done.stdout.split())
    assert already_done == len(seen_before_kill) and finished == total - already_done
    final = _lines(output)
    assert sorted(row["id"] for row in final) == list(range(total))
    assert all(row["payload"] == f"{row['id']}:" + "x" * 20000 for row in final)
    assert "kill:" in done.stderr and "item/s" in done.stderr  # tqdm's bar, with its rate


def test_token_counts_of_every_call_are_recorded_per_item_and_summed(tmp_path):
    """Each item's LLM calls (reported by any client, here from threads the work starts, and by a
    server without ``usage``) land in its row, its error row, and the stage's sum."""
    from fake_openai_server import FakeOpenAIServer

    from glmjax.inference.llm_client import OpenAIHTTPClient, record_usage, report_usage

    def work(item):
        k = item.row["x"]
        threads = [threading.Thread(target=report_usage, args=(10 * k, k)) for _ in range(2)]
        for thread in threads:  # plain threads do not inherit the context: these are not counted
            thread.start()
            thread.join()
        report_usage(10 * k, k)
        report_usage(5, 1)
        if k == 2:
            raise RuntimeError("judge gave up")
        if k == 3:
            client.complete([{"role": "user", "content": "hi"}])  # a server without usage
        return {"k": k}

    with FakeOpenAIServer() as server:
        client = OpenAIHTTPClient(server.base_url, "m", max_retries=0, use_env_proxy=False)
        with record_usage() as job:
            outcome = run_stage("s", _items(4), work, tmp_path / "out.jsonl", concurrency=2, progress=False)
    rows = {row["id"]: row for row in _lines(tmp_path / "out.jsonl")}
    assert rows["i1"]["usage"] == {"calls": 2, "prompt_tokens": 15, "completion_tokens": 2, "unreported": 0}
    assert rows["i3"]["usage"] == {"calls": 3, "prompt_tokens": 35, "completion_tokens": 4, "unreported": 1}
    (error,) = _lines(tmp_path / os.path.basename(errors_path_for(tmp_path / "out.jsonl")))
    assert error["usage"] == {"calls": 2, "prompt_tokens": 25, "completion_tokens": 3, "unreported": 0}
    assert outcome.usage.to_json() == {"calls": 9, "prompt_tokens": 80, "completion_tokens": 10, "unreported": 1}
    assert outcome.as_dict()["usage"]["prompt_tokens"] == 80
    assert job.total == outcome.usage  # a meter around run_stage sees the items' calls too
