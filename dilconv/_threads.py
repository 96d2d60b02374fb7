"""Thread count of the kernels.

By default dilconv follows OpenMP: OMP_NUM_THREADS, and threadpoolctl.threadpool_limits(),
which sees dilconv's OpenMP runtime. set_num_threads(n) overrides that for the process;
set_num_threads(None) goes back to following OpenMP.
"""
from __future__ import annotations

import numbers
from typing import Optional

from . import _openmp_helpers

_requested: Optional[int] = None
# OpenMP's own count before set_num_threads changed it, restored by set_num_threads(None).
_openmp_before: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Use `n` threads in dilconv's kernels (None: follow OpenMP's setting again).

    >>> import dilconv
    >>> dilconv.set_num_threads(1); dilconv.get_num_threads()
    1
    >>> dilconv.set_num_threads(None)
    """
    global _requested, _openmp_before
    if n is None:
        if _openmp_before is not None:
            _openmp_helpers.set_max_threads(_openmp_before)
        _requested = _openmp_before = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be a positive int or None, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if _openmp_before is None:
        _openmp_before = _openmp_helpers.max_threads()
    _requested = int(n)
    # Also set OpenMP's own count in this thread, so threadpoolctl reads and restores it.
    _openmp_helpers.set_max_threads(_requested)


def get_num_threads() -> int:
    """Threads the next kernel call from this thread will use.

    A threadpoolctl limit (or a lower OMP_NUM_THREADS in a thread that did not call
    set_num_threads) caps the requested count.

    >>> import dilconv, threadpoolctl
    >>> with threadpoolctl.threadpool_limits(1):
    ...     dilconv.get_num_threads()
    1
    """
    available = _openmp_helpers.max_threads()
    if _requested is None:
        return available
    return min(_requested, available)


def threads_for(tasks: int) -> int:
    """Threads for a kernel with `tasks` independent parallel tasks (never more)."""
    return max(1, min(get_num_threads(), tasks))
