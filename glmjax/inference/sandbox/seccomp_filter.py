"""The sandbox's seccomp filter, built with libseccomp through ``pyseccomp``.

The sandbox child (``child.py``) loads this file directly; it imports only the standard
library and ``pyseccomp``.  The filter allows by default and makes the calls below fail
with ``EPERM`` (``clone3`` with ``ENOSYS``, so that the C library falls back to ``clone``,
whose flags the filter can inspect).  Calls from another ABI (i386, x32) kill the process.
The filter is inherited by every thread and cannot be removed.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

# Denied outright.  Names the installed libseccomp does not know are skipped.
DENIED_SYSCALLS = (
    # Process creation and program execution (threads are allowed: see install()).
    "fork", "vfork", "execve", "execveat",
    # Namespaces, mounts and roots.
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig",
    "fsmount", "fspick", "move_mount", "open_tree", "open_tree_attr", "mount_setattr",
    # Other processes' memory, descriptors and signals.
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease",
    "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "get_robust_list",
    "migrate_pages", "move_pages",
    # Networking: no socket() at all; socketpair() is restricted below.
    "socket", "connect", "bind", "listen", "accept", "accept4",
    # Kernel interfaces that are attack surface or act on the whole machine.
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init", "keyctl", "add_key",
    "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup", "iopl", "ioperm",
    "modify_ldt", "uselib", "_sysctl", "lookup_dcookie", "nfsservctl", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    # Files the working-directory rule cannot follow: device nodes and FIFOs, file handles,
    # memory files and IPC objects that outlive the process.
    "mknod", "mknodat", "name_to_handle_at", "open_by_handle_at", "memfd_create",
    "memfd_secret", "shmget", "semget", "msgget", "mq_open",
)

# Allowed only when the first argument is this process: signal and rlimit calls on others.
_OWN_PID_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
# Allowed only when the target argument is 0 (the caller): (syscall, argument index).
_SELF_ONLY = (("prlimit64", 0), ("sched_setaffinity", 0), ("sched_setscheduler", 0),
              ("sched_setparam", 0), ("sched_setattr", 0), ("setpriority", 1),
              ("ioprio_set", 1))

_CLONE_THREAD = 0x00010000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (NEWTIME needs clone3).
_CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                          0x20000000, 0x40000000)
_SOCKET_TYPE_MASK = 0xF
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C


def unavailable_reason() -> str | None:
    """Why the filter cannot be built here (``pyseccomp`` or libseccomp missing), or ``None``."""
    try:
        import pyseccomp  # noqa: F401 - imported for its side effect of loading libseccomp
    except (ImportError, OSError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def install(own_pid: int) -> None:
    """Load the filter into the calling process, whose pid is ``own_pid``.

    Raises OSError when the kernel refuses the filter.
    """
    import pyseccomp as seccomp

    deny = seccomp.ERRNO(errno.EPERM)
    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    syscall_filter.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)

    def add(action: int, name: str, *conditions: Any) -> None:
        number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
        if number >= 0:
            syscall_filter.add_rule(action, number, *conditions)

    for name in DENIED_SYSCALLS:
        add(deny, name)
    add(seccomp.ERRNO(errno.ENOSYS), "clone3")
    # clone() only for threads, and never with a namespace flag.
    add(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    for flag in _CLONE_NAMESPACE_FLAGS:
        add(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # socketpair(): connected AF_UNIX stream pairs only (datagram sockets can address paths).
    add(deny, "socketpair", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    for socket_type in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        add(deny, "socketpair",
            seccomp.Arg(1, seccomp.MASKED_EQ, _SOCKET_TYPE_MASK, int(socket_type)))
    for name in _OWN_PID_ONLY:
        add(deny, name, seccomp.Arg(0, seccomp.NE, own_pid))
    for name, index in _SELF_ONLY:
        add(deny, name, seccomp.Arg(index, seccomp.NE, 0))
    for request in (_TIOCSTI, _TIOCLINUX):  # Typing into, or driving, a terminal.
        add(deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
    syscall_filter.load()
