"""Depthwise convolutions: one input channel per group (C/groups == 1). Forward for any
channel multiplier O/groups, stride and dilation; weight gradient at unit column stride
(the input gradient with multiplier 1 is this forward with the turned kernel: dispatch).

Memory-bound, so each output is computed once, in registers, and stored once: per output
row, the columns are cut into runs over which the same kernel columns are in the image
(`tap_runs`), and each run sums its in-image taps block by block (`_depthwise.h`). Taps
in the padding are skipped, never multiplied, so non-finite weights need no special care;
except where the border columns are thin and the weights finite (`fills_zero_columns`):
at unit column stride a task then copies its input rows between zero columns and every
output row is one run of the column taps, the border ones reading zeros (their runs of a
few columns would be summed one output at a time).
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from libc.string cimport memcpy

from _common cimport Geom, make_geom
from _plan cimport range_edges

import glob

import numpy as np

from dilconv._geometry import fills_zero_columns
from dilconv._threads import kernel_threads
from dilconv._scratch import thread_scratch

cdef extern from "_depthwise.h":
    enum: DILCONV_DW_ROW_BLOCK
    enum: DILCONV_DW_CHAINS
    enum: DILCONV_VEC256_BYTES
    void dilconv_dw_grad_f(Py_ssize_t rows, Py_ssize_t n, const float* g, Py_ssize_t g_next,
                           const float* x, Py_ssize_t x_next, float* acc) noexcept nogil
    void dilconv_dw_grad_d(Py_ssize_t rows, Py_ssize_t n, const double* g, Py_ssize_t g_next,
                           const double* x, Py_ssize_t x_next, double* acc) noexcept nogil
    void dilconv_dw_prefetch(const void* p, Py_ssize_t bytes) noexcept nogil
    float dilconv_dw_total_f(const float* acc) noexcept nogil
    double dilconv_dw_total_d(const double* acc) noexcept nogil
    void dilconv_dw_run_f(Py_ssize_t rows, Py_ssize_t n, const float* x, Py_ssize_t x_next,
                          Py_ssize_t x_row, Py_ssize_t nh, Py_ssize_t dw, Py_ssize_t sw,
                          const float* w, Py_ssize_t w_row, Py_ssize_t nk, float b, float* y,
                          Py_ssize_t y_next) noexcept nogil
    void dilconv_dw_wide_run_f(Py_ssize_t rows, Py_ssize_t n, const float* x,
                               Py_ssize_t x_next, Py_ssize_t x_row, Py_ssize_t nh,
                               Py_ssize_t dw, Py_ssize_t sw, const float* w, Py_ssize_t w_row,
                               Py_ssize_t nk, float b, float* y, Py_ssize_t y_next) noexcept nogil
    void dilconv_dw_run_d(Py_ssize_t rows, Py_ssize_t n, const double* x, Py_ssize_t x_next,
                          Py_ssize_t x_row, Py_ssize_t nh, Py_ssize_t dw, Py_ssize_t sw,
                          const double* w, Py_ssize_t w_row, Py_ssize_t nk, double b,
                          double* y, Py_ssize_t y_next) noexcept nogil


def _last_level_cache_bytes():
    """The size of the CPU's largest cache (Linux), else 32 MiB."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            pass
    return max(sizes, default=32 << 20)


# The forward fetches each next input plane ahead where the call's input and output pass
# this many bytes, so come from memory (an AVX-512 EPYC, 32 MiB L3, one / two threads:
# float64 dw_d4, 67 MB, 2.2x / 1.7x faster; its weight gradient, whose tasks read whole
# planes, gained nothing); in cache, the prefetches cost 3-6% (float32 dw_d4, 34 MB, and
# MobileNetV2's 960 x 33 x 33, 8 MB).
PREFETCH_FROM_BYTES = 3 * _last_level_cache_bytes() // 2


# Zero-filled rows at most this wide (unit row stride) are summed as one run over a row
# run's rows end to end (float32 in the tier's widest vectors), not row by row, whose
# last, overlapping vector per row waited on its own chains (an AVX-512 EPYC, float32, one
# / two threads: MobileNetV2's 960 x 33 x 33, dilation 2, 1.09x / 1.10x; 48 and 64
# columns 1.03-1.05x; float64, in 32-byte vectors: 0.97-1.03x).
FLAT_RUN_MAX_WIDTH = 64


def applies(spec):
    """True where this kernel runs: one input channel per group."""
    return spec.c == spec.groups


def tap_runs(lo, hi, Py_ssize_t size):
    """Rows (start, end, t0, t1): the outputs [0, size) of one axis cut at the range edges,
    with the taps [t0, t1) that read the image for a whole run (none when t0 == t1; the
    input index grows with the tap, so they are a contiguous range)."""
    edges = range_edges(lo, hi, size)
    lo, hi = lo.tolist(), hi.tolist()
    runs = []
    for start, end in zip(edges, edges[1:]):
        inside = [t for t in range(len(lo)) if lo[t] <= start < hi[t]]
        runs.append((start, end, inside[0], inside[len(inside) - 1] + 1) if inside
                    else (start, end, 0, 0))
    return np.array(runs, dtype=np.intp).reshape(-1, 4)


cdef inline Py_ssize_t padded_width(Geom g) noexcept nogil:
    # Input columns -pl .. that the output columns read (unit column stride).
    return (g.Wo - 1) + (g.kW - 1) * g.dw + 1


cdef inline void _run(Py_ssize_t rows, Py_ssize_t n, const floating* x, Py_ssize_t x_next,
                      Py_ssize_t x_row, Py_ssize_t nh, Py_ssize_t dw, Py_ssize_t sw,
                      const floating* w, Py_ssize_t w_row, Py_ssize_t nk, floating b,
                      floating* y, Py_ssize_t y_next) noexcept nogil:
    if floating is float:
        dilconv_dw_run_f(rows, n, x, x_next, x_row, nh, dw, sw, w, w_row, nk, b, y, y_next)
    else:
        dilconv_dw_run_d(rows, n, x, x_next, x_row, nh, dw, sw, w, w_row, nk, b, y, y_next)


cdef inline void _wide_run(Py_ssize_t rows, Py_ssize_t n, const floating* x,
                           Py_ssize_t x_next, Py_ssize_t x_row, Py_ssize_t nh, Py_ssize_t dw,
                           Py_ssize_t sw, const floating* w, Py_ssize_t w_row, Py_ssize_t nk,
                           floating b, floating* y, Py_ssize_t y_next) noexcept nogil:
    # The runs of zero-filled rows laid end to end: float32 in the tier's widest vectors.
    if floating is float:
        dilconv_dw_wide_run_f(rows, n, x, x_next, x_row, nh, dw, sw, w, w_row, nk, b, y, y_next)
    else:
        dilconv_dw_run_d(rows, n, x, x_next, x_row, nh, dw, sw, w, w_row, nk, b, y, y_next)


cdef void _band(const floating[:, :, :, ::1] x,                # IN  (N, C, H, W)
                const floating[:, :, :, ::1] w,                # IN  (O, 1, kH, kW)
                const floating[::1] bias,                      # IN  (O,) or empty
                floating[:, :, :, ::1] out,                    # OUT (N, O, Ho, Wo)
                Geom g, const Py_ssize_t[:, ::1] rows,         # IN  row runs (tap_runs)
                const Py_ssize_t[:, ::1] cols,                 # IN  column runs
                Py_ssize_t band_rows, Py_ssize_t task,
                floating* padded, floating* flat,              # SCRATCH or NULL
                bint prefetch) noexcept nogil:
    # With `padded` (zero-filled columns, `cols` one run over the row; zero where no
    # image column goes): the band's input rows go there first, and the runs read them
    # from there. With `flat` too (unit row stride): the rows of a row run are one run of
    # the padded rows laid end to end (the padding columns' sums computed and dropped),
    # summed into `flat` and copied out row by row.
    cdef Py_ssize_t bands = (g.Ho + band_rows - 1) // band_rows
    cdef Py_ssize_t plane = task // bands
    cdef Py_ssize_t n = plane // g.O, o = plane % g.O
    cdef Py_ssize_t r0 = (task % bands) * band_rows
    cdef Py_ssize_t r1 = min(g.Ho, r0 + band_rows)
    cdef const floating* xp = &x[n, o // g.Og, 0, 0]     # the group's one input channel
    cdef const floating* wp = &w[o, 0, 0, 0]
    cdef floating b = bias[o] if bias.shape[0] > 0 else 0
    cdef Py_ssize_t rs, cs, oh, oh_end, step, h0, nh, j0, k0, nk, span, half, r
    cdef Py_ssize_t x_w = g.W, x_col = -g.pl, first, stop, copied
    cdef const floating* src
    # A task of a whole plane fetches the next plane's rows as it goes (the next task of
    # this thread's static schedule), in step with its own rows.
    cdef const floating* ahead = NULL
    cdef Py_ssize_t fetched = 0, fetch_to
    if prefetch and bands == 1 and plane + 1 < g.N * g.O:
        ahead = &x[(plane + 1) // g.O, (plane + 1) % g.O // g.Og, 0, 0]
    if padded != NULL:
        # Padded rows span the columns that output columns [0, Wo) read, from -pl.
        first = max(0, r0 * g.sh - g.pt)
        stop = min(g.H, (r1 - 1) * g.sh - g.pt + (g.kH - 1) * g.dh + 1)
        x_w = padded_width(g)
        x_col = 0
        copied = min(g.W, x_w - g.pl)
        for rs in range(stop - first):     # the zero columns stay zero from task to task
            memcpy(padded + rs * x_w + g.pl, xp + (first + rs) * g.W, copied * sizeof(floating))
        xp = padded - first * x_w
    for rs in range(rows.shape[0]):
        h0 = rows[rs, 2]
        nh = rows[rs, 3] - h0
        oh = max(r0, rows[rs, 0])
        oh_end = min(r1, rows[rs, 1])
        if flat != NULL and oh < oh_end and nh > 0:
            span = (oh_end - oh - 1) * x_w + g.Wo   # the run over the rows end to end
            half = (span + 1) // 2
            k0 = cols[0, 2]
            nk = cols[0, 3] - k0
            if nk > 0 and half * sizeof(floating) >= DILCONV_VEC256_BYTES:
                # Two halves as the two rows of a block (they overlap by at most one sum).
                _wide_run(DILCONV_DW_ROW_BLOCK, half,
                          xp + (oh + h0 * g.dh - g.pt) * x_w + k0 * g.dw, span - half,
                          g.dh * x_w, nh, g.dw, 1, wp + h0 * g.kW + k0, g.kW, nk, b, flat,
                          span - half)
                for r in range(oh_end - oh):
                    memcpy(&out[n, o, oh + r, 0], flat + r * x_w, g.Wo * sizeof(floating))
                oh = oh_end
        while oh < oh_end:
            # Blocks of rows with the same taps: more independent sums in flight.
            step = DILCONV_DW_ROW_BLOCK if oh + DILCONV_DW_ROW_BLOCK <= oh_end else 1
            for cs in range(cols.shape[0]):
                j0 = cols[cs, 0]
                k0 = cols[cs, 2]
                nk = cols[cs, 3] - k0
                src = xp
                if nh > 0 and nk > 0:        # else only the bias: nothing is read
                    src = xp + (oh * g.sh + h0 * g.dh - g.pt) * x_w \
                        + j0 * g.sw + k0 * g.dw + x_col
                _run(step, cols[cs, 1] - j0, src, g.sh * x_w, g.dh * x_w,
                     nh if nk > 0 else 0, g.dw, g.sw, wp + h0 * g.kW + k0, g.kW, nk, b,
                     &out[n, o, oh, j0], g.Wo)
            oh = oh + step
            if ahead != NULL:
                fetch_to = oh * g.H // g.Ho
                dilconv_dw_prefetch(ahead + fetched * g.W,
                                    (fetch_to - fetched) * g.W * sizeof(floating))
                fetched = fetch_to


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
            const floating[::1] bias, floating[:, :, :, ::1] out, spec, tuning):
    """Depthwise conv2d + bias into `out` (C/groups == 1). Tasks are bands of about
    `tuning.depthwise_task_pixels` output pixels (whole rows) of one (image, output
    channel) plane; every output is computed by one task in a fixed order, so any thread
    count gives the same bits (zero-filled columns or not depend on the layer and the
    weights only). Scratch with zero-filled columns: a band's input rows per thread, and
    in rows at most FLAT_RUN_MAX_WIDTH wide its sums."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t band_rows = max(1, min(g.Ho, tuning.depthwise_task_pixels // g.Wo))
    cdef Py_ssize_t n_tasks = g.N * g.O * ((g.Ho + band_rows - 1) // band_rows)
    cdef int n_threads = kernel_threads(spec, n_tasks, tuning)
    # Runs (start, end, t0, t1) of output rows / columns over which kernel rows / columns
    # [t0, t1) read the image (with zero-filled columns, one run of every column tap that
    # reads it anywhere).
    cdef const Py_ssize_t[:, ::1] rows = tap_runs(spec.oh_lo, spec.oh_hi, g.Ho)
    cdef const Py_ssize_t[:, ::1] cols = tap_runs(spec.ow_lo, spec.ow_hi, g.Wo)
    cdef bint zero_fill = False
    cdef floating[:, ::1] scratch = None
    cdef floating* padded = NULL
    cdef Py_ssize_t task, padded_len = 0, flat_len = 0
    cdef int tid
    cdef bint prefetch = (x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3]
                          + out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3]) \
        * sizeof(floating) > PREFETCH_FROM_BYTES
    if g.sw == 1 and fills_zero_columns(spec, w, tuning):
        # Only where a border run would be summed one output at a time (shorter than half
        # a vector); half vectors take the others without the copies (MobileNetV2's
        # 960 x 33 x 33 at dilation 2, 2-column borders: 1.5x faster, float32).
        runs = np.asarray(cols)
        reach = np.flatnonzero(spec.ow_lo < spec.ow_hi)
        zero_fill = bool((((runs[:, 3] - runs[:, 2]) < len(reach))
                          & ((runs[:, 1] - runs[:, 0]) * sizeof(floating)
                             < DILCONV_VEC256_BYTES // 2)).any())
    if zero_fill:
        cols = np.array([[0, g.Wo, reach[0], reach[-1] + 1]], dtype=np.intp)
        padded_len = (min(g.H, (band_rows - 1) * g.sh + (g.kH - 1) * g.dh + 1)
                      * padded_width(g))
        if g.sh == 1 and g.Wo <= FLAT_RUN_MAX_WIDTH:
            flat_len = band_rows * padded_width(g)
        scratch = thread_scratch(n_threads, padded_len + flat_len,
                                 np.float32 if floating is float else np.float64)
        scratch[:, :] = 0
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        padded = &scratch[tid, 0] if zero_fill else NULL
        for task in prange(n_tasks, schedule='static'):
            _band(x, w, bias, out, g, rows, cols, band_rows, task, padded,
                  padded + padded_len if flat_len else NULL, prefetch)


def grad_weight_applies(spec):
    """True where `grad_weight` runs: one input channel per group, unit column stride."""
    return applies(spec) and spec.stride[1] == 1


cdef void _grad_weight_channel(const floating[:, :, :, ::1] gy,   # IN  (N, O, Ho, Wo)
                               const floating[:, :, :, ::1] x,    # IN  (N, C, H, W)
                               floating[:, :, :, ::1] gw,         # OUT (O, 1, kH, kW)
                               Geom g, floating* acc, Py_ssize_t acc_len,
                               Py_ssize_t o) noexcept nogil:
    cdef Py_ssize_t c = o // g.Og, taps = g.kH * g.kW
    cdef Py_ssize_t n, kh, kw, t, i, oh0, ow0, rows, cols
    for i in range(taps * acc_len):
        acc[i] = 0
    # Image by image, every tap over its in-image rectangle: the planes stay in cache
    # across the taps.
    for n in range(g.N):
        for kh in range(g.kH):
            oh0 = g.oh_lo[kh]
            rows = g.oh_hi[kh] - oh0
            for kw in range(g.kW):
                ow0 = g.ow_lo[kw]
                cols = g.ow_hi[kw] - ow0
                if rows <= 0 or cols <= 0:
                    continue
                t = kh * g.kW + kw
                if floating is float:
                    dilconv_dw_grad_f(rows, cols, &gy[n, o, oh0, ow0], g.Wo,
                                      &x[n, c, oh0 * g.sh + kh * g.dh - g.pt,
                                         ow0 + kw * g.dw - g.pl],
                                      g.sh * g.W, acc + t * acc_len)
                else:
                    dilconv_dw_grad_d(rows, cols, &gy[n, o, oh0, ow0], g.Wo,
                                      &x[n, c, oh0 * g.sh + kh * g.dh - g.pt,
                                         ow0 + kw * g.dw - g.pl],
                                      g.sh * g.W, acc + t * acc_len)
    for t in range(taps):
        if floating is float:
            gw[o, 0, t // g.kW, t % g.kW] = dilconv_dw_total_f(acc + t * acc_len)
        else:
            gw[o, 0, t // g.kW, t % g.kW] = dilconv_dw_total_d(acc + t * acc_len)


def grad_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                floating[:, :, :, ::1] gw, spec, tuning):
    """Weight gradient into `gw` (grad_weight_applies). One task per output channel sums
    its taps over all images in a fixed order (the partial sums of _depthwise.h), so any
    thread count gives the same bits. Scratch: the taps' partial sums, per thread."""
    cdef Geom g = make_geom(spec)
    cdef int n_threads = kernel_threads(spec, g.O, tuning)
    cdef Py_ssize_t acc_len = (DILCONV_DW_CHAINS * (DILCONV_VEC256_BYTES // sizeof(floating))
                               + 1)
    cdef floating[:, ::1] scratch = thread_scratch(
        n_threads, g.kH * g.kW * acc_len, np.float32 if floating is float else np.float64)
    cdef Py_ssize_t o
    cdef int tid
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for o in prange(g.O, schedule='static'):
            _grad_weight_channel(gy, x, gw, g, &scratch[tid, 0], acc_len, o)
