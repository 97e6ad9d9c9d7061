"""Batch specs: what each key of a training batch is (dtype, logical axes) and how rows group.

A data factory (or an objective) declares its batch spec; the trainer builds one sharding per key
from the logical axes (``glmjax.sharding``), the step constrains each key by its own axes, and the
microbatch split keeps the rows of a group together.

Every key's first axis is the batch (``"act_batch"``). Examples::

    inputs        int32   (act_batch, act_seq)          token ids
    teacher_ids   int32   (act_batch, act_seq, None)    top-k teacher ids per position
    ref_logps     float32 (act_batch,)                  one value per row (unpacked data)
    rewards       float32 (act_batch, None)             one value per packed segment

Groups: ``group_size`` consecutive rows form one group (a DPO pair is 2 rows, chosen then
rejected; the K responses to one prompt are K rows). Row counts per host, per data shard and per
microbatch are multiples of it, so no split ever separates a group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from glmjax.sharding import LogicalAxes


class BatchSpecError(ValueError):
    """A batch that does not match its spec (the message names the key)."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One batch key.

    Attributes:
      dtype: numpy dtype name of the host arrays ("int32", "float32", ...).
      axes: one logical axis name (or None: never sharded) per dimension, batch first.
    """

    dtype: str
    axes: LogicalAxes

    def __post_init__(self) -> None:
        np.dtype(self.dtype)  # fails early on a typo
        if not self.axes or self.axes[0] != "act_batch":
            raise ValueError(f"feature axes {self.axes} must start with 'act_batch'")

    @property
    def ndim(self) -> int:
        return len(self.axes)


TOKEN = FeatureSpec("int32", ("act_batch", "act_seq"))
"""An int32 [batch, seq] key (token ids, masks, positions, segment ids)."""

LM_FEATURES: dict[str, FeatureSpec] = {
    "inputs": TOKEN, "targets": TOKEN, "loss_mask": TOKEN, "segment_ids": TOKEN, "positions": TOKEN,
}
"""The keys every LM batch of ``glmjax.data.pipeline`` has."""


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The keys of a batch and its grouping.

    Attributes:
      features: key -> FeatureSpec.
      group_size: consecutive rows that must stay in one microbatch (1: rows are independent).
    """

    features: Mapping[str, FeatureSpec]
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def merge(self, other: "BatchSpec | None") -> "BatchSpec":
        """This spec with ``other``'s keys added; a key both declare must agree, and so must
        group sizes other than 1."""
        if other is None:
            return self
        features = dict(self.features)
        for key, feature in other.features.items():
            if key in features and features[key] != feature:
                raise BatchSpecError(f"batch key {key!r} declared twice: {features[key]} vs {feature}")
            features[key] = feature
        sizes = {self.group_size, other.group_size} - {1}
        if len(sizes) > 1:
            raise BatchSpecError(f"group sizes disagree: {self.group_size} vs {other.group_size}")
        return BatchSpec(features, sizes.pop() if sizes else 1)

    def check(self, batch: Mapping[str, Any], where: str = "batch") -> None:
        """Raises ``BatchSpecError`` naming the key when ``batch`` does not match the spec: a key
        without a spec, a declared key missing, a dtype or rank that differs, or a row count
        that is not a multiple of ``group_size``."""
        undeclared = sorted(set(batch) - set(self.features))
        if undeclared:
            shapes = ", ".join(f"{k} {np.asarray(batch[k]).dtype} {list(np.shape(batch[k]))}" for k in undeclared)
            raise BatchSpecError(
                f"{where}: keys without a batch spec: {shapes}; declare them (glmjax.data.spec) in "
                "the data factory or the objective")
        for key, feature in self.features.items():
            if key not in batch:
                raise BatchSpecError(f"{where}: key {key!r} is declared in the batch spec but missing")
            array = batch[key]
            dtype, shape = np.dtype(array.dtype), tuple(array.shape)
            if dtype != np.dtype(feature.dtype) or len(shape) != feature.ndim:
                raise BatchSpecError(
                    f"{where}: key {key!r} is {dtype.name} {list(shape)} but the spec says "
                    f"{feature.dtype} with axes {feature.axes}")
            if shape[0] % self.group_size:
                raise BatchSpecError(
                    f"{where}: key {key!r} has {shape[0]} rows, not a multiple of group_size "
                    f"{self.group_size}")


def lm_batch_spec(extra: Mapping[str, FeatureSpec] | None = None, group_size: int = 1) -> BatchSpec:
    """The LM keys (``LM_FEATURES``) plus ``extra`` ones."""
    return BatchSpec(dict(LM_FEATURES), group_size).merge(BatchSpec(dict(extra or {})))


class SpecifiedIterDataset(grain.IterDataset):
    """A grain dataset that also says what its batches are (``batch_spec``); iterating it is
    iterating its parent (same elements, same checkpointable iterator state)."""

    def __init__(self, parent: grain.IterDataset, batch_spec: BatchSpec):
        super().__init__(parent)
        self.batch_spec = batch_spec

    def __iter__(self) -> grain.DatasetIterator:
        return self._parent.__iter__()

    def __str__(self) -> str:
        return f"SpecifiedIterDataset({self.batch_spec})"


def with_batch_spec(dataset: grain.IterDataset, batch_spec: BatchSpec) -> SpecifiedIterDataset:
    """``dataset`` carrying ``batch_spec``."""
    return SpecifiedIterDataset(dataset, batch_spec)


def batch_spec_of(dataset: Any) -> BatchSpec | None:
    """The spec a dataset declares (``dataset.batch_spec``), or None."""
    return getattr(dataset, "batch_spec", None)
