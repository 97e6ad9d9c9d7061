"""Two processes: per-process host states, and a corruption that only one process sees makes
both fall back to the same step."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from glmjax import sharding
from glmjax.training.checkpointing import Checkpointer
from glmjax.training.state import TrainState

mesh = sharding.make_mesh((4, 1, 1, 1))
rows = NamedSharding(mesh, PartitionSpec("data"))
everywhere = NamedSharding(mesh, PartitionSpec())


def bits(step):
    return np.random.default_rng(step).integers(0, 2**32, (8, 1024), dtype=np.uint32)


def state(step):
    put = lambda value, s: jax.make_array_from_callback(value.shape, s, lambda index: value[index])
    return TrainState(step=put(np.int32(step), everywhere), params={"w": put(np.full((8, 4), step, np.float32), rows)},
                      opt_state=(), rng=put(np.zeros(2, np.uint32), everywhere), extra={"bits": put(bits(step), rows)})


class Position:
    def __init__(self, value):
        self.value = value

    def get_state(self):
        return {"value": self.value}

    def set_state(self, state):
        self.value = state["value"]


position = Position(100 * jax.process_index())
checkpointer = Checkpointer(sys.argv[3])
if sys.argv[4] == "save":
    for step in (1, 2, 3):
        checkpointer.save(state(step), step=step, host_states={"data": position})
        position.value += 1
else:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
    restored, step = checkpointer.restore(abstract, host_states={"data": position})
    local = [np.asarray(s.data) for s in restored.extra["bits"].addressable_shards]
    print(json.dumps({"step": step, "position": position.value, "steps": checkpointer.all_steps(),
                      "bits_ok": bool(np.array_equal(np.concatenate(local), bits(step)[4 * jax.process_index():][:4])),
                      "w": float(restored.params["w"].addressable_shards[0].data[0, 0])}))
checkpointer.close()
"""


def _run_two(tmp_path, phase):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    processes = [
        subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(tmp_path / "ckpt"), phase],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr[-3000:]
        outputs.append((stdout, stderr))
    return outputs


def test_one_process_sees_corruption_both_fall_back(tmp_path):
    _run_two(tmp_path, "save")
    directory = tmp_path / "ckpt"
    assert sorted(os.listdir(directory / "3" / "host")) == ["commit_success.txt", "process_0-of-2.json",
                                                             "process_1-of-2.json"]
    # Step 3: process 1's host state is damaged. Step 2: the stored rows of extra/bits that only
    # process 1 reads are cut off.
    host = directory / "3" / "host" / "process_1-of-2.json"
    host.write_text(host.read_text().replace('"value": 102', '"value": 7'))
    needle = np.random.default_rng(2).integers(0, 2**32, (8, 1024), dtype=np.uint32)[6].tobytes()[:64]
    holders = [p for p in (directory / "2" / "state").rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert holders
    for path in holders:
        data = path.read_bytes()
        path.write_bytes(data[: data.find(needle)])

    outputs = _run_two(tmp_path, "restore")
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert [r["step"] for r in results] == [1, 1]
    assert [r["position"] for r in results] == [100 * i for i in range(2)]  # each process its own
    assert all(r["bits_ok"] and r["w"] == 1.0 and r["steps"] == [1] for r in results)
    warnings = [[line for line in stderr.splitlines() if "corrupt checkpoint (" in line] for _, stderr in outputs]
    assert [len(lines) for lines in warnings] == [2, 2], warnings  # steps 3 and 2, one line each
    assert all("corrupt checkpoint (process 1 could not read its part)" in line for line in warnings[0])
    assert "host/process_1-of-2.json: CRC32 mismatch" in warnings[1][0]
    assert "unreadable array data" in warnings[1][1]
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt", "3.corrupt"]
