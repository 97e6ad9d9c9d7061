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

  @property
  def total_pairs(self) -> int:
    """Attendable (query, key) token pairs of the whole sequence."""
    n = self.seq_len
    return n * (n + 1) // 2 if self.causal else n * n

  def token_pairs(self, xp=np):
    """Attendable (query, key) token pairs per block pair, ``[nq, nk]`` int.

    Counts only real tokens (``< seq_len``) and, if causal, pairs with key <= query.
    Closed form, O(nq * nk) memory; ``xp`` is ``numpy`` (trace-time constant, int64) or
    ``jax.numpy`` (computed in the graph from iotas, int32: no ``[nq, nk]`` constant is
    embedded in the program, which matters at 1M tokens).
    """
    i = xp.arange(self.num_q_blocks)[:, None]
    j = xp.arange(self.num_k_blocks)[None, :]
    q_lo = i * self.block_q
    q_hi = xp.maximum(xp.minimum(q_lo + self.block_q, self.seq_len), q_lo)
    k_lo = j * self.block_k
    k_len = xp.maximum(xp.minimum(k_lo + self.block_k, self.seq_len) - k_lo, 0)
    if not self.causal:
      return (q_hi - q_lo) * k_len
    # Query q sees min(max(q + 1 - k_lo, 0), k_len) keys of block j; sum over the block's
    # queries as F(q_hi - k_lo) - F(q_lo - k_lo), F(x) = sum_{u=1..x} min(u, k_len).
    def partial_sum(x):
      x = xp.maximum(x, 0)
      ramp = xp.minimum(x, k_len)
      return ramp * (ramp + 1) // 2 + (x - ramp) * k_len
    return partial_sum(q_hi - k_lo) - partial_sum(q_lo - k_lo)

  def allowed_blocks(self, xp=np):
    """Block pairs with at least one attendable token pair, ``[nq, nk]`` bool."""
    return self.token_pairs(xp) > 0

  def window_blocks(self, xp=np):
    """Block pairs always kept (local window, incl. the diagonal), ``[nq, nk]`` bool.

    Key block ``j`` is kept for query block ``i`` if it intersects the token window
    of any query in block ``i``; this is a superset of the token-level window.
    ``xp`` as in :meth:`token_pairs`.
    """
    q_first = xp.arange(self.num_q_blocks) * self.block_q
    q_last = q_first + self.block_q - 1
    k_first = xp.arange(self.num_k_blocks) * self.block_k
    k_last = k_first + self.block_k - 1
    lo = q_first - self.window + 1
    hi = q_last if self.causal else q_last + self.window - 1
    near = (k_last[None, :] >= lo[:, None]) & (k_first[None, :] <= hi[:, None])
    return near & self.allowed_blocks(xp)
