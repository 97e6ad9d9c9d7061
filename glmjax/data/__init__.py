"""Data: GLM-4 chat format, tokenizers, record sources, grain LM pipelines, and the synthetic task.

Modules:
  chat_format: chat formats from a tokenizer's chat template (prompts, training encodings with
    loss masks, content kept from becoming control tokens, tool-call parsing).
  templates: the published GLM-4 and Qwen2.5 chat templates, and our ChatML template.
  chat_template: GLM-4 special tokens and tokenizer-level shortcuts (encode_chat, stop_token_ids).
  tokenizer: load a local Hugging Face tokenizer, or build the embedded default one.
  sources: JSONL and array_record random-access sources.
  tfds_source: TFDS datasets (array_record file format) as random-access sources, without TF.
  encoders: record -> token ids and loss mask (+ declared per-token / per-example features).
  pipeline: shuffled, sharded, packed, checkpointable grain datasets of LM batches.
  spec: batch specs (dtype and logical axes per key, row groups).
  global_batch: per-host numpy batches -> global sharded ``jax.Array`` batches.
  synthetic: the default task (self-checking multi-step arithmetic) and its exact-match scorer.
"""

from glmjax.data.chat_format import (
    ChatEncoding,
    ChatFormat,
    ChatFormatError,
    Reply,
    ToolCall,
    chat_format_for,
    tool_message,
)
from glmjax.data.chat_template import (
    EOS,
    SPECIAL_TOKENS,
    STOP_TOKENS,
    encode_chat,
    render_messages,
    stop_token_ids,
)
from glmjax.data.encoders import (
    ChatEncoder,
    FeatureEncoder,
    RecordField,
    TextEncoder,
    TokenEncoder,
)
from glmjax.data.global_batch import make_global_batch
from glmjax.data.pipeline import (
    BATCH_KEYS,
    DEFAULT_OVERLONG,
    dropped_examples,
    lm_dataset,
    make_lm_dataset,
)
from glmjax.data.sources import (
    DataFormatError,
    EmptyDatasetError,
    JsonlSource,
    TokenRecordSource,
    write_token_records,
)
from glmjax.data.spec import BatchSpec, FeatureSpec, batch_spec_of, with_batch_spec
from glmjax.data.synthetic import (
    ArithmeticConfig,
    EvalPrompt,
    Problem,
    exact_match_accuracy,
    extract_answer,
    generate_problems,
    is_correct,
    load_eval_prompts,
    write_arithmetic_jsonl,
)
from glmjax.data.tfds_source import TfdsSource
from glmjax.data.tokenizer import (
    TokenizerError,
    build_default_tokenizer,
    default_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_OVERLONG",
    "EOS",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "ArithmeticConfig",
    "BatchSpec",
    "ChatEncoder",
    "ChatEncoding",
    "ChatFormat",
    "ChatFormatError",
    "DataFormatError",
    "EmptyDatasetError",
    "EvalPrompt",
    "FeatureEncoder",
    "FeatureSpec",
    "JsonlSource",
    "Problem",
    "RecordField",
    "Reply",
    "TextEncoder",
    "TfdsSource",
    "TokenEncoder",
    "TokenRecordSource",
    "TokenizerError",
    "ToolCall",
    "batch_spec_of",
    "build_default_tokenizer",
    "chat_format_for",
    "default_tokenizer",
    "dropped_examples",
    "encode_chat",
    "exact_match_accuracy",
    "extract_answer",
    "generate_problems",
    "is_correct",
    "load_eval_prompts",
    "lm_dataset",
    "load_tokenizer",
    "make_global_batch",
    "make_lm_dataset",
    "render_messages",
    "stop_token_ids",
    "tool_message",
    "write_arithmetic_jsonl",
    "with_batch_spec",
    "write_token_records",
]
