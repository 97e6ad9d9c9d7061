"""Ahead-of-time compiles of the real train step of GLM-4-9B: per-device memory on 8 fake CPU
devices, and for a TPU slice through libtpu (no TPU needed)."""

import jax
import numpy as np
import pytest

from glmjax import hardware
from glmjax.data.spec import lm_batch_spec
from glmjax.models import preset
from glmjax.training.trainer import train
from training_helpers import fixed_batches_factory

GIB = 2**30
_CONFIG = preset("glm4-9b").replace(compute_dtype="bfloat16", remat_policy="full")


def _zeros_factory(rows: int, seq: int):
    batch = {k: np.zeros((rows, seq), np.int32) for k in lm_batch_spec().features}
    return fixed_batches_factory([batch])


def _compile(config, mesh_shape, rows, seq, **kwargs):
    return train(model_dir="unused", model_config=config, train_data=_zeros_factory(rows, seq),
                 train_steps=10, mesh_shape=mesh_shape, compile_only=True, **kwargs)


@pytest.mark.slow
def test_glm4_9b_train_step_fits_per_device_memory():
    """fsdp=8, fp32 master weights + AdamW moments, bf16 compute, full remat, 8 x 2048 tokens in
    2 microbatches.

    Arguments are the state: 9.40B parameters x (4 + 4 + 4) bytes / 8 devices = 13.1 GiB, plus
    the batch. The step's temporaries (XLA:CPU's count, which includes fp32 copies of bf16 values
    that a TPU keeps in bf16) leave less room than one more fp32 [embed, vocab] buffer per device
    (2.3 GiB replicated) on top of what the sharded step needs.
    """
    report = _compile(_CONFIG, (1, 8, 1, 1), rows=8, seq=2048, num_microbatches=2)
    state_bytes = 9.40e9 * 12 / 8
    assert report["parameters"] == 9_399_951_360
    assert abs(report["argument_bytes_per_device"] - state_bytes) / state_bytes < 0.01
    # Measured 17.1 GiB (jax 0.10.2); one more replicated fp32 [embed, vocab] buffer is 2.3 GiB.
    assert report["temp_bytes_per_device"] < 18.5 * GIB, report


@pytest.mark.tpu_aot
@pytest.mark.skipif(not hardware.libtpu_available(), reason="libtpu is not installed (pip install 'glmjax[tpu_aot]')")
def test_glm4_9b_train_step_compiles_for_a_tpu_slice():
    """The real step (splash attention through Mosaic, AdamW) for v5p:2x2x1 (4 chips, 95 GiB HBM)."""
    with jax.default_matmul_precision("default"):
        report = _compile(_CONFIG.replace(attention_backend="splash"), (1, -1, 1, 1), rows=4, seq=2048,
                          topology="v5p:2x2x1")
    assert report["platform"] == "tpu" and report["devices"] == 4
    assert report["peak_bytes_per_device"] < 95 * GIB
    state_bytes = 9.40e9 * 12 / 4
    assert abs(report["argument_bytes_per_device"] - state_bytes) / state_bytes < 0.01
