"""Buffers the kernels allocate for one call: cache-line aligned.

numpy aligns large arrays to 16 bytes only, so every 64-byte vector load from a packed
panel would straddle two cache lines (read twice as slowly on some CPUs); rows of
per-thread scratch also start on their own lines, so threads never share one."""
import numpy as np

CACHE_LINE = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a cache line."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + CACHE_LINE, dtype=np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def thread_scratch(threads: int, length: int, dtype) -> np.ndarray:
    """(threads, >= length) scratch, each thread's row starting on its own cache line."""
    dtype = np.dtype(dtype)
    per_line = CACHE_LINE // dtype.itemsize
    row = -(-max(length, 1) // per_line) * per_line
    return aligned_empty((threads, row), dtype)
