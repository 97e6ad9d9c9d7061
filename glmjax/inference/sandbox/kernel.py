"""Linux primitives for the sandbox child: namespaces, the private root file system, credentials.

The sandbox child (``child.py``) loads this file directly; it imports only the standard
library, and every function raises ``OSError`` naming the step that failed.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterable
from typing import Any

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SANDBOX_NAMESPACES = (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                      | CLONE_NEWUTS | CLONE_NEWCGROUP)

# <sys/mount.h>, <linux/mount.h>
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_NOEXEC = 0x8
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000

# <linux/prctl.h>, <linux/capability.h>
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_SETPCAP = 8

# Syscalls without a glibc wrapper before 2.36, by machine; mount_setattr has one number everywhere.
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}
_MOUNT_SETATTR = 442

# The scratch directory (the code's working directory) inside the private root.
SCRATCH_DIR = "/sandbox"
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEVICE_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                 "stderr": "/proc/self/fd/2"}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc_handle: Any = None


def _libc() -> Any:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


def _prctl(option: int, argument: int = 0) -> int:
    unused = ctypes.c_ulong(0)
    return _libc().prctl(ctypes.c_int(option), ctypes.c_ulong(argument), unused, unused, unused)


def _encode(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           options: str | None = None) -> None:
    _check(_libc().mount(_encode(source), _encode(target), _encode(fstype),
                         ctypes.c_ulong(flags), _encode(options)), f"mount {target}")


def _restrict_mount(target: str, attributes: int) -> None:
    """Set ``attributes`` on the mount at ``target`` and every mount below it."""
    attr = _MountAttr(attributes, 0, 0, 0)
    result = _libc().syscall(ctypes.c_long(_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD),
                             os.fsencode(target), ctypes.c_uint(_AT_RECURSIVE),
                             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(result, f"mount_setattr {target}")


# --------------------------------------------------------------------------- user namespace


def unshare_with_id_maps(outside_uid: int, outside_gid: int) -> None:
    """Enter new namespaces (``SANDBOX_NAMESPACES``) whose uid and gid 0 map to the given ids.

    A helper process forked beforehand stays in the parent user namespace and writes the
    maps: only it may map an id other than its own (root host), and for a non-root host it
    maps the user's own ids after denying ``setgroups``.  The credentials stay those of the
    host until :func:`become_namespace_root`.
    """
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    helper = os.fork()
    if helper == 0:  # The helper: wait for the unshare, write the maps, report, exit.
        os.close(go_write)
        os.close(done_read)
        message = b""
        try:
            if os.read(go_read, 1):
                _write_id_maps(os.getppid(), outside_uid, outside_gid)
        except OSError as error:
            message = f"writing the user namespace id maps failed: {error}".encode()
        os.write(done_write, message)
        os._exit(0)
    os.close(go_read)
    os.close(done_write)
    try:
        _check(_libc().unshare(ctypes.c_int(SANDBOX_NAMESPACES)),
               "unshare(user, mount, pid, net, ipc, uts, cgroup)")
        os.write(go_write, b"x")
    finally:
        os.close(go_write)
        message = os.read(done_read, 4096)
        os.close(done_read)
        os.waitpid(helper, 0)
    if message:
        raise OSError(message.decode(errors="replace"))


def _write_id_maps(pid: int, outside_uid: int, outside_gid: int) -> None:
    if os.geteuid() != 0:  # Unprivileged: gid maps require setgroups to be denied first.
        with open(f"/proc/{pid}/setgroups", "w", encoding="ascii") as setgroups:
            setgroups.write("deny")
    with open(f"/proc/{pid}/uid_map", "w", encoding="ascii") as uid_map:
        uid_map.write(f"0 {outside_uid} 1\n")
    with open(f"/proc/{pid}/gid_map", "w", encoding="ascii") as gid_map:
        gid_map.write(f"0 {outside_gid} 1\n")


def become_namespace_root(drop_groups: bool) -> None:
    """Take uid and gid 0 of the new user namespace (the mapped outside ids), keeping the
    namespace's capabilities."""
    if drop_groups:
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


# --------------------------------------------------------------------------- root file system


def build_root(stage: str, python_dirs: Iterable[str], scratch_bytes: int,
               scratch_inodes: int, drop_groups: bool) -> None:
    """Assemble the sandbox's root file system on a tmpfs mounted at ``stage``.

    Called right after :func:`unshare_with_id_maps`, with the host credentials: the sources
    are opened first (they may lie under directories only the host user can enter), then the
    process becomes the namespace's root and fills the tmpfs: read-only, nosuid, nodev binds
    of the system directories and ``python_dirs``, a few device nodes, an empty ``/proc``
    mount point, ``/tmp`` as a link to the scratch directory (unless the interpreter lives
    below ``/tmp``), and the scratch directory itself, a size- and inode-limited tmpfs.
    The working directory is left at the new root; :func:`enter_root` finishes the job in
    the namespace's init process.
    """
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("tmpfs", stage, "tmpfs", _MS_NOSUID | _MS_NODEV,
           "mode=0755,size=1m,nr_inodes=4096,uid=0,gid=0")
    os.chdir(stage)
    links: dict[str, str] = {}
    dirs: dict[str, int] = {}
    for name in _SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            links[name] = os.readlink(path)
        elif os.path.isdir(path):
            dirs[path] = _open_path(path)
    covered = [f"/{name}" for name in links] + list(dirs)
    for path in sorted(set(python_dirs), key=len):
        if os.path.isdir(path) and not any(_is_within(path, top) for top in covered):
            dirs[path] = _open_path(path)
            covered.append(path)
    devices = {name: _open_path(f"/dev/{name}") for name in _DEVICES
               if os.path.exists(f"/dev/{name}")}
    become_namespace_root(drop_groups)
    try:
        for name, target in links.items():
            os.symlink(target, name)
        for path, fd in dirs.items():
            target = path.lstrip("/")
            os.makedirs(target, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
            _restrict_mount(target, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV)
        os.mkdir("dev", 0o755)
        for name, fd in devices.items():
            target = f"dev/{name}"
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
            _restrict_mount(target, _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NOEXEC)
        for name, target in _DEVICE_LINKS.items():
            os.symlink(target, f"dev/{name}")
        os.mkdir("proc", 0o555)
        scratch = SCRATCH_DIR.lstrip("/")
        os.mkdir(scratch, 0o700)
        _mount("tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               f"mode=0700,uid=0,gid=0,size={scratch_bytes},nr_inodes={scratch_inodes}")
        if not os.path.lexists("tmp"):  # /tmp holds the interpreter when it lives there.
            os.symlink(scratch, "tmp")
    finally:
        for fd in (*dirs.values(), *devices.values()):
            os.close(fd)


def _open_path(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _is_within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def enter_root() -> None:
    """In the PID namespace's init: mount ``/proc``, pivot into the new root, seal it read-only.

    The host's root is detached, so nothing outside the binds of :func:`build_root` is
    reachable by path any more; the working directory becomes :data:`SCRATCH_DIR`.
    """
    _mount("proc", "proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    pivot_root = _PIVOT_ROOT.get(os.uname().machine)
    if pivot_root is None:
        raise OSError(f"pivot_root: unsupported machine {os.uname().machine!r}")
    _check(_libc().syscall(ctypes.c_long(pivot_root), b".", b"."), "pivot_root")
    _check(_libc().umount2(b".", ctypes.c_int(_MNT_DETACH)), "detaching the host root")
    os.chdir("/")
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(SCRATCH_DIR)


# --------------------------------------------------------------------------- process attributes


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies."""
    _check(_prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")


def make_undumpable() -> None:
    """Forbid core dumps and ptrace-mode access (``/proc/PID/mem``, ``environ``, ``fd``) to us."""
    _check(_prctl(_PR_SET_DUMPABLE, 0), "prctl(PR_SET_DUMPABLE)")


def _capabilities() -> tuple[int, int, int]:
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(_libc().capget(header, data), "capget")
    effective, permitted, inheritable = (data[i] | (data[i + 3] << 32) for i in range(3))
    return effective, permitted, inheritable


def drop_capabilities() -> None:
    """Drop every capability for good (bounding, ambient, effective, permitted, inheritable)
    and set ``no_new_privs``; raise if any capability remains."""
    if _capabilities()[0] & (1 << _CAP_SETPCAP):
        cap = 0
        while _prctl(_PR_CAPBSET_DROP, cap) == 0:
            cap += 1
        if ctypes.get_errno() != 22:  # EINVAL marks the end of the capability numbers.
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(_prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL), "clearing ambient capabilities")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc().capset(header, (ctypes.c_uint32 * 6)()), "capset")
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
    if any(_capabilities()):
        raise OSError("capabilities remain after dropping them")
