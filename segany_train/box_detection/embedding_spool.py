"""Training embeddings kept on disk instead of in memory: a corpus of N images is N x 4 MB of
ViT-H embeddings, more than memory holds at SA-1B scale, while training reads a batch at a time."""

import tempfile

import numpy as np
import torch


class EmbeddingSpool:
    """BxCxhxw embedding chunks appended to an unnamed temporary file (in TMPDIR), then mapped back as
    one NxCxhxw float32 CPU tensor. The OS reads its pages when they are indexed and may drop them
    again, so holding it costs no memory; the file disappears with the tensor, or with the process.

    The file holds the image encoder's own layout, channels last (its neck ends in a permute), and
    the tensor keeps those strides: reductions and convolutions over it then add in the same order
    as over the encoder's output, so a head trained from the spool is the one trained in memory."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self._shape: tuple[int, ...] | None = None
        self._count = 0

    def append(self, chunk: torch.Tensor) -> None:
        """Adds BxCxhxw embeddings (any device) after those appended before."""
        if self._shape is None:
            self._shape = tuple(chunk.shape[1:])
        elif tuple(chunk.shape[1:]) != self._shape:
            raise ValueError(f"embedding chunks must all be Bx{'x'.join(map(str, self._shape))}, got {tuple(chunk.shape)}")
        channels_last = chunk.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).contiguous()  # Bxhxwxc
        self._file.write(memoryview(channels_last.numpy()))
        self._count += chunk.shape[0]

    def mapped(self) -> torch.Tensor:
        """The NxCxhxw tensor of every chunk appended, in order; the spool takes no more chunks."""
        if self._shape is None:
            raise ValueError("the embedding spool holds no embedding")
        self._file.flush()
        # copy-on-write: a writable array (torch warns on read-only ones) whose writes never reach the file
        c, h, w = self._shape
        array = np.memmap(self._file, dtype=np.float32, mode="c", shape=(self._count, h, w, c))
        self._file.close()  # the mapping keeps the file's pages until the array is freed
        return torch.from_numpy(array).permute(0, 3, 1, 2)
