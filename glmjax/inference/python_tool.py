"""A sandboxed Python interpreter tool for tool-calling models.

Each :meth:`PythonInterpreter.run` executes model-written code in a fresh child
interpreter (``sys.executable -I -B -u`` running this file as a script) inside a
throwaway working directory that is deleted afterwards.  The host never runs the
code itself; it only reads the child's output through pipes, with a wall-time
deadline and an output-size cap, and kills the child's whole process group when
either is exceeded.

Protection layers, outermost first:

1. **Kernel isolation** (``isolation="namespaces"``; used automatically when the
   host is root and the kernel allows it, see :func:`namespace_isolation_error`).
   The child enters new mount, network, PID and IPC namespaces, mounts a fresh
   ``/proc``, bind-mounts the working directory and remounts *every other* mount
   read-only, then drops all capabilities (effective, permitted, inheritable,
   ambient and the bounding set) and sets ``no_new_privs``.  Guaranteed by the
   kernel: no network interfaces besides a down loopback (no TCP/UDP anywhere,
   not even to 127.0.0.1); no writes outside the working directory (``EROFS``);
   host processes are invisible and cannot be signalled; every process the code
   starts dies with it.  The uid stays 0 so the interpreter remains readable
   (it may live under a private home such as ``/root``); without capabilities
   that uid cannot remount, bypass read-only mounts or ptrace the host.
   *Not* guaranteed by this layer: connecting to filesystem (path) Unix sockets
   owned by root, and reading files that the host user can read.
2. **Resource limits** (always): ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
   ``RLIMIT_FSIZE`` (largest file written), ``RLIMIT_NOFILE`` and
   ``RLIMIT_CORE=0``, set in the child before user code runs, soft = hard so
   the code cannot raise them.  ``RLIMIT_NPROC`` is not used: it is not enforced
   for uid 0, and for other users it counts all of that user's processes on the
   machine, so no value would be both safe and meaningful.
3. **In-process guard** (always): a ``sys.addaudithook`` hook, which Python code
   cannot remove, that refuses: creating network sockets, and connecting,
   binding or addressing any socket (only Unix socket pairs, as asyncio uses,
   work); process creation (fork, exec, spawn, ``subprocess``); signals to
   other processes; file writes, creation, deletion, renames and mode changes
   whose resolved path lies outside the working directory; any use of
   ``ctypes`` (loading libraries, foreign calls, raw memory access); and ``gc``
   object enumeration.
   Alone (``isolation="guard"``, the fallback when namespaces are unavailable)
   this stops honest mistakes and naive attempts, but it is not a security
   boundary: native extension code is not audited, ``os.mkfifo`` has no audit
   event, and ``os.open(..., dir_fd=...)`` reports a path without its
   directory.

The wall-time deadline, output cap, process-group kill and temporary directory
removal are enforced by the host in every mode.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from glmjax.inference.tools import ToolRegistry

_CHILD_FLAG = "--sandbox-child"
_MiB = 1024 * 1024

# Linux constants (from <sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MOUNT_OPTION_FLAGS = {
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

Isolation = Literal["auto", "namespaces", "guard"]


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits applied to one execution.

    Attributes:
      wall_time_s: wall-clock deadline; the process group is killed after it.
      cpu_time_s: CPU seconds (``RLIMIT_CPU``); ``None`` means ``ceil(wall_time_s)``.
      memory_bytes: address-space limit (``RLIMIT_AS``) of the code's process.
      output_bytes: stdout + stderr bytes kept; the process is killed beyond it.
      file_size_bytes: largest file the code may write (``RLIMIT_FSIZE``).
      open_files: maximum open file descriptors (``RLIMIT_NOFILE``).
    """

    wall_time_s: float = 10.0
    cpu_time_s: int | None = None
    memory_bytes: int = 1024 * _MiB
    output_bytes: int = 64 * 1024
    file_size_bytes: int = 16 * _MiB
    open_files: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value <= 0:
                raise ValueError(f"SandboxLimits.{field.name} must be positive, got {value!r}")

    @property
    def effective_cpu_time_s(self) -> int:
        """CPU-second limit actually applied."""
        if self.cpu_time_s is not None:
            return self.cpu_time_s
        return max(1, math.ceil(self.wall_time_s))


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed execution.

    Attributes:
      stdout, stderr: decoded output (UTF-8, invalid bytes replaced), at most
        ``SandboxLimits.output_bytes`` bytes together.
      exit_status: the code's exit code, or ``-N`` if it was killed by signal N,
        or ``None`` if the sandbox could not be set up.
      timed_out: the wall-time deadline or the CPU-time limit was hit.
      memory_exceeded: the code died of ``MemoryError`` under the memory limit.
      output_truncated: output exceeded the cap; the process was killed.
      exception: name of the exception that ended the code, if any.
      setup_error: why the sandbox could not be set up (the code did not run).
      isolation: ``"namespaces"`` or ``"guard"``: the mode actually used.
      limits: the limits in force.
    """

    stdout: str
    stderr: str
    exit_status: int | None
    timed_out: bool
    memory_exceeded: bool
    output_truncated: bool
    exception: str | None
    setup_error: str | None
    isolation: str
    limits: SandboxLimits

    @property
    def ok(self) -> bool:
        """True if the code ran to completion with exit status 0."""
        return self.exit_status == 0 and not (
            self.timed_out or self.memory_exceeded or self.output_truncated
        )

    def observation(self) -> str:
        """Render the result as the text returned to the model."""
        if self.setup_error is not None:
            return f"Error: the Python sandbox could not start: {self.setup_error}"
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        notes = self._notes()
        if notes:
            parts.append("\n".join(notes))
        return "\n".join(parts) if parts else "(no output)"

    def _notes(self) -> list[str]:
        notes = []
        limits = self.limits
        if self.timed_out:
            notes.append(
                f"[execution stopped: time limit exceeded "
                f"({limits.wall_time_s:g} s wall / {limits.effective_cpu_time_s} s CPU)]"
            )
        if self.memory_exceeded:
            notes.append(
                f"[execution stopped: memory limit of {limits.memory_bytes // _MiB} MiB exceeded]"
            )
        if self.output_truncated:
            notes.append(
                f"[execution stopped: output exceeded {limits.output_bytes} bytes "
                f"and was truncated]"
            )
        if not notes and self.exit_status is not None and self.exit_status != 0:
            if self.exit_status < 0:
                notes.append(f"[process killed by signal {_signal_name(-self.exit_status)}]")
            elif self.exception is None:
                notes.append(f"[process exited with status {self.exit_status}]")
        return notes


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class PythonInterpreter:
    """Runs Python code in a sandboxed child process (see the module docstring).

    Args:
      limits: per-execution limits.
      isolation: ``"namespaces"`` requires kernel isolation (each run reports a
        setup error where it is unavailable), ``"guard"`` uses only resource
        limits and the in-process guard, ``"auto"`` picks namespaces when
        :func:`namespace_isolation_error` finds them usable.
      temp_root: directory in which the throwaway working directories are
        created (default: the system temporary directory).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolation: Isolation = "auto",
        temp_root: str | os.PathLike[str] | None = None,
    ) -> None:
        if isolation not in ("auto", "namespaces", "guard"):
            raise ValueError(
                f"isolation must be 'auto', 'namespaces' or 'guard', got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.temp_root = None if temp_root is None else os.fspath(temp_root)
        if isolation == "auto":
            isolation = "guard" if namespace_isolation_error() else "namespaces"
        self.isolation: str = isolation

    def run(self, code: str) -> ExecutionResult:
        """Execute ``code`` and return its result; never raises for bad code."""
        return _execute(code, self.limits, self.isolation == "namespaces", self.temp_root)

    def __call__(self, code: str) -> str:
        """Execute ``code`` and return the observation text for the model."""
        return self.run(code).observation()


PYTHON_TOOL_DESCRIPTION = (
    "Run Python 3 code in a fresh, isolated interpreter and return what it prints "
    "(stdout, then stderr and any traceback). State is not kept between calls. "
    "There is no network access; files may only be written in the current "
    "directory; time, memory and output are limited."
)


def register_python_tool(
    registry: ToolRegistry, interpreter: PythonInterpreter | None = None, name: str = "python"
) -> PythonInterpreter:
    """Register a Python interpreter tool (one ``code`` string argument) in ``registry``."""
    interpreter = interpreter or PythonInterpreter()
    registry.register(
        interpreter,
        name=name,
        description=PYTHON_TOOL_DESCRIPTION,
        parameters={
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source to execute."}},
            "required": ["code"],
        },
    )
    return interpreter


@lru_cache(maxsize=1)
def namespace_isolation_error() -> str | None:
    """Why kernel isolation is unusable on this host, or ``None`` if it works.

    Probed once per process by running a trivial program in a namespaced child.
    """
    if not sys.platform.startswith("linux"):
        return "namespaces need Linux"
    if os.geteuid() != 0:
        return "namespaces need root (uid 0) in the host process"
    result = _execute("pass", SandboxLimits(wall_time_s=10.0), True, None)
    if result.setup_error is not None:
        return result.setup_error
    if result.exit_status != 0:
        return f"probe exited with status {result.exit_status}: {result.stderr.strip()[-500:]}"
    return None


# --------------------------------------------------------------------------- host side


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _execute(
    code: str, limits: SandboxLimits, namespaces: bool, temp_root: str | None
) -> ExecutionResult:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="glmjax-pytool-", dir=temp_root))
    status_read, status_write = os.pipe()
    try:
        config = {
            "workdir": workdir,
            "status_fd": status_write,
            "namespaces": namespaces,
            "memory_bytes": limits.memory_bytes,
            "cpu_time_s": limits.effective_cpu_time_s,
            "file_size_bytes": limits.file_size_bytes,
            "open_files": limits.open_files,
        }
        command = [sys.executable, "-I", "-B", "-u", os.path.abspath(__file__), _CHILD_FLAG,
                   json.dumps(config)]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_child_env(workdir),
            start_new_session=True,
            pass_fds=(status_write,),
        )
        os.close(status_write)
        status_write = -1
        try:
            stdout, stderr, timed_out, truncated = _supervise(process, code, limits)
        finally:
            cpu_seconds = _kill_group_and_reap(process)
        status = _read_status(status_read)
    finally:
        if status_write >= 0:
            os.close(status_write)
        os.close(status_read)
        _remove_tree(workdir)
    return _make_result(process.returncode, cpu_seconds, stdout, stderr, timed_out, truncated,
                        status, limits, namespaces)


def _remove_tree(top: str) -> None:
    """Delete the working directory, even if the code made subdirectories unwritable."""
    for directory, subdirectories, _ in os.walk(top):
        for name in subdirectories:
            path = os.path.join(directory, name)
            if not os.path.islink(path):  # Never chmod what a link points to.
                os.chmod(path, 0o700)
    shutil.rmtree(top, ignore_errors=True)


def _supervise(
    process: subprocess.Popen[bytes], code: str, limits: SandboxLimits
) -> tuple[bytes, bytes, bool, bool]:
    """Feed the code, collect capped output until exit; kill on deadline/overflow."""
    deadline = time.monotonic() + limits.wall_time_s
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        process.stdin.write(code.encode("utf-8", "replace"))
        process.stdin.close()
    except BrokenPipeError:
        pass  # The child died during setup; its status explains why.
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
            for key, _ in selector.select(timeout=min(remaining, 0.05)):
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
                # The code exited but something still holds its pipes: stop it.
                _kill_group(process.pid)
    return (bytes(buffers[process.stdout.fileno()]), bytes(buffers[process.stderr.fileno()]),
            timed_out, truncated)


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its group id stays reserved)."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group_and_reap(process: subprocess.Popen[bytes]) -> float:
    """Kill what is left of the process group, reap the leader; return its CPU seconds."""
    # The leader is not reaped yet, so its pid cannot have been reused as a group id.
    _kill_group(process.pid)
    _, wait_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    return usage.ru_utime + usage.ru_stime


def _read_status(fd: int) -> dict[str, Any]:
    """Merge the JSON status lines the child wrote (later lines win)."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    status: dict[str, Any] = {}
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            status.update(record)
    return status


def _make_result(
    returncode: int,
    cpu_seconds: float,
    stdout: bytes,
    stderr: bytes,
    timed_out: bool,
    truncated: bool,
    status: dict[str, Any],
    limits: SandboxLimits,
    namespaces: bool,
) -> ExecutionResult:
    setup_error = status.get("setup_error")
    exit_status: int | None = returncode
    if setup_error is not None:
        exit_status = None
    elif "signal" in status:  # Namespaced runs: the reaper reports how the code ended.
        exit_status = -int(status["signal"])
    elif "exit_code" in status:
        exit_status = int(status["exit_code"])
    # RLIMIT_CPU has soft == hard, so the kernel ends the code with SIGKILL (or SIGXCPU).
    cpu_exceeded = (exit_status in (-signal.SIGXCPU, -signal.SIGKILL)
                    and cpu_seconds >= limits.effective_cpu_time_s - 0.05)
    exception = status.get("exception")
    return ExecutionResult(
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        exit_status=exit_status,
        timed_out=timed_out or cpu_exceeded,
        memory_exceeded=exception == "MemoryError",
        output_truncated=truncated,
        exception=exception,
        setup_error=setup_error,
        isolation="namespaces" if namespaces else "guard",
        limits=limits,
    )


# --------------------------------------------------------------------------- child side


class _SetupError(Exception):
    """The sandbox could not be established; user code must not run."""


def _write_status(fd: int, **record: Any) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(libc: Any, result: int, what: str) -> None:
    import ctypes

    if result != 0:
        errno = ctypes.get_errno()
        raise _SetupError(f"{what} failed: {os.strerror(errno)} (errno {errno})")


def _prctl(libc: Any, option: int, argument: int = 0) -> int:
    import ctypes

    unused = ctypes.c_ulong(0)
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(argument), unused, unused, unused)


def _enter_namespaces(libc: Any, status_fd: int) -> None:
    """Unshare namespaces and fork; only the child (PID 1 of the new namespace) returns.

    The parent stays outside as a reaper, reports how the child ended on the
    status pipe and exits.
    """
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
    _check(libc, libc.unshare(flags), "unshare(mount, net, pid, ipc)")
    pid = os.fork()
    if pid == 0:
        _check(libc, _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PDEATHSIG)")
        return
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        _write_status(status_fd, signal=os.WTERMSIG(wait_status))
        os._exit(128 + os.WTERMSIG(wait_status))
    _write_status(status_fd, exit_code=os.WEXITSTATUS(wait_status))
    os._exit(os.WEXITSTATUS(wait_status))


def _mount_table() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) for each mount of this mount namespace."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            mount_point = fields[4].encode().decode("unicode_escape")  # \040 etc. are octal escapes
            mounts.append((mount_point, set(fields[5].split(","))))
    return mounts


def _lock_down_filesystem(libc: Any, workdir: str) -> None:
    """Private mounts, fresh /proc, everything read-only except ``workdir``."""
    _check(libc, libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None),
           "making mounts private")
    nosuid_nodev_noexec = (_MOUNT_OPTION_FLAGS["nosuid"] | _MOUNT_OPTION_FLAGS["nodev"]
                           | _MOUNT_OPTION_FLAGS["noexec"])
    _check(libc, libc.mount(b"proc", b"/proc", b"proc", nosuid_nodev_noexec, None),
           "mounting /proc")
    encoded_workdir = os.fsencode(workdir)
    _check(libc, libc.mount(encoded_workdir, encoded_workdir, None, _MS_BIND, None),
           f"bind-mounting {workdir}")
    for mount_point, options in _mount_table():
        if mount_point == workdir:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options:
            flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
        result = libc.mount(None, os.fsencode(mount_point), None, flags, None)
        if result != 0 and "ro" not in options:
            _check(libc, result, f"remounting {mount_point} read-only")
    os.chdir(workdir)  # The old working directory still refers to the read-only mount.


def _drop_capabilities(libc: Any) -> None:
    """Drop every capability for good; uid 0 then has only ordinary file-owner rights."""
    import ctypes

    cap = 0
    while _prctl(libc, _PR_CAPBSET_DROP, cap) == 0:
        cap += 1
    if cap == 0:
        _check(libc, -1, "prctl(CAPBSET_DROP)")
    _check(libc, _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL),
           "clearing ambient capabilities")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(libc, libc.capset(header, data), "capset")
    _check(libc, _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1), "prctl(NO_NEW_PRIVS)")
    with open("/proc/self/status", encoding="ascii") as status:
        effective = next(line for line in status if line.startswith("CapEff:"))
    if int(effective.split()[1], 16) != 0:
        raise _SetupError(f"capabilities still present after dropping: {effective.strip()}")


def _apply_rlimits(config: dict[str, Any]) -> None:
    for limit, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, config["cpu_time_s"]),
        (resource.RLIMIT_FSIZE, config["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, config["open_files"]),
        (resource.RLIMIT_AS, config["memory_bytes"]),
    ):
        resource.setrlimit(limit, (value, value))


def _install_guard(workdir: str) -> None:
    """Install the audit hook described in the module docstring (it cannot be removed)."""
    root = workdir.rstrip(os.sep) + os.sep
    own_pid = os.getpid()
    forbidden_prefixes = ("ctypes.", "gc.get_")
    # Sockets: only unconnected Unix socket pairs (asyncio's self-pipe) are allowed.
    forbidden_events = frozenset({
        "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg",
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
        "subprocess.Popen", "os.killpg", "signal.pthread_kill",
    })
    # Audited os functions that change the filesystem -> index of their dir_fd argument.
    one_path_events = {
        "os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3,
        "os.utime": 3, "os.truncate": None, "os.setxattr": None, "os.removexattr": None,
        "os.chflags": None, "os.lchflags": None,
    }
    two_path_events = frozenset({"os.rename", "os.link"})  # (src, dst, src_dir_fd, dst_dir_fd)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def resolve(path: Any, dir_fd: Any) -> str:
        if isinstance(path, int):  # A descriptor: check the file it refers to.
            path = os.readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(path)
        if dir_fd not in (None, -1) and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)

    def check_path(event: str, path: Any, dir_fd: Any = None) -> None:
        resolved = resolve(path, dir_fd)
        if resolved != workdir and not resolved.startswith(root) and resolved != os.devnull:
            raise PermissionError(
                f"sandbox: {event} on {resolved!r} is not allowed; "
                f"only the working directory {workdir!r} is writable"
            )

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in forbidden_events or event.startswith(forbidden_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "socket.__new__":
            if args[1] != socket.AF_UNIX:
                raise PermissionError("sandbox: network access is not allowed")
        elif event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (flags or 0) & write_flags)
            if writing:
                check_path("opening for writing", path)
        elif event == "os.kill":
            if args[0] not in (own_pid, 0):
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event in one_path_events:
            dir_fd_index = one_path_events[event]
            check_path(event, args[0], None if dir_fd_index is None else args[dir_fd_index])
        elif event in two_path_events:
            check_path(event, args[0], args[2])
            check_path(event, args[1], args[3])
        elif event == "os.symlink":
            check_path(event, args[1], args[2])

    sys.addaudithook(hook)


def _format_user_traceback(error: BaseException) -> str:
    """Format ``error`` with the frames of this file (runner, guard) left out."""
    this_file = os.path.abspath(__file__)
    formatted = traceback.TracebackException(type(error), error, error.__traceback__)
    pending, seen = [formatted], set()
    while pending:
        exception = pending.pop()
        if id(exception) in seen:
            continue
        seen.add(id(exception))
        exception.stack = traceback.StackSummary.from_list(
            [frame for frame in exception.stack if frame.filename != this_file])
        pending.extend(e for e in (exception.__cause__, exception.__context__) if e is not None)
    return "".join(formatted.format())


def _run_user_code(code: str, status_fd: int) -> None:
    """Execute ``code`` as ``__main__``; print a traceback without sandbox frames on error."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = module
    # Lets tracebacks show the offending source lines.
    linecache.cache["<code>"] = (len(code), None, code.splitlines(keepends=True), "<code>")
    try:
        compiled = compile(code, "<code>", "exec")
        exec(compiled, module.__dict__)  # noqa: S102 - running model code is this tool's purpose
    except SystemExit:
        raise
    except MemoryError:
        _write_status(status_fd, exception="MemoryError")
        module.__dict__.clear()
        print("MemoryError: the memory limit was exceeded", file=sys.stderr)
        sys.exit(1)
    except BaseException as error:  # noqa: BLE001 - report anything the code raised
        _write_status(status_fd, exception=type(error).__name__)
        sys.stderr.write(_format_user_traceback(error))
        sys.exit(1)
    finally:
        sys.stdout.flush()


def _child_main(config: dict[str, Any]) -> None:
    """Entry point of the child interpreter; see the module docstring for the order."""
    status_fd = config["status_fd"]
    code = sys.stdin.buffer.read().decode("utf-8")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        libc = _libc()  # Also imports ctypes before the guard forbids its loader.
        if config["namespaces"]:
            _enter_namespaces(libc, status_fd)
            _lock_down_filesystem(libc, config["workdir"])
            _drop_capabilities(libc)
        _apply_rlimits(config)
        _install_guard(config["workdir"])
    except (_SetupError, OSError, ValueError) as error:
        _write_status(status_fd, setup_error=str(error))
        os._exit(2)
    del libc
    _run_user_code(code, status_fd)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _CHILD_FLAG:
    _child_main(json.loads(sys.argv[2]))
