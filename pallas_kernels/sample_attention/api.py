"""Public SampleAttention entry points and backend dispatch.

Model layout: q ``[batch, seq, heads, head_dim]``, k/v ``[batch, seq, kv_heads,
head_dim]`` with ``heads % kv_heads == 0`` (GQA: K/V are never repeated).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.platform import current_platform
from pallas_kernels.sample_attention.layout import BlockLayout
from pallas_kernels.sample_attention.pallas_tpu import pallas_sample_attention
from pallas_kernels.sample_attention.reference import reference_attention
from pallas_kernels.sample_attention.selection import (
    DEFAULT_STAGE1_CHUNK_ELEMS, Selection, select_blocks)
from pallas_kernels.sample_attention.xla_gather import (
    DEFAULT_GROUP_ROWS, xla_sample_attention)

BACKENDS = ("auto", "xla", "pallas", "triton", "reference")


def resolve_backend(backend: str) -> str:
  """Maps ``'auto'`` to ``'pallas'`` on TPU, ``'triton'`` on GPU, ``'xla'`` elsewhere.

  The platform is the ambient mesh's (``jax.set_mesh``), so an ahead-of-time compile for a
  TPU topology on a CPU host picks the TPU kernel; without a mesh, the default backend's.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  return {"tpu": "pallas", "gpu": "triton"}.get(current_platform(), "xla")


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"need q [b, s, h, d], k/v [b, s, kvh, d]; got {q.shape} {k.shape} {v.shape}")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} differ in batch, seq or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"heads {q.shape[2]} not a multiple of kv_heads {k.shape[2]}")


@functools.partial(jax.jit, static_argnames=(
    "alpha", "window_ratio", "row_ratio", "causal", "block_q", "block_k", "scale",
    "stage1_chunk_elems"))
def sample_attention_selection(
    q: jax.Array,
    k: jax.Array,
    *,
    alpha: float = 0.95,
    window_ratio: float = 0.08,
    row_ratio: float = 0.05,
    causal: bool = True,
    block_q: int = 128,
    block_k: int = 128,
    scale: float | None = None,
    stage1_chunk_elems: int = DEFAULT_STAGE1_CHUNK_ELEMS,
) -> Selection:
  """Stages 1 and 2 only: the per-(batch, head, query block) key block lists.

  Arguments as in :func:`sample_attention`. Block indices refer to the sequence
  padded to a multiple of ``lcm(block_q, block_k)``.
  """
  _check_shapes(q, k, k)
  layout = BlockLayout.create(q.shape[1], block_q, block_k, causal, window_ratio)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return select_blocks(q, k, layout, alpha=alpha, row_ratio=row_ratio, scale=scale,
                       chunk_elems=stage1_chunk_elems)


@functools.partial(jax.jit, static_argnames=(
    "alpha", "window_ratio", "row_ratio", "causal", "block_q", "block_k", "scale",
    "backend", "return_selection", "interpret", "stage1_chunk_elems", "xla_group_rows",
    "query_len"))
def sample_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    alpha: float = 0.95,
    window_ratio: float = 0.08,
    row_ratio: float = 0.05,
    causal: bool = True,
    block_q: int = 128,
    block_k: int = 128,
    scale: float | None = None,
    backend: str = "auto",
    selection: Selection | None = None,
    return_selection: bool = False,
    interpret: bool = False,
    stage1_chunk_elems: int = DEFAULT_STAGE1_CHUNK_ELEMS,
    xla_group_rows: int = DEFAULT_GROUP_ROWS,
    query_start: int | jax.Array = 0,
    query_len: int | None = None,
) -> jax.Array | tuple[jax.Array, Selection]:
  """SampleAttention prefill: local window + sampled key-block stripes.

  Args:
    q: ``[batch, seq, heads, head_dim]``.
    k, v: ``[batch, seq, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    alpha: fraction of the sampled rows' attention mass the kept blocks must cover
      (0.95 near-lossless, 0.8 fast); ``alpha = 1`` keeps every block (dense).
    window_ratio: local window as a fraction of ``seq`` (``ceil``, at least 1 token);
      window blocks (incl. the diagonal) are always kept.
    row_ratio: fraction of query rows sampled in stage 1 (strided, incl. the last).
    causal: causal attention (prefill). Non-causal uses a symmetric window.
    block_q, block_k: query / key block sizes (tokens); ``seq`` need not be a
      multiple, inputs are padded internally.
    scale: softmax scale, default ``head_dim ** -0.5``.
    backend: ``'auto'`` (Pallas on TPU, Triton on GPU, XLA elsewhere), ``'xla'``,
      ``'pallas'``, ``'triton'`` or ``'reference'`` (dense masked, for checks).
    selection: precomputed block lists (from :func:`sample_attention_selection`
      with the same blocks/causal/seq); skips stages 1 and 2.
    return_selection: also return the :class:`Selection`.
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    stage1_chunk_elems: max fp32 stage 1 scores held at once per head.
    xla_group_rows: query rows per step of the XLA backend's loop.
    query_start, query_len: output only query rows ``[query_start, query_start +
      query_len)`` (``query_start`` may be traced; ``query_len`` is static, default all
      rows). The selection still uses the whole sequence (stage 1 samples rows across
      it); the ``xla`` and ``pallas`` backends then attend only the query blocks covering
      those rows (at most ``ceil(query_len / block_q) + 1``), while ``reference`` and
      ``triton`` compute every row and slice.

  Returns:
    Output ``[batch, query_len or seq, heads, head_dim]`` in ``q.dtype``, and the
    selection (of all query blocks) if ``return_selection``.
  """
  _check_shapes(q, k, v)
  batch, seq, heads, d = q.shape
  layout = BlockLayout.create(seq, block_q, block_k, causal, window_ratio)
  scale = d ** -0.5 if scale is None else scale
  if selection is None:
    selection = select_blocks(q, k, layout, alpha=alpha, row_ratio=row_ratio,
                              scale=scale, chunk_elems=stage1_chunk_elems)
  name = resolve_backend(backend)
  rows = seq if query_len is None else query_len
  if not 1 <= rows <= seq:
    raise ValueError(f"query_len must be in [1, seq={seq}], got {query_len}")
  if query_len is None and not (isinstance(query_start, int) and query_start == 0):
    raise ValueError("query_start needs query_len (the number of query rows to output)")
  start = jnp.asarray(query_start, jnp.int32)
  if name == "reference":
    out = reference_attention(q, k, v, selection, layout, scale)
    out = jax.lax.dynamic_slice_in_dim(out, start, rows, axis=1)
    return (out, selection) if return_selection else out
  pad = ((0, 0), (0, 0), (0, layout.padded_len - seq), (0, 0))
  qt, kt, vt = (jnp.pad(x.transpose(0, 2, 1, 3), pad) for x in (q, k, v))
  if name == "triton":
    from pallas_kernels.sample_attention.triton_gpu import triton_sample_attention
    out = triton_sample_attention(qt, kt, vt, selection, layout, scale)
    out = jax.lax.dynamic_slice_in_dim(out, start, rows, axis=2)
  else:
    # The query blocks covering rows [start, start + rows): a static count, a traced first.
    bq = layout.block_q
    n_blocks = min(layout.num_q_blocks, -(-rows // bq) + (rows != seq))
    first = jnp.clip(start // bq, 0, layout.num_q_blocks - n_blocks)
    local = Selection(
        jax.lax.dynamic_slice_in_dim(selection.kv_blocks, first, n_blocks, axis=2),
        jax.lax.dynamic_slice_in_dim(selection.counts, first, n_blocks, axis=2),
        selection.density)
    q_local = jax.lax.dynamic_slice_in_dim(qt, first * bq, n_blocks * bq, axis=2)
    if name == "xla":
      out = xla_sample_attention(q_local, kt, vt, local, layout, scale, xla_group_rows, first)
    else:
      out = pallas_sample_attention(q_local, kt, vt, local, layout, scale, interpret, first)
    out = jax.lax.dynamic_slice_in_dim(out, start - first * bq, rows, axis=2)
  out = out.transpose(0, 2, 1, 3)
  return (out, selection) if return_selection else out
