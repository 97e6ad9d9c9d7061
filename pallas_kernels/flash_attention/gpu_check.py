"""GPU check of :func:`flash_attention`, one command on a GPU host (prints JSON lines).

    python -m pallas_kernels.flash_attention.gpu_check [--seq_lens=8192,32768] [--doc_len=2048]

1. Correctness: compiled kernels vs the dense reference (fp32 with IEEE products, and bf16),
   outputs and q/k/v gradients, packed GQA inputs with padding and a query chunk at an offset.
2. Timing (forward + backward, bf16, GLM-4-9B heads: 32 query, 2 KV, head dim 128, batch 1,
   documents of ``doc_len`` packed into each sequence): the kernels vs
   ``jax.nn.dot_product_attention`` with the dense ``[b, 1, s, s]`` mask the ``fused`` backend
   passes for packed inputs, and vs its unpacked ``is_causal=True`` (cuDNN) path as a speed
   reference. ``--interpret`` runs part 1 in the Pallas interpreter at tiny sizes (no GPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import allowed_mask, reference_attention


def _packed_ids(batch: int, seq: int, doc_len: int, padding: int = 0) -> jax.Array:
  ids = np.repeat(np.arange(1, seq // doc_len + 2), doc_len)[:seq]
  ids[seq - padding:] = 0
  return jnp.asarray(np.broadcast_to(ids, (batch, seq)), jnp.int32)


def _inputs(seed: int, batch: int, seq_q: int, seq_kv: int, heads: int, kv_heads: int, dim: int,
            dtype) -> tuple[jax.Array, ...]:
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (batch, seq_q, heads, dim), dtype),
          jax.random.normal(keys[1], (batch, seq_kv, kv_heads, dim), dtype),
          jax.random.normal(keys[2], (batch, seq_kv, kv_heads, dim), dtype),
          jax.random.normal(keys[3], (batch, seq_q, heads, dim), dtype))


def _value_and_grads(attention, q, k, v, out_grad, **kwargs):
  def run(q, k, v, out_grad):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kwargs), q, k, v)
    return (out, *vjp(out_grad))
  return jax.jit(run)(q, k, v, out_grad)


def check(interpret: bool) -> list[dict]:
  """Max |kernel - reference| / max |reference| per output and gradient, per case."""
  seq, chunk = (128, 64) if interpret else (1024, 512)
  results = []
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    q, k, v, out_grad = _inputs(0, 2, chunk, seq, 4, 2, 64, dtype)
    kv_seg = _packed_ids(2, seq, seq // 4, padding=seq // 8)
    kwargs = dict(q_segment_ids=kv_seg[:, seq - chunk:], kv_segment_ids=kv_seg, q_offset=seq - chunk)
    with jax.default_matmul_precision("highest"):
      got = _value_and_grads(flash_attention, q, k, v, out_grad, interpret=interpret, **kwargs)
    want = _value_and_grads(reference_attention, *(x.astype(jnp.float32) for x in (q, k, v, out_grad)),
                            **kwargs)
    errors = {name: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
              for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    results.append({"check": str(jnp.dtype(dtype)), "seq_kv": seq, "seq_q": chunk,
                    "relative_errors": errors, "ok": max(errors.values()) <= tol})
  return results


def _median_seconds(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(seq: int, doc_len: int) -> dict:
  """Forward + backward seconds of the kernels and of the dense-mask and causal peers."""
  q, k, v, _ = _inputs(1, 1, seq, seq, 32, 2, 128, jnp.bfloat16)
  ids = _packed_ids(1, seq, doc_len)

  def loss(attention):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2)))

  runs = {
      "flash_attention_packed": lambda q, k, v: flash_attention(
          q, k, v, q_segment_ids=ids, kv_segment_ids=ids),
      "dot_product_attention_dense_mask": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, mask=allowed_mask(ids, ids)[:, None]),
      "dot_product_attention_causal_unpacked": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True),
  }
  result = {"seq": seq, "doc_len": doc_len, "seconds_fwd_bwd": {}}
  for name, attention in runs.items():
    try:
      result["seconds_fwd_bwd"][name] = _median_seconds(loss(attention), q, k, v)
    except Exception as error:  # a peer that does not compile at this size is reported, not fatal
      result["seconds_fwd_bwd"][name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="8192,32768")
  parser.add_argument("--doc_len", type=int, default=2048)
  parser.add_argument("--interpret", action="store_true")
  args = parser.parse_args()
  if not args.interpret and jax.default_backend() != "gpu":
    parser.error(f"needs a GPU (backend is {jax.default_backend()!r}); --interpret checks on CPU")
  print(json.dumps({"device": jax.devices()[0].device_kind}))
  results = check(args.interpret)
  for result in results:
    print(json.dumps(result))
  if not args.interpret:
    for seq in (int(s) for s in args.seq_lens.split(",")):
      print(json.dumps(benchmark(seq, args.doc_len)))
  if not all(result["ok"] for result in results):
    raise SystemExit("flash_attention check failed: see relative_errors above")


if __name__ == "__main__":
  main()
