"""What the running CPU can do: its features (with the OS's saved register state) and
its own multiply-add peak and copy bandwidth, measured by register-only loops shipped in
the package (the yardsticks of `python -m bench`, independent of any BLAS).

Built once with the compiler's baseline flags; each probe width is compiled for the
instructions it needs and only run where the CPU has them.
"""
import time

import numpy as np

from cython.parallel cimport prange
from libc.string cimport memcpy

cdef extern from "_fma_probe.h":
    int DILCONV_PROBE_NACC
    double dilconv_fma_probe(int is_double, int kind, long iters) nogil
    int dilconv_cpu_has(const char *name) nogil
    const char *dilconv_cpu_vendor() nogil
    int dilconv_cpu_family() nogil

cdef extern from "_omp_compat.h":
    int DILCONV_OPENMP

FEATURES = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl",
            "neon")
# Probe kinds of _fma_probe.h, by vector width in bits.
_KIND_512, _KIND_256, _KIND_128_FMA, _KIND_128 = 3, 2, 1, 0


def cpu_features():
    """{feature: bool} for FEATURES, as the running CPU and OS support them."""
    return {name: bool(dilconv_cpu_has(name.encode())) for name in FEATURES}


def cpu_vendor():
    """"amd", "intel" or "" (another vendor or architecture): some plans were measured
    to differ between them."""
    return dilconv_cpu_vendor().decode()


def cpu_family():
    """The x86 family number (AMD: 25 for Zen 3 and 4, 26 for Zen 5), 0 elsewhere."""
    return dilconv_cpu_family()


def _kinds():
    """{width in bits: probe kind} the running CPU can run."""
    f = cpu_features()
    kinds = {}
    if f["sse2"] or f["neon"]:
        kinds[128] = _KIND_128_FMA if (f["fma"] and f["avx2"]) or f["neon"] else _KIND_128
    if f["avx2"] and f["fma"]:
        kinds[256] = _KIND_256
    if f["avx512f"] and f["avx512vl"] and f["avx512dq"] and f["avx512bw"]:
        kinds[512] = _KIND_512
    return kinds


def vector_widths():
    """Vector widths in bits the running CPU can run with the probe, widest last."""
    return sorted(_kinds())


def _run(int is_double, int kind, long iters, int threads):
    """Wall seconds for `threads` threads each running `iters` probe iterations."""
    cdef int t
    cdef double sink = 0
    start = time.perf_counter()
    for t in prange(threads, nogil=True, num_threads=threads, schedule="static",
                    chunksize=1):
        sink += dilconv_fma_probe(is_double, kind, iters)
    if sink < 0:
        raise RuntimeError("the multiply-add probe is not built for this CPU")
    return time.perf_counter() - start


def fma_peak(dtype, threads=1, width=None, seconds=0.1):
    """The CPU's multiply-add peak in GFLOP/s (2 flops per lane per FMA) for `dtype`
    (float32 or float64) on `threads` threads with `width`-bit vectors (None: the widest the
    CPU has), best of a few runs taking about `seconds` in all. Without FMA (SSE2 only)
    it counts a multiply and an add. A build without OpenMP measures one thread whatever
    `threads` says, since its kernels run on one."""
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    kinds = _kinds()
    if width is None:
        width = max(kinds)
    if width not in kinds:
        raise ValueError(f"width must be one of {sorted(kinds)} bits on this CPU, got {width!r}")
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if not DILCONV_OPENMP:
        threads = 1
    is_double, kind = int(dt == np.float64), kinds[width]
    lanes = width // 8 // dt.itemsize
    # Calibrate on one thread (waking a thread pool takes longer than a short run), then
    # time runs of about seconds / 4 each on all threads.
    iters = 1 << 12
    while _run(is_double, kind, iters, 1) < seconds / 8 and iters < (1 << 34):
        iters *= 2
    _run(is_double, kind, iters // 8, threads)
    best = min([_run(is_double, kind, iters, threads) for _ in range(3)])
    return 2.0 * lanes * DILCONV_PROBE_NACC * iters * threads / best / 1e9


def copy_bandwidth(threads=1, nbytes=1 << 26, repeat=5):
    """Copy bandwidth in GB/s (bytes read plus bytes written per second) of `threads`
    threads copying `nbytes` (larger than the caches) in fixed chunks; best of `repeat`."""
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    cdef Py_ssize_t chunk = 1 << 20
    cdef Py_ssize_t n_chunks = max(1, nbytes // chunk), c
    cdef unsigned char[::1] src = np.ones(n_chunks * chunk, np.uint8)
    cdef unsigned char[::1] dst = np.zeros(n_chunks * chunk, np.uint8)
    cdef int nt = threads
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for c in prange(n_chunks, nogil=True, num_threads=nt, schedule="static"):
            memcpy(&dst[c * chunk], &src[c * chunk], chunk)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n_chunks * chunk / best / 1e9
