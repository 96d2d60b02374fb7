"""Python threads, fork(), multiprocessing start methods and thread-count controls."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import threadpoolctl

import dilconv
from dilconv._dispatch import select
from dilconv._validate import make_spec

# Subprocesses import this checkout's dilconv, not an installed one.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dilconv.__file__)))
LINUX = sys.platform.startswith("linux")

# (input, weight, kwargs): one case per kernel family, both dtypes.
CASES = [
    # panel; its strided input gradient runs on BLAS, under the shared BLAS limit
    ((2, 16, 20, 20), (16, 16, 3, 3), dict(stride=(2, 1), padding=2, dilation=2)),
    ((2, 8, 21, 19), (8, 1, 3, 3), dict(stride=(2, 1), padding=3, dilation=3, groups=8)),
    ((2, 8, 21, 30), (16, 1, 3, 3), dict(stride=(2, 1), padding=3, dilation=3, groups=8)),
]


def _cases(rng):
    for dtype in (np.float32, np.float64):
        for xs, ws, kwargs in CASES:
            x = rng.standard_normal(xs).astype(dtype)
            w = rng.standard_normal(ws).astype(dtype)
            b = rng.standard_normal(ws[0]).astype(dtype)
            y = dilconv.conv2d(x, w, b, **kwargs)
            gy = rng.standard_normal(y.shape).astype(dtype)
            yield x, w, b, gy, kwargs


def _run_all(cases):
    out = []
    for x, w, b, gy, kwargs in cases:
        out.append(dilconv.conv2d(x, w, b, **kwargs))
        out.extend(dilconv.conv2d_backward(gy, x, w, **kwargs))
    return out


def _blas_threads():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"]


def test_cases_cover_the_kernel_families():
    defaults = dict(stride=1, padding=0, dilation=1, groups=1)
    paths = {select(make_spec(xs, ws, **{**defaults, **kw}), op)
             for xs, ws, kw in CASES for op in ("forward", "grad_weight")}
    assert paths == {"direct", "panel", "depthwise"}


def test_eight_threads_match_serial_calls(rng):
    cases = list(_cases(rng))
    blas_before = _blas_threads()
    serial = _run_all(cases)
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            for _ in range(5):
                got = _run_all(cases)
                if results[i] is None:
                    results[i] = got
                for a, b in zip(got, serial):
                    assert np.array_equal(a, b)
        except BaseException as exc:        # reported below, with the thread's number
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results:
        for a, b in zip(got, serial):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    # Concurrent calls share one BLAS limit: the original count comes back.
    assert _blas_threads() == blas_before


def test_kernels_release_the_gil(rng):
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    dilconv.set_num_threads(1)                   # leave a core for this thread
    try:
        # A call long enough (>= 0.1 s) that scheduling noise cannot pass for a stall.
        size = 64
        while True:
            x = np.ones((1, 64, size, size), np.float32)
            t0 = time.perf_counter()
            dilconv.conv2d(x, w, padding=2, dilation=2)
            if time.perf_counter() - t0 >= 0.1 or size >= 1024:
                break
            size *= 2
        span = {}

        def call():
            span["start"] = time.perf_counter()
            dilconv.conv2d(x, w, padding=2, dilation=2)
            span["end"] = time.perf_counter()

        worker = threading.Thread(target=call)
        ticks = []
        worker.start()
        while worker.is_alive():
            ticks.append(time.perf_counter())
            time.sleep(0.001)
        worker.join()
    finally:
        dilconv.set_num_threads(None)
    # A kernel holding the GIL would stall this loop for the whole call.
    duration = span["end"] - span["start"]
    gaps = np.diff(ticks)
    assert len(ticks) > 5 and gaps.max() < duration / 2, (duration, gaps.max(), len(ticks))


def _python(script, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


FORK_SCRIPT = """
import os, sys, faulthandler
import numpy as np
import dilconv
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 16, 30, 30)).astype(np.float32)
w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
xd = rng.standard_normal((4, 8, 30, 30))
wd = rng.standard_normal((8, 1, 3, 3))
dilconv.set_num_threads(2)
ref = dilconv.conv2d(x, w, dilation=2)               # parallel regions in the parent
refd = dilconv.conv2d(xd, wd, groups=8, padding=1)
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(30, exit=True)  # a hang becomes exit code 1
    dilconv.set_num_threads(2)                       # has no effect in this child
    ok = (np.array_equal(dilconv.conv2d(x, w, dilation=2), ref)
          and np.array_equal(dilconv.conv2d(xd, wd, groups=8, padding=1), refd))
    os._exit(0 if ok and dilconv.get_num_threads() == 1 else 3)
_, status = os.waitpid(pid, 0)
assert dilconv.get_num_threads() == 2                # the parent keeps its threads
assert np.array_equal(dilconv.conv2d(x, w, dilation=2), ref)
print("child status", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_after_parallel_parent():
    # GNU OpenMP hangs in a fork() child of a process that ran a parallel region; dilconv
    # runs the child's kernels on one thread instead (same bits for any thread count).
    proc = _python(FORK_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert "child status 0" in proc.stdout, proc.stdout + proc.stderr


MP_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np
import dilconv

def work(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((2, 16, 20, 20)).astype(np.float32)
    return (dilconv.conv2d(x, w, dilation=2), dilconv.conv2d_backward(gy, x, w, dilation=2),
            dilconv.get_num_threads())

if __name__ == "__main__":
    method = sys.argv[1]
    dilconv.set_num_threads(2)
    expected = [work(s) for s in range(4)]           # the parent ran parallel regions
    with mp.get_context(method).Pool(2) as pool:
        got = pool.map(work, range(4))
    for (y, g, _), (y2, g2, threads) in zip(expected, got):
        assert np.array_equal(y, y2)
        assert all(np.array_equal(a, b) for a, b in zip(g, g2))
    print("worker threads", sorted({t for _, _, t in got}))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_start_methods(method, tmp_path):
    import multiprocessing
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    script = tmp_path / "mp_script.py"      # spawn needs an importable __main__ file
    script.write_text(textwrap.dedent(MP_SCRIPT))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(script), method], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # fork workers inherit a parent that ran parallel regions: one thread each.
    expected = "[1]" if method == "fork" else "[2]"
    assert f"worker threads {expected}" in proc.stdout, proc.stdout


THREAD_COUNT_SCRIPT = """
import json, os
import numpy as np
import threadpoolctl
import dilconv

x = np.ones((8, 8, 64, 64)); w = np.ones((8, 1, 3, 3))     # no BLAS threads; work for 16
def threads_after_call():
    dilconv.conv2d(x, w, groups=8)
    return len(os.listdir("/proc/self/task")), dilconv.get_num_threads()

base = len(os.listdir("/proc/self/task"))
seen = {}
with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
    seen["threadpool_limits(1)"] = threads_after_call()
dilconv.set_num_threads(2)
seen["set_num_threads(2)"] = threads_after_call()
dilconv.set_num_threads(None)
with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
    seen["threadpool_limits(3)"] = threads_after_call()
dilconv.set_num_threads(4)
seen["set_num_threads(4)"] = threads_after_call()
with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
    seen["set_num_threads(4) + threadpool_limits(1)"] = (None, dilconv.get_num_threads())
seen["after the limit"] = (None, dilconv.get_num_threads())
print(json.dumps({"base": base, "seen": seen}))
"""


@pytest.mark.skipif(not LINUX, reason="counts threads in /proc/self/task")
@pytest.mark.skipif(not dilconv._threads._openmp_helpers.OPENMP_ENABLED,
                    reason="built without OpenMP")
def test_set_num_threads_and_threadpool_limits_take_effect():
    """The kernels really run on the requested number of OS threads."""
    import json
    proc = _python(THREAD_COUNT_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    base, seen = report["base"], report["seen"]
    # OpenMP's pool: the calling thread plus n - 1 workers (it only grows here).
    for label, n in [("threadpool_limits(1)", 1), ("set_num_threads(2)", 2),
                     ("threadpool_limits(3)", 3), ("set_num_threads(4)", 4)]:
        assert seen[label] == [base + n - 1, n], (label, seen)
    assert seen["set_num_threads(4) + threadpool_limits(1)"][1] == 1
    assert seen["after the limit"][1] == 4


FIRST_CALLS_CONCURRENT_SCRIPT = """
import json, threading
import numpy as np
import threadpoolctl
import dilconv

def blas():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

before = blas()
x = np.random.rand(1, 64, 64, 64).astype(np.float32)
w = np.random.rand(64, 64, 3, 3).astype(np.float32)
def calls():
    for _ in range(20):
        dilconv.conv2d(x, w, padding=1)                 # gemm path: limits BLAS
threads = [threading.Thread(target=calls) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({"before": before, "after": blas()}))
"""


def test_blas_count_comes_back_when_the_first_calls_are_concurrent():
    # threadpoolctl lets only one thread change OpenBLAS's pool; the thread that restores
    # the count is not always the one that limited it (dask's threaded scheduler).
    import json
    proc = _python(FIRST_CALLS_CONCURRENT_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["after"] == report["before"], report
