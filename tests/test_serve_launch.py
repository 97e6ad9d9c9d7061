"""``python -m launch.serve`` end to end: one-line flag errors; serving an HF checkpoint directory;
and two processes (``jax.distributed``, gloo) where process 0 serves and process 1 follows its
schedule, answering exactly what one process with the same mesh answers."""

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import openai
import pytest
from chat_tokenizers import qwen_tokenizer
from hf_models import make_hf_model

from glmjax.inference.llm_client import OpenAIHTTPClient, SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "2,1,2,1"  # data 2 x tensor 2: 4 devices, in one process or two
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GLM checkpoint with a Qwen-style chat tokenizer in the same directory."""
    directory = tmp_path_factory.mktemp("served")
    tokenizer = qwen_tokenizer(directory)
    make_hf_model("glm", vocab_size=len(tokenizer), seed=5).save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "launch.serve", "--port=0", *flags]


@contextlib.contextmanager
def _serving(commands: list[list[str]], devices: int, logs):
    """Runs the commands (process 0 first); yields the URL process 0 prints; stops them."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    files = contextlib.ExitStack()
    processes = []
    for index, command in enumerate(commands):
        stderr = files.enter_context(open(logs / f"process_{index}.err", "w"))
        stdout = subprocess.PIPE if index == 0 else files.enter_context(open(logs / f"process_{index}.out", "w"))
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in processes[0].stdout], daemon=True).start()
    try:
        try:
            ready = json.loads(lines.get(timeout=300))
        except queue.Empty:
            raise AssertionError((logs / "process_0.err").read_text()[-3000:]) from None
        yield ready["url"], ready
    finally:
        processes[0].send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=120) for process in processes]
        files.close()
        assert codes == [0] * len(processes), [(logs / f"process_{i}.err").read_text()[-2000:]
                                               for i in range(len(processes))]


def _answers(url: str) -> dict:
    """Greedy chat turns (two conversations, n=2), seeded samples and a streamed completion."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    name = client.models.list().data[0].id
    chat = client.chat.completions.create(model=name, messages=USER, max_tokens=8, temperature=0, n=2)
    sampled = client.completions.create(model=name, prompt=["Paris", "sunny"], max_tokens=6, temperature=1.0, seed=3,
                                        n=2, logprobs=1, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=name, prompt="weather", max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    ours = OpenAIHTTPClient(url, name, use_env_proxy=False).complete_batch(
        [USER, USER], SamplingParams(max_tokens=6, temperature=0.8, seed=11))
    return {"name": name, "chat": [c.message.content for c in chat.choices],
            "sampled": [c.text for c in sampled.choices],
            "logprobs": [c.logprobs.token_logprobs for c in sampled.choices], "streamed": streamed, "ours": ours}


@pytest.mark.parametrize("flags, message", [
    ([], "serve: serving needs a tokenizer: pass --tokenizer_dir (the model's tokenizer directory)"),
    (["--tokenizer_dir={model}"], "serve: give exactly one of --hf_dir, --orbax_dir and --run_dir"),
    (["--hf_dir={model}", "--max_len=100000"], "serve: --max_len=100000 exceeds the model's max_position_embeddings (256)"),
    (["--hf_dir={model}", "extra"], "serve: unexpected arguments ['extra']"),
])
def test_flag_errors_are_one_line(model_dir, flags, message):
    command = _serve_command(*(flag.format(model=model_dir) for flag in flags))
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == message


def test_two_processes_serve_what_one_process_serves(model_dir, tmp_path):
    flags = [f"--hf_dir={model_dir}", f"--mesh_shape={MESH}", "--max_slots=4", "--served_model_name=tiny"]
    (tmp_path / "one").mkdir()
    with _serving([_serve_command(*flags)], 4, tmp_path / "one") as (url, ready):
        assert ready["processes"] == 1 and ready["max_len"] == 256
        one = _answers(url)
    coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
    commands = [_serve_command(*flags, coordinator, "--num_processes=2", f"--process_id={index}") for index in (0, 1)]
    (tmp_path / "two").mkdir()
    with _serving(commands, 2, tmp_path / "two") as (url, ready):
        assert ready["processes"] == 2
        two = _answers(url)
    assert one["name"] == "tiny" and len(set(one["sampled"])) > 1
    assert {k: v for k, v in two.items() if k != "logprobs"} == {k: v for k, v in one.items() if k != "logprobs"}
    flat = [[value for row in answers["logprobs"] for value in row] for answers in (one, two)]
    assert flat[1] == pytest.approx(flat[0], abs=1e-5)
