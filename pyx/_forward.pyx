"""Forward dilated convolution, direct form.

The Python layer has validated every shape and computed, per kernel tap, the range of output
rows/columns whose input pixel is inside the image; the loops below run only over those
ranges, so they never test bounds and never multiply taps that fall in the padding.
"""
from cython.parallel cimport prange
from cython cimport floating

from _common cimport Geom, make_geom, axpy

from dilconv._threads import kernel_threads


cdef void _forward_plane(const floating[:, :, :, ::1] x,      # IN  (N, C, H, W)
                         const floating[:, :, :, ::1] w,      # IN  (O, C/groups, kH, kW)
                         const floating[::1] bias,            # IN  (O,) or empty
                         floating[:, :, :, ::1] out,          # OUT (N, O, Ho, Wo)
                         Geom g, Py_ssize_t task) noexcept nogil:
    cdef Py_ssize_t n = task // g.O, o = task % g.O
    cdef Py_ssize_t c0 = (o // g.Og) * g.Cg
    cdef Py_ssize_t ci, kh, kw, oh, ow, lo, hi, ih, iw0, i
    cdef floating wv
    cdef floating* orow
    cdef const floating* xrow
    cdef floating* op = &out[n, o, 0, 0]
    cdef floating b0 = bias[o] if bias.shape[0] > 0 else 0

    for i in range(g.Ho * g.Wo):
        op[i] = b0
    # Summation order per output: in channel, kernel row, kernel column (fixed).
    for ci in range(g.Cg):
        for kh in range(g.kH):
            for oh in range(g.oh_lo[kh], g.oh_hi[kh]):
                ih = oh * g.sh + kh * g.dh - g.pt
                xrow = &x[n, c0 + ci, ih, 0]
                orow = op + oh * g.Wo
                for kw in range(g.kW):
                    lo = g.ow_lo[kw]
                    hi = g.ow_hi[kw]
                    wv = w[o, ci, kh, kw]
                    iw0 = lo * g.sw + kw * g.dw - g.pl
                    if g.sw == 1:
                        axpy(hi - lo, wv, xrow + iw0, orow + lo)
                    else:
                        for ow in range(lo, hi):
                            orow[ow] = orow[ow] + wv * xrow[iw0 + (ow - lo) * g.sw]


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
            const floating[::1] bias, floating[:, :, :, ::1] out, spec, tuning):
    """Write conv2d(x, w) + bias into `out` (all arrays C-contiguous, shapes validated)."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t task
    cdef int n_threads = kernel_threads(spec, g.N * g.O, tuning)
    # Each task owns one (image, output channel) plane: no shared writes, any thread count
    # gives the same bits.
    if n_threads == 1:                # no parallel region (microseconds: tiny layers)
        with nogil:
            for task in range(g.N * g.O):
                _forward_plane(x, w, bias, out, g, task)
        return
    for task in prange(g.N * g.O, nogil=True, schedule='static', num_threads=n_threads):
        _forward_plane(x, w, bias, out, g, task)
