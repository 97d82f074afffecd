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
    """The brush RLE (a list of byte values) of an HxW bool mask.

    Every pixel is 4 equal bytes, so each run of the mask is one repeat token of 4x its length (split
    where it exceeds the widest field); the tokens are packed with numpy, not bit by bit.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"a brush mask must be HxW bool, got {mask.dtype} {mask.shape}")
    flat = mask.ravel()
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if flat.size else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, flat.size]).astype(np.int64) * CHANNELS
    words = np.where(flat[starts], 255, 0).astype(np.int64)
    # runs longer than the widest field become several tokens of at most _MAX_RUN values
    pieces = -(-lengths // _MAX_RUN)
    token_run = np.repeat(np.arange(lengths.size), pieces)
    piece_index = np.arange(token_run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    counts = np.minimum(lengths[token_run] - piece_index * _MAX_RUN, _MAX_RUN)
    field_sizes = np.array(RUN_FIELD_SIZES)
    size_index = np.searchsorted(2**field_sizes, counts, side="left")  # smallest field holding count - 1
    widths = field_sizes[size_index]
    # a token: 1 (repeat), 2 bits of field index, `width` bits of count - 1, the 8-bit word
    codes = (((1 << 2 | size_index) << widths | (counts - 1)) << WORD_SIZE) | words[token_run]
    bit_lengths = 3 + widths + WORD_SIZE
    header = (((flat.size * CHANNELS) << 5 | (WORD_SIZE - 1)) << 16) | int("".join(f"{s - 1:04b}" for s in RUN_FIELD_SIZES), 2)
    codes = np.r_[header, codes]
    bit_lengths = np.r_[_HEADER_BITS, bit_lengths]
    owner = np.repeat(np.arange(codes.size), bit_lengths)
    offset = np.arange(owner.size) - np.repeat(np.cumsum(bit_lengths) - bit_lengths, bit_lengths)
    bits = (codes[owner] >> (bit_lengths[owner] - 1 - offset)) & 1
    return np.packbits(bits.astype(np.uint8)).tolist()


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
    bits = "".join(f"{byte:08b}" for byte in data.tolist())
    if len(bits) < _HEADER_BITS:
        raise ValueError(f"a brush RLE needs a {_HEADER_BITS}-bit header, got {len(bits)} bits")
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
    rgba = np.repeat(np.concatenate(values).astype(np.uint8), repeats).reshape(height, width, CHANNELS)
    return rgba[:, :, 3] >= 128


class _BitReader:
    """Big-endian bit fields read in order from a string of 0s and 1s; ValueError past its end.

    (Slicing a string and parsing it with `int(..., 2)` is several times faster per field than numpy
    for the short fields this format has.)"""

    def __init__(self, bits: str) -> None:
        self.bits = bits
        self.position = 0

    def read(self, size: int) -> int:
        end = self.position + size
        if end > len(self.bits):
            raise ValueError("the brush RLE ends in the middle of a token")
        value = int(self.bits[self.position : end], 2)
        self.position = end
        return value

    def read_words(self, count: int, size: int) -> np.ndarray:
        return np.array([self.read(size) for _ in range(count)], dtype=np.int64)
