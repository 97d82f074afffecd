"""Files written whole or not at all: a temporary file beside the final name, flushed to disk (fsync),
then renamed into place, so that a crash or a full disk leaves the old complete file or the new one,
never half of one. A leaf: importable from every layer (docs/layout.md)."""

import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from segany_train.os_errors import naming_the_file


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file of its own, synced, then renamed: never half
    a file, even after a crash or beside another writer of the same path."""
    write_atomically(path, lambda stream: stream.write(data))


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(stream)` into a temporary file beside `path`, synced, then renamed to `path` (streamed:
    a checkpoint of several GB is never held in memory a second time)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: the name is this writer's alone; mode 0o666 under the umask, as open() would create it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise naming_the_file(error, path) from None
        raise


def finite_or_null(value: Any) -> Any:
    """`value` (dicts, lists and tuples, recursively) with every float that is not finite as None.
    JSON has no NaN or infinity: Python's json writes them as bare `NaN`/`Infinity`, which other
    readers (jq, JavaScript, strict parsers) refuse. Unknown figures (a real tool's clicks, a precision
    of no pre-filled mask) are NaN in memory and null in files."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_json_atomically(path: Path, value: Any) -> None:
    """`value` as indented, valid JSON (`finite_or_null`), written as `write_bytes_atomically` does."""
    write_bytes_atomically(path, json.dumps(finite_or_null(value), indent=1, sort_keys=True, allow_nan=False).encode("utf-8"))
