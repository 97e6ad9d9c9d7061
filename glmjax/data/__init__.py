"""Data: GLM-4 chat format, tokenizers, record sources, grain LM pipelines, and the synthetic task.

Modules:
  chat_template: render / tokenize GLM-4 conversations, parse model replies.
  tokenizer: load a local Hugging Face tokenizer, or build the embedded default one.
  sources: JSONL and array_record random-access sources.
  encoders: record -> token ids and loss mask.
  pipeline: shuffled, sharded, packed, checkpointable grain datasets of LM batches.
  global_batch: per-host numpy batches -> global sharded ``jax.Array`` batches.
  synthetic: the default task (self-checking multi-step arithmetic) and its exact-match scorer.
"""

from glmjax.data.chat_template import (
    EOS,
    SPECIAL_TOKENS,
    STOP_TOKENS,
    ChatEncoding,
    ChatFormatError,
    encode_chat,
    parse_assistant_output,
    render_messages,
    stop_token_ids,
)
from glmjax.data.encoders import ChatEncoder, TextEncoder, TokenEncoder
from glmjax.data.global_batch import make_global_batch
from glmjax.data.pipeline import BATCH_KEYS, lm_dataset, make_lm_dataset
from glmjax.data.sources import (
    DataFormatError,
    EmptyDatasetError,
    JsonlSource,
    TokenRecordSource,
    write_token_records,
)
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
from glmjax.data.tokenizer import (
    TokenizerError,
    build_default_tokenizer,
    default_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "EOS",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "ArithmeticConfig",
    "ChatEncoder",
    "ChatEncoding",
    "ChatFormatError",
    "DataFormatError",
    "EmptyDatasetError",
    "EvalPrompt",
    "JsonlSource",
    "Problem",
    "TextEncoder",
    "TokenEncoder",
    "TokenRecordSource",
    "TokenizerError",
    "build_default_tokenizer",
    "default_tokenizer",
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
    "parse_assistant_output",
    "render_messages",
    "stop_token_ids",
    "write_arithmetic_jsonl",
    "write_token_records",
]
