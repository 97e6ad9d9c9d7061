"""Removal of directory trees that hostile code built: any depth or permissions, never raising."""

from __future__ import annotations

import os
import stat

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(top: str) -> bool:
    """Delete ``top`` and everything below it; return whether it is gone.

    Walks the tree iteratively, holding one directory descriptor at a time (so neither the
    depth nor the path length matters), makes each directory writable before entering it,
    never follows symbolic links and skips what cannot be deleted instead of raising.  Meant
    for trees nobody else is changing (the code that built it has been killed).
    """
    try:
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            return False
        os.chmod(top, 0o700)
        fd = os.open(top, _DIRECTORY_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    names: list[str] = []  # Path from ``top`` to the directory ``fd`` refers to.
    stuck: set[tuple[int, int]] = set()  # (device, inode) of entries that resisted deletion.
    try:
        while True:
            subdirectory = _clear_files(fd, stuck)
            if subdirectory is not None:
                try:
                    os.chmod(subdirectory, 0o700, dir_fd=fd)
                    child = os.open(subdirectory, _DIRECTORY_FLAGS, dir_fd=fd)
                except OSError:
                    stuck.add(_identity(fd, subdirectory))
                    continue
                os.close(fd)
                fd = child
                names.append(subdirectory)
                continue
            if not names:
                break
            parent = os.open("..", _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            name = names.pop()
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                stuck.add(_identity(fd, name))
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rmdir(top)
    except OSError:
        return False
    return True


def _clear_files(fd: int, stuck: set[tuple[int, int]]) -> str | None:
    """Unlink the non-directories in ``fd``; return a subdirectory still to clear, if any."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in stuck:
                continue
            if stat.S_ISDIR(info.st_mode):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                stuck.add((info.st_dev, info.st_ino))
    return None


def _identity(fd: int, name: str) -> tuple[int, int]:
    """(device, inode) of ``name`` in ``fd``; an entry that cannot be stat-ed is skipped anyway."""
    try:
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return -1, -1
    return info.st_dev, info.st_ino
