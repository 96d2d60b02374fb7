"""Thread count of the kernels.

By default dilconv follows OpenMP: OMP_NUM_THREADS, and threadpoolctl.threadpool_limits(),
which sees dilconv's OpenMP runtime. set_num_threads(n) overrides that for the process;
set_num_threads(None) goes back to following OpenMP.

fork(): GNU OpenMP's thread pool does not survive fork(), and the first parallel region in
the child of a process that already ran one waits forever for threads that do not exist.
Kernels give the same bits for any thread count, so in such a child dilconv runs them on
one thread (get_num_threads() says 1). Use the 'spawn' or 'forkserver' start methods for
parallel workers.
"""
from __future__ import annotations

import numbers
import os
from typing import Optional

from . import _openmp_helpers

# More threads than this never helps a compute kernel, and asking OpenMP for millions of
# threads would end the process when thread creation fails.
MAX_THREADS = 1024
_requested: Optional[int] = None
# OpenMP's own count before set_num_threads changed it, restored by set_num_threads(None).
_openmp_before: Optional[int] = None
_parallel_used = False      # a kernel ran on more than one thread in this process
_forked_serial = False      # this is a fork() child of such a process: one thread only


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
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n must be >= 1 and <= {MAX_THREADS}, got {n}")
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
    if _forked_serial:
        return 1
    available = _openmp_helpers.max_threads()
    if _requested is None:
        return available
    return min(_requested, available)


def threads_for(tasks: int) -> int:
    """Threads for a kernel with `tasks` independent parallel tasks (never more)."""
    global _parallel_used
    n = max(1, min(get_num_threads(), tasks, MAX_THREADS))
    if n > 1:
        _parallel_used = True
    return n


def _after_fork_in_child() -> None:
    global _forked_serial
    if _parallel_used:
        _forked_serial = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
