"""The in-process guard: an audit hook that refuses what the sandbox does not offer.

It turns the common cases (``subprocess``, sockets, writes outside the working directory,
``ctypes``, subinterpreters) into one clear ``PermissionError`` per attempt.  It is a
courtesy, not a security layer: native code, ``os.open(..., dir_fd=...)`` (the audit event
carries no directory), and calls without audit events (``os.mkfifo``, ``readline``) are not
seen, and Python code can tamper with the modules the hook relies on.  In namespace mode the
kernel enforces all of it regardless.

The sandbox child (``child.py``) loads this file directly; it imports only the standard library.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

_FORBIDDEN_EVENTS = frozenset({
    "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
    "subprocess.Popen", "os.killpg", "signal.pthread_kill",
    "cpython.PyInterpreterState_New",  # Subinterpreters run without this hook.
})
_FORBIDDEN_PREFIXES = ("ctypes.", "gc.get_")
_FORBIDDEN_MODULES = frozenset({"_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
                                "_testinternalcapi"})
# Audited os functions that change the file system -> index of their dir_fd argument.
_ONE_PATH_EVENTS = {
    "os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2, "os.chown": 3,
    "os.utime": 3, "os.truncate": None, "os.setxattr": None, "os.removexattr": None,
    "os.chflags": None, "os.lchflags": None,
}
_TWO_PATH_EVENTS = frozenset({"os.rename", "os.link"})  # (src, dst, src_dir_fd, dst_dir_fd)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install(workdir: str) -> None:
    """Install the hook (it cannot be removed); writes are allowed below ``workdir`` only."""
    root = workdir.rstrip(os.sep) + os.sep
    own_pid = os.getpid()
    # Bound now, so that later changes to builtins or to os.path do not reach the hook.
    realpath, readlink, fsdecode = os.path.realpath, os.readlink, os.fsdecode
    join, isabs, devnull = os.path.join, os.path.isabs, os.devnull
    is_instance, af_unix = isinstance, socket.AF_UNIX

    def resolve(path: Any, dir_fd: Any) -> str:
        if is_instance(path, int):  # A descriptor: check the file it refers to.
            path = readlink(f"/proc/self/fd/{path}")
        path = fsdecode(path)
        if dir_fd not in (None, -1) and not isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def check_path(event: str, path: Any, dir_fd: Any = None) -> None:
        resolved = resolve(path, dir_fd)
        if resolved != workdir and not resolved.startswith(root) and resolved != devnull:
            raise PermissionError(
                f"sandbox: {event} on {resolved!r} is not allowed; "
                f"only the working directory {workdir!r} is writable")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in _FORBIDDEN_EVENTS or event.startswith(_FORBIDDEN_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0] in _FORBIDDEN_MODULES:
                raise PermissionError(f"sandbox: module {args[0]} is not available")
        elif event == "socket.__new__":
            if args[1] != af_unix:
                raise PermissionError("sandbox: network access is not allowed")
        elif event == "open":
            path, mode, flags = args
            if is_instance(mode, str):
                writing = "w" in mode or "a" in mode or "x" in mode or "+" in mode
            else:
                writing = bool((flags or 0) & _WRITE_FLAGS)
            if writing and path is not None:
                check_path("opening for writing", path)
        elif event == "os.kill":
            if args[0] != own_pid:
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event in _ONE_PATH_EVENTS:
            dir_fd_index = _ONE_PATH_EVENTS[event]
            check_path(event, args[0], None if dir_fd_index is None else args[dir_fd_index])
        elif event in _TWO_PATH_EVENTS:
            check_path(event, args[0], args[2])
            check_path(event, args[1], args[3])
        elif event == "os.symlink":
            check_path(event, args[1], args[2])
        elif event == "sqlite3.connect":
            database = args[0]
            if fsdecode(database) != ":memory:":
                check_path(event, database)

    sys.addaudithook(hook)
