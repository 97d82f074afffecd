"""One line for an OSError a command meets while it works (a full disk, a read-only or vanished
output), instead of a traceback: which file, and, for a full disk, that a rerun after freeing space
carries on where this one stopped."""

import errno


def describe_os_error(error: OSError, *, rerun: str) -> str:
    """`error` in one line; `rerun` says what a rerun keeps, e.g. "the run resumes from its last
    complete checkpoint"."""
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full{where} ({error.strerror}); free space and rerun: {rerun}"
    return f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)


def naming_the_file(error: OSError, path: object) -> OSError:
    """`error` with `path` as its file name when it has none (a write to an open stream says nothing
    of the file), for `describe_os_error`."""
    if error.filename is not None or error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))
