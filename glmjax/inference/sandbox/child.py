"""The sandbox child: sets up the containment, then runs the model's code.

Started by the host as ``python -I -B -u child.py CONFIG_JSON`` with the code on stdin.  It
imports only the standard library, ``pyseccomp`` and the sibling files ``kernel.py``,
``seccomp_filter.py`` and ``guard.py`` (loaded by path, never as a package, so that nothing of
glmjax is imported).

Namespace mode, three processes:

* the *starter* (this process, in the host's PID namespace): unshares the namespaces, builds
  the private root, forks the init and exits once the init is gone; on SIGTERM (the host's
  stop request) it kills the init;
* the *init* (PID 1 of the new PID namespace): keeps the namespace's capabilities, is not
  dumpable and holds the status channel; it pivots into the new root, forks the worker,
  reaps it and writes its exit status to the status channel.  When it exits, the kernel
  kills everything left in the namespace;
* the *worker* (PID 2): drops every capability, applies the resource limits, the seccomp
  filter and the guard, closes its copy of the status channel and runs the code.

Guard mode: this process drops its capabilities (when root), applies the limits, the seccomp
filter where available and the guard, and runs the code itself.

The status channel carries JSON lines: ``setup_error`` (from any process, before the code
runs) and ``exit_status`` (from the init).  The code never holds it.  The worker's runner
reports the name of an uncaught exception on a separate report channel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import linecache
import os
import resource
import signal
import sys
import traceback
import types
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
# Uid and gid the code runs as on a root host (the kernel's overflow id, "nobody").
_UNPRIVILEGED_ID = 65534
# The starter and the init count against RLIMIT_NPROC too (same user in the namespace).
_SUPERVISOR_TASKS = 2


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_glmjax_sandbox_{name}",
                                                  os.path.join(_HERE, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_status(fd: int, **record: Any) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def _silence_stdio() -> None:
    """Point 0, 1 and 2 at /dev/null, so that only the worker holds the host's pipes."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _python_dirs() -> list[str]:
    """The interpreter's installation directories, as given and resolved."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted({path for prefix in prefixes
                   for path in (os.path.abspath(prefix), os.path.realpath(prefix))})


class _Starter:
    """The starter's state for its SIGTERM handler: the init's pid, once forked."""

    init_pid = 0

    @classmethod
    def on_terminate(cls, signum: int, frame: Any) -> None:
        """The host's stop request: kill the init (and so the whole PID namespace)."""
        if cls.init_pid:
            os.kill(cls.init_pid, signal.SIGKILL)  # The relay's wait then returns.
        else:
            os._exit(128 + signum)


def _enter_namespaces(kernel: types.ModuleType, config: dict[str, Any]) -> str:
    """Set up namespace mode (see the module docstring); only the worker returns.

    Returns the worker's working directory.
    """
    signal.signal(signal.SIGTERM, _Starter.on_terminate)
    root_host = os.geteuid() == 0
    outside_uid = _UNPRIVILEGED_ID if root_host else os.geteuid()
    outside_gid = _UNPRIVILEGED_ID if root_host else os.getegid()
    kernel.unshare_with_id_maps(outside_uid, outside_gid)
    kernel.build_root(config["workdir"], _python_dirs(), config["disk_bytes"],
                      config["disk_inodes"], drop_groups=root_host)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # Until init_pid is known.
    init = os.fork()
    if init:
        _Starter.init_pid = init
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _relay(init, config)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    kernel.die_with_parent()
    kernel.make_undumpable()
    kernel.enter_root()
    worker = os.fork()
    if worker:
        _reap(worker, config)
    os.setsid()
    kernel.drop_capabilities()
    return kernel.SCRATCH_DIR


def _relay(init: int, config: dict[str, Any]) -> None:
    """The starter: wait for the init, then exit; the PID namespace is empty by then.

    The host stops a run with SIGTERM to the starter (see :class:`_Starter`), so that the
    starter's exit still means that every process of the sandbox is gone.
    """
    code = 1
    try:
        os.close(config["report_fd"])
        os.close(config["status_fd"])
        _silence_stdio()
        # Wait without reaping, so that the handler never signals a recycled pid; then reap
        # with the handler held off.
        os.waitid(os.P_PID, init, os.WEXITED | os.WNOWAIT)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # End by the same signal, without a core dump.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if -code != signal.SIGKILL:
                signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
    finally:
        os._exit(code if code >= 0 else 128 - code)


def _reap(worker: int, config: dict[str, Any]) -> None:
    """The init: reap every process of the namespace until the worker ends; report its status."""
    try:
        os.close(config["report_fd"])
        _silence_stdio()
        while True:
            pid, status = os.wait()
            if pid == worker:
                break
        _write_status(config["status_fd"], exit_status=os.waitstatus_to_exitcode(status))
    finally:
        os._exit(0)


def _apply_rlimits(config: dict[str, Any], count_threads: bool) -> None:
    limits = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_CPU, config["cpu_time_s"]),
        (resource.RLIMIT_FSIZE, config["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, config["open_files"]),
        (resource.RLIMIT_AS, config["memory_bytes"]),
    ]
    if count_threads:  # Counted per user namespace; in the host's it would count all its tasks.
        limits.append((resource.RLIMIT_NPROC, config["threads"] + _SUPERVISOR_TASKS))
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))


def _close_inherited_fds(keep: tuple[int, ...]) -> None:
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # The listing's own descriptor is gone by now.
                os.close(fd)


def _format_user_traceback(error: BaseException) -> str:
    """Format ``error`` without the frames of the sandbox's own files."""
    formatted = traceback.TracebackException(type(error), error, error.__traceback__)
    pending, seen = [formatted], set()
    while pending:
        exception = pending.pop()
        if id(exception) in seen:
            continue
        seen.add(id(exception))
        exception.stack = traceback.StackSummary.from_list(
            [frame for frame in exception.stack
             if os.path.dirname(frame.filename) != _HERE])
        pending.extend(e for e in (exception.__cause__, exception.__context__) if e is not None)
    return "".join(formatted.format())


def _report_exception(report_fd: int, error: BaseException, message: str | None) -> None:
    """Report the exception's name to the host and print its traceback (or ``message``)."""
    with contextlib.suppress(OSError):  # The code may have closed the channel.
        os.write(report_fd, type(error).__name__.encode("ascii", "replace") + b"\n")
    try:
        text = message if message is not None else _format_user_traceback(error)
    except BaseException:  # noqa: BLE001 - a hostile exception may break formatting
        text = f"{type(error).__name__}: (the exception could not be formatted)\n"
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the code may have replaced or closed stderr
        with contextlib.suppress(OSError):
            os.write(2, text.encode("utf-8", "replace"))


def _run_user_code(code: str, report_fd: int) -> None:
    """Execute ``code`` as ``__main__``; exit 1 with a clean traceback on an uncaught exception."""
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
    except MemoryError as error:
        module.__dict__.clear()
        _report_exception(report_fd, error, "MemoryError: the memory limit was exceeded\n")
        sys.exit(1)
    except BaseException as error:  # noqa: BLE001 - report anything the code raised
        _report_exception(report_fd, error, None)
        sys.exit(1)
    finally:
        with contextlib.suppress(BaseException):  # The code may have broken stdout.
            sys.stdout.flush()


def main(config: dict[str, Any]) -> None:
    """Set up the sandbox for ``config["mode"]`` and run the code read from stdin."""
    status_fd, report_fd = config["status_fd"], config["report_fd"]
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    namespaces = config["mode"] == "namespaces"
    try:
        kernel, seccomp_filter, guard = (_load(name)
                                         for name in ("kernel", "seccomp_filter", "guard"))
        # Loads libseccomp now, while the host's file system is still in view.
        seccomp_error = seccomp_filter.unavailable_reason()
        if namespaces and seccomp_error is not None:
            raise OSError(f"seccomp is unavailable: {seccomp_error}")
        if namespaces:
            workdir = _enter_namespaces(kernel, config)
        else:
            workdir = config["workdir"]
            kernel.drop_capabilities()
        _close_inherited_fds(keep=(status_fd, report_fd))
        _apply_rlimits(config, count_threads=namespaces)
        if seccomp_error is None:
            try:
                seccomp_filter.install(os.getpid())
            except OSError as error:
                if namespaces:  # Guard mode applies the filter only where the kernel takes it.
                    raise OSError(f"loading the seccomp filter failed: {error}") from error
        guard.install(workdir)
    except Exception as error:  # noqa: BLE001 - any failure means the code must not run
        _write_status(status_fd, setup_error=str(error) or type(error).__name__)
        os._exit(2)
    os.close(status_fd)
    _run_user_code(code, report_fd)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
