"""Buffers the kernels allocate for one call: cache-line aligned.

numpy aligns large arrays to 16 bytes only, so every 64-byte vector load from a packed
panel would straddle two cache lines (read twice as slowly on some CPUs); rows of
per-thread scratch also start on their own lines, so threads never share one."""
import math

import numpy as np

CACHE_LINE = 64
# Below this many bytes an array is left where numpy puts it: asking where that is costs
# more (microseconds) than a misaligned small buffer does.
ALIGN_FROM_BYTES = 1 << 14


def aligned_empty(shape, dtype, always: bool = False) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line (if it
    holds at least ALIGN_FROM_BYTES, or `always`)."""
    dtype = np.dtype(dtype)
    # math.prod, not np.prod: a tiny layer's call makes a few of these (1 us each).
    count = math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape)
    nbytes = count * dtype.itemsize
    if nbytes < ALIGN_FROM_BYTES and not always:
        return np.empty(shape, dtype)
    # Sized without a first array of the shape: that one, alive until the return, moved
    # the allocator's thresholds so that every large buffer came as fresh pages, each
    # zeroed by the OS at its first touch (a 2048 -> 256 layer's forward: 920 page faults
    # a call, against 55 now, 4% of its time on an AVX-512 Xeon).
    raw = np.empty(nbytes + CACHE_LINE, np.uint8)
    start = -raw.__array_interface__["data"][0] % CACHE_LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def thread_scratch(threads: int, length: int, dtype) -> np.ndarray:
    """(threads, >= length) scratch, each thread's row whole cache lines of its own:
    aligned however small it is when several threads share it (rows of tap offsets
    sharing a line, rewritten per tap by two threads, slowed aspp_r6's weight gradient)."""
    per_line = CACHE_LINE // np.dtype(dtype).itemsize
    return aligned_empty((threads, -(-max(length, 1) // per_line) * per_line), dtype,
                         always=threads > 1)
