"""SampleAttention: adaptive structured sparse attention for long-context prefill.

Public API: :func:`sample_attention` (attention), :func:`sample_attention_selection`
(stages 1 and 2 only), :class:`Selection` (padded key block lists + counts + density)
and the lower-level selection helpers.
"""
from pallas_kernels.sample_attention.api import (
    BACKENDS, resolve_backend, sample_attention, sample_attention_selection)
from pallas_kernels.sample_attention.layout import BlockLayout
from pallas_kernels.sample_attention.reference import reference_attention
from pallas_kernels.sample_attention.selection import (
    Selection, build_selection, full_selection, sampled_rows, select_blocks, selection_from_mask,
    stage1_block_scores, stage2_select_stripes)

__all__ = [
    "BACKENDS", "BlockLayout", "Selection", "build_selection", "full_selection",
    "reference_attention", "resolve_backend", "sample_attention",
    "sample_attention_selection", "sampled_rows", "select_blocks", "selection_from_mask",
    "stage1_block_scores", "stage2_select_stripes",
]
