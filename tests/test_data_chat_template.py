"""GLM-4 chat format: rendering, token ids with loss mask, reply parsing."""

import json

import numpy as np
import pytest

from glmjax.data.chat_template import (
    ChatFormatError,
    encode_chat,
    parse_assistant_output,
    render_messages,
    stop_token_ids,
)
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_default_tokenizer(tmp_path_factory.mktemp("tok")))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]


def test_render_simple_conversation():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    expected = (
        "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nHi<|assistant|>\nHello!"
        "<|user|>\n2+2?<|assistant|>"
    )
    assert render_messages(messages, add_generation_prompt=True) == expected
    assert render_messages(messages) == expected[: -len("<|assistant|>")]


def test_render_tools_tool_call_and_observation():
    spec = json.dumps(WEATHER_TOOL["function"], indent=4)
    expected = (
        "[gMASK]<sop><|system|>\nBe brief.\n\n# Available tools\n\n## get_weather\n\n"
        + spec
        + "\n\nTo call a tool, reply with its name on the first line and its arguments as a JSON "
        "object on the next line."
        '<|user|>\nWeather in Paris?<|assistant|>get_weather\n{"city": "Paris"}'
        '<|observation|>\n{"temp": 21}<|assistant|>\nIt is 21 degrees.'
    )
    assert render_messages(TOOL_CONVERSATION, tools=[WEATHER_TOOL]) == expected


def test_tools_without_system_message_get_their_own_system_turn():
    text = render_messages([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL["function"]])
    assert text.startswith("[gMASK]<sop><|system|>\n# Available tools\n\n## get_weather\n\n")
    assert text.endswith("<|user|>\nx")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "bot", "content": "x"}], "message 0: role 'bot'"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], "message 1: field 'content'"),
        ([{"content": "x"}], "message 0: missing field 'role'"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                }
            ],
            r"message 0: tool_calls\[0\]: field 'arguments' is not valid JSON",
        ),
        ([], "non-empty list"),
    ],
)
def test_render_rejects_bad_messages(messages, match):
    with pytest.raises(ChatFormatError, match=match):
        render_messages(messages)


def test_encode_matches_tokenized_rendering(tokenizer):
    encoding = encode_chat(tokenizer, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    rendered = render_messages(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    expected = tokenizer.encode(rendered, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert encoding.input_ids.tolist() == expected
    assert encoding.input_ids.dtype == np.int32 and encoding.loss_mask.dtype == np.int32
    assert encoding.loss_mask.shape == encoding.input_ids.shape

    prompt = encode_chat(tokenizer, TOOL_CONVERSATION[:2], add_generation_prompt=True)
    assert prompt.input_ids.tolist() == tokenizer.encode(
        render_messages(TOOL_CONVERSATION[:2], add_generation_prompt=True), add_special_tokens=False
    )
    assert not prompt.loss_mask.any()


def _masked_spans(tokenizer, encoding):
    """Decoded runs of consecutive loss-masked tokens."""
    spans, current = [], []
    for token, m in zip(encoding.input_ids.tolist(), encoding.loss_mask.tolist()):
        if m:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_loss_mask_covers_assistant_turns_and_their_end_token(tokenizer):
    encoding = encode_chat(tokenizer, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert _masked_spans(tokenizer, encoding) == [
        'get_weather\n{"city": "Paris"}<|observation|>',
        "\nIt is 21 degrees.<|endoftext|>",
    ]
    multi_turn = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    encoding = encode_chat(tokenizer, multi_turn, append_eos=False)
    assert _masked_spans(tokenizer, encoding) == ["\nb<|user|>", "\nd"]


def test_parse_reply_and_tool_call_round_trip():
    reply = render_messages([{"role": "assistant", "content": "Answer: 42 "}])
    assert parse_assistant_output(reply.split("<|assistant|>")[-1]) == {"content": "Answer: 42 "}
    call = {"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2]}}
    text = render_messages([{"role": "assistant", "tool_calls": [call]}])
    parsed = parse_assistant_output(text.split("<|assistant|>")[-1] + "<|observation|>junk")
    assert parsed == {"tool_call": "get_weather", "arguments": call["arguments"]}


def test_stop_token_ids(tokenizer):
    ids = stop_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|user|>", "<|observation|>", "<|endoftext|>"]


def test_parse_stops_at_stop_tokens():
    assert parse_assistant_output("\nhi<|user|>\nmore") == {"content": "hi"}
    assert parse_assistant_output("\nhi<|endoftext|>") == {"content": "hi"}


@pytest.mark.parametrize(
    "text, match",
    [
        ("get_weather\n{city: Paris}", "tool call 'get_weather': arguments are not valid JSON"),
        ("get_weather\n[1, 2]", "must be a JSON object"),
        ("no newline at all", "neither a reply"),
    ],
)
def test_parse_rejects_bad_output(text, match):
    with pytest.raises(ChatFormatError, match=match):
        parse_assistant_output(text)
