# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Gradients of the dilated convolution: input, weight and bias.

Each parallel task owns the outputs it writes (an input-gradient plane, one weight slice, one
bias entry) and sums its terms in a fixed order, so results are bitwise identical for any
thread count. The per-tap in-bounds ranges are the forward's.
"""
from cython.parallel cimport prange
from cython cimport floating

from _common cimport Geom, make_geom, axpy, dot


cdef void _grad_input_plane(const floating[:, :, :, ::1] gy,  # IN  (N, O, Ho, Wo)
                            const floating[:, :, :, ::1] w,   # IN  (O, C/groups, kH, kW)
                            floating[:, :, :, ::1] gx,        # OUT (N, C, H, W)
                            const Py_ssize_t[::1] oh_lo, const Py_ssize_t[::1] oh_hi,
                            const Py_ssize_t[::1] ow_lo, const Py_ssize_t[::1] ow_hi,
                            Geom g, Py_ssize_t task) noexcept nogil:
    cdef Py_ssize_t n = task // g.C, c = task % g.C
    cdef Py_ssize_t ci = c % g.Cg, o0 = (c // g.Cg) * g.Og
    cdef Py_ssize_t oi, kh, kw, oh, ow, lo, hi, ih, iw0, i
    cdef floating wv
    cdef floating* gxrow
    cdef const floating* gyrow
    cdef floating* gxp = &gx[n, c, 0, 0]

    for i in range(g.H * g.W):
        gxp[i] = 0
    # Scatter each output gradient row back through every tap, in a fixed order.
    for oi in range(g.Og):
        for kh in range(g.kH):
            for oh in range(oh_lo[kh], oh_hi[kh]):
                ih = oh * g.sh + kh * g.dh - g.pt
                gxrow = gxp + ih * g.W
                gyrow = &gy[n, o0 + oi, oh, 0]
                for kw in range(g.kW):
                    lo = ow_lo[kw]
                    hi = ow_hi[kw]
                    wv = w[o0 + oi, ci, kh, kw]
                    iw0 = lo * g.sw + kw * g.dw - g.pl
                    if g.sw == 1:
                        axpy(hi - lo, wv, gyrow + lo, gxrow + iw0)
                    else:
                        for ow in range(lo, hi):
                            gxrow[iw0 + (ow - lo) * g.sw] = (gxrow[iw0 + (ow - lo) * g.sw]
                                                            + wv * gyrow[ow])


cdef void _grad_weight_slice(const floating[:, :, :, ::1] gy,  # IN  (N, O, Ho, Wo)
                             const floating[:, :, :, ::1] x,   # IN  (N, C, H, W)
                             floating[:, :, :, ::1] gw,        # OUT (O, C/groups, kH, kW)
                             const Py_ssize_t[::1] oh_lo, const Py_ssize_t[::1] oh_hi,
                             const Py_ssize_t[::1] ow_lo, const Py_ssize_t[::1] ow_hi,
                             Geom g, Py_ssize_t task) noexcept nogil:
    cdef Py_ssize_t o = task // g.Cg, ci = task % g.Cg
    cdef Py_ssize_t c = (o // g.Og) * g.Cg + ci
    cdef Py_ssize_t n, kh, kw, oh, lo, hi, ih, iw0, i
    cdef floating* gwp = &gw[o, ci, 0, 0]
    cdef const floating* gyrow
    cdef const floating* xrow

    for i in range(g.kH * g.kW):
        gwp[i] = 0
    # Each weight sums image by image, row by row (fixed order).
    for n in range(g.N):
        for kh in range(g.kH):
            for oh in range(oh_lo[kh], oh_hi[kh]):
                ih = oh * g.sh + kh * g.dh - g.pt
                xrow = &x[n, c, ih, 0]
                gyrow = &gy[n, o, oh, 0]
                for kw in range(g.kW):
                    lo = ow_lo[kw]
                    hi = ow_hi[kw]
                    iw0 = lo * g.sw + kw * g.dw - g.pl
                    gwp[kh * g.kW + kw] = gwp[kh * g.kW + kw] + dot(
                        gyrow + lo, xrow + iw0, hi - lo, g.sw)


cdef inline floating _row_sum(const floating* a, Py_ssize_t n) noexcept nogil:
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 = s0 + a[i]
        s1 = s1 + a[i + 1]
        s2 = s2 + a[i + 2]
        s3 = s3 + a[i + 3]
        i = i + 4
    while i < n:
        s0 = s0 + a[i]
        i = i + 1
    return (s0 + s1) + (s2 + s3)


cdef void _grad_bias_entry(const floating[:, :, :, ::1] gy,   # IN  (N, O, Ho, Wo)
                           floating[::1] gb,                  # OUT (O,)
                           Geom g, Py_ssize_t o) noexcept nogil:
    cdef Py_ssize_t n, oh
    cdef floating acc = 0
    for n in range(g.N):
        for oh in range(g.Ho):
            acc = acc + _row_sum(&gy[n, o, oh, 0], g.Wo)
    gb[o] = acc


def grad_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w,
               floating[:, :, :, ::1] gx, spec, int n_threads):
    """Write the input gradient into `gx` (C-contiguous, shapes validated)."""
    cdef Geom g = make_geom(spec)
    cdef const Py_ssize_t[::1] oh_lo = spec.oh_lo, oh_hi = spec.oh_hi
    cdef const Py_ssize_t[::1] ow_lo = spec.ow_lo, ow_hi = spec.ow_hi
    cdef Py_ssize_t task
    for task in prange(g.N * g.C, nogil=True, schedule='static', num_threads=n_threads):
        _grad_input_plane(gy, w, gx, oh_lo, oh_hi, ow_lo, ow_hi, g, task)


def grad_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                floating[:, :, :, ::1] gw, spec, int n_threads):
    """Write the weight gradient into `gw` (C-contiguous, shapes validated)."""
    cdef Geom g = make_geom(spec)
    cdef const Py_ssize_t[::1] oh_lo = spec.oh_lo, oh_hi = spec.oh_hi
    cdef const Py_ssize_t[::1] ow_lo = spec.ow_lo, ow_hi = spec.ow_hi
    cdef Py_ssize_t task
    for task in prange(g.O * g.Cg, nogil=True, schedule='static', num_threads=n_threads):
        _grad_weight_slice(gy, x, gw, oh_lo, oh_hi, ow_lo, ow_hi, g, task)


def grad_bias(const floating[:, :, :, ::1] gy, floating[::1] gb, spec, int n_threads):
    """Write the bias gradient (sum over images and pixels) into `gb`."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t o
    for o in prange(g.O, nogil=True, schedule='static', num_threads=n_threads):
        _grad_bias_entry(gy, gb, g, o)
