"""SampleAttention selection (stages 1 and 2) against direct dense computations."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sample_attention import (
    BlockLayout, build_selection, sample_attention_selection, sampled_rows,
    selection_from_mask, stage1_block_scores, stage2_select_stripes)
from pallas_kernels.sample_attention.reference import block_mask
from pallas_kernels.sample_attention.synthetic import random_qkv, structured_qkv


def _dense_probs(q, k, causal):
  """fp64 softmax probabilities ``[b, h, s, s]`` with GQA, numpy."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  group = q.shape[2] // k.shape[2]
  k = np.repeat(k, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  return p / p.sum(-1, keepdims=True)


def _token_keep(blocks, layout):
  """Token mask ``[b, h, s, s]`` numpy from a block mask, with causal and padding."""
  t = np.repeat(np.repeat(np.asarray(blocks), layout.block_q, 2), layout.block_k, 3)
  t = t[..., :layout.seq_len, :layout.seq_len]
  if layout.causal:
    t = t & np.tril(np.ones((layout.seq_len, layout.seq_len), bool))
  return t


def test_layout_pairs_and_window():
  layout = BlockLayout.create(300, block_q=64, block_k=32, causal=True, window_ratio=0.1)
  assert layout.padded_len == 320 and layout.window == 30
  pairs = layout.token_pairs()
  assert pairs.sum() == 300 * 301 // 2
  full = np.ones((1, 1, layout.num_q_blocks, layout.num_k_blocks), bool)
  assert _token_keep(full, layout).sum() == pairs.sum()
  window = layout.window_blocks()
  for i in range(layout.num_q_blocks):
    diag = (min((i + 1) * 64, 300) - 1) // 32
    assert window[i, diag]  # diagonal block
    assert not window[i, diag + 1:].any()  # causal
  noncausal = BlockLayout.create(300, 64, 32, causal=False, window_ratio=0.1)
  assert noncausal.token_pairs().sum() == 300 * 300
  for lay in (layout, noncausal):  # window blocks == blocks touched by the token window
    p, j = np.arange(300)[:, None], np.arange(300)[None, :]
    near = (p - j < lay.window) & ((j <= p) if lay.causal else (j - p < lay.window))
    touched = np.zeros((lay.num_q_blocks, lay.num_k_blocks), bool)
    qi, kj = np.nonzero(near)
    touched[qi // lay.block_q, kj // lay.block_k] = True
    np.testing.assert_array_equal(lay.window_blocks(), touched)


def test_sampled_rows_strided_with_last_row():
  rows = sampled_rows(1000, 0.05)
  assert rows[-1] == 999 and len(rows) == 50
  assert np.all(np.diff(rows) == 20)
  assert list(sampled_rows(5, 1.0)) == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError):
    sampled_rows(10, 0.0)


def test_stage1_matches_dense_probabilities():
  """Row-chunked stage 1 (tiny chunks, padded last chunk, GQA) equals dense fp64."""
  b, s, h, kvh, d = 2, 150, 6, 2, 16
  q, k, _ = random_qkv(101, b, s, h, kvh, d)
  for causal in (True, False):
    layout = BlockLayout.create(s, 32, 16, causal, window_ratio=0.1)
    rows = sampled_rows(s, 0.1)
    chunk = 3 * layout.padded_len  # 3 rows per chunk: 15 rows -> 5 chunks
    scores, window = jax.jit(
        lambda q, k: stage1_block_scores(q, k, layout, rows, d ** -0.5, chunk))(q, k)
    p = _dense_probs(q, k, causal)[:, :, rows]  # [b, h, n, s]
    delta = rows[:, None] - np.arange(s)[None, :]
    in_win = (delta >= 0) & (delta < layout.window) if causal else np.abs(delta) < layout.window
    want_window = (p * in_win).sum((-2, -1))
    outside = np.pad((p * ~in_win).sum(-2), ((0, 0), (0, 0), (0, layout.padded_len - s)))
    want_blocks = outside.reshape(b, h, layout.num_k_blocks, layout.block_k).sum(-1)
    np.testing.assert_allclose(window, want_window, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, want_blocks, rtol=1e-5, atol=1e-5)


def test_stage1_memory_is_bounded():
  """No intermediate in stage 1 holds all sampled rows x all keys (or all heads)."""
  b, s, h, kvh, d = 1, 512, 8, 2, 16
  layout = BlockLayout.create(s, 64, 64, True, 0.05)
  rows = sampled_rows(s, 0.25)  # 128 rows
  chunk = 16 * layout.padded_len
  q = jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)
  k = jax.ShapeDtypeStruct((b, s, kvh, d), jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda q, k: stage1_block_scores(q, k, layout, rows, 0.25, chunk))(q, k)

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            yield from sizes(inner)

  biggest = max(sizes(jaxpr.jaxpr))
  assert biggest <= max(chunk, b * h * len(rows) * d)  # a score chunk, or the q rows
  assert biggest < len(rows) * s


def test_stage2_keeps_fewest_blocks_reaching_alpha():
  rng = np.random.default_rng(102)
  scores = rng.exponential(size=(3, 7)).astype(np.float32) * (rng.random((3, 7)) < 0.8)
  window = rng.exponential(size=3).astype(np.float32)
  for alpha in (0.3, 0.8, 0.95, 1.0):
    keep = np.asarray(stage2_select_stripes(jnp.asarray(scores), jnp.asarray(window), alpha))
    for r in range(3):
      total = window[r] + scores[r].sum()
      need = alpha * total - window[r]
      kept = scores[r][keep[r]].sum()
      assert kept >= need * (1 - 1e-6)
      # brute force: no smaller set reaches the target
      best = min(n for n in range(8)
                 if any(scores[r][list(c)].sum() >= need * (1 - 1e-6)
                        for c in itertools.combinations(range(7), n)))
      assert keep[r].sum() <= max(best, 0) + (scores[r] == 0).sum() * (alpha == 1.0)


def test_selection_lists_are_sorted_padded_and_consistent():
  layout = BlockLayout.create(200, 32, 16, True, 0.1)
  rng = np.random.default_rng(103)
  mask = rng.random((2, 3, layout.num_q_blocks, layout.num_k_blocks)) < 0.4
  mask &= layout.allowed_blocks()
  mask[0, 0, 2] = False  # an empty list
  sel = selection_from_mask(jnp.asarray(mask), layout)
  blocks, counts = np.asarray(sel.kv_blocks), np.asarray(sel.counts)
  np.testing.assert_array_equal(counts, mask.sum(-1))
  for idx in np.ndindex(counts.shape):
    n = counts[idx]
    np.testing.assert_array_equal(blocks[idx][:n], np.flatnonzero(mask[idx]))
    assert np.all(blocks[idx][n:] == (blocks[idx][n - 1] if n else 0))
  np.testing.assert_array_equal(block_mask(sel, layout.num_k_blocks), mask)
  want = (_token_keep(mask, layout).sum((-2, -1)) / (200 * 201 / 2))
  np.testing.assert_allclose(sel.density, want, rtol=1e-6)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 1)])
def test_retained_mass_on_sampled_rows(heads, kv_heads):
  """Kept blocks hold >= alpha of the sampled rows' mass; diagonal and window kept."""
  b, s, d, alpha = 2, 333, 32, 0.9
  q, k, _ = structured_qkv(104 + heads, b, s, heads, kv_heads, d,
                           band=8.0, num_heavy=3)
  layout = BlockLayout.create(s, 32, 32, True, window_ratio=0.05)
  sel = sample_attention_selection(q, k, alpha=alpha, window_ratio=0.05, row_ratio=0.1,
                                   block_q=32, block_k=32)
  blocks = np.asarray(block_mask(sel, layout.num_k_blocks))
  assert np.all(blocks[..., layout.window_blocks()])
  for i in range(layout.num_q_blocks):
    assert np.all(blocks[:, :, i, (min((i + 1) * 32, s) - 1) // 32])  # diagonal block
  assert not np.any(blocks & ~layout.allowed_blocks())
  rows = sampled_rows(s, 0.1)
  p = _dense_probs(q, k, True)[:, :, rows]
  kept = (p * _token_keep(blocks, layout)[:, :, rows]).sum(-1).mean(-1)  # [b, h]
  assert np.all(kept >= alpha - 1e-5), kept
  assert np.all(np.asarray(sel.density) < 1.0)  # the structure allows real sparsity


def test_alpha_one_and_zero():
  b, s, h, d = 1, 130, 2, 16
  q, k, _ = structured_qkv(105, b, s, h, 1, d, band=4.0)
  layout = BlockLayout.create(s, 32, 32, True, 0.08)
  full = sample_attention_selection(q, k, alpha=1.0, block_q=32, block_k=32)
  np.testing.assert_array_equal(block_mask(full, layout.num_k_blocks)[0, 0],
                                layout.allowed_blocks())
  np.testing.assert_allclose(full.density, 1.0)
  none = build_selection(jnp.zeros((b, h, layout.num_k_blocks), bool), layout)
  zero = sample_attention_selection(q, k, alpha=0.0, block_q=32, block_k=32)
  np.testing.assert_array_equal(zero.kv_blocks, none.kv_blocks)
  np.testing.assert_array_equal(zero.counts, none.counts)
