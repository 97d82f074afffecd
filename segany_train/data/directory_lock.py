"""Exclusive locks on files and directories between processes, released by the OS when a holder dies.

`flock` locks belong to an open file, so a crashed or killed holder never leaves a stale lock behind,
and nothing has to be cleaned up by hand. They are advisory: only code that takes them is excluded.
"""

import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"  # the lock file inside a locked directory

_held: set[Path] = set()  # directories this process holds, so nested use does not lock against itself


class DirectoryLocked(RuntimeError):
    """Another process holds the directory; the message names it."""


@contextmanager
def directory_mutex(directory: str | Path) -> Iterator[None]:
    """Holds an exclusive lock on the directory itself for the block, waiting for it. No file is made,
    and it is independent of `lock_directory`'s, so the holder of that may take this one too."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"


@contextmanager
def lock_directory(directory: str | Path, *, wait: bool = False) -> Iterator[None]:
    """One process at a time in `directory` (created if missing), through its `.lock` file, which
    names the holder (pid, host, command line) while it holds it.

    A second process raises DirectoryLocked naming the holder, or with `wait=True` waits for it. The
    same process may nest the lock on one directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _held:
        yield
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DirectoryLocked(
                f"{directory} is in use by {_holder(fd)}; wait for it to finish, or stop it, or use another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)})\n".encode())
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
