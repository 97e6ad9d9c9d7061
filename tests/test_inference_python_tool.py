"""Tests for the sandboxed Python interpreter tool.

Every test runs in both isolation modes where the host supports namespaces
(root on Linux), and checks afterwards that no sandbox process and no
temporary working directory is left behind.
"""

import concurrent.futures
import os
import resource
import socket
import textwrap
import time

import pytest

from glmjax.inference.python_tool import (
    PythonInterpreter,
    SandboxLimits,
    namespace_isolation_error,
    register_python_tool,
)
from glmjax.inference.tools import ToolRegistry

LIMITS = SandboxLimits(wall_time_s=2.0, memory_bytes=256 * 2**20, output_bytes=4096)
NAMESPACES = pytest.param(
    "namespaces",
    marks=pytest.mark.skipif(namespace_isolation_error() is not None,
                             reason=f"no namespace isolation: {namespace_isolation_error()}"),
)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if text.encode() in cmdline.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@pytest.fixture(params=["guard", NAMESPACES])
def interpreter(request, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    open_fds = len(os.listdir("/proc/self/fd"))
    yield PythonInterpreter(LIMITS, isolation=request.param, temp_root=runs)
    assert list(runs.iterdir()) == [], "a working directory was left behind"
    assert _processes_mentioning(str(runs)) == [], "a sandbox process was left behind"
    assert len(os.listdir("/proc/self/fd")) == open_fds, "file descriptors leaked"


def test_prints_and_files_in_working_directory(interpreter):
    result = interpreter.run(textwrap.dedent("""
        with open("notes.txt", "w") as f:
            f.write("kept")
        import os, tempfile
        os.mkdir("sub")
        with tempfile.NamedTemporaryFile("w", delete=False) as t:
            t.write("x")
        print(open("notes.txt").read(), sum(range(10)))
        import asyncio
        async def answer():
            return 42
        print(asyncio.run(answer()))
    """))
    assert result.ok, result
    assert result.stdout == "kept 45\n42\n"
    assert result.stderr == ""
    assert result.isolation == interpreter.isolation
    assert result.observation() == "kept 45\n42"


def test_exception_returns_traceback_without_sandbox_frames(interpreter):
    result = interpreter.run("def f(x):\n    return 1 / x\nprint('before')\nf(0)\n")
    assert result.exit_status == 1 and result.exception == "ZeroDivisionError"
    assert not (result.timed_out or result.memory_exceeded or result.output_truncated)
    assert 'File "<code>", line 4, in <module>' in result.stderr
    assert "return 1 / x" in result.stderr
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "python_tool.py" not in result.stderr
    assert result.observation().startswith("before\n[stderr]\nTraceback")


def test_syntax_error_and_exit_status(interpreter):
    result = interpreter.run("x = (1,\n")
    assert result.exception == "SyntaxError" and "was never closed" in result.stderr
    result = interpreter.run("import sys\nsys.exit(3)")
    assert result.exit_status == 3 and result.exception is None
    assert result.observation() == "[process exited with status 3]"


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_is_stopped(interpreter, code):
    limits = SandboxLimits(wall_time_s=1.0)
    quick = PythonInterpreter(limits, isolation=interpreter.isolation,
                              temp_root=interpreter.temp_root)
    start = time.monotonic()
    result = quick.run("print('started')\n" + code)
    assert time.monotonic() - start < limits.wall_time_s + 1.5
    assert result.timed_out and not result.ok
    assert result.stdout == "started\n"  # Output before the kill is kept.
    assert "time limit exceeded" in result.observation()


def test_memory_hog_is_contained(interpreter):
    before = resource.getrlimit(resource.RLIMIT_AS)
    result = interpreter.run("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))")
    assert result.memory_exceeded and result.exception == "MemoryError"
    assert "memory limit of 256 MiB exceeded" in result.observation()
    assert interpreter.run("print(len(bytearray(10**8)))").stdout == "100000000\n"
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # The host is unaffected.


def test_huge_output_is_truncated(interpreter):
    start = time.monotonic()
    result = interpreter.run("while True:\n    print('x' * 1000)")
    assert time.monotonic() - start < LIMITS.wall_time_s
    assert result.output_truncated and not result.timed_out
    assert len(result.stdout) == LIMITS.output_bytes
    assert "output exceeded 4096 bytes" in result.observation()


def test_big_files_are_refused(interpreter):
    limits = SandboxLimits(wall_time_s=2.0, file_size_bytes=1000)
    small = PythonInterpreter(limits, isolation=interpreter.isolation,
                              temp_root=interpreter.temp_root)
    result = small.run("with open('big', 'wb') as f:\n    f.write(b'x' * 2000)")
    assert result.exception == "OSError" and "File too large" in result.stderr


@pytest.mark.parametrize("target", ["{outside}/pwned.txt", "../pwned.txt"])
def test_write_outside_working_directory_is_blocked(interpreter, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    code = f"open({target.format(outside=outside)!r}, 'w').write('owned')"
    result = interpreter.run(code)
    assert result.exit_status == 1
    assert result.exception in ("PermissionError", "OSError")
    assert "not allowed" in result.stderr or "Read-only file system" in result.stderr
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "runs" / "pwned.txt").exists()


def test_network_is_blocked(interpreter):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = interpreter.run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert result.exit_status == 1 and result.exception in ("PermissionError", "OSError")
        with pytest.raises(BlockingIOError):
            listener.accept()  # Nothing ever connected.
    finally:
        listener.close()


def test_process_creation_is_blocked(interpreter):
    result = interpreter.run("import subprocess\nsubprocess.run(['sleep', '30'])")
    assert result.exception == "PermissionError"
    assert "subprocess.Popen is not allowed" in result.stderr


@pytest.mark.skipif(namespace_isolation_error() is not None, reason="no namespace isolation")
def test_kernel_isolation_where_the_guard_has_no_hook(tmp_path):
    """What the namespaces guarantee even where the in-process guard has no hook."""
    interpreter = PythonInterpreter(LIMITS, isolation="namespaces", temp_root=tmp_path)
    result = interpreter.run(textwrap.dedent(f"""
        import os
        print(os.getpid())
        print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev")
                     if ":" in line))
        print([l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")])
        os.mkfifo({str(tmp_path / 'fifo')!r})  # mkfifo is not audited.
    """))
    assert result.stdout.splitlines() == ["1", "['lo']", "['0000000000000000']"]
    assert "Read-only file system" in result.stderr
    assert not (tmp_path / "fifo").exists()


def test_concurrent_runs_do_not_interfere(interpreter):
    codes = [f"print({i} * {i})" for i in range(6)] + ["while True:\n    pass"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(interpreter.run, codes))
    assert [r.stdout for r in results[:6]] == [f"{i * i}\n" for i in range(6)]
    assert results[6].timed_out


def test_registered_as_a_tool(tmp_path):
    registry = ToolRegistry()
    interpreter = register_python_tool(
        registry, PythonInterpreter(LIMITS, isolation="guard", temp_root=tmp_path))
    assert registry.spec("python").parameters["required"] == ["code"]
    assert registry.call("python", {"code": "print(6 * 7)"}) == "42"
    assert "ZeroDivisionError" in registry.call("python", {"code": "1/0"})
    assert interpreter("print('direct')") == "direct"
    assert registry.call("python", {"code": ""}) == "(no output)"


def test_invalid_configuration():
    with pytest.raises(ValueError, match="wall_time_s must be positive"):
        SandboxLimits(wall_time_s=0)
    with pytest.raises(ValueError, match="isolation must be"):
        PythonInterpreter(isolation="docker")
