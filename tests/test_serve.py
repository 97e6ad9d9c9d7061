"""The OpenAI-compatible server (glmjax.inference.serving) driven by the official ``openai`` client:
models, completions, chat (plain, tool calls both ways), n, seeds, stop, max_tokens, logprobs,
streaming, errors, concurrent clients."""

import concurrent.futures
import json
import urllib.error
import urllib.request

import openai
import pytest
from chat_tokenizers import glm4_tokenizer, qwen_tokenizer
from serving_models import MODEL_NAME, scripted_engine, serving, tiny_engine

from glmjax.data.chat_format import chat_format_for
from glmjax.inference.llm_client import OpenAIHTTPClient, SamplingParams
from glmjax.inference.sampling import SamplingConfig

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return qwen_tokenizer(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def engine(tokenizer):
    return tiny_engine(len(tokenizer))


@pytest.fixture(scope="module")
def server(engine, tokenizer):
    with serving(engine, tokenizer, max_slots=4, max_waiting=64) as (served, background):
        yield served, background


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1].base_url, api_key="unused", max_retries=0, timeout=120)


def _chat(client, **kwargs):
    return client.chat.completions.create(**{"model": MODEL_NAME, "messages": USER, "max_tokens": 8, **kwargs})


def _raw(server, path, body=None, method=None):
    """(status, JSON body) of a request sent without the openai client."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(server[1].base_url.removesuffix("/v1") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_health(client, server):
    (model,) = client.models.list().data
    assert model.id == MODEL_NAME and model.owned_by == "glmjax"
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    status, health = _raw(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["slots"] == 4


def test_chat_completion_is_the_engines_greedy_turn(client, engine, tokenizer):
    reply = _chat(client, temperature=0)
    (choice,) = reply.choices
    chat_format = chat_format_for(tokenizer)
    prompt = chat_format.prompt_ids(USER)
    (want,) = engine.generate([prompt], SamplingConfig(), max_new_tokens=8, stop_token_ids=chat_format.stop_token_ids)
    body = want.tokens[:-1] if want.finish_reason == "stop" else want.tokens
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.message.content == chat_format.parse_reply(tokenizer.decode(body, skip_special_tokens=False)).content
    assert choice.finish_reason == want.finish_reason
    assert reply.object == "chat.completion" and reply.model == MODEL_NAME
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(want.tokens))


def test_completions_prompts_n_and_token_ids(client, engine, tokenizer):
    prompt_ids = tokenizer.encode("Paris")
    reply = client.completions.create(model=MODEL_NAME, prompt=["Paris", "sunny"], max_tokens=6, n=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    (want,) = engine.generate([prompt_ids], max_new_tokens=6)
    text = tokenizer.decode(want.tokens, skip_special_tokens=False)
    assert [c.text for c in reply.choices[:2]] == [text, text]  # n greedy samples of one prefill
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 24
    by_ids = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == text and by_ids.usage.prompt_tokens == len(prompt_ids)


def test_seeds_make_samples_reproducible_and_distinct(client):
    kwargs = dict(model=MODEL_NAME, prompt="Paris", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    first = [c.text for c in client.completions.create(n=3, seed=5, **kwargs).choices]
    assert first == [c.text for c in client.completions.create(n=3, seed=5, **kwargs).choices]
    assert len(set(first)) > 1
    # Choice j samples with seed + j.
    assert client.completions.create(n=1, seed=6, **kwargs).choices[0].text == first[1]


def test_stop_and_max_tokens(client):
    kwargs = dict(model=MODEL_NAME, prompt="Paris", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=16, **kwargs).choices[0]
    assert full.finish_reason == "length"
    stop = full.text[4:7]
    cut = client.completions.create(max_tokens=16, stop=[stop, "never"], **kwargs).choices[0]
    assert (cut.text, cut.finish_reason) == (full.text[: full.text.find(stop)], "stop")
    short = client.completions.create(max_tokens=3, **kwargs)
    assert short.usage.completion_tokens == 3 and full.text.startswith(short.choices[0].text)


def test_logprobs(client, engine, tokenizer):
    reply = _chat(client, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 8
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    prompt = chat_format_for(tokenizer).prompt_ids(USER)
    (want,) = engine.generate([prompt], max_new_tokens=8, logprob_mode="raw")
    assert [e.logprob for e in entries] == pytest.approx(want.logprobs, abs=1e-4)
    completion = client.completions.create(model=MODEL_NAME, prompt="Paris", max_tokens=4, temperature=0,
                                           logprobs=2, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(completion.tokens) == len(completion.token_logprobs) == len(completion.top_logprobs) == 4
    assert "".join(completion.tokens) == client.completions.create(
        model=MODEL_NAME, prompt="Paris", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert completion.text_offset[0] == 0 and all(len(top) == 2 for top in completion.top_logprobs)
    assert _chat(client, temperature=0).choices[0].logprobs is None


def test_streaming_equals_the_whole_reply(client):
    whole = _chat(client, temperature=0, max_tokens=12)
    chunks = list(_chat(client, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    kwargs = dict(model=MODEL_NAME, prompt="Paris", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[6:9]
    streamed = list(client.completions.create(stream=True, stop=stop, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_errors_are_openai_style(client, server):
    with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist"):
        _chat(client, model="nope")
    cases = [
        (dict(temperature=3.0), "temperature", "temperature: Input should be less than or equal to 2"),
        (dict(frequency_penalty=0.5), "frequency_penalty", "frequency_penalty is not supported"),
        (dict(n=9), "n", "n must be at most 4"),
        (dict(max_tokens=5000), "max_tokens", "exceed this model's context of 1024 tokens"),
        (dict(tool_choice="required", tools=[WEATHER]), "tool_choice", "tool_choice must be 'auto' or 'none'"),
        (dict(messages=[{"content": "no role"}]), "messages", "message 0: missing field 'role'"),
        (dict(top_logprobs=2), "top_logprobs", "top_logprobs needs logprobs=true"),
    ]
    for kwargs, param, message in cases:
        with pytest.raises(openai.BadRequestError, match=message) as info:
            _chat(client, **kwargs)
        assert info.value.status_code == 400 and info.value.body["param"] == param
        assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, messages=[{"role": "user", "content": "x" * 5000}])
    assert info.value.body["code"] == "context_length_exceeded"
    assert _raw(server, "/v1/chat/completions", b"{not json")[0] == 400
    assert _raw(server, "/v1/nothing-here", {})[0] == 404
    status, body = _raw(server, "/v1/completions", method="GET")
    assert status == 405 and set(body["error"]) == {"message", "type", "param", "code"}


def test_concurrent_clients_get_what_they_would_get_alone(client):
    def ask(index):
        return client.completions.create(model=MODEL_NAME, prompt=f"city {index}", max_tokens=4 + index, seed=index,
                                         temperature=0.8, extra_body={"ignore_eos": True}).choices[0].text

    alone = [ask(index) for index in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone


def test_our_http_client_works_against_the_server(server):
    http = OpenAIHTTPClient(server[1].base_url, MODEL_NAME, timeout_s=60, use_env_proxy=False)
    texts = http.complete_batch([USER, USER], SamplingParams(max_tokens=6, temperature=1.0, top_k=20, min_p=0.01,
                                                             seed=1))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.fixture(scope="module")
def qwen_tool_server(tokenizer):
    """A model that, by construction, answers any prompt with a <tool_call> for get_weather."""
    fmt = chat_format_for(tokenizer)
    prompt = fmt.prompt_ids(USER, [WEATHER])
    call = tokenizer.encode('<tool_call>{"name": "get_weather"}</tool_call>', add_special_tokens=False)
    engine = scripted_engine(len(tokenizer), [prompt[-1], *call, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with serving(engine, tokenizer) as (_, background):
        yield openai.OpenAI(base_url=background.base_url, api_key="unused", max_retries=0), background


def test_tool_calls_come_back_as_openai_tool_calls(qwen_tool_server):
    client, background = qwen_tool_server
    (choice,) = _chat(client, tools=[WEATHER], temperature=0, max_tokens=20).choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", "{}")
    assert call.id.startswith("call_")
    chunks = list(_chat(client, tools=[WEATHER], temperature=0, max_tokens=20, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    (streamed,) = [call for delta in deltas for call in delta.tool_calls or []]
    assert (streamed.index, streamed.function.name, streamed.function.arguments) == (0, "get_weather", "{}")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Without tools offered the same output is text; our client parses tool calls the same way.
    assert _chat(client, temperature=0, max_tokens=20).choices[0].message.content.startswith("<tool_call>")
    (turn,) = OpenAIHTTPClient(background.base_url, MODEL_NAME, use_env_proxy=False).assistant_turns(
        [USER], SamplingParams(max_tokens=20, temperature=0), tools=[WEATHER])
    (parsed,) = turn.reply.tool_calls
    assert (parsed.name, parsed.arguments, turn.finish_reason) == ("get_weather", {}, "stop")
    assert parsed.id.startswith("call_") and turn.reply.content == ""


def test_glm4_tool_calls_both_ways(tmp_path_factory):
    """GLM-4: OpenAI tool_calls in the history are rendered the GLM-4 way (the prompt the server
    counts is the chat format's), and a GLM-4 call in the output comes back as tool_calls."""
    tokenizer = glm4_tokenizer(tmp_path_factory.mktemp("glm4"))
    fmt = chat_format_for(tokenizer)
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    prompt = fmt.prompt_ids(history, [WEATHER])
    call = tokenizer.encode("weather\n{}", add_special_tokens=False)
    engine = scripted_engine(len(tokenizer), [prompt[-1], *call, tokenizer.convert_tokens_to_ids("<|observation|>")])
    with serving(engine, tokenizer) as (_, background):
        client = openai.OpenAI(base_url=background.base_url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=[WEATHER], temperature=0,
                                               max_tokens=20)
    assert reply.usage.prompt_tokens == len(prompt)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("weather", {})]
