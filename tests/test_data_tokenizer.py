"""The embedded default tokenizer and loading tokenizers from local directories."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from glmjax.data.chat_template import SPECIAL_TOKENS
from glmjax.data.tokenizer import (
    TokenizerError,
    build_default_tokenizer,
    default_tokenizer,
    load_tokenizer,
    save_tokenizer,
)


def test_build_is_deterministic(tmp_path):
    first = build_default_tokenizer(tmp_path / "a")
    second = build_default_tokenizer(tmp_path / "b")
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_default_tokenizer_tokens(tmp_path):
    tok = default_tokenizer(tmp_path)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == 0
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    digits = tok.encode("31415", add_special_tokens=False)
    assert [tok.decode([d]) for d in digits] == list("31415")
    assert len(tok) < 512


def test_any_text_round_trips(tmp_path):
    tok = default_tokenizer(tmp_path)
    text = "Grüße, 世界! Step 1: 12*3=36.\n\ttabs  and  spaces <|user|> inside"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_cache_is_built_once(tmp_path):
    default_tokenizer(tmp_path)
    (cached,) = [p for p in tmp_path.iterdir()]
    stamp = (cached / "tokenizer.json").stat().st_mtime_ns
    tok = default_tokenizer(tmp_path)
    assert (cached / "tokenizer.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]
    assert tok.convert_tokens_to_ids("<|assistant|>") is not None


def test_load_missing_directory_names_it(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")


def test_any_tokenizer_loads_and_pads_with_its_eos(tmp_path):
    """A tokenizer without the GLM-4 tokens (Qwen's, say) loads; the chat format decides later
    whether it can render chats."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_special_tokens(["<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>").save_pretrained(str(tmp_path / "t"))
    tokenizer = load_tokenizer(tmp_path / "t")
    assert tokenizer.pad_token == "<|im_end|>"
    save_tokenizer(tokenizer, tmp_path / "copy" / "tokenizer")
    again = load_tokenizer(tmp_path / "copy" / "tokenizer")
    assert again.convert_tokens_to_ids("<|im_end|>") == tokenizer.convert_tokens_to_ids("<|im_end|>")
