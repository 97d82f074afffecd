"""Label Studio's brush RLE: masks in and out of the `BrushLabels` tag's `rle` format.

Label Studio stores a brush region as the RGBA pixels of an image-sized canvas (row-major, 4 bytes
a pixel) packed with thi.ng's `rle-pack` bit format, sent as a list of byte values:

    header: 32 bits value count, 5 bits word size - 1, four 4-bit run-length field sizes - 1
    then tokens until the count is reached, each: 1 flag bit, 2 bits choosing a field size,
    that many bits of (length - 1), then one word (flag 1: the value repeated `length` times)
    or `length` words (flag 0: literal values)

A mask pixel is 255 in all four channels; a pixel belongs to the mask when its alpha is at least
128 (the tool's anti-aliased stroke edges are partly covered). Conversion to the SA-1B/COCO RLE
goes through the HxW mask (`segany_train.data.sa1b.annotation_from_mask`, pycocotools).
"""

import numpy as np

WORD_SIZE = 8  # bits per value: RGBA bytes
RUN_FIELD_SIZES = (3, 4, 8, 16)  # the sizes Label Studio's own encoder announces in its header
CHANNELS = 4
_HEADER_BITS = 32 + 5 + 4 * 4
_MAX_RUN = 2 ** RUN_FIELD_SIZES[-1]


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """The brush RLE (a list of byte values) of an HxW bool mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"a brush mask must be HxW bool, got {mask.dtype} {mask.shape}")
    flat = mask.ravel()
    # runs of the mask in row-major order; every pixel is 4 equal bytes, so each run is 4x longer
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, flat.size]) * CHANNELS
    fields = [f"{flat.size * CHANNELS:032b}", f"{WORD_SIZE - 1:05b}", *(f"{s - 1:04b}" for s in RUN_FIELD_SIZES)]
    for start, length in zip(starts.tolist(), lengths.tolist()):
        word = f"{255 if flat[start] else 0:08b}"
        while length:
            piece = min(length, _MAX_RUN)
            size_index = next(k for k, size in enumerate(RUN_FIELD_SIZES) if piece - 1 < 2**size)
            fields.append(f"1{size_index:02b}{piece - 1:0{RUN_FIELD_SIZES[size_index]}b}{word}")
            length -= piece
    bits = "".join(fields)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def brush_rle_to_mask(rle: list[int] | bytes, *, height: int, width: int) -> np.ndarray:
    """The HxW bool mask of a brush RLE made for a `height` x `width` image.

    ValueError in one line when the data is not a brush RLE of that size (wrong value count or word
    size, truncated tokens, values that are not bytes).
    """
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError("a brush RLE must be a list of byte values") from None
    if data.ndim != 1 or (data.size and (data.min() < 0 or data.max() > 255)):
        raise ValueError("a brush RLE must be a list of byte values (0-255)")
    bits = np.unpackbits(data.astype(np.uint8))
    if bits.size < _HEADER_BITS:
        raise ValueError(f"a brush RLE needs a {_HEADER_BITS}-bit header, got {bits.size} bits")
    reader = _BitReader(bits)
    count = reader.read(32)
    word_size = reader.read(5) + 1
    field_sizes = [reader.read(4) + 1 for _ in range(4)]
    expected = height * width * CHANNELS
    if count != expected:
        raise ValueError(f"the brush RLE holds {count} values, a {height}x{width} RGBA image has {expected}")
    if word_size != WORD_SIZE:
        raise ValueError(f"the brush RLE's word size is {word_size} bits, RGBA values have {WORD_SIZE}")
    values: list[np.ndarray] = []
    repeats: list[int] = []
    filled = 0
    while filled < count:
        repeated = reader.read(1)
        length = reader.read(field_sizes[reader.read(2)]) + 1
        if filled + length > count:
            raise ValueError(f"the brush RLE's runs cover more than its {count} values")
        if repeated:
            values.append(np.array([reader.read(word_size)]))
            repeats.append(length)
        else:
            literal = reader.read_words(length, word_size)
            values.append(literal)
            repeats += [1] * length
        filled += length
    rgba = np.repeat(np.concatenate(values), repeats).reshape(height, width, CHANNELS)
    return rgba[:, :, 3] >= 128


class _BitReader:
    """Big-endian bit fields read in order from an unpacked bit array; ValueError past its end."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits
        self.position = 0

    def read(self, size: int) -> int:
        return int(self.read_words(1, size)[0])

    def read_words(self, count: int, size: int) -> np.ndarray:
        end = self.position + count * size
        if end > self.bits.size:
            raise ValueError("the brush RLE ends in the middle of a token")
        chunk = self.bits[self.position : end].reshape(count, size).astype(np.int64)
        self.position = end
        return chunk @ (1 << np.arange(size - 1, -1, -1, dtype=np.int64))
