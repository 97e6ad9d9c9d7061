"""Tests for the removal of directory trees that hostile code left in guard mode."""

import os
import socket
import stat

from glmjax.inference.sandbox.cleanup import remove_tree


def _deep_tree(top, depth, name="d" * 30):
    """A chain of ``depth`` directories, each holding an unreadable file, built by descriptor."""
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o000, dir_fd=fd))
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.fchmod(fd, 0o000)
        os.close(fd)
        fd = child
    os.close(fd)


def test_removes_a_tree_deeper_than_path_max_and_the_recursion_limit(tmp_path):
    top = tmp_path / "work"
    top.mkdir()
    _deep_tree(str(top), depth=2000)  # 2000 * 31 characters: far beyond PATH_MAX.
    assert remove_tree(str(top))
    assert not top.exists()


def test_unwritable_and_unreadable_directories(tmp_path):
    top = tmp_path / "work"
    for path in ("a/b/c", "a/x", "wide"):
        (top / path).mkdir(parents=True)
    for i in range(200):
        (top / "wide" / f"sub{i}").mkdir()
        (top / "wide" / f"file{i}").write_text("x")
    (top / "a/b/c/f").write_text("x")
    os.mkfifo(top / "a/fifo")
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(top / "a/sock"))
    for path in ("a/b/c", "a/b", "a/x", "a", "wide/sub7"):
        (top / path).chmod(0)
    assert remove_tree(str(top))
    assert not top.exists()


def test_symbolic_links_are_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file").write_text("kept")
    outside.chmod(0o555)
    top = tmp_path / "work"
    top.mkdir()
    (top / "to_dir").symlink_to(outside)
    (top / "to_file").symlink_to(outside / "keep" / "file")
    (top / "dangling").symlink_to(tmp_path / "missing")
    assert remove_tree(str(top))
    assert not top.exists()
    assert (outside / "keep" / "file").read_text() == "kept"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o555  # Not made writable either.


def test_missing_and_non_directory_tops_do_not_raise(tmp_path):
    assert remove_tree(str(tmp_path / "missing"))
    plain = tmp_path / "file"
    plain.write_text("x")
    plain.chmod(0o444)
    assert not remove_tree(str(plain))
    assert plain.read_text() == "x" and stat.S_IMODE(plain.stat().st_mode) == 0o444
