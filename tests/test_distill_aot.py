"""Ahead-of-time compile of online distillation at the paper's scale: the GLM-4-9B teacher
(frozen, bf16, forward only) inside the train step of the 1.9B student preset, on 8 fake CPU
devices, with per-device memory printed."""

import json

import numpy as np
import pytest

from glmjax.data.spec import lm_batch_spec
from glmjax.models import preset
from glmjax.objectives.alpha import WSDAlpha
from glmjax.objectives import LMObjective
from glmjax.objectives.distill import DistillObjective
from glmjax.training.trainer import train
from training_helpers import fixed_batches_factory

GIB = 2**30
_STUDENT = preset("glm4-student-1.9b").replace(compute_dtype="bfloat16", remat_policy="full")
_TEACHER = preset("glm4-9b").replace(param_dtype="bfloat16", compute_dtype="bfloat16")


@pytest.mark.slow
def test_online_distillation_of_glm4_9b_into_1_9b_compiles_with_bounded_memory():
    """fsdp=8, 8 x 2048 tokens (one row per device), PD* truncation (top-0.95-50, tau 2, KL),
    against the LM step of the same student.

    Arguments: the student's fp32 state (1.90B x 12 bytes / 8 = 2.7 GiB) + the bf16 teacher
    (9.40B x 2 bytes / 8 = 2.2 GiB) + the batch.
    """
    rows, seq = 8, 2048
    batch = {k: np.zeros((rows, seq), np.int32) for k in lm_batch_spec().features}
    online = DistillObjective(mode="online", teacher=_TEACHER, teacher_seed=0, top_p=0.95, top_k=50,
                              temperature=2.0, loss_type="kl", alpha=WSDAlpha(total_steps=10), chunk_size=512)

    def compile_step(objective):
        return train(model_dir="unused", model_config=_STUDENT, train_data=fixed_batches_factory([batch]),
                     train_steps=10, objective=objective, mesh_shape=(1, 8, 1, 1), num_microbatches=1,
                     compile_only=True)

    reports = {"online_kd": compile_step(online), "lm": compile_step(LMObjective(chunk_size=512))}
    for name, report in reports.items():
        print(name, json.dumps({k: round(report[k] / GIB, 2) for k in (
            "argument_bytes_per_device", "temp_bytes_per_device", "peak_bytes_per_device")}), "GiB per device,",
            f"compiled in {report['compile_seconds']} s")
    kd, lm = reports["online_kd"], reports["lm"]
    teacher_bytes = 9.40e9 * 2 / 8
    assert abs(kd["argument_bytes_per_device"] - lm["argument_bytes_per_device"] - teacher_bytes) / teacher_bytes < 0.01
    for report in reports.values():
        assert np.isfinite(report["peak_bytes_per_device"]) and report["peak_bytes_per_device"] > 0
    # Measured (jax 0.10.2, XLA:CPU, which counts fp32 copies of bf16 values): 12.58 GiB of
    # temporaries with the teacher vs 5.99 GiB for the LM step. The KD loss itself adds nothing
    # (offline KD compiles to 5.51 GiB); the teacher's forward adds its FSDP all-gathered layer
    # weights and head kernel, its activations and one chunk of fp32 teacher logits
    # (512 x 151552 x 4 bytes = 0.3 GiB per row). Whole-sequence fp32 logits of both models would be
    # 2 x 1.2 GiB per row more; the bound leaves less than that.
    assert kd["temp_bytes_per_device"] < 13.5 * GIB, kd
