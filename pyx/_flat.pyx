"""Forward for unit-stride convolutions with few channels (depthwise, RGB stems).

Short output rows make per-row loops overhead-bound, so this kernel copies a band of input
rows, zero-padded, into a per-thread buffer with rows of width Wp = Wo + (kW-1)*dW. Then the
input pixel of tap (kh, kw) for flat output position i is buffer[i + kh*dH*Wp + kw*dW]: one
long, contiguous, vectorised loop per tap covers the whole band. The Wp - Wo extra columns
of each accumulated row are dropped when the band is written out. Padding taps meet zeros
(so the caller uses this only for finite weights, where 0*w = 0 exactly).
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating

from _common cimport Geom, make_geom, axpy


cdef void _band(const floating[:, :, :, ::1] x,                # IN  (N, C, H, W)
                const floating[:, :, :, ::1] w,                # IN  (O, C/groups, kH, kW)
                const floating[::1] bias,                      # IN  (O,) or empty
                floating[:, :, :, ::1] out,                    # OUT (N, O, Ho, Wo)
                Geom g, Py_ssize_t rows, Py_ssize_t o_block, Py_ssize_t task,
                floating* band, floating* acc) noexcept nogil:  # SCRATCH (C/g bands, acc)
    cdef Py_ssize_t bands = (g.Ho + rows - 1) // rows, blocks = g.Og // o_block
    cdef Py_ssize_t n = task // (g.groups * blocks * bands)
    cdef Py_ssize_t grp = (task // (blocks * bands)) % g.groups
    cdef Py_ssize_t o0 = grp * g.Og + ((task // bands) % blocks) * o_block
    cdef Py_ssize_t r0 = (task % bands) * rows
    cdef Py_ssize_t nr = min(rows, g.Ho - r0)
    cdef Py_ssize_t wp = g.Wo + (g.kW - 1) * g.dw
    cdef Py_ssize_t in_rows = nr + (g.kH - 1) * g.dh
    cdef Py_ssize_t span = nr * wp
    cdef Py_ssize_t band_size = (rows + (g.kH - 1) * g.dh) * wp + (g.kW - 1) * g.dw
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
            const floating[::1] bias, floating[:, :, :, ::1] out, spec,
            Py_ssize_t rows, Py_ssize_t o_block, floating[:, ::1] scratch, int n_threads):
    """Unit-stride conv2d into `out`, in bands of `rows` output rows and blocks of `o_block`
    (dividing O/groups) output channels. `scratch` is (threads, C/g * band + acc) with
    band = (rows + (kH-1)*dH) * Wp + (kW-1)*dW and acc = o_block * rows * Wp."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t task, tid
    cdef Py_ssize_t wp = g.Wo + (g.kW - 1) * g.dw
    cdef Py_ssize_t band_size = (rows + (g.kH - 1) * g.dh) * wp + (g.kW - 1) * g.dw
    cdef Py_ssize_t n_tasks = g.N * g.groups * (g.Og // o_block) * ((g.Ho + rows - 1) // rows)
    cdef floating* band
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        band = &scratch[tid, 0]
        for task in prange(n_tasks, schedule='static'):
            _band(x, w, bias, out, g, rows, o_block, task, band, band + g.Cg * band_size)
