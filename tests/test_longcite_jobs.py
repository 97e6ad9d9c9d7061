"""The LongBench-Cite job in process (glmjax.evals.longbench_cite_jobs) with scripted clients: the
hand-computed report of the fixture, a judge that never answers readably fails the item (retried
by the next run), stale judgements are refused, per-item seeds."""

import json

import pytest

import longcite_script as script
from scripted_clients import ScriptedClient

from glmjax.evals import longbench_cite_jobs as jobs
from glmjax.evals.longbench_jobs import StaleStageError


class WordTokenizer:
    """Whitespace tokens (the citation length in words); truncation keeps whole words."""

    name_or_path = "words"

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(ids)


def _model():
    return ScriptedClient(lambda prompt, sampling: script.model_reply({"messages": [{"content": prompt}]}))


def _judge(unreadable=()):
    """The scripted judge; a support prompt of a statement in ``unreadable`` gets no rating."""
    def reply(prompt, sampling):
        if "how well the passage supports" in prompt and any(s in prompt for s in unreadable):
            return "I am not sure."
        return script.judge_reply({"messages": [{"content": prompt}], "temperature": sampling.temperature})
    return ScriptedClient(reply)


def test_job_report_of_the_fixture(tmp_path):
    model, judge = _model(), _judge()
    report = jobs.longbench_cite_job(script.FIXTURE, tmp_path, model, judge, tokenizer=WordTokenizer(),
                                     seed=1, concurrency=3, progress=False, name="scripted")
    assert (report["scored"], report["unfinished"], report["failed"]) == (6, 0, 0)
    assert len(model.calls) == 6 and len(judge.calls) == script.JUDGE_CALLS
    script.check_report(report, WordTokenizer())
    # words per citation, pooled: 8 + 17, 7, 1, 10 + 9, 1 words over 6 citations
    assert report["summary"]["average"]["citation_length"] == pytest.approx((8 + 17 + 7 + 1 + 19 + 1) / 6)
    assert report["citation_length_tokenizer"] == "words"
    assert {(s.temperature, s.top_p, s.max_tokens) for _, s in model.calls} == {(0.95, 0.7, 1024)}
    seeds = [s.seed for _, s in model.calls]
    assert len(set(seeds)) == 6
    assert "| Average | 6 | 62.5 | 70.0 | 63.3 | 82.0 | 8.8 |" in (tmp_path / "report.md").read_text()
    # Another seed: other per-item seeds; the same seed again: the same ones (asked in a new directory).
    again = _model()
    jobs.longbench_cite_job(script.FIXTURE, tmp_path / "again", again, _judge(), seed=1, progress=False)
    assert sorted(s.seed for _, s in again.calls) == sorted(seeds)
    other = _model()
    jobs.longbench_cite_job(script.FIXTURE, tmp_path / "other", other, _judge(), seed=2, progress=False)
    assert not set(s.seed for _, s in other.calls) & set(seeds)


def test_unreadable_citation_judge_fails_the_item_until_a_rerun_reads_it(tmp_path):
    judge = _judge(unreadable=["Alice Smith was born in Leeds."])
    report = jobs.longbench_cite_job(script.FIXTURE, tmp_path, _model(), judge, judge_tries=2, progress=False)
    assert (report["scored"], report["unfinished"], report["failed"]) == (5, 1, 1)
    assert report["stages"]["citations"]["failed"] == 1 and report["stages"]["correctness"]["failed"] == 0
    (error,) = [json.loads(line) for line in (tmp_path / "citations.errors.jsonl").read_text().splitlines()]
    assert error["id"] == 0 and "JudgeReplyError: the support judge gave no readable rating for statement 0 " \
        "in 2 tries; last reply: 'I am not sure.'" in error["error"]
    assert "1 of 6 items are not scored yet" in (tmp_path / "report.md").read_text()
    model = _model()
    report = jobs.longbench_cite_job(script.FIXTURE, tmp_path, model, _judge(), progress=False)
    assert (report["scored"], report["failed"], len(model.calls)) == (6, 0, 0)
    assert report["stages"]["citations"]["finished"] == 1
    assert report["summary"]["average"]["citation_f1"] == pytest.approx(script.EXPECTED_AVERAGE[2])


def test_judgements_of_another_response_are_refused(tmp_path):
    jobs.longbench_cite_job(script.FIXTURE, tmp_path, _model(), _judge(), progress=False)
    responses = tmp_path / "responses.jsonl"
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    rows[0]["response"] = "<statement>Something else.<cite>[0-0]</cite></statement>"
    responses.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    with pytest.raises(StaleStageError, match=f"citations.jsonl: the judgement of idx {rows[0]['id']!r} judged "
                                              "another response"):
        jobs.check_cite_files(script.FIXTURE, tmp_path)


def test_bad_knobs(tmp_path):
    with pytest.raises(ValueError, match="budget, judge_tries and max_statements must be >= 1"):
        jobs.longbench_cite_job(script.FIXTURE, tmp_path, _model(), _judge(), max_statements=0, progress=False)
    assert not (tmp_path / "responses.jsonl").exists()
