"""`AtomicCheckpointIO`: Lightning's checkpoint writer, made safe on a full disk.

Lightning's own (`TorchCheckpointIO`) writes a checkpoint into the system temp directory and moves it
into place; when that directory is on another file system (a tmpfs /tmp, a container's), the move is
a copy onto the final name, and a full disk leaves a truncated checkpoint there, which a resumed run
then fails to load. Here each checkpoint is written beside its final name, synced and renamed
(`write_bytes_atomically`): a failed write leaves the earlier file as it was, and the OSError names
the checkpoint.
"""

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from segany_train.data.shard_writer import write_bytes_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, buffer.getbuffer())  # an OSError names the checkpoint
