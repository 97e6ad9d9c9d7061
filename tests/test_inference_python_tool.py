"""Tests for the sandboxed Python interpreter tool: behaviour for honest code, in both modes.

Every test runs in both isolation modes (namespace mode where the kernel provides it) and
checks afterwards that no sandbox process, descriptor or directory is left behind.  The
attacks are in tests/test_inference_sandbox_hostile.py.
"""

import concurrent.futures
import os
import resource
import socket
import textwrap
import time

import pytest

from glmjax.inference import python_tool
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
                             reason=f"no kernel isolation: {namespace_isolation_error()}"),
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
        import threading
        results = []
        workers = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]
        for w in workers: w.start()
        for w in workers: w.join()
        print(sorted(results))
        import numpy
        print(int(numpy.arange(5).sum()))
    """))
    assert result.ok, result
    assert result.stdout == "kept 45\n42\n[0, 1, 2, 3]\n10\n"
    assert result.stderr == ""
    assert result.isolation == interpreter.isolation
    assert result.observation() == "kept 45\n42\n[0, 1, 2, 3]\n10"


def test_exception_returns_traceback_without_sandbox_frames(interpreter):
    result = interpreter.run("def f(x):\n    return 1 / x\nprint('before')\nf(0)\n")
    assert result.exit_status == 1 and result.exception == "ZeroDivisionError"
    assert not (result.timed_out or result.memory_exceeded or result.output_truncated)
    assert 'File "<code>", line 4, in <module>' in result.stderr
    assert "return 1 / x" in result.stderr
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "sandbox" not in result.stderr and "child.py" not in result.stderr
    assert result.observation().startswith("before\n[stderr]\nTraceback")


def test_syntax_error_and_exit_status(interpreter):
    result = interpreter.run("x = (1,\n")
    assert result.exception == "SyntaxError" and "was never closed" in result.stderr
    result = interpreter.run("import sys\nsys.exit(3)")
    assert result.exit_status == 3 and result.exception is None
    assert result.observation() == "[process exited with status 3]"
    result = interpreter.run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert result.exit_status == -15
    assert result.observation() == "[process killed by signal SIGTERM]"


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


@pytest.mark.parametrize("target", ["{outside}/pwned.txt", "../pwned.txt", "/pwned.txt"])
def test_write_outside_working_directory_is_blocked(interpreter, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    result = interpreter.run(f"open({target.format(outside=outside)!r}, 'w').write('owned')")
    assert result.exit_status == 1
    # The guard refuses; in namespace mode a host path under /tmp names a file in the
    # scratch directory (/tmp is a link to it) whose directory does not exist there.
    assert result.exception in ("PermissionError", "FileNotFoundError")
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "runs" / "pwned.txt").exists()
    assert not os.path.exists("/pwned.txt")


def test_network_is_blocked(interpreter):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = interpreter.run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert result.exit_status == 1 and result.exception == "PermissionError"
        with pytest.raises(BlockingIOError):
            listener.accept()  # Nothing ever connected.
    finally:
        listener.close()


def test_process_creation_is_blocked(interpreter):
    result = interpreter.run("import subprocess\nsubprocess.run(['sleep', '30'])")
    assert result.exception == "PermissionError"
    assert "subprocess.Popen is not allowed" in result.stderr


@pytest.mark.skipif(namespace_isolation_error() is not None, reason="no kernel isolation")
def test_namespace_mode_environment(tmp_path):
    """What the code sees in namespace mode: its own PID namespace, no network, no capabilities."""
    interpreter = PythonInterpreter(LIMITS, temp_root=tmp_path)
    result = interpreter.run(textwrap.dedent("""
        import os
        print(os.getpid(), os.getcwd(), os.path.realpath("/tmp"), sorted(os.listdir("/proc"))[:2])
        print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev") if ":" in line))
        print([l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")])
        print(open("/proc/self/uid_map").read().split())
        print(sorted(os.environ))
    """))
    assert result.ok, result
    outside_uid = "65534" if os.geteuid() == 0 else str(os.geteuid())
    assert result.stdout.splitlines() == [
        "2 /sandbox /sandbox ['1', '2']",
        "['lo']",
        "['0000000000000000']",
        str(["0", outside_uid, "1"]),
        str(sorted(["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "MALLOC_ARENA_MAX",
                    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"])),
    ]


def test_default_mode_is_kernel_isolation_and_works_as_root():
    assert PythonInterpreter().isolation == "namespaces"
    if os.geteuid() != 0 or os.uname().sysname != "Linux":
        pytest.skip("the default mode is required to work for root on Linux")
    with open("/proc/sys/user/max_user_namespaces") as limit:
        if int(limit.read()) == 0:
            pytest.skip("user namespaces are disabled on this kernel (user.max_user_namespaces=0)")
    assert namespace_isolation_error() is None


def test_refuses_without_kernel_isolation(monkeypatch, tmp_path):
    monkeypatch.setattr(python_tool, "namespace_isolation_error", lambda: "no user namespaces")
    marker = tmp_path / "ran"
    result = PythonInterpreter(LIMITS, temp_root=tmp_path).run(f"open({str(marker)!r}, 'w')")
    assert result.exit_status is None and not result.ok and not marker.exists()
    assert result.setup_error.startswith("kernel isolation is unavailable on this host "
                                         "(no user namespaces), so the code was not run")
    assert "isolation='guard'" in result.observation()
    assert list(tmp_path.iterdir()) == []


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
    with pytest.raises(ValueError, match="threads must be positive"):
        SandboxLimits(threads=0)
    with pytest.raises(ValueError, match="isolation must be 'namespaces' or 'guard'"):
        PythonInterpreter(isolation="auto")
