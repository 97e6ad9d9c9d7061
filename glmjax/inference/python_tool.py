"""A sandboxed Python interpreter tool for tool-calling models.

Each :meth:`PythonInterpreter.run` executes model-written code in a fresh child interpreter
and returns an :class:`ExecutionResult`; the host never runs the code itself.  The sandbox
lives in :mod:`glmjax.inference.sandbox`; its two modes:

* ``isolation="namespaces"`` (the default): the kernel contains the code.  New user, mount,
  PID, network, IPC, UTS and cgroup namespaces; a private read-only root holding only the
  system directories and the interpreter, plus a size-limited tmpfs as the working
  directory; an unprivileged uid (``nobody`` on a root host, the user's own otherwise) with
  no capabilities; a seccomp filter (no process creation or program execution, no sockets
  but Unix socket pairs, no ptrace, mounts, namespaces, keys, BPF, io_uring, signals to
  other processes ...); resource limits, including a thread count.  Where the kernel cannot
  provide this, every run refuses with the reason (:func:`namespace_isolation_error`).
* ``isolation="guard"`` (explicit opt-in): no namespaces.  Resource limits, the seccomp
  filter where libseccomp is available, capabilities dropped, and an audit-hook guard
  against writes outside the working directory.  Not a security boundary: the code can
  read and, through calls the guard does not see, write whatever the host user can.

In both modes the host enforces the wall-time deadline and the output cap, kills the whole
sandbox, removes every file it left and judges the outcome from what it observed itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from glmjax.inference.sandbox.host import (
    Mode,
    execute,
    failed_result,
    namespace_isolation_error,
)
from glmjax.inference.sandbox.limits import ExecutionResult, SandboxLimits

if TYPE_CHECKING:
    from glmjax.inference.tools import ToolRegistry

__all__ = [
    "PYTHON_TOOL_DESCRIPTION",
    "ExecutionResult",
    "Isolation",
    "PythonInterpreter",
    "SandboxLimits",
    "namespace_isolation_error",
    "register_python_tool",
]

Isolation = Mode


class PythonInterpreter:
    """Runs Python code in a sandboxed child process (see the module docstring).

    Args:
      limits: per-execution limits.
      isolation: ``"namespaces"`` (kernel-enforced; runs refuse where it is unavailable)
        or ``"guard"`` (resource limits, seccomp where available and the in-process guard
        only; choose it explicitly, knowing it is not a security boundary).
      temp_root: directory in which the per-run directories are created (default: the
        system temporary directory).  In guard mode the code works there; in namespace
        mode it only holds the empty mount point of the sandbox's private root.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolation: Isolation = "namespaces",
        temp_root: str | os.PathLike[str] | None = None,
    ) -> None:
        if isolation not in ("namespaces", "guard"):
            raise ValueError(f"isolation must be 'namespaces' or 'guard', got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.isolation: Isolation = isolation
        self.temp_root = None if temp_root is None else os.fspath(temp_root)

    def run(self, code: str) -> ExecutionResult:
        """Execute ``code`` and return its result; never raises."""
        if self.isolation == "namespaces":
            reason = namespace_isolation_error()
            if reason is not None:
                return failed_result(
                    self.limits, self.isolation,
                    f"kernel isolation is unavailable on this host ({reason}), so the code was "
                    f"not run; PythonInterpreter(isolation='guard') runs it without that "
                    f"protection")
        return execute(code, self.limits, self.isolation, self.temp_root)

    def __call__(self, code: str) -> str:
        """Execute ``code`` and return the observation text for the model."""
        return self.run(code).observation()


PYTHON_TOOL_DESCRIPTION = (
    "Run Python 3 code in a fresh, isolated interpreter and return what it prints "
    "(stdout, then stderr and any traceback). State is not kept between calls. "
    "There is no network access and no subprocesses; files may only be written in the "
    "current directory; time, memory, threads, disk and output are limited."
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
