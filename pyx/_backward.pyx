"""Gradients of the dilated convolution: input, weight and bias.

Each parallel task owns the outputs it writes (an input-gradient plane, one weight slice, one
bias entry) and sums its terms in a fixed order, so results are bitwise identical for any
thread count. The per-tap in-bounds ranges are the forward's.
"""
from cython.parallel cimport prange
from cython cimport floating

from _common cimport Geom, make_geom, axpy, dot, row_dots3, total

from dilconv._threads import kernel_threads


cdef void _grad_input_plane(const floating[:, :, :, ::1] gy,  # IN  (N, O, Ho, Wo)
                            const floating[:, :, :, ::1] w,   # IN  (O, C/groups, kH, kW)
                            floating[:, :, :, ::1] gx,        # OUT (N, C, H, W)
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
            for oh in range(g.oh_lo[kh], g.oh_hi[kh]):
                ih = oh * g.sh + kh * g.dh - g.pt
                gxrow = gxp + ih * g.W
                gyrow = &gy[n, o0 + oi, oh, 0]
                for kw in range(g.kW):
                    lo = g.ow_lo[kw]
                    hi = g.ow_hi[kw]
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
                             Geom g, Py_ssize_t task) noexcept nogil:
    cdef Py_ssize_t o = task // g.Cg, ci = task % g.Cg
    cdef Py_ssize_t c = (o // g.Og) * g.Cg + ci
    cdef Py_ssize_t n, kh, kw, oh0, lo, hi, ih, i
    cdef floating* gwp = &gw[o, ci, 0, 0]

    for i in range(g.kH * g.kW):
        gwp[i] = 0
    # Each weight sums image by image (fixed order). At unit column stride, three taps of a
    # kernel row share the outputs all three read in a row: those sum over all the rows at
    # once (one reduction), then each tap's outputs outside them row by row. Other taps
    # sum row by row.
    for n in range(g.N):
        for kh in range(g.kH):
            oh0 = g.oh_lo[kh]
            if oh0 >= g.oh_hi[kh]:
                continue
            ih = oh0 * g.sh + kh * g.dh - g.pt
            kw = 0
            while kw < g.kW:
                if g.sw == 1 and kw + 3 <= g.kW:
                    lo = max(g.ow_lo[kw], max(g.ow_lo[kw + 1], g.ow_lo[kw + 2]))
                    hi = min(g.ow_hi[kw], min(g.ow_hi[kw + 1], g.ow_hi[kw + 2]))
                    if hi > lo:
                        row_dots3(g.oh_hi[kh] - oh0, hi - lo, &gy[n, o, oh0, lo], g.Wo,
                                  &x[n, c, ih, lo + kw * g.dw - g.pl], g.sh * g.W, g.dw,
                                  gwp + kh * g.kW + kw)
                        for i in range(kw, kw + 3):
                            _tap_rows(gy, x, gwp, g, n, o, c, kh, i, g.ow_lo[i], lo)
                            _tap_rows(gy, x, gwp, g, n, o, c, kh, i, hi, g.ow_hi[i])
                        kw = kw + 3
                        continue
                _tap_rows(gy, x, gwp, g, n, o, c, kh, kw, g.ow_lo[kw], g.ow_hi[kw])
                kw = kw + 1


cdef inline void _tap_rows(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                           floating* gwp, Geom g, Py_ssize_t n, Py_ssize_t o, Py_ssize_t c,
                           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    # Tap (kh, kw)'s terms of outputs [lo, hi) of every row it reads, row by row.
    cdef Py_ssize_t oh
    cdef Py_ssize_t iw0 = lo * g.sw + kw * g.dw - g.pl
    if hi <= lo:
        return
    for oh in range(g.oh_lo[kh], g.oh_hi[kh]):
        gwp[kh * g.kW + kw] = gwp[kh * g.kW + kw] + dot(
            &gy[n, o, oh, lo], &x[n, c, oh * g.sh + kh * g.dh - g.pt, iw0], hi - lo, g.sw)


cdef void _grad_bias_entry(const floating[:, :, :, ::1] gy,   # IN  (N, O, Ho, Wo)
                           floating[::1] gb,                  # OUT (O,)
                           Geom g, Py_ssize_t o) noexcept nogil:
    cdef Py_ssize_t n
    cdef floating acc = 0
    for n in range(g.N):
        acc = acc + total(&gy[n, o, 0, 0], g.Ho * g.Wo)
    gb[o] = acc


def grad_input(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] w,
               floating[:, :, :, ::1] gx, spec, tuning):
    """Write the input gradient into `gx` (C-contiguous, shapes validated)."""
    cdef Geom g = make_geom(spec)
    cdef int n_threads = kernel_threads(spec, g.N * g.C, tuning)
    cdef Py_ssize_t task
    if n_threads == 1:                # no parallel region (microseconds: tiny layers)
        with nogil:
            for task in range(g.N * g.C):
                _grad_input_plane(gy, w, gx, g, task)
        return
    for task in prange(g.N * g.C, nogil=True, schedule='static', num_threads=n_threads):
        _grad_input_plane(gy, w, gx, g, task)


def grad_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                floating[:, :, :, ::1] gw, spec, tuning):
    """Write the weight gradient into `gw` (C-contiguous, shapes validated)."""
    cdef Geom g = make_geom(spec)
    cdef int n_threads = kernel_threads(spec, g.O * g.Cg, tuning)
    cdef Py_ssize_t task
    if n_threads == 1:                # no parallel region (microseconds: tiny layers)
        with nogil:
            for task in range(g.O * g.Cg):
                _grad_weight_slice(gy, x, gw, g, task)
        return
    for task in prange(g.O * g.Cg, nogil=True, schedule='static', num_threads=n_threads):
        _grad_weight_slice(gy, x, gw, g, task)


def grad_bias(const floating[:, :, :, ::1] gy, floating[::1] gb, spec, tuning):
    """Write the bias gradient (sum over images and pixels) into `gb`."""
    cdef Geom g = make_geom(spec)
    cdef int n_threads = kernel_threads(spec, g.O, tuning)
    cdef Py_ssize_t o
    if n_threads == 1:                # no parallel region (microseconds: tiny layers)
        with nogil:
            for o in range(g.O):
                _grad_bias_entry(gy, gb, g, o)
        return
    for o in prange(g.O, nogil=True, schedule='static', num_threads=n_threads):
        _grad_bias_entry(gy, gb, g, o)
