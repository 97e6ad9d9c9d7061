"""SampleAttention Triton kernel: on GPU through jax-triton; on CPU in Triton's interpreter."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sample_attention import (
    BlockLayout, reference_attention, sample_attention, selection_from_mask)
from pallas_kernels.sample_attention.synthetic import random_qkv

KERNEL_FILE = (pathlib.Path(__file__).resolve().parents[1]
               / "pallas_kernels" / "sample_attention" / "triton_kernel.py")


def _case(seed, causal):
  b, s, h, kvh, d, bq, bk = 2, 100, 4, 2, 16, 32, 16
  q, k, v = random_qkv(seed, b, s, h, kvh, d)
  layout = BlockLayout.create(s, bq, bk, causal, window_ratio=0.1)
  rng = np.random.default_rng(seed)
  mask = rng.random((b, h, layout.num_q_blocks, layout.num_k_blocks)) < 0.4
  mask &= layout.allowed_blocks()
  sel = selection_from_mask(jnp.asarray(mask), layout)
  return q, k, v, layout, sel, reference_attention(q, k, v, sel, layout, d ** -0.5)


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
# The kernel file is loaded by path so the child does not import JAX.
_INTERPRETER_SCRIPT = """
import importlib.util, sys, numpy as np, torch
spec = importlib.util.spec_from_file_location("kernel", sys.argv[1])
kernel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel)
for path in sys.argv[2:]:
  a = dict(np.load(path))
  t = {n: torch.tensor(a[n]) for n in ("q", "k", "v", "blocks", "counts")}
  out = torch.zeros_like(t["q"])
  b, h, s_pad, d = t["q"].shape
  kvh, nq = t["k"].shape[1], t["counts"].shape[-1]
  kernel.sample_attention_kernel[(nq, b * h)](
      t["q"], t["k"], t["v"], t["blocks"], t["counts"], float(a["scale"]), int(a["seq_len"]),
      h, h // kvh, nq, t["blocks"].shape[-1], kvh, s_pad, out,
      BLOCK_Q=int(a["block_q"]), BLOCK_K=int(a["block_k"]), HEAD_DIM=d,
      CAUSAL=bool(a["causal"]), PRECISION="ieee")
  np.save(path + ".out.npy", out.numpy())
"""


def test_triton_kernel_in_interpreter(tmp_path):
  """The kernel's logic, run by Triton's interpreter on PyTorch CPU tensors."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  cases = {}
  for causal in (True, False):
    q, k, v, layout, sel, want = _case(501 + causal, causal)
    s, d = q.shape[1], q.shape[3]
    pad = ((0, 0), (0, 0), (0, layout.padded_len - s), (0, 0))
    q_t, k_t, v_t = (np.asarray(jnp.pad(x.transpose(0, 2, 1, 3), pad)) for x in (q, k, v))
    path = str(tmp_path / f"causal{causal}.npz")
    np.savez(path, q=q_t, k=k_t, v=v_t, blocks=np.asarray(sel.kv_blocks),
             counts=np.asarray(sel.counts), scale=d ** -0.5, seq_len=s,
             block_q=layout.block_q, block_k=layout.block_k, causal=causal)
    cases[path] = (s, want)
  env = {**os.environ, "TRITON_INTERPRET": "1"}
  subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, str(KERNEL_FILE), *cases],
                 env=env, check=True, timeout=120)
  for path, (s, want) in cases.items():
    got = np.load(path + ".out.npy")[:, :, :s].transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=path)


def _has_gpu():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_triton_backend_on_gpu(causal):
  pytest.importorskip("jax_triton")
  q, k, v, layout, sel, want = _case(511 + causal, causal)
  out = sample_attention(q, k, v, causal=causal, block_q=layout.block_q,
                         block_k=layout.block_k, window_ratio=0.1, selection=sel,
                         backend="triton")
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
