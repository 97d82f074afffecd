"""A full file system, simulated under one directory, for the tests of what commands do on a full disk."""

import builtins
import errno
import io
import os
from pathlib import Path


class FullDirectory:
    """A full file system under `directory`, simulated: files opened for writing there take `room`
    more bytes in all, then a write stores what fits and raises OSError(ENOSPC), as a full disk does,
    through write() (open, os.fdopen) and sendfile() (shutil's copies)."""

    def __init__(self, directory: Path, room: int, monkeypatch) -> None:
        self.directory, self.room = directory.resolve(), room
        real_open, real_sendfile = io.open, os.sendfile

        def opening(file, mode="r", *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            return _FullFile(opened, self) if set(mode) & set("wax+") and self.holds(file) else opened

        def sendfile(out_fd, in_fd, offset, count):
            if not self.holds(out_fd):
                return real_sendfile(out_fd, in_fd, offset, count)
            fits = min(count, self.room)
            sent = real_sendfile(out_fd, in_fd, offset, fits) if fits else 0
            self.room -= sent
            if fits < count and sent == fits:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return sent

        monkeypatch.setattr(builtins, "open", opening)
        monkeypatch.setattr(io, "open", opening)  # os.fdopen's
        monkeypatch.setattr(os, "sendfile", sendfile)

    def holds(self, file) -> bool:
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
        return Path(path).resolve().is_relative_to(self.directory)


class _FullFile:
    def __init__(self, file, disk: FullDirectory) -> None:
        self._file, self._disk = file, disk

    def write(self, data) -> int:
        data = data if isinstance(data, str) else memoryview(data).cast("B")  # text counts a byte a character
        fits = min(len(data), self._disk.room)
        self._file.write(data[:fits])
        self._file.flush()
        self._disk.room -= fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
