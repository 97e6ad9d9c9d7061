#!/usr/bin/env bash
# SampleAttention GPU check, one call: builds the Triton kernel (via jax-triton),
# checks it against the dense masked reference, then times it against cuDNN flash
# attention at 32K..128K. Installs nothing: needs the `gpu` extra already present.
#
# Usage: bash launch/gpu_check_sample_attention.sh [OUT_DIR]   (default /tmp/sample_attention_gpu)
# Prints two JSON documents (check, benchmark) and writes them to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-/tmp/sample_attention_gpu}"
mkdir -p "${OUT_DIR}"

python - > "${OUT_DIR}/check.json" <<'EOF'
"""Correctness: Triton backend vs the dense masked reference and vs cuDNN at alpha = 1."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sample_attention import (
    BlockLayout, reference_attention, sample_attention, selection_from_mask)
from pallas_kernels.sample_attention.synthetic import random_qkv, structured_qkv

assert jax.default_backend() == "gpu", f"no GPU: backend is {jax.default_backend()}"
report = {"device": jax.devices()[0].device_kind, "checks": []}


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Random selections, fp32 (exact kernel logic) and bf16; odd length, GQA 4, both masks.
for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
  for causal in (True, False):
    b, s, h, kvh, d, blk = 2, 1000, 8, 2, 128, 64
    q, k, v = random_qkv(7, b, s, h, kvh, d, dtype=dtype)
    layout = BlockLayout.create(s, blk, blk, causal, window_ratio=0.08)
    mask = np.random.default_rng(8).random((b, h, layout.num_q_blocks, layout.num_k_blocks)) < 0.3
    sel = selection_from_mask(jnp.asarray(mask & layout.allowed_blocks()), layout)
    start = time.perf_counter()
    out = sample_attention(q, k, v, causal=causal, block_q=blk, block_k=blk, selection=sel,
                           backend="triton").block_until_ready()
    build_s = time.perf_counter() - start
    ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), sel, layout, d ** -0.5)
    err = rel(out, ref)
    report["checks"].append({"what": "triton vs masked reference", "dtype": str(jnp.dtype(dtype)),
                             "causal": causal, "rel_err": err, "ok": err < tol,
                             "first_call_s": build_s})

# alpha = 1 (all causal blocks) vs cuDNN, bf16, GLM-4-9B-like heads.
q, k, v = structured_qkv(9, 1, 4096, 32, 2, 128, dtype=jnp.bfloat16)
dense = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
full = sample_attention(q, k, v, alpha=1.0, backend="triton")
err = rel(full, dense)
report["checks"].append({"what": "triton alpha=1 vs cudnn", "dtype": "bfloat16",
                         "rel_err": err, "ok": err < 2e-2})
sparse = sample_attention(q, k, v, alpha=0.95, backend="triton")
report["checks"].append({"what": "triton alpha=0.95 vs cudnn (fidelity)", "dtype": "bfloat16",
                         "rel_err": rel(sparse, dense)})
report["all_ok"] = all(c.get("ok", True) for c in report["checks"])
print(json.dumps(report, indent=2))
EOF
cat "${OUT_DIR}/check.json"

python -m launch.benchmark_sample_attention \
    --seq_lens=32768,65536,131072 --alphas=0.8,0.95 --inputs=structured,random \
    --heads=32 --kv_heads=2 --head_dim=128 --block=128 --dtype=bfloat16 --repeats=5 \
    --backend=triton --reference_max_seq=0 --stage1_chunk_elems=268435456 \
    --output="${OUT_DIR}/bench.json" > /dev/null
cat "${OUT_DIR}/bench.json"
