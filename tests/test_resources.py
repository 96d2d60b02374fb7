"""Memory over many calls, 64-bit indexing (> 2**31 elements), KeyboardInterrupt."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dilconv
from dilconv import _dispatch, _threads
from dilconv._tuning import tuning
from dilconv._validate import make_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dilconv.__file__)))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mixed_calls(rng):
    """One round of calls over every kernel, the error paths, out= and needs=."""
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)         # gemm
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)        # direct (depthwise)
    b = rng.standard_normal(8).astype(np.float32)
    out = np.empty((2, 8, 8, 8), np.float32)
    gy = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)

    def round_():
        dilconv.conv2d(x, w, b, dilation=2)
        dilconv.conv2d(x, wd, b, dilation=2, groups=8, out=out)
        dilconv.conv2d_backward(gy, x, w, dilation=2)
        dilconv.conv2d_backward(gy, x, wd, dilation=2, groups=8, needs=("weight",))
        dilconv.conv2d(x[0].tolist(), w.astype(np.float64)[:, :, ::-1], padding="same")
        for bad in (dict(stride=0), dict(groups=3), dict(padding="full")):
            try:
                dilconv.conv2d(x, w, b, **bad)
            except ValueError:
                pass
    return round_


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_no_memory_growth_over_10000_calls(rng):
    round_ = _mixed_calls(rng)
    calls_per_round = 8
    # One thread: tiny calls on a busy machine would mostly wait for OpenMP wake-ups.
    dilconv.set_num_threads(1)
    try:
        for _ in range(200):                  # warm up allocator caches
            round_()
        before = _rss_bytes()
        for _ in range(10_000 // calls_per_round):
            round_()
        growth = _rss_bytes() - before
    finally:
        dilconv.set_num_threads(None)
    # Leaking even the smallest result of each call (a 1 KiB grad weight) would add
    # 10 MB; allocator noise stays well under the limit.
    assert growth < 2 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB over 10,000 calls"


INTERRUPT_SCRIPT = """
import os, signal, threading, time
import numpy as np
import threadpoolctl
import dilconv
from dilconv import _threads
from dilconv._validate import make_spec

def blas():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

rng = np.random.default_rng(0)
x = rng.standard_normal((1, 64, 160, 160)).astype(np.float32)
w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
blas_before = blas()
expected = dilconv.conv2d(x, w, padding=2, dilation=2)
t0 = time.perf_counter()
dilconv.conv2d(x, w, padding=2, dilation=2)
duration = time.perf_counter() - t0

threading.Timer(duration / 4, os.kill, (os.getpid(), signal.SIGINT)).start()
t0 = time.perf_counter()
try:
    y = dilconv.conv2d(x, w, padding=2, dilation=2)
    # The kernel cannot be interrupted: the signal is handled at the next bytecode. The
    # timer fires duration/4 after the start even when this call was faster than the one
    # timed (on a loaded machine): wait for it well past that.
    while time.perf_counter() < t0 + duration / 4 + 5.0:
        time.sleep(0.001)
    raise SystemExit("no KeyboardInterrupt")
except KeyboardInterrupt:
    waited = time.perf_counter() - t0
assert waited > duration / 4
# Usable afterwards: same results, no BLAS limit or lock left behind.
assert np.array_equal(dilconv.conv2d(x, w, padding=2, dilation=2), expected)
g = dilconv.conv2d_backward(np.ones_like(expected), x, w, padding=2, dilation=2)
assert all(np.isfinite(a).all() for a in g)
assert blas() == blas_before and _threads._blas_users == 0, (blas(), blas_before)
print(f"interrupted after {waited:.3f} s; call takes {duration:.3f} s")
"""


def test_keyboard_interrupt_during_a_long_call_leaves_the_process_usable():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(INTERRUPT_SCRIPT)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interrupted after" in proc.stdout


# -- 64-bit indexing: a (1, 1, 46341, 46341) float32 plane has 2,147,488,281 > 2**31
# elements (8.6 GB); the test needs about 18 GB of RAM.
BIG = 46341


def _fill(x):
    # Small multiples of 0.5: every product and partial sum below is exact in float32.
    rows = (np.arange(BIG) % 13).astype(np.float32)
    cols = (np.arange(BIG) % 7).astype(np.float32) * 0.5
    np.add(rows[:, None], cols[None, :], out=x[0, 0])       # no full-size temporary


def _check_rows(y, x, rows, fn):
    for r0 in rows:
        r1 = min(BIG, r0 + 512)
        np.testing.assert_array_equal(y[0, 0, r0:r1], fn(x, r0, r1))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["direct", "gemm", "depthwise"])
def test_more_than_2_31_elements(path):
    assert BIG * BIG > 2 ** 31
    x = np.empty((1, 1, BIG, BIG), np.float32)
    _fill(x)
    y = np.empty_like(x)
    # Rows at the start, the middle and the end (flat indices past 2**31 are in the last row).
    rows = [0, BIG // 2, BIG - 512]
    with tuning(path=path):
        # 1x1 kernel: y = 2x + 0.5, exactly.
        dilconv.conv2d(x, np.full((1, 1, 1, 1), 2, np.float32), np.array([0.5], np.float32),
                       out=y)
        _check_rows(y, x, rows, lambda x, r0, r1: 2 * x[0, 0, r0:r1] + np.float32(0.5))
        # 3x3 kernel, dilation 2, 'same' padding: sums of 9 taps, skipping the border.
        w = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
        dilconv.conv2d(x, w, padding="same", dilation=2, out=y)

        def same_3x3(x, r0, r1):
            padded = np.zeros((r1 - r0 + 4, BIG + 4), np.float64)
            lo, hi = max(0, r0 - 2), min(BIG, r1 + 2)
            padded[lo - r0 + 2:hi - r0 + 2, 2:-2] = x[0, 0, lo:hi]
            acc = sum(w[0, 0, i, j] * padded[2 * i:2 * i + r1 - r0, 2 * j:2 * j + BIG]
                      for i in range(3) for j in range(3))
            return acc.astype(np.float32)
        _check_rows(y, x, rows, same_3x3)
        del y
        # Backward through the 1x1 kernel with grad_output = x: grad input = 2x exactly.
        g = dilconv.conv2d_backward(x, x, np.full((1, 1, 1, 1), 2, np.float32),
                                    needs=("input",))
        _check_rows(g.input, x, rows, lambda x, r0, r1: 2 * x[0, 0, r0:r1])
        del g
        # Weight and bias gradients: grad_output is zero except for blocks at both ends
        # of the checked rows, so every partial sum is a multiple of 0.5 below 2**23
        # (exact in float32, in any order); untouched zero pages cost no memory.
        gy = np.zeros_like(x)
        blocks = [(slice(r0, r0 + 512), cols) for r0 in rows
                  for cols in (slice(0, 32), slice(BIG - 32, BIG))]
        for block in blocks:
            gy[(0, 0) + block] = 1
        g = dilconv.conv2d_backward(gy, x, np.ones((1, 1, 1, 1), np.float32),
                                    needs=("weight", "bias"))
        assert g.bias[0] == len(blocks) * 512 * 32
        expected_w = sum(x[(0, 0) + block].astype(np.float64).sum() for block in blocks)
        assert g.weight[0, 0, 0, 0] == expected_w


def test_planes_over_2_31_pixels_stay_off_blas():
    # A plane of 2**31 + 4096 output pixels (BLAS sizes are C ints): the panel kernels
    # (no BLAS) take it, the strided input gradient as a panel forward per stride phase.
    # Shapes only: no memory.
    big = make_spec((1, 16, 524289, 8192), (16, 16, 1, 1), (1, 2), 0, 1, 1)
    weight = np.zeros((16, 16, 1, 1), np.float32)
    assert (_dispatch.select(big) == _dispatch.select(big, "grad_weight")
            == _dispatch.select(big, "grad_input", weight) == "panel")
    phases = dict(_dispatch.stride_phases(big))
    assert phases[(0, 1)] is None              # odd columns: no tap reads them
    sub = phases[(0, 0)][0]
    assert (sub.h, sub.w, sub.stride) == (big.ho, big.wo, (1, 1))
    assert (sub.ho, sub.wo) == (big.h, big.w // 2)


def test_forced_gemm_falls_back_to_direct_past_blas_sizes():
    # BLAS sizes are 32-bit: a plane of more than 2**31 - 1 output pixels never reaches it.
    spec = make_spec((1, 1, 524289, 4096), (1, 1, 1, 1), 1, 0, 1, 1)
    with tuning(path="gemm"):
        assert _dispatch.select(spec) == "direct"
        assert _dispatch.select(make_spec((1, 8, 64, 64), (8, 8, 1, 1), 1, 0, 1, 1)) == "gemm"


@pytest.mark.slow
def test_forced_gemm_on_a_plane_over_2_31_pixels():
    # Whole-row tiles (Wo <= 4096) with Ho*Wo = 2**31 + 4096: about 17 GB of RAM.
    x = np.ones((1, 1, 524289, 4096), np.float32)
    with tuning(path="gemm"):
        y = dilconv.conv2d(x, np.full((1, 1, 1, 1), 2, np.float32))
    del x
    assert (y == 2).all()
