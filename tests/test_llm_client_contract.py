"""One contract for every LLMClient, run against the local engine (LocalEngineClient) and against
the same engine served over HTTP (OpenAIHTTPClient on glmjax.inference.serving): ordered batches,
per-item seeds, per-item results, stop strings, token budgets, parsed tool calls; and the two give
the same greedy turns."""

import pytest
from chat_tokenizers import qwen_tokenizer
from serving_models import MODEL_NAME, scripted_engine, serving, tiny_engine

from glmjax.data.chat_format import chat_format_for
from glmjax.inference.llm_client import (
    AssistantTurn,
    LLMClientError,
    OpenAIHTTPClient,
    SamplingParams,
)
from glmjax.inference.local_client import LocalEngineClient

CLIENTS = ["local", "http"]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CONVERSATIONS = [
    USER,
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sunny?"}],
    USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "21 degrees"}],
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
HOT = SamplingParams(max_tokens=10, temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return qwen_tokenizer(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def engine(tokenizer):
    return tiny_engine(len(tokenizer))


@pytest.fixture(scope="module")
def base_url(engine, tokenizer):
    with serving(engine, tokenizer) as (_, background):
        yield background.base_url


def _client(kind, engine, tokenizer, base_url):
    if kind == "local":
        return LocalEngineClient(engine, tokenizer)
    return OpenAIHTTPClient(base_url, MODEL_NAME, timeout_s=120, max_retries=0, use_env_proxy=False)


@pytest.fixture(params=CLIENTS)
def client(request, engine, tokenizer, base_url):
    return _client(request.param, engine, tokenizer, base_url)


def test_batches_keep_their_order(client):
    texts = client.complete_batch(CONVERSATIONS, GREEDY)
    assert texts == [client.complete(conversation, GREEDY) for conversation in CONVERSATIONS]
    turns = client.assistant_turns(CONVERSATIONS, GREEDY)
    assert all(isinstance(turn, AssistantTurn) for turn in turns)
    assert [turn.reply.content for turn in turns] == texts
    assert client.assistant_turns([], GREEDY) == []


def test_item_i_samples_with_seed_plus_i(client):
    texts = client.complete_batch([USER] * 3, HOT)
    assert texts == client.complete_batch([USER] * 3, HOT)  # reproducible
    assert len(set(texts)) > 1  # copies of one conversation get different samples
    assert client.complete(USER, SamplingParams(max_tokens=10, temperature=1.0, seed=9)) == texts[2]
    unseeded = SamplingParams(max_tokens=10, temperature=1.0)
    assert client.complete(USER, unseeded) != client.complete(USER, unseeded)


def test_a_failed_item_carries_its_error_and_the_others_are_kept(client):
    broken = [{"content": "no role"}]
    with pytest.raises(LLMClientError, match="message 0: missing field 'role'") as info:
        client.assistant_turns([USER, broken, CONVERSATIONS[1]], GREEDY)
    error = info.value
    assert error.batch_index == 1 and error.results[1] is error
    assert [turn.reply for turn in (error.results[0], error.results[2])] == [
        turn.reply for turn in client.assistant_turns([USER, CONVERSATIONS[1]], GREEDY)]
    with pytest.raises(LLMClientError) as info:
        client.complete_batch([broken, USER], GREEDY)
    assert info.value.batch_index == 0 and info.value.results[1] == client.complete(USER, GREEDY)


def test_stop_strings_end_the_text(client):
    (full,) = client.assistant_turns([USER], SamplingParams(max_tokens=16, temperature=0.0))
    text = full.reply.content
    assert len(text) >= 6, text
    stop = text[3:5]
    (cut,) = client.assistant_turns([USER], SamplingParams(max_tokens=16, temperature=0.0, stop=(stop, "never")))
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"


def test_max_tokens_bounds_the_turn(client):
    (turn,) = client.assistant_turns([USER], SamplingParams(max_tokens=1, temperature=0.0))
    assert turn.finish_reason == "length" or turn.text == ""
    assert len(turn.tokens) <= 1


def test_both_clients_give_the_same_greedy_turns(engine, tokenizer, base_url):
    local, http = (_client(kind, engine, tokenizer, base_url) for kind in CLIENTS)
    for tools in (None, [WEATHER]):
        expected = local.assistant_turns(CONVERSATIONS, GREEDY, tools=tools)
        got = http.assistant_turns(CONVERSATIONS, GREEDY, tools=tools)
        assert [(t.reply.content, t.finish_reason) for t in got] == [(t.reply.content, t.finish_reason)
                                                                     for t in expected]


@pytest.mark.parametrize("kind", CLIENTS)
def test_tool_calls_are_parsed(kind, tokenizer, tmp_path_factory):
    prompt = chat_format_for(tokenizer).prompt_ids(USER, [WEATHER])
    call = tokenizer.encode('<tool_call>{"name": "get_weather"}</tool_call>', add_special_tokens=False)
    engine = scripted_engine(len(tokenizer), [prompt[-1], *call, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with serving(engine, tokenizer) as (_, background):
        (turn,) = _client(kind, engine, tokenizer, background.base_url).assistant_turns(
            [USER], SamplingParams(max_tokens=20, temperature=0.0), tools=[WEATHER])
    (parsed,) = turn.reply.tool_calls
    assert (parsed.name, parsed.arguments, turn.reply.content, turn.error) == ("get_weather", {}, "", None)
    follow_up = turn.reply.to_message()  # goes back into the conversation either way
    assert follow_up["tool_calls"][0]["function"]["name"] == "get_weather"


def test_token_usage_reaches_the_callers_meters(client, engine, tokenizer):
    """Every generation reports its prompt and completion tokens to the active meters (also from
    the HTTP client's worker threads); nested meters both count; the counts are the chat format's
    prompt ids and the generated ids, for both clients."""
    from glmjax.inference.llm_client import record_usage

    prompts = [len(chat_format_for(tokenizer).prompt_ids(c)) for c in CONVERSATIONS]
    generated = [len(turn.tokens) for turn in LocalEngineClient(engine, tokenizer).assistant_turns(
        CONVERSATIONS, GREEDY)]
    with record_usage() as outer:
        with record_usage() as inner:
            client.assistant_turns(CONVERSATIONS, GREEDY)
        client.complete(USER, GREEDY)
    assert inner.total.calls == 3 and inner.total.unreported == 0
    assert inner.total.prompt_tokens == sum(prompts)
    assert inner.total.completion_tokens == sum(generated) > 0
    assert outer.total.calls == 4 and outer.total.prompt_tokens == sum(prompts) + prompts[0]
