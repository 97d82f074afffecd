"""`AtomicCheckpointIO`: Lightning's checkpoint writer, made safe on a full disk.

Lightning's own (`TorchCheckpointIO`) writes a checkpoint into the system temp directory and moves it
into place; when that directory is on another file system (a tmpfs /tmp, a container's), the move is
a copy onto the final name, and a full disk leaves a truncated checkpoint there, which a resumed run
then fails to load. Here each checkpoint is written beside its final name, synced and renamed
(`write_atomically`, streamed): a failed write leaves the earlier file as it was, and the OSError names
the checkpoint.
"""

from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from segany_train.atomic_files import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda stream: _save_streamed(checkpoint, stream))
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(path)) from None


class _WriteErrors:
    """A stream that remembers the OSError its write raised: torch.save reports a failed write to a
    stream as a RuntimeError ("unexpected pos"), without the errno that says the disk is full."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.error = stream, None

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


def _save_streamed(checkpoint: dict[str, Any], stream: BinaryIO) -> None:
    recording = _WriteErrors(stream)
    try:
        torch.save(checkpoint, recording)
    except RuntimeError:
        if recording.error is not None:
            raise recording.error from None
        raise
