"""Record encoders: one data record in, ``{"input_ids", "loss_mask"}`` (int32 ``[n]`` each) out.

* :class:`TextEncoder`: ``{"text": str}`` -> ``[gMASK] <sop> text <|endoftext|>`` for tokenizers with
  the GLM-4 special tokens, else ``{bos} text {eos}`` (Qwen: ``text <|endoftext|>``); loss on every token.
* :class:`ChatEncoder`: ``{"messages": [...], "tools": [...]?}`` -> the tokenizer's chat format
  (:func:`glmjax.data.chat_format.chat_format_for`: its chat template, else the GLM-4 or ChatML
  layout), loss on the tokens of assistant turns and the token that ends each one only
  (:meth:`glmjax.data.chat_format.ChatFormat.encode`).
* :class:`TokenEncoder`: ``{"input_ids": int32 [n]}`` (a :class:`~glmjax.data.sources.TokenRecordSource`
  record) -> the same ids, loss on every token.
* :class:`FeatureEncoder`: any of those plus record fields copied into the example as numpy arrays
  of a declared dtype and shape (:class:`RecordField`): per-token features (e.g. stored top-k
  teacher logits, ``[n, K]``) and per-example features (e.g. a reference log-prob or a reward).

``required_fields`` names the record keys an encoder reads, so a source can check them and report
the file and line of a record that lacks one. An encoder may declare ``token_features`` and
``example_features`` (name -> :class:`RecordField`); :func:`glmjax.data.pipeline.lm_dataset` carries
those example keys into its batches.

Per-token alignment: a per-token feature of an example of ``n`` tokens has ``n`` entries (or
``n - 1``: the unused last one left out, it becomes 0); entry ``i`` belongs to the prediction made
at input position ``i``, i.e. of token ``i + 1``, so it lines up with ``targets[i]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from glmjax.data.chat_format import chat_format_for
from glmjax.data.chat_template import EOS, GMASK, SOP

Example = dict[str, np.ndarray]


def settle_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Encodes once so the tokenizer drops any truncation/padding settings from tokenizer.json now.

    The first ``encode`` call mutates the Rust tokenizer when such settings exist; doing it here,
    before grain's reader threads share the tokenizer, keeps their calls read-only.
    """
    tokenizer.encode("", add_special_tokens=False)


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        return None
    return token_id


def document_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """(ids before a document, the id after it): GLM-4's ``[gMASK]<sop>`` ... ``<|endoftext|>``
    when the tokenizer has those tokens, else its own bos (if any) ... eos.

    Raises:
      ValueError: the tokenizer has neither the GLM-4 tokens nor an eos token.
    """
    glm = [_single_token_id(tokenizer, token) for token in (GMASK, SOP, EOS)]
    if None not in glm:
        return glm[:2], glm[2]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (nor GLM-4's <|endoftext|>) to end documents with")
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return prefix, tokenizer.eos_token_id


class TextEncoder:
    """Plain text documents; ``field`` holds the text (affixes: ``document_affixes``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, field: str = "text"):
        self.tokenizer = tokenizer
        self.field = field
        self.required_fields = (field,)
        settle_tokenizer(tokenizer)
        self._prefix, self._eos = document_affixes(tokenizer)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        text = record[self.field]
        if not isinstance(text, str):
            raise ValueError(f"field {self.field!r} must be a string, got {type(text).__name__}")
        ids = [*self._prefix, *self.tokenizer.encode(text, add_special_tokens=False), self._eos]
        return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.ones(len(ids), np.int32)}


class ChatEncoder:
    """Chat conversations; ``field`` holds the messages, optional ``tools_field`` the tool specs.

    Raises (at construction):
      ChatFormatError: the tokenizer has no chat format (no template, no GLM-4 or ChatML tokens).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        field: str = "messages",
        tools_field: str = "tools",
    ):
        self.tokenizer = tokenizer
        self.field = field
        self.tools_field = tools_field
        self.required_fields = (field,)
        settle_tokenizer(tokenizer)
        self.chat_format = chat_format_for(tokenizer)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        encoding = self.chat_format.encode(record[self.field], record.get(self.tools_field))
        return {"input_ids": encoding.input_ids, "loss_mask": encoding.loss_mask}


class TokenEncoder:
    """Pre-tokenized records; ``field`` (default ``"input_ids"``) holds int ``[n]``; every token
    is a target."""

    def __init__(self, field: str = "input_ids"):
        self.field = field
        self.required_fields = (field,)

    def __call__(self, record: Mapping[str, Any]) -> Example:
        ids = np.asarray(record[self.field], dtype=np.int32)
        if ids.ndim != 1:
            raise ValueError(
                f"field {self.field!r} must be a 1-D list of token ids, got shape "
                f"{list(ids.shape)}")
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), np.int32)}


@dataclasses.dataclass(frozen=True)
class RecordField:
    """A record field carried into the batches as a feature.

    Attributes:
      dtype: numpy dtype name of the feature ("int32", "float32", ...).
      shape: for a per-token feature, the shape of one token's value (``()``: a scalar per token,
        ``(K,)``: top-k values); for a per-example feature, the shape of the whole value.
      field: the record key holding the value; default the feature's name.
    """

    dtype: str
    shape: tuple[int, ...] = ()
    field: str | None = None

    def __post_init__(self) -> None:
        if np.dtype(self.dtype).kind not in "biuf":
            raise ValueError(f"RecordField dtype must be numeric, got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    def key(self, name: str) -> str:
        """The record key of the feature called ``name``."""
        return self.field or name


def _as_array(what: str, value: Any, spec: RecordField) -> np.ndarray:
    """``value`` as a numpy array of ``spec.dtype``; refuses lossy casts (floats to ints, ints out
    of range)."""
    try:
        array = np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"{what}: not a rectangular array ({err})") from err
    target = np.dtype(spec.dtype)
    if array.size and not np.can_cast(array.dtype, target, casting="same_kind"):
        raise ValueError(f"{what}: {array.dtype} values cannot be stored as {target}")
    if array.size and target.kind in "iu" and array.dtype.kind in "iu":
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"{what}: values do not fit in {target}")
    return array.astype(target, copy=False)


def _token_feature(name: str, value: Any, spec: RecordField, n: int) -> np.ndarray:
    """A per-token feature as ``[n, *spec.shape]``, the unused last entry 0 when it was left out."""
    what = f"token feature {name!r}"
    array = _as_array(what, value, spec)
    if array.ndim < 1 or array.shape[1:] != spec.shape or array.shape[0] not in (n, n - 1):
        expected = ", ".join([f"{n} or {n - 1}", *map(str, spec.shape)])
        raise ValueError(
            f"{what} has shape {list(array.shape)}; expected [{expected}] for an example of "
            f"{n} tokens")
    if array.shape[0] == n:
        return array
    return np.concatenate([array, np.zeros((1, *spec.shape), array.dtype)])


def _example_feature(name: str, value: Any, spec: RecordField) -> np.ndarray:
    what = f"example feature {name!r}"
    array = _as_array(what, value, spec)
    if array.shape != spec.shape:
        raise ValueError(f"{what} has shape {list(array.shape)}; expected {list(spec.shape)}")
    return array


class FeatureEncoder:
    """``encoder``'s examples plus declared record fields as numpy arrays.

    Args:
      encoder: record -> ``{"input_ids", "loss_mask"}`` (any encoder of this module).
      token_features: name -> field with ``n`` or ``n - 1`` entries of ``spec.shape`` for an
        example of ``n`` tokens (see the module docstring for the alignment); example key
        ``[n, *shape]``.
      example_features: name -> field of exactly ``spec.shape``; example key ``shape``.

    A value of the wrong shape or dtype raises ``ValueError`` naming the feature (the pipeline
    adds the record's file and line).
    """

    def __init__(
        self,
        encoder: Callable[[Mapping[str, Any]], Example],
        token_features: Mapping[str, RecordField] | None = None,
        example_features: Mapping[str, RecordField] | None = None,
    ):
        self.encoder = encoder
        self.token_features = dict(token_features or {})
        self.example_features = dict(example_features or {})
        both = sorted(set(self.token_features) & set(self.example_features))
        if both:
            raise ValueError(f"features declared both per token and per example: {both}")
        declared = {**self.token_features, **self.example_features}
        fields = [spec.key(name) for name, spec in declared.items()]
        base_fields = getattr(encoder, "required_fields", ())
        self.required_fields = tuple(dict.fromkeys([*base_fields, *fields]))

    def __call__(self, record: Mapping[str, Any]) -> Example:
        example = dict(self.encoder(record))
        n = len(example["input_ids"])
        for name, spec in self.token_features.items():
            example[name] = _token_feature(name, record[spec.key(name)], spec, n)
        for name, spec in self.example_features.items():
            example[name] = _example_feature(name, record[spec.key(name)], spec)
        return example
