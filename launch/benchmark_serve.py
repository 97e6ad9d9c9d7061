r"""Server throughput: continuous against static batching, side by side in one process.

  python -m launch.benchmark_serve --output=/tmp/serve_bench.json

Builds one random decoder (default: hidden 512, 4 layers, 32K vocabulary, fp32, as
``launch.benchmark_generate``), serves it with ``launch.serve``'s stack (``ServedModel`` behind
uvicorn on 127.0.0.1) and runs rounds of ``--clients`` concurrent HTTP clients, each sending
``--requests_per_client`` ``/v1/completions`` requests one after the other: token-id prompts of
``--prompt_lens`` tokens and ``max_tokens`` drawn from ``--output_lengths`` (mixed lengths, with
``ignore_eos`` so each completion has exactly that many tokens), sampled at ``--temperature``. Every
round sends the same requests with the same seeds.

The scheduler's ``batching`` switches between rounds: "continuous" (a finished row's slot is
refilled at once) and "static" (a new batch is admitted only when the whole batch has finished).
After a warm-up round of each (compilation), the two alternate (order swapped every repeat) for
``--repeats`` repeats. The JSON reports, per mode, generated tokens/s over the round's wall time and
request latencies (medians, min and max over repeats), the continuous/static ratio of the median
tokens/s, and the machine load (``os.getloadavg``) before every round, since other processes on
the host distort CPU timings.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np
from absl import app, flags

from glmjax.data.tokenizer import default_tokenizer
from glmjax.inference.engine import GenerationEngine
from glmjax.inference.serving import BackgroundServer, ServedModel, create_app
from glmjax.models import create_model, preset

_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder layers.")
_HEADS = flags.DEFINE_integer("heads", 8, "Attention heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 1536, "MLP size.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Decode slots of the server.")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "Positions per slot.")
_DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", 8, "Decode steps per device call at most.")
_CLIENTS = flags.DEFINE_integer("clients", 16, "Concurrent clients.")
_REQUESTS = flags.DEFINE_integer("requests_per_client", 4, "Requests each client sends, one after the other.")
_PROMPT_LENS = flags.DEFINE_list("prompt_lens", ["16", "64"], "Prompt lengths drawn from (tokens).")
_OUTPUT_LENGTHS = flags.DEFINE_list("output_lengths", ["16", "64", "256"], "max_tokens drawn from.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per mode.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON report here (also printed).")

_MODES = ("continuous", "static")


def _requests() -> list[list[dict]]:
    """Per client, its request bodies (seeded: every round sends the same)."""
    rng = np.random.default_rng(0)
    prompt_lens = [int(n) for n in _PROMPT_LENS.value]
    lengths = [int(n) for n in _OUTPUT_LENGTHS.value]
    return [[{"model": "bench", "prompt": rng.integers(2, _VOCAB.value, size=int(rng.choice(prompt_lens))).tolist(),
              "max_tokens": int(rng.choice(lengths)), "temperature": _TEMPERATURE.value,
              "seed": client * 1000 + index, "ignore_eos": True}
             for index in range(_REQUESTS.value)] for client in range(_CLIENTS.value)]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _round(url: str, requests: list[list[dict]]) -> dict[str, float]:
    """All clients at once; each sends its requests in turn. Tokens/s over the wall time."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(bodies: list[dict]) -> None:
        for body in bodies:
            start = time.perf_counter()
            reply = _post(url, body)
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += reply["usage"]["completion_tokens"]

    load = os.getloadavg()[0]
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(bodies,)) for bodies in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens[0], "tokens_per_s": tokens[0] / seconds,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p90_s": float(np.percentile(latencies, 90)),
            "load_before": load}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str]) -> None:
    del argv
    config = preset("glm4-tiny").replace(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, num_layers=_LAYERS.value, num_heads=_HEADS.value,
        num_kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value, intermediate_size=_INTERMEDIATE.value,
        max_position_embeddings=max(_MAX_LEN.value, 4096), partial_rotary_factor=0.5)
    engine = GenerationEngine(create_model(config, seed=0), max_batch_size=_SLOTS.value)
    tokenizer = default_tokenizer(os.path.join(tempfile.gettempdir(), "glmjax-bench-tokenizer"))
    served = ServedModel("bench", engine, tokenizer, max_slots=_SLOTS.value, max_len=_MAX_LEN.value,
                         decode_chunk=_DECODE_CHUNK.value, max_waiting=4 * _CLIENTS.value)
    requests = _requests()
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in _MODES}
    try:
        with BackgroundServer(create_app(served)) as server:
            url = server.base_url + "/completions"
            for mode in _MODES:  # warm-up: compiles every prefill shape the rounds use
                served.scheduler.batching = mode
                _round(url, requests)
            for repeat in range(_REPEATS.value):
                for mode in (_MODES if repeat % 2 == 0 else _MODES[::-1]):
                    served.scheduler.batching = mode
                    rounds[mode].append(_round(url, requests))
    finally:
        served.close()
    report = {
        "device": jax.devices()[0].device_kind, "platform": platform.platform(), "cpus": os.cpu_count(),
        "model": {"hidden": _HIDDEN.value, "layers": _LAYERS.value, "heads": _HEADS.value,
                  "kv_heads": _KV_HEADS.value, "vocab": _VOCAB.value, "dtype": config.param_dtype},
        "server": {"slots": _SLOTS.value, "max_len": _MAX_LEN.value, "decode_chunk": _DECODE_CHUNK.value},
        "load": {"clients": _CLIENTS.value, "requests_per_client": _REQUESTS.value,
                 "prompt_lens": _PROMPT_LENS.value, "output_lengths": _OUTPUT_LENGTHS.value,
                 "temperature": _TEMPERATURE.value, "tokens_per_round": rounds[_MODES[0]][0]["tokens"]},
        "repeats": _REPEATS.value,
    }
    for mode in _MODES:
        report[mode] = {key: _summary([r[key] for r in rounds[mode]])
                        for key in ("tokens_per_s", "seconds", "latency_p50_s", "latency_p90_s", "load_before")}
    report["continuous_over_static_tokens_per_s"] = (report["continuous"]["tokens_per_s"]["median"]
                                                     / report["static"]["tokens_per_s"]["median"])
    text = json.dumps(report, indent=2)
    print(text)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
