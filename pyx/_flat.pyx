"""Forward for unit-stride convolutions with few channels (depthwise, RGB stems).

Short output rows make per-row loops overhead-bound, so this kernel copies a band of input
rows, zero-padded, into a per-thread buffer with rows of width Wp = Wo + (kW-1)*dW. Then the
input pixel of tap (kh, kw) for flat output position i is buffer[i + kh*dH*Wp + kw*dW]: one
long, contiguous, vectorised loop per tap covers the whole band. The Wp - Wo extra columns
of each accumulated row are dropped when the band is written out. Padding taps meet zeros
(so this kernel runs only for finite weights, where 0*w = 0 exactly: see `applies`), and
only where those bands do not outweigh the output (huge padding or dilation would make
them, and the time spent on them, scale with the padded size instead).
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating

from _common cimport Geom, all_finite, make_geom, axpy

import math

import numpy as np

from dilconv._geometry import memoised
from dilconv._threads import kernel_threads
from dilconv._scratch import thread_scratch
from dilconv._validate import KERNEL_DTYPES

# Output channels of a block share the packed input bands.
FLAT_MAX_O_BLOCK = 16
# Packed band elements (per input channel) at most this many per output pixel, plus this
# many: beyond, zero padding would dominate memory and time.
FLAT_MAX_PADDED_PER_OUTPUT = 4
FLAT_PADDED_SLACK = 1 << 18


# Scratch items (doubles) of a one-thread call kept on the stack.
cdef enum:
    FLAT_STACK_ITEMS = 512


cdef struct Plan:
    Py_ssize_t rows         # output rows per band
    Py_ssize_t o_block      # output channels per task (dividing O/groups)
    Py_ssize_t wp           # band row width, Wo + (kW-1)*dW
    Py_ssize_t band         # band elements per input channel, (kW-1)*dW slack included
    Py_ssize_t n_tasks


def plan(spec, tuning):
    """(rows, o_block, wp, band, n_tasks) of this geometry, or None where this kernel does
    not apply: stride other than 1, or zero-padded bands that would outweigh the output.
    In Python integers: the sizes of a rejected geometry may not fit in C's."""
    if spec.stride != (1, 1):
        return None
    og = spec.o // spec.groups
    halo_h, halo_w = (spec.kh - 1) * spec.dilation[0], (spec.kw - 1) * spec.dilation[1]
    wp = spec.wo + halo_w
    rows = max(1, min(spec.ho, tuning.flat_span_elements // wp))
    bands = -(-spec.ho // rows)
    band = (rows + halo_h) * wp + halo_w
    if bands * band > FLAT_MAX_PADDED_PER_OUTPUT * spec.ho * spec.wo + FLAT_PADDED_SLACK:
        return None
    o_block = math.gcd(og, FLAT_MAX_O_BLOCK)
    return rows, o_block, wp, band, spec.n * spec.groups * (og // o_block) * bands


def applies(spec, weight, tuning):
    """True where this kernel runs the forward: see `plan`; and finite weights (padding
    taps multiply zeros, and 0 * inf is nan); `weight` None: not checked."""
    return (memoised(spec, "flat", tuning, plan, spec, tuning) is not None
            and (weight is None or finite(weight)))


def finite(weight):
    """No inf or nan in `weight`: in C for the kernels' arrays (np.isfinite takes
    microseconds, as long as this layer's whole forward with a tiny kernel)."""
    if (type(weight) is np.ndarray and weight.ndim == 4 and weight.flags.c_contiguous
            and weight.dtype in KERNEL_DTYPES):
        return _all_finite(weight)
    return bool(np.isfinite(weight).all())


def _all_finite(const floating[:, :, :, ::1] w):
    return _finite(w)


cdef bint _finite(const floating[:, :, :, ::1] w) noexcept nogil:
    cdef Py_ssize_t count = w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3]
    return count == 0 or all_finite(&w[0, 0, 0, 0], count)


cdef void _band(const floating[:, :, :, ::1] x,                # IN  (N, C, H, W)
                const floating[:, :, :, ::1] w,                # IN  (O, C/groups, kH, kW)
                const floating[::1] bias,                      # IN  (O,) or empty
                floating[:, :, :, ::1] out,                    # OUT (N, O, Ho, Wo)
                Geom g, const Plan* p, Py_ssize_t task,
                floating* band, floating* acc) noexcept nogil:  # SCRATCH (C/g bands, acc)
    cdef Py_ssize_t rows = p.rows, o_block = p.o_block, wp = p.wp, band_size = p.band
    cdef Py_ssize_t bands = (g.Ho + rows - 1) // rows, blocks = g.Og // o_block
    cdef Py_ssize_t n = task // (g.groups * blocks * bands)
    cdef Py_ssize_t grp = (task // (blocks * bands)) % g.groups
    cdef Py_ssize_t o0 = grp * g.Og + ((task // bands) % blocks) * o_block
    cdef Py_ssize_t r0 = (task % bands) * rows
    cdef Py_ssize_t nr = min(rows, g.Ho - r0)
    cdef Py_ssize_t in_rows = nr + (g.kH - 1) * g.dh
    cdef Py_ssize_t span = nr * wp
    cdef Py_ssize_t ci, kh, kw, oi, i, r, j, ih, j_lo, j_hi
    cdef const floating* xrow
    cdef floating* dst
    cdef floating* a
    cdef floating wv, bv

    # Zero-padded input bands of every channel of the group, (kW-1)*dW slack after each.
    j_lo = min(g.pl, wp)
    j_hi = min(g.pl + g.W, wp)
    for ci in range(g.Cg):
        dst = band + ci * band_size
        for r in range(in_rows):
            ih = r0 + r - g.pt
            if ih < 0 or ih >= g.H:
                for j in range(wp):
                    dst[r * wp + j] = 0
                continue
            xrow = &x[n, grp * g.Cg + ci, ih, 0]
            for j in range(j_lo):
                dst[r * wp + j] = 0
            for j in range(j_lo, j_hi):
                dst[r * wp + j] = xrow[j - g.pl]
            for j in range(j_hi, wp):
                dst[r * wp + j] = 0
        for j in range(in_rows * wp, band_size):
            dst[j] = 0
    # One output channel at a time, so its accumulator row band stays in L1 over all taps;
    # per output: in channel, kernel row, kernel column (fixed order).
    for oi in range(o_block):
        a = acc + oi * span
        for i in range(span):
            a[i] = 0
        for ci in range(g.Cg):
            for kh in range(g.kH):
                for kw in range(g.kW):
                    wv = w[o0 + oi, ci, kh, kw]
                    axpy(span, wv, band + ci * band_size + kh * g.dh * wp + kw * g.dw, a)
    for oi in range(o_block):
        bv = bias[o0 + oi] if bias.shape[0] > 0 else 0
        for r in range(nr):
            dst = &out[n, o0 + oi, r0 + r, 0]
            a = acc + oi * span + r * wp
            for j in range(g.Wo):
                dst[j] = a[j] + bv


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
            const floating[::1] bias, floating[:, :, :, ::1] out, spec, tuning):
    """Unit-stride conv2d into `out` where the geometry `applies`, in tasks of one band of
    output rows and one block of output channels (see `plan`); per thread, the bands of
    every input channel of the group and one block's accumulators. True if it ran; False,
    writing nothing, where `w` is not finite (checked here, not by a call of `finite`: a
    layer of tiny calls spends its time in such calls)."""
    if not _finite(w):
        return False
    cdef Geom g = make_geom(spec)
    cdef Plan p
    p.rows, p.o_block, p.wp, p.band, p.n_tasks = memoised(spec, "flat", tuning, plan, spec,
                                                           tuning)
    cdef int n_threads = kernel_threads(spec, p.n_tasks, tuning)
    cdef Py_ssize_t need = g.Cg * p.band + p.o_block * p.rows * p.wp
    cdef double small[FLAT_STACK_ITEMS]
    cdef floating[:, ::1] scratch
    cdef Py_ssize_t task, tid
    cdef floating* band
    if n_threads == 1 and need <= FLAT_STACK_ITEMS:
        # A tiny call: scratch on the stack, no parallel region (each costs as much as
        # the arithmetic).
        band = <floating*> small
        with nogil:
            for task in range(p.n_tasks):
                _band(x, w, bias, out, g, &p, task, band, band + g.Cg * p.band)
        return True
    scratch = thread_scratch(n_threads, need, np.float32 if floating is float else np.float64)
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        band = &scratch[tid, 0]
        for task in prange(p.n_tasks, schedule='static'):
            _band(x, w, bias, out, g, &p, task, band, band + g.Cg * p.band)
    return True
