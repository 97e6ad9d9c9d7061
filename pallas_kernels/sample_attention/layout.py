"""Static block geometry shared by the selection, the reference and the kernels.

Everything here is plain Python / NumPy computed at trace time, so shapes stay
static under ``jax.jit``. Positions are token indices in ``[0, padded_len)``;
tokens at positions ``>= seq_len`` are padding and never attended to.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Block tiling of one (query, key) sequence pair.

  Attributes:
    seq_len: real sequence length (tokens).
    block_q: query block size (tokens).
    block_k: key/value block size (tokens).
    causal: whether query ``p`` may only attend keys ``<= p``.
    window: local window in tokens (>= 1): a query at ``p`` always attends to
      keys in ``(p - window, p]`` (causal) or ``(p - window, p + window)``.
  """

  seq_len: int
  block_q: int
  block_k: int
  causal: bool
  window: int

  @classmethod
  def create(cls, seq_len: int, block_q: int, block_k: int, causal: bool,
             window_ratio: float) -> "BlockLayout":
    """Builds a layout; the window is ``ceil(window_ratio * seq_len)`` tokens, at least 1."""
    if seq_len < 1 or block_q < 1 or block_k < 1:
      raise ValueError(f"bad sizes seq_len={seq_len} block_q={block_q} block_k={block_k}")
    if not 0.0 <= window_ratio <= 1.0:
      raise ValueError(f"window_ratio must be in [0, 1], got {window_ratio}")
    window = max(1, math.ceil(window_ratio * seq_len))
    return cls(seq_len, block_q, block_k, causal, window)

  @property
  def padded_len(self) -> int:
    """Sequence length rounded up to a multiple of both block sizes."""
    unit = math.lcm(self.block_q, self.block_k)
    return -(-self.seq_len // unit) * unit

  @property
  def num_q_blocks(self) -> int:
    return self.padded_len // self.block_q

  @property
  def num_k_blocks(self) -> int:
    return self.padded_len // self.block_k

  def token_pairs(self) -> np.ndarray:
    """Attendable (query, key) token pairs per block pair, ``[nq, nk]`` int64.

    Counts only real tokens (``< seq_len``) and, if causal, pairs with key <= query.
    """
    qpos = np.arange(self.padded_len).reshape(self.num_q_blocks, self.block_q)
    kpos = np.arange(self.padded_len).reshape(self.num_k_blocks, self.block_k)
    q_valid = qpos < self.seq_len
    k_valid = kpos < self.seq_len
    if self.causal:
      # keys <= q among the valid ones: for each query count keys in block j below it.
      lo = kpos[:, 0][None, :, None]  # [1, nk, 1]
      hi = np.maximum(np.minimum(kpos[:, -1] + 1, self.seq_len), kpos[:, 0])[None, :, None]
      n_keys = np.clip(qpos[:, None, :] + 1, lo, hi) - lo  # [nq, nk, bq]
      return (n_keys * q_valid[:, None, :]).sum(-1)
    return q_valid.sum(-1)[:, None] * k_valid.sum(-1)[None, :]

  def allowed_blocks(self) -> np.ndarray:
    """Block pairs with at least one attendable token pair, ``[nq, nk]`` bool."""
    return self.token_pairs() > 0

  def window_blocks(self) -> np.ndarray:
    """Block pairs always kept (local window, incl. the diagonal), ``[nq, nk]`` bool.

    Key block ``j`` is kept for query block ``i`` if it intersects the token window
    of any query in block ``i``; this is a superset of the token-level window.
    """
    q_first = np.arange(self.num_q_blocks) * self.block_q
    q_last = q_first + self.block_q - 1
    k_first = np.arange(self.num_k_blocks) * self.block_k
    k_last = k_first + self.block_k - 1
    lo = q_first - self.window + 1
    hi = q_last if self.causal else q_last + self.window - 1
    near = (k_last[None, :] >= lo[:, None]) & (k_first[None, :] <= hi[:, None])
    return near & self.allowed_blocks()
