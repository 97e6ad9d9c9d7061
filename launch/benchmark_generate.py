r"""Decode throughput and time to first token: glmjax ``GenerationEngine`` vs transformers ``generate``.

  python -m launch.benchmark_generate --output=/tmp/generate_bench.json

Builds one random transformers model (default: GLM, hidden 512, 4 layers, fp32), saves it, loads
the same weights with ``glmjax.from_pretrained``, checks that both greedy-decode the same tokens,
then times both on identical prompts at each batch size, exactly ``--new_tokens`` tokens (no
early stop), greedy or sampled (``--temperature``, ``--top_p``), interleaving the two
implementations and repeating:

* time to first token (TTFT): wall time of a call that generates one token (prefill + 1 token);
* decode tokens/s: ``batch * (new_tokens - 1) / (t_full - t_ttft)`` from the same repetition;
* end-to-end tokens/s: ``batch * new_tokens / t_full``.

Compilation and PyTorch warm-up happen before timing. The JSON reports medians, min and max,
the ours/transformers ratios of the medians, and the machine load (``os.getloadavg``) around
every measurement, since other processes on the host distort CPU timings.

``--stop_check_every=N`` also times glmjax's stop-string path (``glmjax_stop_strings``: a stop
string that never occurs, host checks every N steps, ids joined as text standing in for a
tokenizer) in the same interleaved runs, to show its cost over the one-program default.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers
from absl import app, flags

import glmjax
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.sampling import SamplingConfig

_ARCHITECTURE = flags.DEFINE_enum("architecture", "glm", ["glm", "glm4", "qwen2"], "Model family.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 1536, "MLP size.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Generated tokens per row.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per batch size and implementation.")
_STOP_CHECK_EVERY = flags.DEFINE_integer(
    "stop_check_every", 0, "Also time the stop-string path with host checks every N steps (0: off).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: its default).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON report here (also printed).")


def _hf_model() -> transformers.PreTrainedModel:
    common = dict(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_INTERMEDIATE.value,
        num_hidden_layers=_LAYERS.value, num_attention_heads=_HEADS.value,
        num_key_value_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value,
        max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    config_cls, model_cls = {
        "glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
        "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[_ARCHITECTURE.value]
    torch.manual_seed(0)
    return model_cls(config_cls(**common)).float().eval()


def _timed(fn: Callable[[], object]) -> dict[str, float]:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - start, "load_before": load}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _bench_batch(engine: GenerationEngine, hf_model, batch: int) -> dict:
    new = _NEW_TOKENS.value
    prompts = np.random.default_rng(batch).integers(2, _VOCAB.value, size=(batch, _PROMPT_LEN.value))
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    sampling = SamplingConfig(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
    peer_sampling = (dict(do_sample=False) if sampling.greedy else
                     dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0))

    def ours(n: int) -> Callable[[], object]:
        return lambda: engine.generate(prompts.tolist(), sampling, max_new_tokens=n)

    def ours_stop_strings(n: int) -> Callable[[], object]:
        return lambda: engine.generate(prompts.tolist(), sampling, max_new_tokens=n,
                                       stop_strings=["never in the text"], detokenize=_ids_text,
                                       stop_check_every=_STOP_CHECK_EVERY.value)

    def peer(n: int) -> Callable[[], object]:
        def run():
            with torch.inference_mode():
                hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=0, **peer_sampling)
        return run

    implementations = [("glmjax", ours), ("transformers", peer)]
    if _STOP_CHECK_EVERY.value:
        implementations.append(("glmjax_stop_strings", ours_stop_strings))
    for _, make in implementations:  # compile / warm up
        make(1)()
        make(new)()
    runs: dict[str, list[dict]] = {name: [] for name, _ in implementations}
    for _ in range(_REPEATS.value):
        for name, make in implementations:
            first = _timed(make(1))
            full = _timed(make(new))
            runs[name].append({"ttft_s": first["seconds"], "full_s": full["seconds"],
                               "load": [first["load_before"], full["load_before"]]})
    report = {}
    for name, rows in runs.items():
        decode = [batch * (new - 1) / (r["full_s"] - r["ttft_s"]) for r in rows]
        report[name] = {
            "ttft_s": _summary([r["ttft_s"] for r in rows]),
            "decode_tokens_per_s": _summary(decode),
            "end_to_end_tokens_per_s": _summary([batch * new / r["full_s"] for r in rows]),
            "runs": rows,
        }
    ours_med, peer_med = report["glmjax"], report["transformers"]
    report["decode_speedup"] = (ours_med["decode_tokens_per_s"]["median"]
                                / peer_med["decode_tokens_per_s"]["median"])
    report["ttft_speedup"] = peer_med["ttft_s"]["median"] / ours_med["ttft_s"]["median"]
    return report


def _ids_text(tokens: list[int]) -> str:
    return " ".join(map(str, tokens))


def _greedy_match(engine: GenerationEngine, hf_model) -> bool:
    prompt = np.random.default_rng(0).integers(2, _VOCAB.value, size=(1, _PROMPT_LEN.value))
    with torch.inference_mode():
        expected = hf_model.generate(torch.tensor(prompt), max_new_tokens=_NEW_TOKENS.value,
                                     min_new_tokens=_NEW_TOKENS.value, do_sample=False,
                                     pad_token_id=0)[0, _PROMPT_LEN.value:].tolist()
    return engine.generate(prompt.tolist(), max_new_tokens=_NEW_TOKENS.value)[0].tokens == expected


def main(argv: list[str]) -> None:
    del argv
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    hf_model = _hf_model()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = glmjax.from_pretrained(directory)
    engine = GenerationEngine(model, max_batch_size=max(batch_sizes))
    report = {
        "model": {"architecture": _ARCHITECTURE.value, "hidden": _HIDDEN.value, "layers": _LAYERS.value,
                  "heads": _HEADS.value, "kv_heads": _KV_HEADS.value, "head_dim": _HEAD_DIM.value,
                  "intermediate": _INTERMEDIATE.value, "vocab": _VOCAB.value, "dtype": "float32",
                  "parameters": sum(p.numel() for p in hf_model.parameters())},
        "workload": {"prompt_len": _PROMPT_LEN.value, "new_tokens": _NEW_TOKENS.value,
                     "repeats": _REPEATS.value, "no_early_stop": True,
                     "stop_check_every": _STOP_CHECK_EVERY.value or None,
                     "decoding": ("greedy" if _TEMPERATURE.value == 0 else
                                  f"sampled, temperature {_TEMPERATURE.value}, top_p {_TOP_P.value}")},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "jax_devices": [str(d) for d in jax.devices()], "platform": platform.platform(),
                    "versions": {"jax": jax.__version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__},
                    "load_at_start": os.getloadavg()},
        "greedy_tokens_match": _greedy_match(engine, hf_model),
        "batches": {},
    }
    for batch in batch_sizes:
        report["batches"][str(batch)] = _bench_batch(engine, hf_model, batch)
    report["machine"]["load_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
