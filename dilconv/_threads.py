"""Thread count of the kernels.

By default dilconv follows OpenMP: OMP_NUM_THREADS, and threadpoolctl.threadpool_limits(),
which sees dilconv's OpenMP runtime. set_num_threads(n) overrides that for the process;
set_num_threads(None) goes back to following OpenMP.

fork(): GNU OpenMP's thread pool does not survive fork(), and the first parallel region in
the child of a process that already ran one waits forever for threads that do not exist.
Kernels give the same bits for any thread count, so in such a child dilconv runs them on
one thread (get_num_threads() says 1). Use the 'spawn' or 'forkserver' start methods for
parallel workers.

BLAS (the gemm kernels) runs inside our parallel regions: `blas_single_threaded()` keeps it
to one thread there.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import threading
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
_blas_lock = threading.Lock()
_blas_users = 0             # calls inside blas_single_threaded()
_blas_limiter = None
_blas_controller = None


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


def kernel_threads(spec, tasks: int, tuning) -> int:
    """Threads for a kernel with `tasks` parallel tasks on this geometry: at least
    `tuning.min_macs_per_thread` multiply-adds each."""
    most = spec.macs // tuning.min_macs_per_thread
    if most <= 1 or tasks <= 1:
        return 1                  # without asking OpenMP (a layer of tiny calls)
    return min(threads_for(tasks), most)


@contextlib.contextmanager
def blas_single_threaded():
    """BLAS runs inside our parallel regions: keep it to one thread there.

    The limit is process-wide, so concurrent calls share one: the first caller sets it and
    the last one restores the original count (otherwise one thread could restore it while
    another is still inside BLAS, or leave it at 1 for good).
    """
    global _blas_controller, _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            if _blas_controller is None:
                from threadpoolctl import ThreadpoolController
                _blas_controller = ThreadpoolController()
            _release_openblas_control()
            _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _release_openblas_control()
                _blas_limiter.restore_original_limits()
                _blas_limiter = None
                _release_openblas_control()


def _release_openblas_control() -> None:
    """Let this thread set OpenBLAS's count.

    threadpoolctl (3.6+) lets only one "controlling" thread change a process-wide
    OpenBLAS pool and silently ignores the others; the last caller, who restores the
    count, may not be the first, who set it. We hold _blas_lock here.
    """
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def _after_fork_in_child() -> None:
    global _forked_serial, _blas_lock, _blas_users, _blas_limiter
    if _parallel_used:
        _forked_serial = True
    # Another thread may have held the BLAS lock or limit at fork(): start afresh.
    _blas_lock = threading.Lock()
    if _blas_users and _blas_limiter is not None:
        _blas_limiter.restore_original_limits()
    _blas_users, _blas_limiter = 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
