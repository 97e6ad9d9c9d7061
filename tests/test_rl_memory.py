"""The RL memory check compiles the train step (with the EMA anchor as evolving state) and the
rollout engine on 8 fake devices; the anchor shows up as a second copy of the parameters."""

from glmjax.objectives.rl import RLObjective
from glmjax.rl.memory import rl_memory_report
from training_helpers import CONFIG


def test_rl_memory_report_counts_the_anchor_and_the_kv_cache():
    common = dict(mesh_shape=(1, 8, 1, 1), prompts_per_step=8, prompt_len=16, max_new_tokens=32)
    with_anchor = rl_memory_report(CONFIG, RLObjective(group_size=4, kl_coef=0.1, anchor="ema"), **common)
    without = rl_memory_report(CONFIG, RLObjective(group_size=4, kl_mode="none"), **common)
    extra = with_anchor["train_state_bytes_per_device"] - without["train_state_bytes_per_device"]
    # fp32 params sharded over 8 fsdp devices: the anchor adds about 1/3 of params + Adam moments.
    assert 0.25 < extra / without["train_state_bytes_per_device"] < 0.4
    assert with_anchor["engine"]["rows"] == 32 and with_anchor["engine"]["temp_bytes_per_device"] > 0
    assert with_anchor["peak_bytes_per_device"] >= with_anchor["rollout_peak_bytes"]
    assert with_anchor["train"]["global_batch"] == 32 and with_anchor["train"]["seq_len"] == 47
