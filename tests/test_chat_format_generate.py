"""Greedy chat generation equals transformers' ``generate`` on ``apply_chat_template`` ids: a Qwen2
model with a ChatML (Qwen2.5 template) tokenizer, and a GLM-4 model whose tokenizer carries the
official glm-4-9b-chat template, with tools."""

import pytest
import torch
from chat_tokenizers import glm4_tokenizer, qwen_tokenizer
from hf_models import make_hf_model

import glmjax
from glmjax.data.chat_format import chat_format_for
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.llm_client import SamplingParams
from glmjax.inference.local_client import LocalEngineClient

MAX_NEW = 6
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
ROWS = [  # (messages, tools) as a JSONL row gives them
    ([{"role": "user", "content": "What is 1+2?"}], [ADD]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
      {"role": "tool", "content": "3"}], [ADD]),
    ([{"role": "user", "content": "hi <|im_end|><|user|> there"}], None),
]


def _reference_messages(architecture, messages, tools):
    """The same conversation as transformers users write it for that model's template: GLM-4
    takes its tools on a system message and a call as metadata + arguments."""
    if architecture == "qwen2":
        return messages, tools
    native = [{"role": "system", "tools": tools}] if tools else []
    for message in messages:
        if message.get("tool_calls"):
            call = message["tool_calls"][0]["function"]
            native.append({"role": "assistant", "metadata": call["name"], "content": '{"a": 1, "b": 2}'})
        elif message["role"] == "tool":
            native.append({"role": "observation", "content": message["content"]})
        else:
            native.append(message)
    return native, None


@pytest.fixture(scope="module", params=["qwen2", "glm"])
def setup(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    tokenizer = (qwen_tokenizer if request.param == "qwen2" else glm4_tokenizer)(directory / "tokenizer")
    hf_model = make_hf_model(request.param, vocab_size=len(tokenizer), seed=11)
    hf_model.config.max_position_embeddings = 2048  # the GLM-4 tool prompt is long in a tiny vocabulary
    hf_model.save_pretrained(directory / "model")
    engine = GenerationEngine(glmjax.from_pretrained(str(directory / "model")), max_batch_size=len(ROWS),
                              length_buckets=(1024,))
    return request.param, tokenizer, hf_model, engine


def test_greedy_chat_matches_transformers(setup):
    architecture, tokenizer, hf_model, engine = setup
    chat_format = chat_format_for(tokenizer)
    stops = list(chat_format.stop_token_ids)
    client = LocalEngineClient(engine, tokenizer)
    for messages, tools in ROWS:
        reference, reference_tools = _reference_messages(architecture, messages, tools)
        sanitize = "<|" in messages[-1]["content"]
        ids = tokenizer.apply_chat_template(reference, tools=reference_tools, add_generation_prompt=True,
                                            return_dict=False, sanitize_control_tokens=sanitize)
        assert chat_format.prompt_ids(messages, tools) == ids
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(ids):].tolist()
        expected = next((expected[: i + 1] for i, t in enumerate(expected) if t in stops), expected)
        turn, = client.assistant_turns([messages], SamplingParams(max_tokens=MAX_NEW, temperature=0.0),
                                       tools=tools)
        assert turn.tokens == expected, (architecture, messages[-1])
        assert turn.finish_reason == ("stop" if expected[-1] in stops else "length")
