"""Timing: interleaved repeats, robust statistics, the machine's GEMM peak, peak memory."""
from __future__ import annotations

import gc
import math
import time
import tracemalloc
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

MAX_REPEAT = 1000
ROUNDS = 5


class Timed(NamedTuple):
    """What a call returns when it timed itself (a peer in another process): `seconds`
    is then its time, without the round trip."""

    seconds: float


def summarize(times) -> dict:
    """Median and interquartile range (seconds) of a list of times."""
    t = np.asarray(times, dtype=np.float64)
    q1, median, q3 = np.percentile(t, [25, 50, 75])
    return {"median_s": float(median), "q1_s": float(q1), "q3_s": float(q3),
            "iqr_s": float(q3 - q1), "min_s": float(t.min()), "repeats": int(t.size)}


def repeats_for(estimate: float, repeat: int, min_time: float,
                max_repeat: int = MAX_REPEAT) -> int:
    """At least `repeat` calls and at least `min_time` seconds of them, at most max_repeat."""
    wanted = math.ceil(min_time / estimate) if estimate > 0 else max_repeat
    return max(repeat, min(max_repeat, wanted))


def time_interleaved(runners: dict, counts: dict, rounds: int = ROUNDS) -> dict:
    """Time runners[name] counts[name] times each, one call per sample, in rounds.

    A runner is (call, before): `before()` (may be None) runs untimed before every call.
    Each implementation's calls are split into `rounds` blocks of consecutive calls, and the
    rounds alternate between implementations: a noisy neighbour's load spreads over all of
    them alike, while the first call after a switch (another library's idle threads still
    spinning) is a small minority of the samples.
    """
    times = {name: [] for name in runners}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name, (call, before) in runners.items():
                n = counts[name]
                for _ in range(n * (r + 1) // rounds - n * r // rounds):
                    if before is not None:
                        before()
                    t0 = time.perf_counter()
                    result = call()
                    elapsed = time.perf_counter() - t0
                    times[name].append(result.seconds if isinstance(result, Timed)
                                       else elapsed)
                    del result
    finally:
        if enabled:
            gc.enable()
    return times


def gemm_peak(dtype: str, threads: int, size: int = 2048, repeats: int = 3,
              min_time: float = 0.5) -> float:
    """Best GFLOP/s of a size x size numpy matmul with BLAS on `threads` threads.

    The best of at least `repeats` calls and `min_time` seconds: a peak, so the fastest
    call is the estimate (slow calls are other processes' doing).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    out = np.empty_like(a)
    best, spent, calls = math.inf, 0.0, 0
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)
        while calls < repeats or (spent < min_time and calls < MAX_REPEAT):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            elapsed = time.perf_counter() - t0
            best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return 2.0 * size ** 3 / best / 1e9


def extra_memory(call, output_bytes) -> int:
    """Peak bytes numpy allocated during one call, beyond its outputs.

    tracemalloc sees numpy's array allocations (not malloc calls inside C code, nor
    PyTorch's allocator). `output_bytes(result)` gives the size of what the call returns.
    """
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - base - output_bytes(result))
