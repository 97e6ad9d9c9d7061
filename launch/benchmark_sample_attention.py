r"""Benchmark SampleAttention against dense causal attention; prints and writes JSON.

For each sequence length and input kind (``structured``: local band + heavy key
columns + noise; ``random``: standard normal) it times, interleaved and repeated:
dense attention (``jax.nn.dot_product_attention``, XLA on CPU / cuDNN on GPU), our
dense masked reference (up to ``--reference_max_seq``), and per alpha the full
sample attention and its stages 1+2 alone. It reports medians with min/max, the
speedup, the stage 1+2 fraction of dense time, the density and the relative
output error ``||out - dense|| / ||dense||``.

Example (CPU, XLA path):
  python -m launch.benchmark_sample_attention --seq_lens=8192,16384,32768 \
      --alphas=0.8,0.95 --repeats=3 --output=/tmp/sample_attention_bench.json
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sample_attention import (
    BlockLayout, full_selection, reference_attention, resolve_backend, sample_attention,
    sample_attention_selection)
from pallas_kernels.sample_attention.synthetic import random_qkv, structured_qkv

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", ["8192", "16384", "32768"], "Sequence lengths.")
flags.DEFINE_list("alphas", ["0.8", "0.95"], "Retained-mass targets.")
flags.DEFINE_list("inputs", ["structured", "random"], "Input kinds.")
flags.DEFINE_integer("repeats", 3, "Timed runs per function (after one warm-up).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("heads", 1, "Query heads.")
flags.DEFINE_integer("kv_heads", 1, "Key/value heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("block", 128, "block_q = block_k.")
flags.DEFINE_float("window_ratio", 0.08, "Local window fraction.")
flags.DEFINE_float("row_ratio", 0.05, "Stage 1 sampled row fraction.")
flags.DEFINE_string("backend", "auto", "Sample attention backend.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Input dtype; auto: bfloat16 on GPU (cuDNN), float32 elsewhere.")
flags.DEFINE_integer("reference_max_seq", 16384,
                     "Largest seq for which the dense masked reference is timed.")
flags.DEFINE_integer("stage1_chunk_elems", 1 << 22,
                     "Stage 1 memory bound (fp32 scores per head and step).")
flags.DEFINE_integer("seed", 0, "Input seed.")
flags.DEFINE_string("output", "", "Write the JSON here too.")


def _on_gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def _time(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _summary(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _rel_err(out: jax.Array, ref: jax.Array) -> float:
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _run_case(seq: int, kind: str, dtype: jnp.dtype) -> dict:
  """All timings for one sequence length and input kind."""
  make = structured_qkv if kind == "structured" else random_qkv
  q, k, v = make(FLAGS.seed + seq, FLAGS.batch, seq, FLAGS.heads, FLAGS.kv_heads,
                 FLAGS.head_dim, dtype=dtype)
  common = dict(window_ratio=FLAGS.window_ratio, row_ratio=FLAGS.row_ratio,
                block_q=FLAGS.block, block_k=FLAGS.block,
                stage1_chunk_elems=FLAGS.stage1_chunk_elems)
  impl = "cudnn" if _on_gpu() else "xla"
  dense_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl))
  fns: dict[str, Callable[[], object]] = {"dense": lambda: dense_fn(q, k, v)}
  if seq <= FLAGS.reference_max_seq:
    layout = BlockLayout.create(seq, FLAGS.block, FLAGS.block, True, FLAGS.window_ratio)
    ref_fn = jax.jit(lambda q, k, v: reference_attention(
        q, k, v, full_selection(FLAGS.batch, FLAGS.heads, layout), layout,
        FLAGS.head_dim ** -0.5))
    fns["reference"] = lambda: ref_fn(q, k, v)
  alphas = [float(a) for a in FLAGS.alphas]
  for a in alphas:
    fns[f"sample@{a}"] = lambda a=a: sample_attention(
        q, k, v, alpha=a, backend=FLAGS.backend, return_selection=True, **common)
    fns[f"stages@{a}"] = lambda a=a: sample_attention_selection(q, k, alpha=a, **common)
    selection = sample_attention_selection(q, k, alpha=a, **common)
    fns[f"kernel@{a}"] = lambda a=a, sel=selection: sample_attention(
        q, k, v, selection=sel, backend=FLAGS.backend, **common)

  first = {name: fn() for name, fn in fns.items()}  # compile + warm up
  jax.block_until_ready(first)
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(FLAGS.repeats):  # interleaved
    for name, fn in fns.items():
      times[name].append(_time(fn))

  dense_out = first["dense"]
  dense_t = _summary(times["dense"])
  result = {"seq": seq, "input": kind, "dense": dense_t, "alphas": {}}
  if "reference" in fns:
    result["reference"] = {**_summary(times["reference"]),
                           "rel_err_vs_dense": _rel_err(first["reference"], dense_out)}
  for a in alphas:
    out, sel = first[f"sample@{a}"]
    sample_t = _summary(times[f"sample@{a}"])
    stages_t = _summary(times[f"stages@{a}"])
    kernel_t = _summary(times[f"kernel@{a}"])
    density = np.asarray(sel.density)
    result["alphas"][str(a)] = {
        "sample": sample_t,
        "stages_1_2": stages_t,
        "attention_only": kernel_t,
        "speedup": dense_t["median_s"] / sample_t["median_s"],
        "stages_fraction_of_dense": stages_t["median_s"] / dense_t["median_s"],
        "density_mean": float(density.mean()),
        "density_min": float(density.min()),
        "density_max": float(density.max()),
        "target_speedup_0.6_over_density": 0.6 / float(density.mean()),
        "rel_err_vs_dense": _rel_err(out, dense_out),
    }
  return result


def _table(report: dict) -> str:
  """Markdown summary: one row per (seq, input, alpha)."""
  lines = ["| seq | input | alpha | dense s | sample s | speedup | 0.6/density | "
           "stages 1+2 / dense | density | rel. error |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for case in report["cases"]:
    for alpha, r in case["alphas"].items():
      lines.append(
          f"| {case['seq']} | {case['input']} | {alpha} | {case['dense']['median_s']:.3f} | "
          f"{r['sample']['median_s']:.3f} | {r['speedup']:.1f}x | "
          f"{r['target_speedup_0.6_over_density']:.1f}x | "
          f"{100 * r['stages_fraction_of_dense']:.1f}% | {r['density_mean']:.3f} | "
          f"{r['rel_err_vs_dense']:.4f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  on_gpu = _on_gpu()
  dtype_name = FLAGS.dtype if FLAGS.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
  report = {
      "device": str(jax.devices()[0].device_kind),
      "backend": resolve_backend(FLAGS.backend),
      "dense_peer": "cudnn" if on_gpu else "xla",
      "dtype": dtype_name,
      "shape": {"batch": FLAGS.batch, "heads": FLAGS.heads, "kv_heads": FLAGS.kv_heads,
                "head_dim": FLAGS.head_dim, "block": FLAGS.block},
      "window_ratio": FLAGS.window_ratio,
      "row_ratio": FLAGS.row_ratio,
      "repeats": FLAGS.repeats,
      "cases": [],
  }
  for seq in (int(s) for s in FLAGS.seq_lens):
    for kind in FLAGS.inputs:
      report["cases"].append(_run_case(seq, kind, jnp.dtype(dtype_name)))
  text = json.dumps(report, indent=2)
  print(text)
  logging.info("\n%s", _table(report))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
