"""Generation with the data axis across two processes (``jax.distributed``, gloo CPU collectives)
gives every process the same results as one process with the same mesh.

Run as a script, this file is one of the two worker processes:
``python tests/test_inference_engine_multiprocess.py PORT PROCESS_ID OUTPUT_JSON``.
"""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_SHAPE = (4, 1, 2, 1)  # data 4 = 2 per process, tensor 2 inside each process
PROMPTS = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13], [20, 21, 22, 23], [30], [40, 41]]


def _detokenize(tokens: list[int]) -> str:
    return " ".join(str(t % 10) for t in tokens)


def generate_all(mesh) -> list[dict]:
    """Greedy, sampled with 2 samples per prompt, and sampled with stop strings (host-checked)."""
    from glmjax.inference.engine import GenerationEngine
    from glmjax.inference.sampling import SamplingConfig
    from glmjax.models import create_model, preset

    model = create_model(preset("glm4-tiny"), seed=7)  # identical, uncommitted on every process
    engine = GenerationEngine(model, mesh=mesh, max_batch_size=8, length_buckets=(16, 32))
    hot = SamplingConfig(temperature=1.0, top_p=0.95)
    runs = [
        engine.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[1]),
        engine.generate(PROMPTS, hot, max_new_tokens=12, seed=3, num_samples=2),
        engine.generate(PROMPTS, hot, max_new_tokens=12, seed=5, stop_strings=["3 4", "7 7"],
                        detokenize=_detokenize, stop_check_every=4),
    ]
    return [{"tokens": r.tokens, "logprobs": r.logprobs, "finish_reason": r.finish_reason, "text": r.text}
            for results in runs for r in results]


def _worker(port: int, process_id: int, output: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from glmjax import sharding

    assert jax.process_count() == 2 and len(jax.local_devices()) == 4
    results = generate_all(sharding.make_mesh(MESH_SHAPE))
    with open(output, "w") as f:
        json.dump(results, f)


def test_two_processes_generate_what_one_process_does(tmp_path):
    import jax
    import numpy as np

    from glmjax import sharding

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    outputs = [tmp_path / f"process_{i}.json" for i in range(2)]
    processes = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), str(out)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, out in enumerate(outputs)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    first, second = (json.loads(out.read_text()) for out in outputs)
    assert first == second  # every process returns the same full list
    one = generate_all(sharding.make_mesh(MESH_SHAPE, devices=jax.devices()[:8]))
    assert len(first) == len(one) == 4 * len(PROMPTS)
    for got, want in zip(first, one):
        assert (got["tokens"], got["finish_reason"], got["text"]) == (
            want["tokens"], want["finish_reason"], want["text"])
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
    assert any(r["finish_reason"] == "stop" and r["text"] is not None for r in one)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
