"""Per-execution limits and the outcome of one sandboxed execution."""

from __future__ import annotations

import dataclasses
import math
import signal

_MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits applied to one execution.

    Attributes:
      wall_time_s: wall-clock deadline; the sandbox is killed after it.
      cpu_time_s: CPU seconds (``RLIMIT_CPU``); ``None`` means ``ceil(wall_time_s)``.
      memory_bytes: address-space limit (``RLIMIT_AS``) of the code's process.
      output_bytes: stdout + stderr bytes kept; the sandbox is killed beyond it.
      file_size_bytes: largest file the code may write (``RLIMIT_FSIZE``).
      open_files: maximum open file descriptors (``RLIMIT_NOFILE``).
      threads: threads the code may run, its main thread included (``RLIMIT_NPROC``
        counted in the sandbox's own user namespace; namespace mode only).
      disk_bytes: size of the scratch file system the code writes to (namespace mode).
      disk_inodes: files and directories the scratch file system holds (namespace mode).
    """

    wall_time_s: float = 10.0
    cpu_time_s: int | None = None
    memory_bytes: int = 1024 * _MiB
    output_bytes: int = 64 * 1024
    file_size_bytes: int = 16 * _MiB
    open_files: int = 256
    threads: int = 32
    disk_bytes: int = 64 * _MiB
    disk_inodes: int = 4096

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

    ``exit_status``, ``timed_out``, ``output_truncated`` and ``setup_error`` come from what
    the host itself observed (the kernel's exit status, its own clock and byte count, and a
    channel the code cannot reach).  ``exception`` is what the runner inside the sandbox
    reported: code that subverts its own runner can name another exception for itself, but
    it cannot change the other fields.

    Attributes:
      stdout, stderr: decoded output (UTF-8, invalid bytes replaced), at most
        ``SandboxLimits.output_bytes`` bytes together.
      exit_status: the code's exit code, or ``-N`` if it was killed by signal N,
        or ``None`` if the sandbox could not be set up (the code did not run).
      timed_out: the wall-time deadline or the CPU-time limit was hit.
      memory_exceeded: the code ended with an uncaught ``MemoryError``.
      output_truncated: output exceeded the cap; the sandbox was killed.
      exception: name of the uncaught exception that ended the code, if any.
      setup_error: why the sandbox could not be set up, or why it refused to run.
      isolation: ``"namespaces"`` or ``"guard"``: the mode used.
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
