"""Host side of the Python sandbox: start the child, supervise it, judge the outcome.

The verdict rests on what the host observes itself: the exit status the kernel reports for
the child (relayed in namespace mode by the sandbox's init process over a status channel
the code never holds), the host's own clock and byte count, and the child's CPU time.
Nothing the code prints or writes to a descriptor can change it, and :func:`execute` never
raises.
"""

from __future__ import annotations

import functools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Literal

from glmjax.inference.sandbox.cleanup import remove_tree
from glmjax.inference.sandbox.kernel import SCRATCH_DIR
from glmjax.inference.sandbox.limits import ExecutionResult, SandboxLimits

Mode = Literal["namespaces", "guard"]

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_STATUS_BYTES = 64 * 1024
_REPORT_BYTES = 4096
_EXCEPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_POLL_S = 0.05
_STOP_GRACE_S = 5.0


def execute(
    code: str, limits: SandboxLimits, mode: Mode, temp_root: str | None
) -> ExecutionResult:
    """Run ``code`` in a fresh sandbox child in ``mode``; never raises."""
    try:
        return _execute(code, limits, mode, temp_root)
    except Exception as error:  # noqa: BLE001 - callers get a result, whatever happened
        return failed_result(limits, mode, f"internal error: {type(error).__name__}: {error}")


def failed_result(limits: SandboxLimits, mode: Mode, reason: str) -> ExecutionResult:
    """The result of an execution that did not run the code, for ``reason``."""
    return ExecutionResult(stdout="", stderr="", exit_status=None, timed_out=False,
                           memory_exceeded=False, output_truncated=False, exception=None,
                           setup_error=reason, isolation=mode, limits=limits)


@functools.lru_cache(maxsize=1)
def namespace_isolation_error() -> str | None:
    """Why namespace mode (the kernel-enforced sandbox) is unusable here, or ``None``.

    Probed once per process by running ``pass`` in namespace mode.
    """
    if not sys.platform.startswith("linux"):
        return "kernel isolation needs Linux"
    result = execute("pass", SandboxLimits(wall_time_s=30.0), "namespaces", None)
    if result.setup_error is not None:
        return result.setup_error
    if result.exit_status != 0:
        return f"the probe exited with status {result.exit_status}: {result.stderr.strip()[-500:]}"
    return None


def _child_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",  # Each malloc arena reserves 64 MiB of the address space.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _execute(
    code: str, limits: SandboxLimits, mode: Mode, temp_root: str | None
) -> ExecutionResult:
    # Guard mode: the code's working directory.  Namespace mode: the mount point of the
    # sandbox's private root, empty on the host side.
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="glmjax-pytool-", dir=temp_root))
    fds: list[int] = []
    try:
        status_read, status_write = os.pipe()
        fds += [status_read, status_write]
        report_read, report_write = os.pipe()
        fds += [report_read, report_write]
        config = {
            "mode": mode,
            "workdir": workdir,
            "status_fd": status_write,
            "report_fd": report_write,
            "memory_bytes": limits.memory_bytes,
            "cpu_time_s": limits.effective_cpu_time_s,
            "file_size_bytes": limits.file_size_bytes,
            "open_files": limits.open_files,
            "threads": limits.threads,
            "disk_bytes": limits.disk_bytes,
            "disk_inodes": limits.disk_inodes,
        }
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-u", _CHILD_SCRIPT, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_child_env(SCRATCH_DIR if mode == "namespaces" else workdir),
            start_new_session=True,
            pass_fds=(status_write, report_write),
        )
        for fd in (status_write, report_write):
            os.close(fd)
            fds.remove(fd)
        try:
            stdout, stderr, timed_out, truncated = _supervise(process, code, limits)
        finally:
            returncode, cpu_seconds = _stop_and_reap(process, mode)
        status = _read_status(status_read)
        exception = _read_report(report_read)
    finally:
        for fd in fds:
            os.close(fd)
        remove_tree(workdir)
    return _make_result(mode, limits, returncode, cpu_seconds, stdout, stderr, timed_out,
                        truncated, status, exception)


def _supervise(
    process: subprocess.Popen[bytes], code: str, limits: SandboxLimits
) -> tuple[bytes, bytes, bool, bool]:
    """Feed the code, collect capped output until exit; kill on deadline or overflow."""
    deadline = time.monotonic() + limits.wall_time_s
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        process.stdin.write(code.encode("utf-8", "replace"))
        process.stdin.close()
    except BrokenPipeError:
        pass  # The child died during start-up; its status explains why.
    buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    total = 0
    timed_out = truncated = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not selector.get_map() and _has_exited(process.pid):
                break
            for key, _ in selector.select(timeout=min(remaining, _POLL_S)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                keep = chunk[: limits.output_bytes - total]
                buffers[key.fd] += keep
                total += len(keep)
                if len(keep) < len(chunk):
                    truncated = True
            if truncated:
                break
            if selector.get_map() and _has_exited(process.pid):
                _kill_group(process.pid)  # The child ended but something still holds its pipes.
    return (bytes(buffers[process.stdout.fileno()]), bytes(buffers[process.stderr.fileno()]),
            timed_out, truncated)


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its group id stays reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_and_reap(process: subprocess.Popen[bytes], mode: Mode) -> tuple[int, float]:
    """Stop what is left of the sandbox and reap the child.

    Namespace mode: SIGTERM asks the starter to kill the sandbox's init, which takes the
    whole PID namespace with it; the starter exits once the init is reaped, so its exit
    means the sandbox is gone.  Then (and in guard mode at once) SIGKILL goes to the
    child's process group.  The child is not reaped before that kill, so its pid cannot
    have been reused as a group id.  Returns the child's exit code and the CPU seconds of
    it and of the descendants it reaped.
    """
    if mode == "namespaces" and not _has_exited(process.pid):
        try:
            os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        grace_end = time.monotonic() + _STOP_GRACE_S
        while not _has_exited(process.pid) and time.monotonic() < grace_end:
            time.sleep(0.001)
    _kill_group(process.pid)
    _, wait_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    return process.returncode, usage.ru_utime + usage.ru_stime


def _read_available(fd: int, cap: int) -> bytes:
    """What the pipe holds now (all writers have exited), at most ``cap`` bytes."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < cap:
        try:
            chunk = os.read(fd, cap - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _read_status(fd: int) -> dict[str, Any]:
    """The first setup error and the last exit status on the status channel, if any."""
    status: dict[str, Any] = {}
    for line in _read_available(fd, _STATUS_BYTES).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        error = record.get("setup_error")
        if isinstance(error, str) and "setup_error" not in status:
            status["setup_error"] = error[:2000]
        exit_status = record.get("exit_status")
        if isinstance(exit_status, int) and not isinstance(exit_status, bool):
            status["exit_status"] = exit_status
    return status


def _read_report(fd: int) -> str | None:
    """The exception name the runner reported: one line holding a Python identifier."""
    lines = _read_available(fd, _REPORT_BYTES).split(b"\n")
    if len(lines) != 2 or lines[1]:
        return None
    name = lines[0].decode("ascii", "replace")
    return name if _EXCEPTION_NAME.fullmatch(name) else None


def _make_result(
    mode: Mode,
    limits: SandboxLimits,
    returncode: int,
    cpu_seconds: float,
    stdout: bytes,
    stderr: bytes,
    timed_out: bool,
    truncated: bool,
    status: dict[str, Any],
    exception: str | None,
) -> ExecutionResult:
    setup_error = status.get("setup_error")
    exit_status: int | None = returncode
    if setup_error is not None:
        exit_status = None
    elif "exit_status" in status:  # Namespace mode: the init's report on the worker.
        exit_status = status["exit_status"]
    elif mode == "namespaces" and not (timed_out or truncated):
        setup_error = f"the sandbox ended without a report on the code (status {returncode})"
        exit_status = None
    # RLIMIT_CPU has soft == hard, so the kernel ends the code with SIGKILL (or SIGXCPU).
    cpu_exceeded = (exit_status in (-signal.SIGXCPU, -signal.SIGKILL)
                    and cpu_seconds >= limits.effective_cpu_time_s - 0.05)
    if exit_status != 1:
        exception = None
    return ExecutionResult(
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        exit_status=exit_status,
        timed_out=timed_out or cpu_exceeded,
        memory_exceeded=exception == "MemoryError",
        output_truncated=truncated,
        exception=exception,
        setup_error=setup_error,
        isolation=mode,
        limits=limits,
    )
