"""``launch.evaluate`` from tests: several argument lists in one fresh interpreter (absl flags of
other launch modules would clash inside the test worker)."""

import json
import os
import subprocess
import sys

import glmjax

REPO = os.path.dirname(os.path.dirname(glmjax.__file__))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")

_IN_PROCESS_RUNNER = """
import json, sys
from absl import flags
from absl.testing import flagsaver
from launch import evaluate
codes = []
for args in json.loads(sys.argv[1]):
    with flagsaver.flagsaver():
        argv = flags.FLAGS(["evaluate", *args])
        codes.append(evaluate.main(argv))
    sys.stdout.flush()
print(json.dumps(codes))
"""


def evaluate_cli(cases: list[list[str]], timeout: float = 240) -> tuple[list[int], list[str], str]:
    """``launch.evaluate.main`` over each argument list in turn: (exit codes, the stdout lines
    before the codes, stderr)."""
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS_RUNNER, json.dumps(cases)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1], done.stderr
