"""Keep freed memory in the process on CPU, so large tensors are not page-faulted in anew each time.

glibc hands allocations above its mmap threshold (128 KiB, rising to at most 32 MiB) straight to
the kernel and returns them on free, and trims the heap top eagerly. SAM's decoder allocates
megabyte-sized activations per prompt; on the machines measured here, zero-filling their fresh pages
cost more than the arithmetic (64-prompt decode: ~45 ms per prompt before, ~17 ms after). Raising
both thresholds lets malloc reuse freed blocks. The price is a resident size that stays at its peak.
"""

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_configured = False


def retain_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds once per process; True if they are now raised.

    A no-op off glibc and when SEGANY_KEEP_MALLOC_DEFAULTS=1 is set.
    """
    global _configured
    if _configured:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("SEGANY_KEEP_MALLOC_DEFAULTS") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _configured = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _configured
