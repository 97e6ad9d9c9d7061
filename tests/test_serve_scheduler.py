"""Continuous batching scheduler: same tokens as the engine, per-row settings in one batch, stop
strings and streaming commits, slots freed as rows finish, fixed compiled shapes."""

import threading
import time

import pytest
from serving_models import tiny_engine

from glmjax.inference.sampling import SamplingConfig
from glmjax.inference.serving.scheduler import (
    ChoiceDelta,
    ChoiceResult,
    ContinuousScheduler,
    GenerationRequest,
    SchedulerBusy,
    SchedulerClosed,
)

VOCAB = 300
EOS = 1
PROMPTS = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [40]]
HOT = SamplingConfig(temperature=1.0, top_p=0.9, top_k=40)


def detokenize(ids: list[int]) -> str:
    return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(VOCAB)


@pytest.fixture(scope="module")
def scheduler(engine):
    with ContinuousScheduler(engine, detokenize, max_slots=4, max_len=64, decode_chunk=4, max_prefill_batch=2) as s:
        yield s


def _concurrently(scheduler, requests):
    """Submits every request at once; returns their results in order."""
    out = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i, r=r: out.__setitem__(i, scheduler.generate(r)))
               for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


@pytest.mark.parametrize("sampling", [SamplingConfig(), HOT], ids=["greedy", "sampled"])
def test_samples_equal_the_engines(engine, scheduler, sampling):
    """K samples of a prompt (one prefill, K slots) draw what engine.generate draws with the same
    seeds, whatever else shares the batch."""
    expected = engine.generate(PROMPTS, sampling, max_new_tokens=12, stop_token_ids=[EOS], seed=3, num_samples=2,
                               logprob_mode="raw")
    requests = [GenerationRequest(p, 12, sampling, seeds=[3 + 2 * i, 4 + 2 * i], stop_token_ids=[EOS])
                for i, p in enumerate(PROMPTS)]
    got = [choice for results in _concurrently(scheduler, requests) for choice in results]
    for want, choice in zip(expected, got):
        assert choice.tokens == want.tokens
        assert choice.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        assert choice.finish_reason == want.finish_reason
        assert choice.text == detokenize(want.tokens[:-1] if want.finish_reason == "stop" else want.tokens)


def test_rows_with_different_settings_share_a_batch(engine, scheduler):
    settings = [SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.3, top_k=5),
                SamplingConfig(temperature=1.0, top_p=0.5, min_p=0.05)]
    requests = [GenerationRequest(PROMPTS[i], 10, s, seeds=[11 + i]) for i, s in enumerate(settings)]
    for request, (choice,) in zip(requests, _concurrently(scheduler, requests)):
        (want,) = engine.generate([request.prompt], request.sampling, max_new_tokens=10, seed=request.seeds[0])
        assert choice.tokens == want.tokens and choice.finish_reason == "length"


def test_stop_strings_cut_the_text_and_stream_nothing_past_them(engine, scheduler):
    (full,) = scheduler.generate(GenerationRequest(PROMPTS[0], 16, seeds=[0]))
    stop = full.text[5:8]
    start = full.text.find(stop)  # one character per token here
    deltas, results = [], []
    done = threading.Event()

    def on_event(event):
        (deltas if isinstance(event, ChoiceDelta) else results).append(event)
        done.set() if isinstance(event, ChoiceResult) else None

    scheduler.submit(GenerationRequest(PROMPTS[0], 16, seeds=[0], stop_strings=[stop, "unseen"], stream=True),
                     on_event)
    assert done.wait(60)
    (result,) = results
    assert result.text == full.text[:start] and result.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.tokens] == result.tokens[: len([t for d in deltas for t in d.tokens])]
    assert result.tokens == full.tokens[: start + len(stop)]  # through the token completing the stop


def test_short_request_finishes_before_a_long_one_admitted_earlier(engine):
    """Continuous batching: a row's slot is reused as soon as it finishes; static batching makes
    the short request wait for the long one."""
    order = {}
    for batching in ("continuous", "static"):
        with ContinuousScheduler(engine, detokenize, max_slots=2, max_len=256, decode_chunk=4,
                                 batching=batching) as scheduler:
            finished = []

            def long_request(scheduler=scheduler, finished=finished):
                scheduler.generate(GenerationRequest([3], 200))
                finished.append("long")

            long = threading.Thread(target=long_request)
            long.start()
            while scheduler.stats()["active"] == 0:
                time.sleep(0.001)
            scheduler.generate(GenerationRequest([4], 3))
            finished.append("short")
            long.join()
            order[batching] = finished
    assert order == {"continuous": ["short", "long"], "static": ["long", "short"]}


def test_compiled_programs_do_not_grow_with_requests(engine):
    def requests(offset):
        return [GenerationRequest(list(range(2, 2 + n)), 3 + n, SamplingConfig(temperature=offset + n / 10),
                                  seeds=[n]) for n in range(1, 9)]

    with ContinuousScheduler(engine, detokenize, max_slots=4, max_len=64, decode_chunk=4,
                             max_prefill_batch=2) as scheduler:
        _concurrently(scheduler, requests(0.5))
        # Prompts of 1-8 tokens are one prompt bucket (16); prefill groups of 1 or 2 prompts: at
        # most two admission programs, plus the one decode program, whatever the sampling settings.
        assert scheduler.programs.num_programs <= 3
        built = scheduler.programs.num_programs
        _concurrently(scheduler, requests(0.9))
        _concurrently(scheduler, [GenerationRequest([5, 6, 7], 6, SamplingConfig(), seeds=[1, 2])])
        assert scheduler.programs.num_programs <= 3 and scheduler.programs.num_programs >= built


def test_cancel_frees_the_slots(engine):
    with ContinuousScheduler(engine, detokenize, max_slots=2, max_len=256, decode_chunk=2) as scheduler:
        events = []
        submission = scheduler.submit(GenerationRequest([3], 250, seeds=[0, 1], stream=True), events.append)
        while not events:
            time.sleep(0.001)
        submission.cancel()
        deadline = time.monotonic() + 30
        while scheduler.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.stats()["active"] == 0
        count = len(events)
        assert scheduler.generate(GenerationRequest([4], 2))[0].finish_reason == "length"
        assert len(events) == count and not any(isinstance(e, ChoiceResult) for e in events)


def test_refusals(engine, scheduler):
    with pytest.raises(ValueError, match="prompt is empty"):
        scheduler.submit(GenerationRequest([], 4), print)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 300\)"):
        scheduler.submit(GenerationRequest([VOCAB], 4), print)
    with pytest.raises(ValueError, match=r"plus max_tokens \(60\) exceed the context of 64 tokens"):
        scheduler.submit(GenerationRequest([2] * 5, 60), print)
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\]"):
        scheduler.submit(GenerationRequest([2], 4, seeds=range(5)), print)
    with pytest.raises(ValueError, match="top_k must be <= 256"):
        scheduler.submit(GenerationRequest([2], 4, SamplingConfig(temperature=1.0, top_k=300)), print)
    with ContinuousScheduler(engine, detokenize, max_slots=1, max_len=256, max_waiting=1) as busy:
        busy.submit(GenerationRequest([3], 200), lambda event: None)
        while busy.stats()["active"] == 0:
            time.sleep(0.001)
        busy.submit(GenerationRequest([3], 2), lambda event: None)
        with pytest.raises(SchedulerBusy, match="1 requests are waiting"):
            busy.submit(GenerationRequest([3], 2), lambda event: None)
    with pytest.raises(SchedulerClosed, match="not running"):
        busy.submit(GenerationRequest([3], 2), lambda event: None)


def test_chunked_prefill_admits_what_one_forward_admits(engine):
    """An engine with ``prefill_chunk`` (8-token chunks of the 32-token prompt bucket) serves the
    same greedy tokens as the one-forward prefill of the same weights."""
    from glmjax.inference.engine import GenerationEngine
    from glmjax.models import create_model, preset

    model = create_model(preset("glm4-tiny").replace(vocab_size=VOCAB), seed=7)  # tiny_engine's
    chunked = GenerationEngine(model, max_batch_size=8, length_buckets=engine.length_buckets, prefill_chunk=8)
    request = GenerationRequest(PROMPTS[2], 10, seeds=[0])
    with ContinuousScheduler(chunked, detokenize, max_slots=2, max_len=64, decode_chunk=4,
                             max_prefill_batch=1) as s:
        (got,) = s.generate(request)
    (want,) = engine.generate([request.prompt], SamplingConfig(), max_new_tokens=10)
    assert got.tokens == want.tokens
