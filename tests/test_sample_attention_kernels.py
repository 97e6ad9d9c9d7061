"""SampleAttention backends (XLA gather, Pallas TPU in interpret mode) vs references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sample_attention import (
    BlockLayout, reference_attention, resolve_backend, sample_attention, selection_from_mask)
from pallas_kernels.sample_attention.synthetic import random_qkv, structured_qkv

RTOL = ATOL = 2e-5


def _dense_numpy(q, k, v, causal, mask=None):
  """fp64 attention ``[b, s, h, d]`` with GQA and an optional token mask [b, h, s, s]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  keep = np.ones(s.shape, bool) if mask is None else np.asarray(mask)
  if causal:
    keep = keep & np.tril(np.ones(s.shape[-2:], bool))
  s = np.where(keep, s, -np.inf)
  m = np.where(keep.any(-1, keepdims=True), s.max(-1, keepdims=True), 0.0)
  p = np.where(keep, np.exp(s - m), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _random_selection(seed, batch, heads, layout, density=0.35):
  """Random per-query-block lists (any pattern, incl. empty lists) and their token mask."""
  rng = np.random.default_rng(seed)
  mask = rng.random((batch, heads, layout.num_q_blocks, layout.num_k_blocks)) < density
  mask &= layout.allowed_blocks()
  mask[0, -1, 0] = False  # one query block with an empty list
  tokens = np.repeat(np.repeat(mask, layout.block_q, 2), layout.block_k, 3)
  tokens = tokens[..., :layout.seq_len, :layout.seq_len]
  return selection_from_mask(jnp.asarray(mask), layout), tokens


def test_auto_backend_on_cpu_is_xla():
  assert resolve_backend("auto") == "xla"
  with pytest.raises(ValueError):
    resolve_backend("cuda")


def test_alpha_one_equals_dense_causal():
  """alpha = 1 keeps all causal blocks: every backend equals dense causal attention."""
  b, s, h, kvh, d = 2, 77, 4, 2, 16  # seq not a multiple of the blocks
  q, k, v = random_qkv(201, b, s, h, kvh, d)
  dense = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(dense, _dense_numpy(q, k, v, True), rtol=RTOL, atol=ATOL)
  for backend in ("xla", "pallas", "reference"):
    out, sel = sample_attention(q, k, v, alpha=1.0, block_q=32, block_k=16, backend=backend,
                                interpret=True, return_selection=True)
    np.testing.assert_allclose(out, dense, rtol=RTOL, atol=ATOL, err_msg=backend)
    np.testing.assert_allclose(sel.density, 1.0)


@pytest.mark.parametrize("causal,heads,kv_heads,block_q,block_k", [
    (True, 8, 1, 16, 32),
    (True, 3, 3, 32, 16),
    (False, 4, 2, 16, 16),
])
def test_backends_match_masked_reference(causal, heads, kv_heads, block_q, block_k):
  """Random selections: XLA, Pallas (interpret) and the jnp reference equal fp64 numpy."""
  b, s, d = 2, 90, 16
  seed = 300 + heads * 10 + block_q
  q, k, v = random_qkv(seed, b, s, heads, kv_heads, d)
  layout = BlockLayout.create(s, block_q, block_k, causal, window_ratio=0.1)
  sel, tokens = _random_selection(seed, b, heads, layout)
  want = _dense_numpy(q, k, v, causal, tokens)
  ref = reference_attention(q, k, v, sel, layout, d ** -0.5)
  np.testing.assert_allclose(ref, want, rtol=RTOL, atol=ATOL)
  for backend in ("xla", "pallas"):
    out = sample_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k,
                           window_ratio=0.1, selection=sel, backend=backend, interpret=True,
                           xla_group_rows=2 * block_q)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL, err_msg=backend)


def test_end_to_end_sparse_structured_input():
  """Stages 1+2 + XLA backend at alpha < 1: equals the reference with that selection,
  really skips blocks, and stays close to dense attention."""
  b, s, h, kvh, d = 2, 500, 4, 1, 32
  q, k, v = structured_qkv(401, b, s, h, kvh, d, band=8.0, num_heavy=3)
  kwargs = dict(alpha=0.95, window_ratio=0.05, row_ratio=0.1, block_q=32, block_k=32)
  out, sel = sample_attention(q, k, v, backend="xla", return_selection=True, **kwargs)
  ref = sample_attention(q, k, v, backend="reference", selection=sel, **kwargs)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  assert float(sel.density.max()) < 0.7
  dense = _dense_numpy(q, k, v, True)
  rel = np.linalg.norm(np.asarray(out) - dense) / np.linalg.norm(dense)
  assert rel < 0.1, rel


@pytest.mark.parametrize("causal", [True, False])
def test_pallas_attends_every_listed_block_of_full_lists(causal):
  """Lists of every length up to all key blocks (counts 0 .. nk, odd and even, so both
  DMA slots are used last): the Pallas kernel drops no listed block (fp32, 2e-5)."""
  b, s, h, kvh, d, bq, bk = 1, 128, 2, 1, 16, 16, 16
  q, k, v = random_qkv(77, b, s, h, kvh, d)
  layout = BlockLayout.create(s, bq, bk, causal, window_ratio=0.1)
  allowed = layout.allowed_blocks()
  mask = np.zeros((b, h, layout.num_q_blocks, layout.num_k_blocks), bool)
  mask[:, 0] = allowed  # head 0: every attendable block (the longest lists)
  for i in range(layout.num_q_blocks):  # head 1: the first i attendable blocks of row i
    mask[0, 1, i, np.flatnonzero(allowed[i])[:i]] = True
  sel = selection_from_mask(jnp.asarray(mask), layout)
  assert int(sel.counts.max()) == (layout.num_q_blocks if causal else layout.num_k_blocks)
  tokens = np.repeat(np.repeat(mask, bq, 2), bk, 3)[..., :s, :s]
  want = _dense_numpy(q, k, v, causal, tokens)
  out = sample_attention(q, k, v, causal=causal, block_q=bq, block_k=bk, window_ratio=0.1,
                         selection=sel, backend="pallas", interpret=True)
  np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_pallas_with_more_than_one_run_of_counts_and_list_entries():
  """130 query and key blocks: counts are fetched in aligned runs of 128 and list rows padded
  to 256 entries; query blocks past the first run, and the last 10 query rows alone
  (``query_start``/``query_len``: blocks 127..129), match the reference (fp32, 2e-5)."""
  b, s, h, kvh, d, blk = 1, 1040, 2, 1, 8, 8
  q, k, v = random_qkv(91, b, s, h, kvh, d)
  layout = BlockLayout.create(s, blk, blk, True, window_ratio=0.01)
  assert layout.num_q_blocks == layout.num_k_blocks == 130
  sel, _ = _random_selection(91, b, h, layout, density=0.04)
  kwargs = dict(block_q=blk, block_k=blk, window_ratio=0.01, selection=sel, interpret=True)
  want = np.asarray(sample_attention(q, k, v, backend="reference", **kwargs))
  out = sample_attention(q, k, v, backend="pallas", **kwargs)
  np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
  part = sample_attention(q, k, v, backend="pallas", query_start=jnp.int32(1030), query_len=10,
                          **kwargs)
  np.testing.assert_allclose(part, want[:, 1030:], rtol=RTOL, atol=ATOL)
