"""GEMM-shaped kernels for channel-heavy layers (kn2row over output tiles).

The output is cut into fixed rectangular tiles (chosen from the geometry alone, never from
the thread count). For one (image, group, tile) task and one kernel tap, the outputs whose
input pixel is in the image form a sub-rectangle; its input pixels are packed into a
per-thread buffer (C/groups x pixels) and one matrix product with that tap's weights
(O/groups x C/groups) gives its contribution. Taps in the padding are never multiplied.
Every output sums its taps in a fixed order, so results are bitwise identical for any thread
count; BLAS runs single-threaded inside (each entry point limits it).
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm

from _common cimport Geom, make_geom
from _plan cimport ceil_div, largest_tile, rect_tiles

import math

import numpy as np

from dilconv._scratch import thread_scratch
from dilconv._threads import blas_single_threaded, kernel_threads

# Pixels per tile: a packed tile of a few hundred KiB stays in L2 (between the tuning's
# min_tile_pixels and max_tile_pixels).
TILE_ELEMENTS = 256 * 1024
# BLAS takes 32-bit sizes.
BLAS_INT_MAX = 2 ** 31 - 1


def applies(spec, tuning):
    """True where BLAS's 32-bit sizes hold this geometry (the forward and the input
    gradient also pass the output plane size as a leading dimension); larger ones run
    elsewhere."""
    return (max(spec.c, spec.o) * tuning.max_tile_pixels <= BLAS_INT_MAX
            and spec.ho * spec.wo <= BLAS_INT_MAX)


def plane_tiles(Py_ssize_t height, Py_ssize_t width, Py_ssize_t channels, tuning):
    """Fixed rectangles (r0, r1, c0, c1) covering a height x width plane, of about
    TILE_ELEMENTS / channels pixels. Depends on the geometry only (never on the thread
    count), so results do not either."""
    target = max(tuning.min_tile_pixels,
                 min(tuning.max_tile_pixels, TILE_ELEMENTS // max(1, channels)))
    return np.array(rect_tiles(0, height, 0, width, target), dtype=np.intp).reshape(-1, 4)


cdef inline void gemm(char trans_a, char trans_b, int m, int n, int k,
                      const floating* a, int lda, const floating* b, int ldb, floating beta,
                      floating* c, int ldc) noexcept nogil:
    # Row-major C (m x n) = op(A) @ op(B) + beta*C through column-major BLAS (C^T = B^T A^T);
    # lda/ldb/ldc are row lengths of the stored row-major matrices.
    cdef floating one = 1
    if floating is float:
        sgemm(&trans_b, &trans_a, &n, &m, &k, &one, <float*> b, &ldb, <float*> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&trans_b, &trans_a, &n, &m, &k, &one, <double*> b, &ldb, <double*> a, &lda,
              &beta, c, &ldc)


cdef inline void pack_rect(const floating* plane, Py_ssize_t plane_w, Py_ssize_t row0,
                           Py_ssize_t row_step, Py_ssize_t col0, Py_ssize_t col_step,
                           Py_ssize_t rows, Py_ssize_t cols, floating* dst) noexcept nogil:
    """Copy plane[row0 + r*row_step, col0 + j*col_step] into dst[r*cols + j]."""
    cdef Py_ssize_t r, j
    cdef const floating* src
    for r in range(rows):
        src = plane + (row0 + r * row_step) * plane_w + col0
        if col_step == 1:
            for j in range(cols):
                dst[r * cols + j] = src[j]
        else:
            for j in range(cols):
                dst[r * cols + j] = src[j * col_step]


cdef struct TileTask:
    Py_ssize_t n, grp, r0, r1, c0, c1


cdef inline TileTask tile_task(const Py_ssize_t[:, ::1] tiles, Geom g,
                               Py_ssize_t task) noexcept nogil:
    """Task numbers run over (image, group, tile), tiles fastest."""
    cdef TileTask tt
    cdef Py_ssize_t n_tiles = tiles.shape[0], t = task % n_tiles
    tt.n = task // (g.groups * n_tiles)
    tt.grp = (task // n_tiles) % g.groups
    tt.r0, tt.r1, tt.c0, tt.c1 = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
    return tt


cdef void pack_taps(const floating* plane, Geom g, Py_ssize_t row0, Py_ssize_t rows,
                    Py_ssize_t c, Py_ssize_t d, Py_ssize_t kw, Py_ssize_t valid_lo,
                    Py_ssize_t valid_hi, floating* dst) noexcept nogil:
    """dst (rows x (d-c)): the input pixels tap column kw meets for output columns [c, d)
    of rows starting at input row row0 (step sh); zero where that tap is in the padding
    (outside [valid_lo, valid_hi))."""
    cdef Py_ssize_t cols = d - c, r, j
    cdef Py_ssize_t lo = min(max(valid_lo, c), d), hi = max(min(valid_hi, d), lo)
    cdef const floating* src
    cdef floating* out
    for r in range(rows):
        src = plane + (row0 + r * g.sh) * g.W + kw * g.dw - g.pl
        out = dst + r * cols - c
        for j in range(c, lo):
            out[j] = 0
        if g.sw == 1:
            for j in range(lo, hi):
                out[j] = src[j]
        else:
            for j in range(lo, hi):
                out[j] = src[j * g.sw]
        for j in range(hi, d):
            out[j] = 0


cdef void _forward_tile(const floating[:, :, :, ::1] x,         # IN  (N, C, H, W)
                        const floating[:, :, ::1] wt,           # IN  (kH*kW/kw_group, O, K)
                        const floating[::1] bias,               # IN  (O,) or empty
                        floating[:, :, :, ::1] out,             # OUT (N, O, Ho, Wo)
                        const Py_ssize_t[:, ::1] tiles,         # IN  (T, 4) r0 r1 c0 c1
                        Py_ssize_t kw_group, Geom g, Py_ssize_t task,
                        floating* pack, floating* tmp) noexcept nogil:   # SCRATCH
    # kw_group taps of a kernel row go into one product (K = kw_group * C/g): 1 for many
    # channels (no zero padding work), kW for few (a longer K multiplies faster).
    cdef TileTask tt = tile_task(tiles, g, task)
    cdef Py_ssize_t n = tt.n, grp = tt.grp, r0 = tt.r0, r1 = tt.r1, c0 = tt.c0, c1 = tt.c1
    cdef Py_ssize_t o0 = grp * g.Og, ci0 = grp * g.Cg, k = kw_group * g.Cg
    cdef Py_ssize_t oi, ci, kh, kw, gi, kw_first, r, j, a, b, c, d, rows, cols, pixels
    cdef floating bv
    cdef floating* orow
    cdef const floating* src
    cdef const floating* a_tap

    for oi in range(g.Og):
        bv = bias[o0 + oi] if bias.shape[0] > 0 else 0
        for r in range(r0, r1):
            orow = &out[n, o0 + oi, r, 0]
            for j in range(c0, c1):
                orow[j] = bv
    for kh in range(g.kH):
        a = max(r0, g.oh_lo[kh])
        b = min(r1, g.oh_hi[kh])
        if a >= b:
            continue
        for gi in range(g.kW // kw_group):
            kw_first = gi * kw_group
            if kw_group == 1:
                c = max(c0, g.ow_lo[kw_first])
                d = min(c1, g.ow_hi[kw_first])
            else:
                c = c0
                d = c1
            if c >= d:
                continue
            rows = b - a
            cols = d - c
            pixels = rows * cols
            for kw in range(kw_first, kw_first + kw_group):
                for ci in range(g.Cg):
                    pack_taps(&x[n, ci0 + ci, 0, 0], g, a * g.sh + kh * g.dh - g.pt, rows,
                              c, d, kw, g.ow_lo[kw], g.ow_hi[kw],
                              pack + ((kw - kw_first) * g.Cg + ci) * pixels)
            a_tap = &wt[(kh * g.kW + kw_first) // kw_group, o0, 0]
            if cols == g.Wo or rows == 1:
                # A run of whole output rows (or one row): accumulate straight into `out`.
                gemm(c'N', c'N', g.Og, pixels, k, a_tap, k, pack, pixels, 1,
                     &out[n, o0, a, c], g.Ho * g.Wo)
            else:
                gemm(c'N', c'N', g.Og, pixels, k, a_tap, k, pack, pixels, 0, tmp, pixels)
                for oi in range(g.Og):
                    for r in range(rows):
                        orow = &out[n, o0 + oi, a + r, c]
                        src = tmp + oi * pixels + r * cols
                        for j in range(cols):
                            orow[j] = orow[j] + src[j]


def forward(const floating[:, :, :, ::1] x, weight,
            const floating[::1] bias, floating[:, :, :, ::1] out, spec, tuning):
    """conv2d into `out`, in tiles of whole output rows or of one row."""
    cdef Geom g = make_geom(spec)
    # Few channels: one product per kernel row (all kW taps, zeros where a tap is in the
    # padding) has a longer K and runs faster than one per tap.
    # Those zeros meet the weights, so only finite weights may take that way (0*inf = nan).
    cdef Py_ssize_t kw_group = 1
    if g.Cg < tuning.kw_group_below_channels and np.isfinite(weight).all():
        kw_group = g.kW
    cdef const Py_ssize_t[:, ::1] tiles = plane_tiles(g.Ho, g.Wo, kw_group * g.Cg, tuning)
    cdef Py_ssize_t n_tasks = g.N * g.groups * tiles.shape[0]
    cdef int n_threads = kernel_threads(spec, n_tasks, tuning)
    # (O, C/g, kH, kW) -> (kH*kW/kw_group, O, kw_group*C/g): columns (kw, c) per product.
    taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(
        g.kH, g.kW // kw_group, kw_group, g.O, g.Cg).transpose(0, 1, 3, 2, 4).reshape(
        g.kH * g.kW // kw_group, g.O, kw_group * g.Cg)
    cdef const floating[:, :, ::1] wt = np.ascontiguousarray(taps)
    cdef Py_ssize_t tile_pixels = largest_tile(tiles)
    cdef floating[:, ::1] scratch = thread_scratch(
        n_threads, (kw_group * g.Cg + g.Og) * tile_pixels,
        np.float32 if floating is float else np.float64)
    cdef Py_ssize_t task, tid, tmp = kw_group * g.Cg * tile_pixels
    with blas_single_threaded():
        with nogil, parallel(num_threads=n_threads):
            tid = threadid()
            for task in prange(n_tasks, schedule='static'):
                _forward_tile(x, wt, bias, out, tiles, kw_group, g, task, &scratch[tid, 0],
                              &scratch[tid, tmp])


cdef inline Py_ssize_t floor_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a // b if a >= 0 else -((-a + b - 1) // b)


cdef inline void outputs_reading(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t first,
                                 Py_ssize_t stop, Py_ssize_t offset, Py_ssize_t step,
                                 Py_ssize_t* a, Py_ssize_t* b) noexcept nogil:
    """[a, b): outputs j in the tap's in-bounds range [lo, hi) whose input index
    j*step + offset falls in [first, stop), along one axis."""
    a[0] = max(lo, ceil_div(first - offset, step))
    b[0] = min(hi, floor_div(stop - 1 - offset, step) + 1)


cdef void _grad_input_tile(const floating[:, :, :, ::1] gy,     # IN  (N, O, Ho, Wo)
                           const floating[:, :, ::1] wt,        # IN  (kH*kW, C, O/groups)
                           floating[:, :, :, ::1] gx,           # OUT (N, C, H, W)
                           const Py_ssize_t[:, ::1] tiles,      # IN  (T, 4) of input pixels
                           Geom g, Py_ssize_t task, Py_ssize_t tile_pixels,
                           floating* pack, floating* tmp) noexcept nogil:   # SCRATCH
    cdef TileTask tt = tile_task(tiles, g, task)
    cdef Py_ssize_t n = tt.n, grp = tt.grp, r0 = tt.r0, r1 = tt.r1, c0 = tt.c0, c1 = tt.c1
    cdef Py_ssize_t o0 = grp * g.Og, ci0 = grp * g.Cg
    cdef Py_ssize_t oi, ci, kh, kw, r, j, a, b, c, d, rows, cols, span, row_len, off_h, off_w
    cdef bint in_place
    cdef floating* gxrow
    cdef const floating* src

    for ci in range(g.Cg):
        for r in range(r0, r1):
            gxrow = &gx[n, ci0 + ci, r, 0]
            for j in range(c0, c1):
                gxrow[j] = 0
    for kh in range(g.kH):
        # Outputs whose input row (oh*sh + off_h) falls in this tile, and in the image.
        off_h = kh * g.dh - g.pt
        outputs_reading(g.oh_lo[kh], g.oh_hi[kh], r0, r1, off_h, g.sh, &a, &b)
        if a >= b:
            continue
        for kw in range(g.kW):
            off_w = kw * g.dw - g.pl
            outputs_reading(g.ow_lo[kw], g.ow_hi[kw], c0, c1, off_w, g.sw, &c, &d)
            if c >= d:
                continue
            rows = b - a
            cols = d - c
            # The rect's pixels as one run of grad_output's rows, read in place (no
            # copy of O/g planes per tap), where the columns outside it that the run
            # takes in add little work and it fits the tile's buffer; else packed.
            span = (rows - 1) * g.Wo + cols
            in_place = span <= tile_pixels and 8 * span <= 9 * rows * cols
            if in_place:
                row_len = g.Wo
                gemm(c'N', c'N', g.Cg, span, g.Og, &wt[kh * g.kW + kw, ci0, 0], g.Og,
                     &gy[n, o0, a, c], g.Ho * g.Wo, 0, tmp, span)
            else:
                span, row_len = rows * cols, cols
                for oi in range(g.Og):
                    pack_rect(&gy[n, o0 + oi, 0, 0], g.Wo, a, 1, c, 1, rows, cols,
                              pack + oi * span)
                gemm(c'N', c'N', g.Cg, span, g.Og, &wt[kh * g.kW + kw, ci0, 0], g.Og,
                     pack, span, 0, tmp, span)
            for ci in range(g.Cg):
                for r in range(rows):
                    gxrow = &gx[n, ci0 + ci, (a + r) * g.sh + off_h, c * g.sw + off_w]
                    src = tmp + ci * span + r * row_len
                    if g.sw == 1:
                        for j in range(cols):
                            gxrow[j] = gxrow[j] + src[j]
                    else:
                        for j in range(cols):
                            gxrow[j * g.sw] = gxrow[j * g.sw] + src[j]


def grad_input(const floating[:, :, :, ::1] gy, weight,
               floating[:, :, :, ::1] gx, spec, tuning):
    """Input gradient into `gx`, in tiles of the input plane."""
    cdef Geom g = make_geom(spec)
    cdef const Py_ssize_t[:, ::1] tiles = plane_tiles(g.H, g.W, g.Og, tuning)
    cdef Py_ssize_t n_tasks = g.N * g.groups * tiles.shape[0]
    cdef int n_threads = kernel_threads(spec, n_tasks, tuning)
    # (O, C/g, kH, kW) -> (kH*kW, C, O/g): per tap and group, a (C/g x O/g) matrix.
    cdef const floating[:, :, ::1] wt = np.ascontiguousarray(
        weight.reshape(g.groups, g.Og, g.Cg, g.kH, g.kW).transpose(3, 4, 0, 2, 1)
    ).reshape(g.kH * g.kW, g.C, g.Og)
    cdef Py_ssize_t tile_pixels = largest_tile(tiles)
    cdef floating[:, ::1] scratch = thread_scratch(
        n_threads, (g.Cg + g.Og) * tile_pixels,
        np.float32 if floating is float else np.float64)
    cdef Py_ssize_t task, tid, tmp = g.Og * tile_pixels
    with blas_single_threaded():
        with nogil, parallel(num_threads=n_threads):
            tid = threadid()
            for task in prange(n_tasks, schedule='static'):
                _grad_input_tile(gy, wt, gx, tiles, g, task, tile_pixels,
                                 &scratch[tid, 0], &scratch[tid, tmp])


cdef void _grad_weight_block(const floating[:, :, :, ::1] gy,   # IN  (N, O, Ho, Wo)
                             const floating[:, :, :, ::1] x,    # IN  (N, C, H, W)
                             floating[:, :, :, ::1] gw,         # OUT (O, C/groups, kH, kW)
                             const Py_ssize_t[:, ::1] tiles,    # IN  (T, 4) of output pixels
                             Py_ssize_t o_block, Geom g, Py_ssize_t task,
                             floating* pack, floating* acc) noexcept nogil:   # SCRATCH
    # One task: one tap x one block of output channels; it sums over images and tiles.
    cdef Py_ssize_t blocks = (g.O + o_block - 1) // o_block
    cdef Py_ssize_t tap = task // blocks
    cdef Py_ssize_t kh = tap // g.kW, kw = tap % g.kW
    cdef Py_ssize_t o0 = (task % blocks) * o_block
    cdef Py_ssize_t ob = min(o_block, g.O - o0)          # blocks never straddle a group
    cdef Py_ssize_t ci0 = (o0 // g.Og) * g.Cg
    cdef Py_ssize_t n, t, oi, ci, a, b, c, d, rows, cols, pixels
    cdef floating* xpack = pack
    cdef floating* gpack

    for oi in range(ob * g.Cg):
        acc[oi] = 0
    for n in range(g.N):
        for t in range(tiles.shape[0]):
            a = max(tiles[t, 0], g.oh_lo[kh])
            b = min(tiles[t, 1], g.oh_hi[kh])
            c = max(tiles[t, 2], g.ow_lo[kw])
            d = min(tiles[t, 3], g.ow_hi[kw])
            if a >= b or c >= d:
                continue
            rows = b - a
            cols = d - c
            pixels = rows * cols
            gpack = pack + g.Cg * pixels
            for ci in range(g.Cg):
                pack_rect(&x[n, ci0 + ci, 0, 0], g.W, a * g.sh + kh * g.dh - g.pt, g.sh,
                          c * g.sw + kw * g.dw - g.pl, g.sw, rows, cols, xpack + ci * pixels)
            for oi in range(ob):
                pack_rect(&gy[n, o0 + oi, 0, 0], g.Wo, a, 1, c, 1, rows, cols,
                          gpack + oi * pixels)
            # acc (ob x Cg) += gy_pack (ob x pixels) @ x_pack^T (pixels x Cg)
            gemm(c'N', c'T', ob, g.Cg, pixels, gpack, pixels, xpack, pixels, 1, acc, g.Cg)
    for oi in range(ob):
        for ci in range(g.Cg):
            gw[o0 + oi, ci, kh, kw] = acc[oi * g.Cg + ci]


def grad_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                floating[:, :, :, ::1] gw, spec, tuning):
    """Weight gradient into `gw`; tasks are (block of output channels, tap), blocks
    dividing O/groups; tiles cut the output plane."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t o_block = math.gcd(g.Og, 64)
    cdef const Py_ssize_t[:, ::1] tiles = plane_tiles(g.Ho, g.Wo, g.Cg + o_block, tuning)
    cdef Py_ssize_t n_tasks = g.kH * g.kW * (g.O // o_block)
    cdef int n_threads = kernel_threads(spec, n_tasks, tuning)
    cdef Py_ssize_t acc_offset = (g.Cg + o_block) * largest_tile(tiles)
    cdef floating[:, ::1] scratch = thread_scratch(
        n_threads, acc_offset + o_block * g.Cg,
        np.float32 if floating is float else np.float64)
    cdef Py_ssize_t task, tid
    with blas_single_threaded():
        with nogil, parallel(num_threads=n_threads):
            tid = threadid()
            for task in prange(n_tasks, schedule='static'):
                _grad_weight_block(gy, x, gw, tiles, o_block, g, task, &scratch[tid, 0],
                                   &scratch[tid, acc_offset])
