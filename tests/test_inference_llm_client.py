"""Tests for the OpenAI-compatible HTTP client against a local fake server."""

import socket
import time

import pytest
from fake_openai_server import Behaviour, FakeOpenAIServer

from glmjax.data.chat_format import Reply, ToolCall
from glmjax.inference.llm_client import (
    AssistantTurn,
    LLMClient,
    LLMClientError,
    LLMConnectionError,
    LLMHTTPError,
    LLMResponseError,
    OpenAIHTTPClient,
    SamplingParams,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


def fast_client(server: FakeOpenAIServer, **overrides) -> OpenAIHTTPClient:
    """A client for ``server`` with short timeouts and backoff."""
    options = dict(timeout_s=1.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05,
                   use_env_proxy=False)
    options.update(overrides)
    return OpenAIHTTPClient(server.base_url, "fake-model", **options)


def test_interface_is_abstract():
    with pytest.raises(TypeError):
        LLMClient()
    assert issubclass(OpenAIHTTPClient, LLMClient)

    class TextOnly(LLMClient):  # No assistant_turns: the chat loop could not use it.
        def complete(self, messages, sampling=None):
            return ""

        def complete_batch(self, conversations, sampling=None):
            return []

    with pytest.raises(TypeError, match="assistant_turns"):
        TextOnly()


def test_complete_sends_openai_request(server, monkeypatch):
    monkeypatch.setenv("FAKE_API_KEY", "sk-test")
    client = fast_client(server, api_key_env="FAKE_API_KEY")
    assert client.complete(MESSAGES) == "echo: hi"
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.body == {"model": "fake-model", "messages": MESSAGES, "max_tokens": 512,
                            "temperature": 1.0, "top_p": 1.0}


def test_sampling_parameters_are_sent_when_set(server):
    client = fast_client(server, api_key="sk-direct")
    sampling = SamplingParams(max_tokens=7, temperature=0.0, top_p=0.9, top_k=20, min_p=0.05,
                              seed=123, stop=["\n\n", "</answer>"])
    client.complete(MESSAGES, sampling)
    body = server.requests[0].body
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                                 "stop")} == {"max_tokens": 7, "temperature": 0.0, "top_p": 0.9,
                                              "top_k": 20, "min_p": 0.05, "seed": 123,
                                              "stop": ["\n\n", "</answer>"]}
    assert server.requests[0].headers["Authorization"] == "Bearer sk-direct"


def test_configuration_errors(monkeypatch):
    monkeypatch.delenv("MISSING_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="MISSING_KEY_VAR"):
        OpenAIHTTPClient("http://127.0.0.1:1/v1", "m", api_key_env="MISSING_KEY_VAR")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])
    assert SamplingParams(stop=["a"]).stop == ("a",)


def test_server_errors_are_retried(server):
    server.script(Behaviour.error(500), Behaviour.error(503))
    assert fast_client(server).complete(MESSAGES) == "echo: hi"
    assert len(server.requests) == 3


def test_persistent_server_errors_give_up(server):
    server.script(*[Behaviour.error(502, "bad gateway")] * 5)
    with pytest.raises(LLMHTTPError, match=r"HTTP 502.*bad gateway.*after 3 attempts") as info:
        fast_client(server).complete(MESSAGES)
    assert info.value.status == 502
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(server):
    server.script(Behaviour.error(400, "context length exceeded"))
    with pytest.raises(LLMHTTPError, match="HTTP 400.*context length exceeded") as info:
        fast_client(server).complete(MESSAGES)
    assert info.value.status == 400 and not info.value.retryable
    assert len(server.requests) == 1


def test_rate_limit_honours_retry_after(server):
    server.script(Behaviour.rate_limited(retry_after_s=0.3))
    start = time.monotonic()
    assert fast_client(server, backoff_max_s=1.0).complete(MESSAGES) == "echo: hi"
    assert len(server.requests) == 2
    assert server.requests[1].time - server.requests[0].time >= 0.3
    assert time.monotonic() - start < 1.0


def test_timeouts_are_retried(server):
    server.script(Behaviour.slow(3.0))
    start = time.monotonic()
    assert fast_client(server, timeout_s=0.3).complete(MESSAGES) == "echo: hi"
    assert time.monotonic() - start < 1.5
    assert len(server.requests) == 2


def test_persistent_timeouts_give_up(server):
    server.script(*[Behaviour.slow(3.0)] * 3)
    with pytest.raises(LLMConnectionError, match="timed out.*after 2 attempts"):
        fast_client(server, timeout_s=0.2, max_retries=1).complete(MESSAGES)


@pytest.mark.parametrize("behaviour, message", [
    (Behaviour.malformed(), "is not JSON: '<html>this is not json</html>'"),
    (Behaviour.missing_choices(), "has no choices"),
    (Behaviour.malformed('{"choices": [{"message": {"content": null}}]}'), "no message text"),
])
def test_malformed_replies(server, behaviour, message):
    server.script(behaviour)
    assert fast_client(server).complete(MESSAGES) == "echo: hi"  # Retried once, then fine.
    server.script(*[behaviour] * 3)
    with pytest.raises(LLMResponseError, match=message):
        fast_client(server).complete(MESSAGES)
    assert len(server.requests) == 2 + 3


def test_unreachable_server():
    with socket.socket() as probe:  # A port nobody listens on.
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OpenAIHTTPClient(f"http://127.0.0.1:{port}/v1/", "m", timeout_s=0.5, max_retries=1,
                              backoff_base_s=0.01, use_env_proxy=False)
    assert client.url == f"http://127.0.0.1:{port}/v1/chat/completions"
    with pytest.raises(LLMConnectionError, match="Connection refused.*after 2 attempts"):
        client.complete(MESSAGES)


def test_batch_preserves_order_and_limits_concurrency(server):
    server.script(*[Behaviour.slow(0.15 - 0.01 * i) for i in range(12)])
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    client = fast_client(server, max_concurrency=3)
    assert client.complete_batch(conversations) == [f"echo: q{i}" for i in range(12)]
    assert server.max_in_flight == 3
    assert client.complete_batch([]) == []


def test_batch_retries_individual_failures(server):
    server.script(Behaviour.error(500), Behaviour.malformed(), Behaviour.rate_limited())
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    assert fast_client(server, max_concurrency=2).complete_batch(conversations) == [
        f"echo: q{i}" for i in range(5)]
    assert len(server.requests) == 8


def test_batch_failure_keeps_the_other_results(server):
    server.script(Behaviour.normal(), Behaviour.error(400, "bad request"), Behaviour.normal(),
                  Behaviour.error(404, "gone"))
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    with pytest.raises(LLMHTTPError, match="HTTP 400") as info:
        fast_client(server, max_concurrency=1).complete_batch(conversations)
    assert info.value.batch_index == 1
    results = info.value.results
    assert [r for i, r in enumerate(results) if i not in (1, 3)] == ["echo: q0", "echo: q2", "echo: q4", "echo: q5"]
    assert results[1] is info.value and isinstance(results[3], LLMHTTPError) and results[3].batch_index == 3
    assert len(server.requests) == 6  # every item was attempted


def test_batch_items_get_seed_plus_index(server):
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    fast_client(server).complete_batch(conversations, SamplingParams(seed=10))
    seeds = {r.body["messages"][0]["content"]: r.body["seed"] for r in server.requests}
    assert seeds == {"q0": 10, "q1": 11, "q2": 12, "q3": 13}
    fast_client(server).assistant_turns(conversations[:2], SamplingParams(seed=0))
    assert [r.body["seed"] for r in server.requests[4:]] in ([0, 1], [1, 0])
    fast_client(server).complete_batch(conversations[:2])
    assert all("seed" not in r.body for r in server.requests[6:])


def test_request_timeout_status_is_retried(server):
    server.script(Behaviour.error(408, "request timeout"))
    assert fast_client(server).complete(MESSAGES) == "echo: hi"
    assert len(server.requests) == 2


def test_retry_after_is_capped(server):
    server.script(Behaviour.rate_limited(retry_after_s=30.0))
    start = time.monotonic()
    assert fast_client(server, max_retry_after_s=0.2).complete(MESSAGES) == "echo: hi"
    assert 0.2 <= server.requests[1].time - server.requests[0].time < 1.0
    assert time.monotonic() - start < 2.0


def test_deadline_bounds_attempts_and_waits(server):
    # The attempt times out at 0.3 s; its retry would wait at least 0.25 s, past the deadline.
    server.script(Behaviour.slow(3.0))
    start = time.monotonic()
    with pytest.raises(LLMConnectionError, match=r"timed out \(deadline of 0.5 s reached after 1 attempts\)"):
        fast_client(server, timeout_s=0.3, deadline_s=0.5, backoff_base_s=0.5, backoff_max_s=0.5).complete(MESSAGES)
    assert time.monotonic() - start < 1.0
    server.script(Behaviour.rate_limited(retry_after_s=5.0))
    with pytest.raises(LLMHTTPError, match="deadline of 1 s reached"):
        fast_client(server, deadline_s=1.0, max_retry_after_s=10.0).complete(MESSAGES)


def test_retry_budget_is_shared_by_a_batch(server):
    server.script(*[Behaviour.error(500)] * 20)
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    with pytest.raises(LLMHTTPError, match="HTTP 500") as info:
        fast_client(server, max_retries=5, retry_budget=2, max_concurrency=1).complete_batch(conversations)
    assert len(server.requests) == 4 + 2
    assert all("retry budget spent" in str(e) for e in info.value.results)


ADD_SPEC = {"type": "function", "function": {"name": "add", "description": "Adds.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}


def test_assistant_turns_requests_and_replies(server):
    server.script(
        Behaviour.answer("hello"),
        Behaviour.tool_calls(("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4}), content="Let me add."),
        Behaviour(message={"role": "assistant", "content": None,  # Arguments as an object.
                           "tool_calls": [{"function": {"name": "add", "arguments": {"a": 5}}}]}),
    )
    calls = [{"function": {"name": "add", "arguments": {"a": 1}}},
             {"function": {"name": "add", "arguments": '{"a": 2}'}}]
    conversations = [
        MESSAGES,
        [{"role": "user", "content": "1+2?"}],
        [{"role": "user", "content": "two sums"}, {"role": "assistant", "content": "", "tool_calls": calls},
         {"role": "observation", "content": "1"}, {"role": "tool", "content": "2"}],
    ]
    turns = fast_client(server, max_concurrency=1).assistant_turns(
        conversations, SamplingParams(max_tokens=9, stop=["END"]), tools=[ADD_SPEC, ADD_SPEC["function"]])
    # Every call of a message is kept, with its id and the content next to it.
    assert turns == [
        AssistantTurn("hello", [], [], "stop", Reply("hello")),
        AssistantTurn("Let me add.", [], [], "stop", Reply("Let me add.", [
            ToolCall("add", {"a": 1, "b": 2}, "server_call_0"),
            ToolCall("add", {"a": 3, "b": 4}, "server_call_1")])),
        AssistantTurn("", [], [], "stop", Reply("", [ToolCall("add", {"a": 5})])),
    ]
    bodies = [request.body for request in server.requests]
    assert all(body["tools"] == [ADD_SPEC, ADD_SPEC] for body in bodies)
    assert bodies[0]["messages"] == MESSAGES
    assert bodies[0]["max_tokens"] == 9 and bodies[0]["stop"] == ["END"]
    assert bodies[2]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "1"},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]
    fast_client(server).assistant_turns([MESSAGES])
    assert "tools" not in server.requests[-1].body
    assert fast_client(server).assistant_turns([]) == []


def test_assistant_turns_finish_reasons_and_bad_arguments(server):
    server.script(Behaviour.answer("cut", finish_reason="length"),
                  Behaviour.answer("done", finish_reason="eos"),
                  Behaviour.tool_calls(("add", '{"a": 1,')))
    turns = fast_client(server, max_concurrency=1).assistant_turns([MESSAGES] * 3)
    assert [(t.text, t.finish_reason, t.error) for t in turns[:2]] == [
        ("cut", "length", None), ("done", "stop", None)]
    # Broken arguments are model output: the turn says so, for the chat loop to report.
    assert turns[2].reply == Reply("") and turns[2].error.startswith(
        "tool_calls[0]: field 'arguments' is not valid JSON")


@pytest.mark.parametrize("message, error", [
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "malformed tool_calls"),
    ({"role": "assistant", "tool_calls": "add"}, "malformed tool_calls"),
    ({"role": "assistant", "content": None}, "no message text"),
])
def test_assistant_turns_malformed_replies_are_retried(server, message, error):
    server.script(Behaviour(message=message))
    assert fast_client(server).assistant_turns([MESSAGES])[0].reply == Reply("echo: hi")
    server.script(*[Behaviour(message=message)] * 6)  # Three attempts for each conversation.
    with pytest.raises(LLMResponseError, match=f"{error}.*after 3 attempts") as info:
        fast_client(server).assistant_turns([MESSAGES] * 2, tools=[ADD_SPEC])
    assert info.value.batch_index == 0


def test_assistant_turns_rejects_unconvertible_conversations(server):
    orphan = [{"role": "user", "content": "?"}, {"role": "observation", "content": "42"}]
    nameless = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]
    with pytest.raises(LLMClientError, match="message 1: 'observation' message answers no tool call") as info:
        fast_client(server, max_concurrency=1).assistant_turns([MESSAGES, orphan, MESSAGES])
    assert info.value.batch_index == 1 and not info.value.retryable
    with pytest.raises(LLMClientError, match=r"message 0: tool_calls\[0\]: missing string field 'name'"):
        fast_client(server).assistant_turns([nameless])
    bad_arguments = [{"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}]
    with pytest.raises(LLMClientError, match=r"tool_calls\[0\]: field 'arguments' must be a JSON object"):
        fast_client(server).assistant_turns([bad_arguments])
    assert len(server.requests) == 2  # The convertible conversations of the first batch were sent.


def test_openai_messages_answer_calls_by_id_and_convert_glm4_native_calls(server):
    server.script(Behaviour.answer("ok"))
    conversation = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "function": {"name": "f", "arguments": {}}},
            {"id": "b", "function": {"name": "g", "arguments": {"x": 1}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "from g"},
        {"role": "tool", "content": "from f"},
        {"role": "assistant", "metadata": "python", "content": "```python\nprint(1)\n```"},
        {"role": "observation", "content": "1"},
    ]
    fast_client(server).assistant_turns([conversation])
    sent = server.requests[0].body["messages"]
    assert sent[2:4] == [{"role": "tool", "tool_call_id": "b", "content": "from g"},
                         {"role": "tool", "tool_call_id": "a", "content": "from f"}]
    assert sent[4:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_2", "type": "function", "function": {
            "name": "python", "arguments": '{"code": "print(1)"}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "1"},
    ]


def test_builtin_tool_specs_are_sent_as_functions(server):
    server.script(Behaviour.answer("ok"))
    python = {"type": "python", "function": {"name": "python", "description": "run", "parameters": {}}}
    fast_client(server).assistant_turns([MESSAGES], tools=[python])
    assert server.requests[0].body["tools"] == [{"type": "function", "function": python["function"]}]
    with pytest.raises(LLMClientError, match="tools\\[0\\]: a tool needs a function object"):
        fast_client(server).assistant_turns([MESSAGES], tools=[{"type": "cogview"}])
