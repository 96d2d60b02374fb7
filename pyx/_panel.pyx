"""Packed panels and a register-blocked micro-kernel (layers with many channels).

The output plane is cut into tiles aligned with the taps' in-bounds ranges, so in a tile
every tap reads the image for all of its pixels or for none: a tile sums exactly its taps
in the image, with no zero padding and no bounds tests (where border columns are thin and
the weights finite, the plan may cut along rows only: column taps then read zeros). A
tile is computed NR pixels at a time: their input pixels, for all of the taps and
channels, form a panel, packed per thread a group of panels (and a chunk of taps, where
the tier's plan splits them) at a time just before use (or, at unit stride with few terms
or few output channels, read in place), and the micro-kernel (pyx/_microkernel.h) holds
MR output channels x NR pixels in registers over the sum of a chunk, once per block of MR
output channels, while the panel is still in cache; the next chunk adds to the stored
partial sums. Every output sums its taps and channels
in one fixed order, so results are bitwise identical for any thread count (and tasks,
which own their outputs, are handed out dynamically: tiles differ in size). The weight
gradient runs on the same micro-kernel, with pixels as the terms of its sums.

Tiers whose plans prefer it (v4, v3) run the forward of layers with long sums in the lanes
scheme instead (pyx/_lanes.h): output channels in the vector lanes, the input rows of a
band of output rows packed once with their channels interleaved, and each output's taps
and channels added in the same order as in the panels, so the bits are the same.
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from libc.string cimport memset

from _common cimport Geom, all_finite, make_geom
from _plan cimport ceil_div, largest_tile, range_edges, rect_tiles

import functools

import numpy as np

from dilconv._cpu import cpu_family, cpu_vendor
from dilconv._geometry import ConvSpec, fills_zero_columns
from dilconv._scratch import aligned_empty, thread_scratch
from dilconv._threads import kernel_threads


cdef extern from *:
    void prefetch "__builtin_prefetch"(const void* address) noexcept nogil


cdef extern from "_microkernel.h":
    enum: DILCONV_MR, DILCONV_MR_GW, DILCONV_BLOCK_BYTES, DILCONV_CHUNK_BYTES
    ctypedef struct Terms "dilconv_terms":
        # The sum of one output block: see pyx/_microkernel.h.
        Py_ssize_t n_seg, seg_len
        const Py_ssize_t* a_off
        const Py_ssize_t* b_off
        Py_ssize_t a_step, a_row, b_step
    void dilconv_ukr_f(const Terms* terms, const float* a, const float* b,
                       const float* bias, int accumulate, float* c, Py_ssize_t ldc,
                       Py_ssize_t m, Py_ssize_t n) noexcept nogil
    void dilconv_ukr_d(const Terms* terms, const double* a, const double* b,
                       const double* bias, int accumulate, double* c, Py_ssize_t ldc,
                       Py_ssize_t m, Py_ssize_t n) noexcept nogil
    void dilconv_ukr_f_packed(const Terms* terms, const float* a, const float* b,
                              const float* bias, int accumulate, float* c, Py_ssize_t ldc,
                              Py_ssize_t m, Py_ssize_t n) noexcept nogil
    void dilconv_ukr_d_packed(const Terms* terms, const double* a, const double* b,
                              const double* bias, int accumulate, double* c,
                              Py_ssize_t ldc, Py_ssize_t m, Py_ssize_t n) noexcept nogil
    void dilconv_copy_block_f(const float* src, float* dst) noexcept nogil
    void dilconv_copy_block_d(const double* src, double* dst) noexcept nogil
    void dilconv_gather2_block_f(const float* src, float* dst) noexcept nogil
    void dilconv_gather2_block_d(const double* src, double* dst) noexcept nogil
    void dilconv_copy_part_f(const float* src, float* dst, Py_ssize_t n,
                               Py_ssize_t room) noexcept nogil
    void dilconv_copy_part_d(const double* src, double* dst, Py_ssize_t n,
                               Py_ssize_t room) noexcept nogil


cdef extern from "_axpy.h":
    void dilconv_gather_f(Py_ssize_t n, const float* src, Py_ssize_t step,
                          float* dst) noexcept nogil
    void dilconv_gather_d(Py_ssize_t n, const double* src, Py_ssize_t step,
                          double* dst) noexcept nogil


# This tier's micro-kernel block (read by tests and show_config, not by any plan): output
# channels per block (in the weight gradient) and bytes of pixels per block.
MR, MR_GRAD_WEIGHT, BLOCK_NBYTES = DILCONV_MR, DILCONV_MR_GW, DILCONV_BLOCK_BYTES

# Forward tiles (tasks): about this many bytes of input terms (pixels x taps x channels),
# and enough pixels that blocks of NR are mostly full. (Tiles sized by one chunk of taps
# instead were 3% faster at 1 thread and 8% slower at 2: fewer tasks to balance.)
PANEL_PACK_BYTES = 1024 * 1024
PANEL_MIN_PIXELS = 256
# Weight-gradient tiles: their packed input stays within this (in L1/L2), and a task's
# output channels of grad_output (in L2 across the taps) within this many.
PANEL_GRAD_WEIGHT_PACK_BYTES = 64 * 1024
PANEL_GRAD_WEIGHT_O_CHUNK = 128
# A task takes up to this many blocks of NR input channels while that leaves at least
# MIN_TASKS tasks; where its tiles then take PACKED_TERMS taps x channel blocks or more,
# grad_output is packed once per tile for them all, in blocks of MR_GW rows (v4: 14 x 2
# vectors, against 8 x 2 read in place; an AVX-512 Xeon, float32, one / two threads:
# 512 -> 512 at 64 x 64 1.12x / 1.13x, 2048 -> 256 at 33 x 33 1.04x / 1.01x). Fewer terms
# per packed value cost more than the wider block saves (3-tap layers packed for each
# channel block: 1.2-1.4x slower).
PANEL_GRAD_WEIGHT_C_GROUP = 4
PANEL_GRAD_WEIGHT_MIN_TASKS = 16
PANEL_GRAD_WEIGHT_PACKED_TERMS = 12
# The weight gradient's sum over images is split into up to this many parts of whole
# images, summed into their own arrays and then added in part order: tasks for every
# thread where channels alone give few (stride2_d2: one), and the same bits for any thread
# count and tier, since the parts depend on the batch only.
PANEL_GRAD_WEIGHT_IMAGE_PARTS = 4
# Packing reads the image this many channel planes ahead of the copy.
cdef enum:
    PACK_PREFETCH_CHANNELS = 8


@functools.lru_cache(maxsize=256)
def aligned_tiles(spec, Py_ssize_t target, bint zero_fill=False):
    """Tiles (r0, r1, c0, c1) of about `target` pixels, none crossing a tap range end (of
    the row taps only, with `zero_fill`: column taps then read zeros in the padding).
    Remembered per geometry (layers call with the same one again and again): read-only."""
    rows = range_edges(spec.oh_lo, spec.oh_hi, spec.ho)
    cols = [0, spec.wo] if zero_fill else range_edges(spec.ow_lo, spec.ow_hi, spec.wo)
    tiles = np.array([tile for a, b in zip(rows, rows[1:]) for c, d in zip(cols, cols[1:])
                      for tile in rect_tiles(a, b, c, d, target)],
                     dtype=np.intp).reshape(-1, 4)
    tiles.flags.writeable = False
    return tiles


cdef inline void ukr(const Terms* terms, const floating* a, const floating* b,
                     const floating* bias, int accumulate, floating* c, Py_ssize_t ldc,
                     Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    if floating is float:
        dilconv_ukr_f(terms, a, b, bias, accumulate, c, ldc, m, n)
    else:
        dilconv_ukr_d(terms, a, b, bias, accumulate, c, ldc, m, n)


cdef inline void ukr_packed(const Terms* terms, const floating* a, const floating* b,
                            const floating* bias, int accumulate, floating* c,
                            Py_ssize_t ldc, Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    # The forward's: A is packed weights (MR per term, zero past m) and bias MR values.
    if floating is float:
        dilconv_ukr_f_packed(terms, a, b, bias, accumulate, c, ldc, m, n)
    else:
        dilconv_ukr_d_packed(terms, a, b, bias, accumulate, c, ldc, m, n)


cdef inline Py_ssize_t block_pixels(floating* like) noexcept nogil:
    # NR as a compile-time constant of each specialisation: divisions by it are shifts.
    return DILCONV_BLOCK_BYTES // sizeof(floating)


cdef inline void gather(Py_ssize_t n, const floating* src, Py_ssize_t step,
                        floating* dst) noexcept nogil:
    # dst[i] = src[i*step] through restrict pointers (pyx/_axpy.h), which vectorise.
    if floating is float:
        dilconv_gather_f(n, src, step, dst)
    else:
        dilconv_gather_d(n, src, step, dst)


cdef void _forward_tile(const floating[:, :, :, :] x,            # IN  (N, C, H, W)
                        const floating[:, :, :, :, ::1] wp,      # IN  (groups, blocks, taps, Cg, MR)
                        const floating[:, :, ::1] bp,            # IN  (groups, blocks, MR)
                        floating[:, :, :, ::1] out,              # OUT (N, O, Ho, Wo)
                        const Py_ssize_t[:, ::1] tiles,          # IN  (T, 4) r0 r1 c0 c1
                        Geom g, Py_ssize_t task,
                        floating* pack, floating* block,                 # SCRATCH
                        Py_ssize_t* taps, Py_ssize_t* offsets, bint zero_fill,
                        Py_ssize_t in_place_bytes, Py_ssize_t group,
                        Py_ssize_t chunk_taps) noexcept nogil:
    cdef Py_ssize_t n_tiles = tiles.shape[0], t = task % n_tiles
    cdef Py_ssize_t n = task // (g.groups * n_tiles), grp = (task // n_tiles) % g.groups
    cdef Py_ssize_t r0 = tiles[t, 0], r1 = tiles[t, 1], c0 = tiles[t, 2], c1 = tiles[t, 3]
    cdef Py_ssize_t tw = c1 - c0, pixels = (r1 - r0) * tw, nr = block_pixels(pack)
    cdef Py_ssize_t ci0 = grp * g.Cg
    cdef Py_ssize_t n_taps = 0, kh, kw, kh0 = 0, kw0 = 0, ti, rr, depth, p, p0
    cdef Py_ssize_t panels, direct_w = 0, t0, t1, chunk_depth, count
    cdef Py_ssize_t reach = 0, tail, tail_rows, first
    cdef bint in_place = False
    cdef Py_ssize_t* packed_off
    cdef Py_ssize_t* image_off
    cdef Py_ssize_t* weight_off
    cdef const floating* base
    cdef Terms terms

    # The tile is aligned with the tap ranges (of the rows only, with zero_fill, where
    # column taps partly in the padding read zeros there): test one pixel per tap.
    for kh in range(g.kH):
        if not (g.oh_lo[kh] <= r0 < g.oh_hi[kh]):
            continue
        for kw in range(g.kW):
            if (g.ow_lo[kw] < g.ow_hi[kw] if zero_fill
                    else g.ow_lo[kw] <= c0 < g.ow_hi[kw]):
                taps[n_taps] = kh * g.kW + kw
                n_taps = n_taps + 1
    depth = n_taps * g.Cg
    weight_off = offsets
    image_off = offsets + n_taps
    packed_off = offsets + 2 * n_taps
    if n_taps > 0:
        kh0 = taps[0] // g.kW
        kw0 = taps[0] % g.kW
    for ti in range(n_taps):
        kh = taps[ti] // g.kW
        kw = taps[ti] % g.kW
        weight_off[ti] = taps[ti] * g.Cg * DILCONV_MR
        image_off[ti] = (kh - kh0) * g.dh * g.W + (kw - kw0) * g.dw
        packed_off[ti] = ti * g.Cg * nr
        reach = max(reach, image_off[ti])
    terms.n_seg = n_taps
    terms.seg_len = g.Cg
    terms.a_off = weight_off
    terms.a_step = DILCONV_MR
    terms.a_row = 1

    # Unit stride: a block of NR pixels along a row reads NR consecutive pixels of each
    # input row, so whole blocks can read the image in place, without packing. That pays
    # while one block's reads stay within L1; packed panels are read sequentially.
    # A row's last, partial block (more than half a block) reads a whole block in place
    # too, past the row's end into the next rows: where those reads stay in the channel's
    # plane, its extra lanes are computed and dropped, which costs less than packing
    # (RGB 3 -> 16 at 252 columns, 224 of them in whole blocks: 1.1x).
    if (n_taps > 0 and not zero_fill and g.sw == 1
            and depth * DILCONV_BLOCK_BYTES <= in_place_bytes):
        direct_w = tw - tw % nr
        in_place = True
    if in_place:
        terms.b_off = image_off
        terms.b_step = g.plane
        tail = tw - direct_w
        tail_rows = 0
        for rr in range(r1 - r0):
            first = ((r0 + rr) * g.sh + kh0 * g.dh - g.pt) * g.W + c0 + kw0 * g.dw - g.pl
            base = &x[n, ci0, 0, 0] + first
            for p in range(direct_w // nr):
                _blocks(wp, bp, out, g, n, grp, r0 + rr, c0 + p * nr, base + p * nr,
                        &terms, nr, 0, 0, block, False, True)
            if (2 * tail > nr and tail_rows == rr
                    and first + direct_w + reach + nr <= g.H * g.W):
                _blocks(wp, bp, out, g, n, grp, r0 + rr, c0 + direct_w, base + direct_w,
                        &terms, tail, 0, 0, block, False, True)
                tail_rows = rr + 1
        if tail == 0 or tail_rows == r1 - r0:
            return
        r0 = r0 + tail_rows         # the partial blocks of the last rows are packed

    # The rest of the tile, columns [c0 + direct_w, c1), a group of panels at a time and
    # their taps a chunk at a time: a chunk of the group's panels is packed just before
    # its blocks read it, and summed into every output block of the group before the
    # next chunk, so one panel's chunk stays in L1 and the chunk's weights in L2.
    c0 = c0 + direct_w
    tw = c1 - c0
    pixels = (r1 - r0) * tw
    panels = (pixels + nr - 1) // nr
    terms.b_off = packed_off
    terms.b_step = nr
    p0 = 0
    while p0 < panels:
        count = min(group * nr, pixels - p0 * nr)
        t0 = 0
        while True:
            t1 = min(n_taps, t0 + chunk_taps)
            chunk_depth = (t1 - t0) * g.Cg
            _pack_panels(&x[n, ci0, 0, 0], g, taps + t0, t1 - t0, r0, c0, tw, p0 * nr,
                         count, chunk_depth, pack)
            terms.n_seg = t1 - t0
            terms.a_off = weight_off + t0
            for p in range(p0, min(p0 + group, panels)):
                _blocks(wp, bp, out, g, n, grp, r0, c0, pack + (p - p0) * chunk_depth * nr,
                        &terms, min(nr, pixels - p * nr), p * nr, tw,
                        block + (p - p0) * wp.shape[1] * DILCONV_MR * nr, t0 > 0,
                        t1 == n_taps)
            t0 = t1
            if t0 >= n_taps:
                break
        p0 = p0 + group


cdef void _pack_panels(const floating* img, Geom g, const Py_ssize_t* taps,
                       Py_ssize_t n_taps, Py_ssize_t r0, Py_ssize_t c0, Py_ssize_t tw,
                       Py_ssize_t q0, Py_ssize_t count, Py_ssize_t depth,
                       floating* pack) noexcept nogil:
    """Tile pixels q0 .. q0+count-1 of every sum index k (tap taps[k // Cg], channel
    k % Cg of the group whose first channel is img) into pack[panel][k][lane], with
    panel, lane = divmod(q - q0, NR): zero where the tap is in the padding, and in the
    last panel's lanes past `count`. Index by index, each copying whole runs of rows:
    one block of every index in turn would read all channel planes at once, and planes a
    power of two apart evict each other from cache."""
    cdef Py_ssize_t nr = block_pixels(pack), plane = g.plane
    cdef Py_ssize_t ti, ci, k, kh, kw, q, rr, c, run, lo, hi, row_off
    cdef Py_ssize_t panels = (count + nr - 1) // nr, valid = count - (panels - 1) * nr
    cdef Py_ssize_t last = (panels - 1) * depth * nr
    for ti in range(n_taps):
        kh = taps[ti] // g.kW
        kw = taps[ti] % g.kW
        # The pixels in runs along tile rows; columns [lo, hi) of a run read the image.
        q = 0
        rr = q0 // tw
        c = c0 + q0 % tw
        while q < count:
            run = min((c0 + tw) - c, count - q)
            lo = min(max(g.ow_lo[kw], c), c + run)
            hi = max(min(g.ow_hi[kw], c + run), lo)
            row_off = (((r0 + rr) * g.sh + kh * g.dh - g.pt) * g.W
                       + lo * g.sw + kw * g.dw - g.pl)
            for ci in range(g.Cg):
                k = ti * g.Cg + ci
                # Reads run ahead of the copies (within the group's channels): the image
                # is often out of L2 by now.
                if ci + PACK_PREFETCH_CHANNELS < g.Cg:
                    prefetch(img + (ci + PACK_PREFETCH_CHANNELS) * plane + row_off)
                if lo > c:
                    pack_run(NULL, 0, lo - c, q, k, depth, pack)
                if hi > lo:
                    pack_run(img + ci * plane + row_off, g.sw, hi - lo, q + lo - c, k, depth,
                             pack)
                if hi < c + run:
                    pack_run(NULL, 0, c + run - hi, q + hi - c, k, depth, pack)
            q = q + run
            rr = rr + 1
            c = c0
        if valid < nr:
            for ci in range(g.Cg):
                memset(pack + last + (ti * g.Cg + ci) * nr + valid, 0,
                       (nr - valid) * sizeof(floating))


cdef inline void pack_run(const floating* src, Py_ssize_t step, Py_ssize_t count,
                          Py_ssize_t q, Py_ssize_t k, Py_ssize_t depth,
                          floating* pack) noexcept nogil:
    """Pixels q .. q+count-1 of sum index k into their panels (pack[panel][k][lane] with
    panel, lane = divmod(q, NR)) from src[0], src[step], ... (zeros if src is NULL)."""
    cdef Py_ssize_t nr = block_pixels(pack)
    cdef Py_ssize_t lane = q % nr, run, j = 0
    cdef floating* dst = pack + (q // nr) * depth * nr + k * nr
    while j < count:
        run = min(nr - lane, count - j)
        if src == NULL:
            memset(dst + lane, 0, run * sizeof(floating))
        elif run == nr and step == 1:
            if floating is float:
                dilconv_copy_block_f(src + j, dst)
            else:
                dilconv_copy_block_d(src + j, dst)
        elif run == nr and step == 2:
            if floating is float:
                dilconv_gather2_block_f(src + 2 * j, dst)
            else:
                dilconv_gather2_block_d(src + 2 * j, dst)
        elif step == 1:
            if floating is float:
                dilconv_copy_part_f(src + j, dst + lane, run, nr - lane)
            else:
                dilconv_copy_part_d(src + j, dst + lane, run, nr - lane)
        else:
            gather(run, src + j * step, step, dst + lane)
        j = j + run
        lane = lane + run
        if lane == nr:
            lane = 0
            dst = dst + depth * nr


cdef void _blocks(const floating[:, :, :, :, ::1] wp, const floating[:, :, ::1] bp,
                  floating[:, :, :, ::1] out, Geom g, Py_ssize_t n, Py_ssize_t grp,
                  Py_ssize_t r0, Py_ssize_t c0, const floating* b, const Terms* terms,
                  Py_ssize_t valid, Py_ssize_t q0, Py_ssize_t tw, floating* blocks,
                  bint accumulate, bint last) noexcept nogil:
    """Outputs of `valid` pixels, from pixel q0 of the rectangle at (r0, c0) of width tw
    (or from (r0, c0) along one row if tw is 0), for every output channel of the group:
    the sum of `terms`, added to the partial sums if `accumulate`. Pixels that wrap
    across rows of the rectangle are summed in `blocks` (MR x NR per block of output
    channels) and copied out with the `last` terms."""
    cdef Py_ssize_t nr = block_pixels(blocks), plane = g.Ho * g.Wo
    cdef Py_ssize_t o0 = grp * g.Og, ob, m, i, j, l, rq, cq, run
    cdef floating* block
    cdef floating* dst
    for ob in range(wp.shape[1]):
        m = min(<Py_ssize_t> DILCONV_MR, g.Og - ob * DILCONV_MR)
        if tw == 0 or tw == g.Wo or q0 // tw == (q0 + valid - 1) // tw:
            # The pixels are consecutive in `out`.
            rq = r0 + (q0 // tw if tw else 0)
            cq = c0 + (q0 % tw if tw else 0)
            ukr_packed(terms, &wp[grp, ob, 0, 0, 0], b, &bp[grp, ob, 0], accumulate,
                       &out[n, o0 + ob * DILCONV_MR, rq, cq], plane, m, valid)
            continue
        block = blocks + ob * DILCONV_MR * nr
        ukr_packed(terms, &wp[grp, ob, 0, 0, 0], b, &bp[grp, ob, 0], accumulate, block, nr,
                   DILCONV_MR, nr)
        if not last:
            continue
        # Copy the block out in runs of consecutive pixels of one tile row.
        rq = q0 // tw
        cq = q0 % tw
        l = 0
        while l < valid:
            run = min(tw - cq, valid - l)
            for i in range(m):
                dst = &out[n, o0 + ob * DILCONV_MR + i, r0 + rq, c0 + cq]
                for j in range(run):
                    dst[j] = block[i * nr + l + j]
            l = l + run
            cq = 0
            rq = rq + 1


cdef void _pack_weight_block(const floating[:, :, :, :] w, const floating[:] bias,
                             floating[:, :, :, :, ::1] wp, floating[:, :, ::1] bp,
                             Py_ssize_t block) noexcept nogil:
    """Block `block` (grp * blocks + ob) of wp[grp, ob, kh*kW + kw, ci, i] =
    w[grp*O/g + ob*MR + i, ci, kh, kw] and of bp likewise from `bias` (which may be
    empty), zero past O/g. `w` may have any strides (read through them as bytes). Taps
    innermost: a row's taps of one channel are read while their lines are in cache."""
    cdef Py_ssize_t groups = wp.shape[0], blocks = wp.shape[1], cg = wp.shape[3]
    cdef Py_ssize_t og = w.shape[0] // groups, kh_size = w.shape[2], kw_size = w.shape[3]
    cdef Py_ssize_t s_o = w.strides[0], tap_stride = cg * DILCONV_MR
    cdef Py_ssize_t grp = block // blocks, ob = block % blocks, ci, kh, kw, i
    cdef Py_ssize_t m = min(<Py_ssize_t> DILCONV_MR, og - ob * DILCONV_MR)
    cdef Py_ssize_t o = grp * og + ob * DILCONV_MR
    cdef const char* src
    cdef floating* dst
    for i in range(DILCONV_MR):
        bp[grp, ob, i] = bias[o + i] if i < m and bias.shape[0] else 0
    for ci in range(cg):
        dst = &wp[grp, ob, 0, ci, 0]
        for kh in range(kh_size):
            for kw in range(kw_size):
                src = <const char*> &w[o, ci, kh, kw]
                if m == DILCONV_MR:
                    # A constant trip count: unrolled.
                    for i in range(DILCONV_MR):
                        dst[i] = (<const floating*> (src + i * s_o))[0]
                else:
                    for i in range(DILCONV_MR):
                        dst[i] = (<const floating*> (src + i * s_o))[0] if i < m else 0
                dst = dst + tap_stride


cdef extern from "_lanes.h":
    enum: DILCONV_LANES_UR, DILCONV_LANES_DEFAULT, DILCONV_VEC_BYTES
    void dilconv_lanes_f(const float* x, Py_ssize_t px_step, Py_ssize_t cb_step,
                         Py_ssize_t n_cb, const float* w, Py_ssize_t n_taps,
                         const Py_ssize_t* x_off, const Py_ssize_t* w_off, float* acc,
                         Py_ssize_t ur, Py_ssize_t nv) noexcept nogil
    void dilconv_lanes_d(const double* x, Py_ssize_t px_step, Py_ssize_t cb_step,
                         Py_ssize_t n_cb, const double* w, Py_ssize_t n_taps,
                         const Py_ssize_t* x_off, const Py_ssize_t* w_off, double* acc,
                         Py_ssize_t ur, Py_ssize_t nv) noexcept nogil
    void dilconv_lanes_f_pack(const float* src, Py_ssize_t plane, Py_ssize_t count,
                              Py_ssize_t channels, float* dst) noexcept nogil
    Py_ssize_t dilconv_lanes_f_pack_squares(const float* src, Py_ssize_t plane,
                                            Py_ssize_t count, float* dst,
                                            Py_ssize_t step) noexcept nogil
    Py_ssize_t dilconv_lanes_d_pack_squares(const double* src, Py_ssize_t plane,
                                            Py_ssize_t count, double* dst,
                                            Py_ssize_t step) noexcept nogil
    void dilconv_lanes_d_pack(const double* src, Py_ssize_t plane, Py_ssize_t count,
                              Py_ssize_t channels, double* dst) noexcept nogil
    void dilconv_lanes_f_weights(const float* w, Py_ssize_t ld, Py_ssize_t m,
                                 Py_ssize_t cols, Py_ssize_t taps, Py_ssize_t cpad,
                                 float* dst) noexcept nogil
    void dilconv_lanes_d_weights(const double* w, Py_ssize_t ld, Py_ssize_t m,
                                 Py_ssize_t cols, Py_ssize_t taps, Py_ssize_t cpad,
                                 double* dst) noexcept nogil
    void dilconv_lanes_f_fill(const float* bias, Py_ssize_t count,
                              float* acc) noexcept nogil
    void dilconv_lanes_d_fill(const double* bias, Py_ssize_t count,
                              double* acc) noexcept nogil
    void dilconv_lanes_f_store(const float* acc, Py_ssize_t count, Py_ssize_t m,
                               Py_ssize_t plane, float* out) noexcept nogil
    void dilconv_lanes_d_store(const double* acc, Py_ssize_t count, Py_ssize_t m,
                               Py_ssize_t plane, double* out) noexcept nogil


# The lanes scheme (pyx/_lanes.h): pixels per block, and whether this tier's plans take it.
LANES_PIXELS, LANES_DEFAULT = DILCONV_LANES_UR, bool(DILCONV_LANES_DEFAULT)
# Per thread, a band's input rows packed with interleaved channels within this many bytes,
# and the partial sums of one sub-tile of the band (filled with the bias, summed a run at
# a time, stored in squares: they stay in L1).
LANES_BAND_BYTES = 2 * 1024 * 1024
LANES_TILE_BYTES = 32 * 1024
# Channels are padded to whole vectors (input) and blocks (output) with zeros: taken by
# default only while the input's adds at most this fraction of multiply-adds. Padded
# output channels cost less than the panels' packing does with few blocks to share it
# (one thread on an AVX-512 Xeon, 3 x 3 taps, 64 to 1024 input channels: lanes 1.1-2.2x
# the panels' speed with 1 to 48 output channels, 1.0-1.8x with 72 to 160; v3's code
# there 1.3-1.9x), so that side has no bound.
LANES_MAX_PADDING = 0.25
# Terms per output (taps x padded channels) below which the panels are faster: the
# squares moved in and out cost as much as a short sum (float32, one thread on an
# AVX-512 Xeon, lanes against panels in v4: 128 terms (1x2 taps) 0.85x, 144 (3x3)
# 1.12x, 192 (1x3) 1.03x, 288 1.10-1.14x, 576 1.18x, 2304 1.30x; v3's code there: 0.97x,
# 1.08x, 0.99x, 1.00-1.03x, 1.14x, 1.20x). On an AVX-512 EPYC (v4, one / two threads)
# the lanes are faster from fewer terms: 128 (1x2) 1.13x / 1.08x, 96 (1x3) 1.10x /
# 1.08x, 48 (3x1) 1.13x / 1.05x, 64 (1x2) 1.05x / 0.95x, 32 (1x2) 0.61x / 0.68x. On an
# EPYC of family 26 (Zen 5: 512-bit multiply-adds at full width, not in two halves) the
# panels' v4 code is faster up to 192 terms (float32, one / two threads: 96 (1x3) 0.71x /
# 0.87x, 128 (1x2) 0.85x / 0.84x, 144 (3x3) 0.85x / 0.83x, 192 (1x2) 0.97x / 0.87x;
# 288 (3x3) 1.00x / 1.04x, 384 (1x3) 0.99x / 1.00x; float64 alike), its v3 code is not
# (128: 1.14x, 144: 1.05x). On an AVX2 EPYC (Zen 3, v3, one / two threads) from 64:
# 32 terms (1x2, 2x2) 0.96x / 0.63-0.93x, 48 (1x3) 1.02-1.27x / 0.93-1.0x, 64 (1x2)
# 1.09x / 1.13x, 72 (3x3 x 8 channels) 1.04-1.18x / 1.08-1.11x, 32 groups of 8 1.3-2.1x.
_V3_ON_AMD = cpu_vendor() == "amd" and DILCONV_VEC_BYTES == 32
_V4_ON_ZEN5 = cpu_vendor() == "amd" and cpu_family() >= 26 and DILCONV_VEC_BYTES == 64
LANES_MIN_TERMS = (64 if _V3_ON_AMD else 288 if _V4_ON_ZEN5
                   else {"amd": 96}.get(cpu_vendor(), 144))
# Column kernels (kH x 1, as ERFNet's 3 x 1) take the panels in v3 on AMD CPUs and in v4
# on Zen 5, where the lanes measured slower (lanes against panels, one / two threads: an
# AVX2 Zen 3, 3 x 1 with 8 to 256 input channels 0.84-0.93x / 0.70-0.89x, 1 x 3 and
# 3 x 3 with 64 or 128 1.10-1.16x / 0.98-1.03x; an AVX-512 Zen 5, 3 x 1 with 64, 128 and
# 256 channels 0.85x / 0.90x, 0.89x / 0.91x, 0.98x / 0.99x, 1 x 3 with 128 0.99x / 1.05x,
# 3 x 3 1.10x / 1.06x).
LANES_COLUMN_KERNELS = not (_V3_ON_AMD or _V4_ON_ZEN5)
# Where one output block's weights exceed this, every run would read them from L2 or
# L3: a sub-tile instead takes the taps one at a time, each in chunks of channels with at
# most LANES_CHUNK_BYTES of weights per block, every block's partial sums (at most
# LANES_TAP_MAJOR_TILE_BYTES of them) taking a chunk before the next, so that a chunk's
# input serves every block; the band (up to LANES_TAP_MAJOR_BAND_BYTES of packed rows)
# need not stay in L2, and the larger it is, the fewer times the weights are read. The
# knob panel_lanes_chunk_bytes sets the chunks for any layer. One thread on an AVX-512
# Xeon, v4: DeepLab's 2048 -> 256 ASPP branch at 33 x 33, rate 6, 1.54x the speed of its
# taps summed in registers and 1.32x the panels'; 512 -> 512 at 48 x 64, 1.08-1.16x the
# registers'; at 64 x 64 (dilation 4) 0.98-1.07x, the same as the panels.
LANES_BLOCK_WEIGHT_BYTES = 512 * 1024
# Taps one at a time too, in v4 on Intel CPUs, where that makes the runs of pixels this many
# times longer on average (runs, each of its taps weighted, between the column taps' range
# ends): borders of thin segments that only some taps reach (an AVX-512 Xeon, float32, one
# / two threads: aspp_r6, runs 1.4x longer, 1.08x / 1.0-1.03x the speed; aspp_r18, 1.3x,
# 1.14x / 1.11x; where runs were as long either way, 128 to 384 channels at 17 x 17 to
# 65 x 65, 0.95-1.01x / 0.92-1.1x). None: not measured elsewhere.
LANES_TAP_MAJOR_RUN_GAIN = 1.2 if cpu_vendor() == "intel" and DILCONV_VEC_BYTES == 64 else None
# Narrower tiers' blocks (v3's 16 float32 channels; SSE2's, whose lanes run only where the
# knob forces them) take chunks of 4 KB, however many blocks: a chunk's input for a
# sub-tile then stays in L2 for every block (float32 on an AVX2 Zen 3, against 64 KB:
# 2048 -> 21 at 41 x 41 2.9x / 1.4x the speed at one / two threads, 1024 -> 48 at 64 x 64
# 1.4x / 1.3x, 1024 -> 21 1.15x / 1.2x, 2048 -> 256 at 33 x 33 1.27x at one; float64
# 0.95-1.1x, within the noise). v4 on Intel CPUs takes 16 KB, a chunk's weights then in
# L1 while its runs read them (an AVX-512 Xeon, float32, one / two threads, against 64 KB:
# 2048 -> 256 at 33 x 33, rate 6, 1.10x / 1.06x; 512 -> 512 at 64 x 64, dilation 4,
# 1.06x / 1.06x; 32 KB 1.04-1.09x; aspp_r6 and aspp_r18 1.00-1.02x).
LANES_CHUNK_BYTES = (4 * 1024 if DILCONV_VEC_BYTES != 64
                     else 16 * 1024 if cpu_vendor() == "intel" else 64 * 1024)
# With one output block, no other block shares a chunk's input: smaller chunks, whose
# weights stay in L1 while each run of pixels reads them (one thread on an AVX-512 EPYC,
# v4, against 64 KB: 2048 -> 21 and 2048 -> 32 at 41 x 41, 512 -> 19 at 64 x 64, 1.18-1.29x;
# with two blocks, 1024 -> 48 at 64 x 64, 16 KB was 0.98x).
LANES_ONE_BLOCK_CHUNK_BYTES = 16 * 1024 if DILCONV_VEC_BYTES == 64 else 4 * 1024
LANES_TAP_MAJOR_BAND_BYTES = 16 * 1024 * 1024
LANES_TAP_MAJOR_TILE_BYTES = 1024 * 1024


# Output rows of this many panel blocks or more take the panels, not merged pairs of
# groups (None: any width): on an AVX-512 EPYC (v4, one and two threads, 32 groups of
# 8 -> 8) the panels, whose blocks read the image in place, were 1.07-1.19x faster at 64,
# 65 and 129 columns, and merged pairs 1.2-1.45x faster at 33 to 48.
LANES_MERGE_MAX_ROW_BLOCKS = {"amd": 2}.get(cpu_vendor())


def lanes_layout(spec, Py_ssize_t itemsize):
    """(L, OB, padded input channels, output blocks) of the lanes scheme in this tier."""
    lanes = DILCONV_VEC_BYTES // itemsize
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    return lanes, 2 * lanes, ceil_div(cg, lanes) * lanes, ceil_div(og, 2 * lanes)


def uses_lanes(spec, Py_ssize_t itemsize, tuning):
    """Whether the forward takes the lanes scheme: the `panel_lanes` knob if set; else, in
    tiers that prefer it, where input channel padding adds little, the sums are long
    enough, the kernel is not a column where the tier's plans say so, and kH input rows
    of a band fit its packed rows."""
    if tuning.panel_lanes is not None:
        return tuning.panel_lanes
    if not DILCONV_LANES_DEFAULT:
        return False
    cpad = lanes_layout(spec, itemsize)[2]
    cg = spec.c // spec.groups
    return (cpad <= (1 + LANES_MAX_PADDING) * cg
            and spec.kh * spec.kw * cpad >= LANES_MIN_TERMS
            and (LANES_COLUMN_KERNELS or spec.kw > 1 or spec.kh == 1)
            and spec.kh * spec.w * cpad * itemsize <= LANES_BAND_BYTES)


def lanes_merged_groups(spec, Py_ssize_t itemsize, tuning):
    """Groups summed together in the lanes scheme (1: none): where a group's input
    channels fill half a vector, pairs of groups as one with block-diagonal weights, each
    output's other half of the terms zero (for finite inputs, those add zeros: the same
    sums but for the sign of a zero). Twice the multiply-adds of the layer, against four
    times with half-empty vectors of channels, or the panels' packing for each block of
    few output channels (ResNeXt's 32 groups of 8 -> 8 at 65 x 65, dilation 2: 1.4x the
    panels' speed, float32, one thread on an AVX-512 Xeon)."""
    lanes = DILCONV_VEC_BYTES // itemsize
    cg, og = spec.c // spec.groups, spec.o // spec.groups
    if (tuning.panel_lanes is not None or not DILCONV_LANES_DEFAULT or 2 * cg != lanes
            or spec.groups % 2):
        return 1
    if (LANES_MERGE_MAX_ROW_BLOCKS is not None and spec.stride[1] == 1
            and spec.wo >= LANES_MERGE_MAX_ROW_BLOCKS * (DILCONV_BLOCK_BYTES // itemsize)):
        return 1
    return 2 if uses_lanes(_merged_spec(spec, 2), itemsize, tuning) else 1


def _merged_spec(spec, Py_ssize_t k):
    """`spec` with every k groups one."""
    return ConvSpec(spec.n, spec.c, spec.h, spec.w, spec.o, spec.kh, spec.kw, spec.stride,
                    spec.dilation, spec.padding, spec.groups // k)


def _merged_weight(spec, weight, Py_ssize_t k):
    """The weights of _merged_spec(spec, k), block-diagonal: output o of a merged group
    reads its own group's channels, zeros elsewhere."""
    g, og, cg = spec.groups, spec.o // spec.groups, spec.c // spec.groups
    w = np.asarray(weight).reshape(g // k, k, og, cg, spec.kh, spec.kw)
    merged = np.zeros((g // k, k, og, k, cg, spec.kh, spec.kw), w.dtype)
    for j in range(k):
        merged[:, j, :, j] = w[:, j]
    return merged.reshape(spec.o, k * cg, spec.kh, spec.kw)


def lanes_tap_major_runs_longer(spec, bint zero_fill):
    """Whether a tap at a time makes the runs of pixels LANES_TAP_MAJOR_RUN_GAIN times
    longer on average than the taps that reach a segment of columns summed together, each
    run weighted by its taps (the same pixels either way: fewer runs, longer ones). With
    `zero_fill`, a row is one run of every column tap either way."""
    if LANES_TAP_MAJOR_RUN_GAIN is None or zero_fill:
        return False
    cdef Py_ssize_t ur = DILCONV_LANES_UR
    reach = [(lo, hi) for lo, hi in zip(spec.ow_lo.tolist(), spec.ow_hi.tolist()) if lo < hi]
    edges = range_edges(spec.ow_lo, spec.ow_hi, spec.wo)
    runs = sum(sum(lo <= a and b <= hi for lo, hi in reach) * ceil_div(b - a, ur)
               for a, b in zip(edges, edges[1:]))
    tap_runs = sum(ceil_div(hi - lo, ur) for lo, hi in reach)
    return tap_runs > 0 and runs >= LANES_TAP_MAJOR_RUN_GAIN * tap_runs


def lanes_band_rows(spec, Py_ssize_t row_bytes, Py_ssize_t budget):
    """Output rows per band, for packed input rows of `row_bytes`: the whole image if its
    rows fit `budget` bytes, else as many as kH row taps reading (band - 1) * sh + 1
    rows each allow (at least one); bands of about equal size."""
    cdef Py_ssize_t fit = max(1, budget // row_bytes), sh = spec.stride[0]
    cdef Py_ssize_t band = (spec.ho if spec.h <= fit
                            else max(1, (fit // spec.kh - 1) // sh + 1))
    return ceil_div(spec.ho, ceil_div(spec.ho, min(band, spec.ho)))


cdef inline void lanes_ukr(const floating* x, Py_ssize_t px_step, Py_ssize_t cb_step,
                           Py_ssize_t n_cb, const floating* w, Py_ssize_t n_taps,
                           const Py_ssize_t* x_off, const Py_ssize_t* w_off, floating* acc,
                           Py_ssize_t ur, Py_ssize_t nv) noexcept nogil:
    if floating is float:
        dilconv_lanes_f(x, px_step, cb_step, n_cb, w, n_taps, x_off, w_off, acc, ur, nv)
    else:
        dilconv_lanes_d(x, px_step, cb_step, n_cb, w, n_taps, x_off, w_off, acc, ur, nv)


cdef inline void lanes_pack(const floating* src, Py_ssize_t plane, Py_ssize_t count,
                            Py_ssize_t channels, floating* dst) noexcept nogil:
    if floating is float:
        dilconv_lanes_f_pack(src, plane, count, channels, dst)
    else:
        dilconv_lanes_d_pack(src, plane, count, channels, dst)


cdef inline Py_ssize_t pack_squares(const floating* src, Py_ssize_t plane, Py_ssize_t count,
                                    floating* dst, Py_ssize_t step) noexcept nogil:
    if floating is float:
        return dilconv_lanes_f_pack_squares(src, plane, count, dst, step)
    else:
        return dilconv_lanes_d_pack_squares(src, plane, count, dst, step)


cdef inline void lanes_fill(const floating* bias, Py_ssize_t count,
                            floating* acc) noexcept nogil:
    if floating is float:
        dilconv_lanes_f_fill(bias, count, acc)
    else:
        dilconv_lanes_d_fill(bias, count, acc)


cdef inline void lanes_store(const floating* acc, Py_ssize_t count, Py_ssize_t m,
                             Py_ssize_t plane, floating* out) noexcept nogil:
    if floating is float:
        dilconv_lanes_f_store(acc, count, m, plane, out)
    else:
        dilconv_lanes_d_store(acc, count, m, plane, out)


cdef void _pack_lanes_weights(const floating[:, :, :, :] w, const floating[:] bias,
                              floating[:, :, :, :, ::1] wl, floating[:, :, ::1] bl,
                              Py_ssize_t block) noexcept nogil:
    """Block `block` (grp * blocks + ob) of wl[grp, ob, kh*kW + kw, ci, o] =
    w[grp*O/g + ob*OB + o, ci, kh, kw] and of bl likewise from `bias` (which may be
    empty), zero past O/g and C/g. `w` may have any strides (read as bytes)."""
    cdef Py_ssize_t blocks = wl.shape[1], cpad = wl.shape[3], ob_size = wl.shape[4]
    cdef Py_ssize_t og = w.shape[0] // wl.shape[0], cg = w.shape[1], kw_size = w.shape[3]
    cdef Py_ssize_t s_o = w.strides[0], grp = block // blocks, ob = block % blocks
    cdef Py_ssize_t m = min(ob_size, og - ob * ob_size), o = grp * og + ob * ob_size
    cdef Py_ssize_t ci, t, i, kh, kw, taps = wl.shape[2], item = sizeof(floating)
    cdef const char* src
    cdef floating* dst
    for i in range(ob_size):
        bl[grp, ob, i] = bias[o + i] if i < m and bias.shape[0] else 0
    if (w.strides[3] == item and w.strides[2] == kw_size * item
            and w.strides[1] == taps * item and s_o % item == 0):
        # Each row's terms contiguous (the forward's weights): moved in squares.
        if floating is float:
            dilconv_lanes_f_weights(&w[o, 0, 0, 0], s_o // item, m, cg * taps,
                                    taps, cpad, &wl[grp, ob, 0, 0, 0])
        else:
            dilconv_lanes_d_weights(&w[o, 0, 0, 0], s_o // item, m, cg * taps,
                                    taps, cpad, &wl[grp, ob, 0, 0, 0])
        for t in range(taps):
            for ci in range(cg, cpad):
                memset(&wl[grp, ob, t, ci, 0], 0, ob_size * sizeof(floating))
        return
    # Any strides (the input gradient's transposed, turned kernel, whose rows are 36
    # bytes apart for 3 x 3 taps): per channel and tap, the block's values gathered from
    # the channel's rows (a few lines, in L1 across its taps) and written in one run.
    # (Written a value at a time to each tap's run, whole runs apart, the packing took
    # 10% of aspp_r6's input gradient.)
    if m < ob_size or cg < cpad:
        memset(&wl[grp, ob, 0, 0, 0], 0, taps * cpad * ob_size * sizeof(floating))
    cdef Py_ssize_t s_c = w.strides[1], s_h = w.strides[2], s_w = w.strides[3]
    cdef Py_ssize_t kh_size = w.shape[2]
    cdef const char* row = <const char*> &w[o, 0, 0, 0]
    for ci in range(cg):
        prefetch(row + (ci + 1) * s_c)         # the next channel's rows: far apart
        for kh in range(kh_size):
            for kw in range(kw_size):
                src = row + ci * s_c + kh * s_h + kw * s_w
                dst = &wl[grp, ob, kh * kw_size + kw, ci, 0]
                for i in range(m):
                    dst[i] = (<const floating*> (src + i * s_o))[0]


cdef Py_ssize_t _band_rows(Geom g, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t* row_slot,
                           Py_ssize_t* segments, Py_ssize_t* taken) noexcept nogil:
    # The input rows the row taps read for output rows [r0, r1) in the image, merged into
    # segments (first row, stop row, first slot) of rows packed once each; returns their
    # count. A row's slot in the packed band is row_slot[kh] + row. The taps are taken in
    # the order of their first rows (with a stride, a tap's first row in the image need
    # not rise with kh).
    cdef Py_ssize_t kh, best, first, stop, best_first = 0, n_seg = 0, slots = 0
    for kh in range(g.kH):
        taken[kh] = max(r0, g.oh_lo[kh]) >= min(r1, g.oh_hi[kh])
    while True:
        best = -1
        for kh in range(g.kH):
            first = max(r0, g.oh_lo[kh]) * g.sh + kh * g.dh - g.pt
            if not taken[kh] and (best < 0 or first < best_first):
                best, best_first = kh, first
        if best < 0:
            return n_seg
        taken[best] = 1
        stop = (min(r1, g.oh_hi[best]) - 1) * g.sh + best * g.dh - g.pt + 1
        if n_seg == 0 or best_first >= segments[3 * n_seg - 2]:
            segments[3 * n_seg] = best_first
            segments[3 * n_seg + 1] = best_first
            segments[3 * n_seg + 2] = slots
            n_seg = n_seg + 1
        if stop > segments[3 * n_seg - 2]:
            slots = slots + stop - segments[3 * n_seg - 2]
            segments[3 * n_seg - 2] = stop
        row_slot[best] = segments[3 * n_seg - 1] - segments[3 * n_seg - 3]


cdef bint _pack_band(const floating[:, :, :, :] x, Geom g, Py_ssize_t unit,
                     const Py_ssize_t* segments, Py_ssize_t n_seg, Py_ssize_t cb0,
                     Py_ssize_t cb1, Py_ssize_t cb_step, Py_ssize_t row_w, Py_ssize_t pad_l,
                     floating* packed, bint check) noexcept nogil:
    # Channel blocks [cb0, cb1) of the band's segments of input rows (image and group of
    # band `unit`), interleaved, in packed rows of row_w pixels: the image's from pad_l,
    # zeros around them. With `check`, returns whether those rows are finite (tested just
    # before they are packed, while in cache); else True.
    cdef Py_ssize_t lanes = DILCONV_VEC_BYTES // sizeof(floating)
    cdef Py_ssize_t grp = unit % (g.groups * g.Ho) // g.Ho, n = unit // (g.groups * g.Ho)
    cdef Py_ssize_t s, cb, first, stop, r, channels, c
    cdef bint finite = True
    cdef floating* dst
    for s in range(n_seg):
        first = segments[3 * s]
        stop = segments[3 * s + 1]
        for cb in range(cb0, cb1):
            channels = min(lanes, g.Cg - cb * lanes)
            dst = packed + cb * cb_step + segments[3 * s + 2] * row_w * lanes
            if check:
                for c in range(channels):
                    finite = finite & all_finite(
                        &x[n, grp * g.Cg + cb * lanes + c, first, 0], (stop - first) * g.W)
            if row_w == g.W and pad_l == 0:
                lanes_pack(&x[n, grp * g.Cg + cb * lanes, first, 0], g.plane,
                           (stop - first) * g.W, channels, dst)
                continue
            for r in range(first, stop):
                memset(dst, 0, pad_l * lanes * sizeof(floating))
                lanes_pack(&x[n, grp * g.Cg + cb * lanes, r, 0], g.plane, g.W,
                           channels, dst + pad_l * lanes)
                memset(dst + (pad_l + g.W) * lanes, 0,
                       (row_w - pad_l - g.W) * lanes * sizeof(floating))
                dst = dst + row_w * lanes
    return finite


cdef inline void _lanes_runs(const floating* x, Py_ssize_t px_step, Py_ssize_t cb_step,
                             Py_ssize_t n_cb, const floating* w, Py_ssize_t n_taps,
                             const Py_ssize_t* x_off, const Py_ssize_t* w_off, floating* acc,
                             Py_ssize_t length, Py_ssize_t m) noexcept nogil:
    # `length` pixels from x (px_step apart) and acc (a block apart) in runs of at most UR,
    # of about equal length, for a block of m channels: one vector of them if m <= L.
    cdef Py_ssize_t runs = ceil_div(length, DILCONV_LANES_UR), k, ur
    cdef Py_ssize_t lanes = DILCONV_VEC_BYTES // sizeof(floating), ob_size = 2 * lanes
    cdef Py_ssize_t nv = 1 if m <= lanes else 2
    for k in range(runs if n_taps else 0):
        ur = length // runs + (1 if k < length % runs else 0)
        lanes_ukr(x, px_step, cb_step, n_cb, w, n_taps, x_off, w_off, acc, ur, nv)
        x = x + ur * px_step
        acc = acc + ur * ob_size


cdef inline Py_ssize_t _band_offset(Geom g, const Py_ssize_t* row_slot, Py_ssize_t kh,
                                    Py_ssize_t kw, Py_ssize_t r, Py_ssize_t row_w,
                                    Py_ssize_t pad_l, Py_ssize_t lanes) noexcept nogil:
    # Where tap (kh, kw) of output row r, column 0, reads a packed band (_pack_band's
    # layout: rows of row_w pixels of `lanes` channels, the image's from pad_l).
    return ((row_slot[kh] + r * g.sh + kh * g.dh - g.pt) * row_w
            + kw * g.dw - g.pl + pad_l) * lanes


cdef inline void _lanes_store_tile(const floating* acc, floating[:, :, :, ::1] out, Geom g,
                                   Py_ssize_t n, Py_ssize_t o, Py_ssize_t m, Py_ssize_t tr0,
                                   Py_ssize_t tr1, Py_ssize_t tc0, Py_ssize_t tc1) noexcept nogil:
    # A sub-tile's sums of one block (m channels from o) into out[n, o:o+m, tr0:tr1, tc0:tc1].
    cdef Py_ssize_t tw = tc1 - tc0, r, ob_size = 2 * (DILCONV_VEC_BYTES // sizeof(floating))
    if tw == g.Wo:
        lanes_store(acc, (tr1 - tr0) * tw, m, g.Ho * g.Wo, &out[n, o, tr0, 0])
    else:
        for r in range(tr0, tr1):
            lanes_store(acc + (r - tr0) * tw * ob_size, tw, m, g.Ho * g.Wo, &out[n, o, r, tc0])


cdef void _lanes_band(const floating[:, :, :, :, ::1] wl,     # IN  (groups, blocks, taps,
                                                             #      Cpad, OB)
                      const floating[:, :, ::1] bl,           # IN  (groups, blocks, OB)
                      floating[:, :, :, ::1] out,             # OUT (N, O, Ho, Wo)
                      Geom g, Py_ssize_t unit, Py_ssize_t r1, Py_ssize_t ob0,
                      Py_ssize_t ob1, Py_ssize_t tile_rows, Py_ssize_t tile_cols,
                      Py_ssize_t cb_step, Py_ssize_t chunk_cb, const floating* packed,
                      floating* acc, const Py_ssize_t* row_slot, Py_ssize_t* offsets,
                      Py_ssize_t row_w, Py_ssize_t pad_l) noexcept nogil:
    # Output blocks [ob0, ob1) of band `unit` (output rows r0 = unit % Ho to r1 of one
    # image and group) from its packed rows (row_w pixels, the image's from pad_l), a
    # sub-tile of partial sums (from the bias in `acc`) at a time, then stored. With
    # chunk_cb == 0, a block at a time, each run of pixels of one row that the same taps
    # reach sums those taps in order in registers; else every block's sums at once (acc
    # holds a sub-tile per block), the taps one at a time, each in chunks of chunk_cb
    # channel blocks taken by every block in turn. With zero columns around the image
    # (pad_l > 0 or row_w > W), a row is one run of every column tap that reaches the
    # image anywhere.
    cdef Py_ssize_t lanes = DILCONV_VEC_BYTES // sizeof(floating), ob_size = 2 * lanes
    cdef Py_ssize_t n_cb = wl.shape[3] // lanes
    cdef bint zero_fill = row_w != g.W or pad_l != 0
    cdef Py_ssize_t tap_len = wl.shape[3] * ob_size, px_step = g.sw * lanes
    cdef Py_ssize_t r0 = unit % g.Ho, grp = unit % (g.groups * g.Ho) // g.Ho
    cdef Py_ssize_t n = unit // (g.groups * g.Ho)
    cdef Py_ssize_t tr0, tr1, tc0, tc1, tw, ob, kh, kw, kh0, kh1, kw0, kw1, r, a, b
    cdef Py_ssize_t n_taps, cb0, tile_len
    cdef Py_ssize_t* x_off = offsets
    cdef Py_ssize_t* w_off = offsets + g.kH * g.kW
    tr0 = r0
    while tr0 < r1:
        tr1 = min(r1, tr0 + tile_rows)
        tc0 = 0
        while tc0 < g.Wo:
            tc1 = min(g.Wo, tc0 + tile_cols)
            tw = tc1 - tc0
            tile_len = (tr1 - tr0) * tw * ob_size
            if chunk_cb:
                # Every block's partial sums at once: a chunk's input serves all of them.
                for ob in range(ob0, ob1):
                    lanes_fill(&bl[grp, ob, 0], (tr1 - tr0) * tw, acc + (ob - ob0) * tile_len)
                for kh in range(g.kH):
                    for kw in range(g.kW):
                        a, b = max(tc0, g.ow_lo[kw]), min(tc1, g.ow_hi[kw])
                        if zero_fill and a < b:
                            a, b = tc0, tc1
                        if a >= b:
                            continue
                        w_off[0] = 0
                        cb0 = 0
                        while cb0 < n_cb:
                            for ob in range(ob0, ob1):
                                for r in range(max(tr0, g.oh_lo[kh]), min(tr1, g.oh_hi[kh])):
                                    x_off[0] = _band_offset(g, row_slot, kh, kw, r, row_w,
                                                            pad_l, lanes)
                                    _lanes_runs(packed + cb0 * cb_step + a * px_step,
                                                px_step, cb_step, min(chunk_cb, n_cb - cb0),
                                                &wl[grp, ob, kh * g.kW + kw, cb0 * lanes, 0],
                                                1, x_off, w_off,
                                                acc + (ob - ob0) * tile_len
                                                + ((r - tr0) * tw + a - tc0) * ob_size, b - a,
                                                g.Og - ob * ob_size)
                            cb0 = cb0 + chunk_cb
                for ob in range(ob0, ob1):
                    _lanes_store_tile(acc + (ob - ob0) * tile_len, out, g, n,
                                      grp * g.Og + ob * ob_size,
                                      min(ob_size, g.Og - ob * ob_size), tr0, tr1, tc0, tc1)
            else:
                for ob in range(ob0, ob1):
                    lanes_fill(&bl[grp, ob, 0], (tr1 - tr0) * tw, acc)
                    for r in range(tr0, tr1):
                        _taps_at(g.oh_lo, g.oh_hi, g.kH, r, &kh0, &kh1)
                        if kh0 >= kh1:
                            continue
                        # Column segments [a, b) reached by the same column taps [kw0, kw1).
                        a = tc0
                        while a < tc1:
                            kw0, kw1, b = 0, g.kW, tc1
                            if not zero_fill:
                                _taps_at(g.ow_lo, g.ow_hi, g.kW, a, &kw0, &kw1)
                                for kw in range(g.kW):
                                    if a < g.ow_lo[kw] < b:
                                        b = g.ow_lo[kw]
                                    if a < g.ow_hi[kw] < b:
                                        b = g.ow_hi[kw]
                            n_taps = 0
                            for kh in range(kh0, kh1):
                                for kw in range(kw0, kw1):
                                    if g.ow_lo[kw] >= g.ow_hi[kw]:
                                        continue
                                    x_off[n_taps] = _band_offset(g, row_slot, kh, kw, r,
                                                                 row_w, pad_l, lanes)
                                    w_off[n_taps] = (kh * g.kW + kw) * tap_len
                                    n_taps = n_taps + 1
                            _lanes_runs(packed + a * px_step, px_step, cb_step, n_cb,
                                        &wl[grp, ob, 0, 0, 0], n_taps, x_off, w_off,
                                        acc + ((r - tr0) * tw + a - tc0) * ob_size, b - a,
                                        g.Og - ob * ob_size)
                            a = b
                    _lanes_store_tile(acc, out, g, n, grp * g.Og + ob * ob_size,
                                      min(ob_size, g.Og - ob * ob_size), tr0, tr1, tc0, tc1)
            tc0 = tc1
        tr0 = tr1


def _forward_lanes(const floating[:, :, :, :] x, weight, bias,
                   floating[:, :, :, ::1] out, spec, tuning, bint check_finite=False):
    """The forward in the lanes scheme. The plan: bands of output rows whose packed input
    rows (at most kH per output row) fit LANES_BAND_BYTES, each a task that packs its rows
    and sums every output block; where that gives fewer than two tasks per thread, the
    bands one at a time, each packed once by all threads, its output blocks the tasks
    (and its rows, where blocks alone give fewer than two tasks per thread).
    Sub-tiles of LANES_TILE_BYTES of partial sums. Where a block's weights pass
    LANES_BLOCK_WEIGHT_BYTES (or lanes_tap_major_runs_longer), taps one at a time in
    chunks: bands of LANES_TAP_MAJOR_BAND_BYTES, sub-tiles of LANES_TAP_MAJOR_TILE_BYTES
    for every block, and a shared band's tasks are its rows, not its blocks. The weights
    are packed as (groups, blocks, kH*kW, C/g padded, OB), zero past C/g and O/g. With
    `check_finite`, returns whether the input was finite (else `out` is not the
    convolution); else True."""
    cdef Geom g = make_geom(spec)
    g.plane = _plane_stride(x)
    lanes, ob_size, cpad, blocks = lanes_layout(spec, sizeof(floating))
    cdef Py_ssize_t L = lanes, OB = ob_size, n_cb = cpad // lanes, nob = blocks
    # Border columns reading zeros (the panels' rule), where some column taps reach a
    # segment of the row too narrow for a good run (stride2_d2: 1 pixel; 7% faster,
    # where context_d8's 8-pixel borders were 3% slower): packed rows as wide as the
    # columns the taps read, with the padding's zeros.
    cdef Py_ssize_t row_w = g.W, pad_l = 0
    edges = range_edges(spec.ow_lo, spec.ow_hi, g.Wo)
    narrowest = min(b - a for a, b in zip(edges, edges[1:]))
    if narrowest < DILCONV_LANES_UR // 2 and fills_zero_columns(spec, weight, tuning):
        pad_l = g.pl
        row_w = max(g.pl + g.W, (g.Wo - 1) * g.sw + (g.kW - 1) * g.dw + 1)
    cdef Py_ssize_t cb_bytes = L * OB * sizeof(floating), chunk_cb = 0
    chunk_bytes = tuning.panel_lanes_chunk_bytes
    zero_fill = row_w != g.W or pad_l != 0
    if chunk_bytes is None and (g.kH * g.kW * n_cb * cb_bytes > LANES_BLOCK_WEIGHT_BYTES
                                or lanes_tap_major_runs_longer(spec, zero_fill)):
        chunk_bytes = LANES_CHUNK_BYTES if nob > 1 else LANES_ONE_BLOCK_CHUNK_BYTES
    if chunk_bytes is not None:
        chunk_cb = ceil_div(n_cb, ceil_div(n_cb, max(1, chunk_bytes // cb_bytes)))
    # A tap at a time, every block's sums of a sub-tile at once: the band need not stay
    # in L2, and the larger it is the fewer times the weights are read.
    cdef Py_ssize_t band = lanes_band_rows(
        spec, row_w * cpad * sizeof(floating),
        LANES_TAP_MAJOR_BAND_BYTES if chunk_cb else LANES_BAND_BYTES)
    cdef Py_ssize_t bands = ceil_div(g.Ho, band)
    cdef Py_ssize_t slot_rows = min(g.H, g.kH * ((band - 1) * g.sh + 1))
    # A line between channel blocks: whole planes apart, they would share cache sets.
    cdef Py_ssize_t cb_step = slot_rows * row_w * L + L
    cdef Py_ssize_t tile_blocks = nob if chunk_cb else 1
    cdef Py_ssize_t tile_pixels = max(1, (LANES_TAP_MAJOR_TILE_BYTES if chunk_cb else
                                          LANES_TILE_BYTES)
                                      // (tile_blocks * OB * sizeof(floating)))
    cdef Py_ssize_t tile_cols = g.Wo if g.Wo <= tile_pixels else ceil_div(
        g.Wo, ceil_div(g.Wo, tile_pixels))
    cdef Py_ssize_t tile_rows = max(1, tile_pixels // tile_cols)
    cdef Py_ssize_t n_units = g.N * g.groups * bands
    # Tasks: bands, or a shared band's blocks and rows.
    cdef int n_threads = kernel_threads(spec, n_units * nob * band, tuning)
    cdef bint shared = n_threads > 1 and n_units < 2 * n_threads
    dtype = np.float32 if floating is float else np.float64
    cdef Py_ssize_t pack_len = n_cb * cb_step
    cdef Py_ssize_t acc_len = tile_rows * tile_cols * OB * tile_blocks
    cdef floating[::1] shared_pack = aligned_empty(pack_len if shared else 1, dtype)
    cdef floating[:, ::1] scratch = thread_scratch(
        n_threads, acc_len + (0 if shared else pack_len), dtype)
    # Per thread: row slots, segments and marks of the row taps (5 kH), tap offsets.
    cdef Py_ssize_t[:, ::1] rows_scratch = thread_scratch(
        n_threads, 5 * g.kH + 2 * g.kH * g.kW, np.intp)
    cdef unsigned char[::1] nonfinite = np.zeros(n_threads, dtype=np.uint8)
    cdef floating[:, :, :, :, ::1] wl = aligned_empty(
        (g.groups, nob, g.kH * g.kW, cpad, OB), dtype)
    cdef floating[:, :, ::1] bl = np.empty((g.groups, nob, OB), dtype=dtype)
    cdef const floating[:, :, :, :] w_view = weight
    cdef const floating[:] b_view = bias
    cdef Py_ssize_t task, tid, block, i, unit, r0, n_seg, cb, ob
    cdef Py_ssize_t task_unit, task_r0, task_seg, rows, row_tasks, task_rows
    cdef Py_ssize_t task_blocks, block_tasks
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for block in prange(g.groups * nob, schedule='static'):
            _pack_lanes_weights(w_view, b_view, wl, bl, block)
        if shared:
            for i in range(n_units):
                # Units are numbered by their first output row: (n, grp, r0).
                r0 = i % bands * band
                unit = i // bands * g.Ho + r0
                n_seg = _band_rows(g, r0, min(g.Ho, r0 + band), &rows_scratch[tid, 0],
                                   &rows_scratch[tid, g.kH], &rows_scratch[tid, 4 * g.kH])
                for cb in prange(n_cb, schedule='static'):
                    if not _pack_band(x, g, unit, &rows_scratch[tid, g.kH], n_seg, cb,
                                      cb + 1, cb_step, row_w, pad_l, &shared_pack[0],
                                      check_finite):
                        nonfinite[tid] = 1
                # Tasks of rows of the band (a shared band is all the work there is):
                # every block each with taps in chunks, as many as sub-tiles rounded up
                # to a multiple of the threads; else one block each, split into rows
                # where blocks alone give fewer than two tasks per thread.
                rows = min(band, g.Ho - r0)
                task_blocks = nob if chunk_cb else 1
                row_tasks = min(rows, ceil_div(ceil_div(rows, tile_rows), n_threads)
                                * n_threads if chunk_cb else ceil_div(2 * n_threads, nob))
                task_rows = ceil_div(rows, row_tasks)
                row_tasks = ceil_div(rows, task_rows)
                block_tasks = nob // task_blocks
                for task in prange(block_tasks * row_tasks, schedule='dynamic'):
                    task_r0 = r0 + task // block_tasks * task_rows
                    ob = task % block_tasks * task_blocks
                    _lanes_band(wl, bl, out, g, unit + task_r0 - r0,
                                min(r0 + rows, task_r0 + task_rows), ob, ob + task_blocks,
                                tile_rows, tile_cols, cb_step, chunk_cb, &shared_pack[0],
                                &scratch[tid, 0], &rows_scratch[tid, 0],
                                &rows_scratch[tid, 5 * g.kH], row_w, pad_l)
        else:
            for task in prange(n_units, schedule='dynamic'):
                task_r0 = task % bands * band
                task_unit = task // bands * g.Ho + task_r0
                task_seg = _band_rows(g, task_r0, min(g.Ho, task_r0 + band),
                                      &rows_scratch[tid, 0], &rows_scratch[tid, g.kH],
                                      &rows_scratch[tid, 4 * g.kH])
                if not _pack_band(x, g, task_unit, &rows_scratch[tid, g.kH], task_seg, 0,
                                  n_cb, cb_step, row_w, pad_l, &scratch[tid, acc_len],
                                  check_finite):
                    nonfinite[tid] = 1
                _lanes_band(wl, bl, out, g, task_unit, min(g.Ho, task_r0 + band), 0, nob,
                            tile_rows, tile_cols, cb_step, chunk_cb, &scratch[tid, acc_len],
                            &scratch[tid, 0], &rows_scratch[tid, 0],
                            &rows_scratch[tid, 5 * g.kH], row_w, pad_l)
    return not np.asarray(nonfinite).any()


cdef Py_ssize_t _plane_stride(const floating[:, :, :, :] x) except -1:
    # The forward's input may have channel planes lying apart (a view of some channels of
    # an image, or of some rows of every channel), each plane C-contiguous: the packing
    # reads rows of W items, channel planes `plane` items apart.
    # (Strides of axes of one item do not matter, as numpy's own contiguity says.)
    cdef Py_ssize_t item = sizeof(floating)
    if ((x.shape[3] > 1 and x.strides[3] != item)
            or (x.shape[2] > 1 and x.strides[2] != x.shape[3] * item)
            or (x.shape[1] > 1 and x.strides[1] % item)):
        raise ValueError("the panel forward's input planes must be C-contiguous")
    return x.strides[1] // item if x.shape[1] > 1 else x.shape[2] * x.shape[3]


def forward(const floating[:, :, :, :] x, weight, bias, floating[:, :, :, ::1] out,
            spec, tuning):
    """conv2d into `out`. `weight` (O, C/g, kH, kW) and `bias` ((O,) or empty) may be any
    strided views (the input gradient passes the transposed, turned kernel); `x` too where
    each channel plane is C-contiguous (`planes_contiguous`).

    The plan: tiles aligned with the tap ranges (of the rows only where few zeros would be
    multiplied in border columns and the weights are finite: zero-filled tiles), of about
    PANEL_PACK_BYTES of input terms; per thread, a group of panels packed a chunk of
    taps at a time, the group's output blocks (for those that wrap across tile rows),
    and the tile's taps with their weight, image and panel offsets. The weights are
    packed as (groups, ceil(O/g / MR), kH*kW, C/g, MR), zero past O/g."""
    if uses_lanes(spec, sizeof(floating), tuning):
        _forward_lanes(x, weight, bias, out, spec, tuning)
        return
    # Pairs of groups merged: only for finite inputs (0 * inf is nan), else the panels
    # write every output again.
    cdef Py_ssize_t merge = lanes_merged_groups(spec, sizeof(floating), tuning)
    if merge > 1 and _forward_lanes(x, _merged_weight(spec, weight, merge), bias, out,
                                    _merged_spec(spec, merge), tuning, True):
        return
    cdef Geom g = make_geom(spec)
    g.plane = _plane_stride(x)
    cdef Py_ssize_t nr = DILCONV_BLOCK_BYTES // sizeof(floating)
    cdef Py_ssize_t taps = g.kH * g.kW, depth = taps * g.Cg
    cdef Py_ssize_t blocks = (g.Og + DILCONV_MR - 1) // DILCONV_MR
    # Taps per chunk: chunks of about equal size, each panel's about panel_chunk_bytes.
    cdef Py_ssize_t chunk_bytes = (DILCONV_CHUNK_BYTES if tuning.panel_chunk_bytes is None
                                   else tuning.panel_chunk_bytes)
    cdef Py_ssize_t chunks = ceil_div(taps, max(1, chunk_bytes
                                                 // (DILCONV_BLOCK_BYTES * g.Cg)))
    cdef Py_ssize_t chunk_taps = ceil_div(taps, chunks)
    cdef Py_ssize_t target = max(PANEL_MIN_PIXELS,
                                 PANEL_PACK_BYTES // sizeof(floating) // depth)
    # A packed panel serves every block of MR output channels: for one or two blocks it
    # does not pay, and unit-stride blocks read the image in place at any depth (in
    # tiles cut at the column taps' range ends).
    cdef Py_ssize_t in_place_bytes = tuning.panel_in_place_bytes
    cdef bint few_blocks = g.sw == 1 and blocks <= tuning.panel_in_place_max_blocks
    if few_blocks:
        in_place_bytes = max(in_place_bytes, depth * DILCONV_BLOCK_BYTES)
    # Tiles not cut at the column taps' range ends (whole rows, when the rows are short)
    # store each block straight into the output and pack whole blocks; border columns
    # then multiply zeros.
    cdef bint zero_fill = not few_blocks and fills_zero_columns(spec, weight, tuning)
    cdef const Py_ssize_t[:, ::1] tiles = aligned_tiles(
        spec, min(tuning.max_tile_pixels, max(nr, target - target % nr)), zero_fill)
    cdef Py_ssize_t n_tasks = g.N * g.groups * tiles.shape[0]
    cdef int n_threads = kernel_threads(spec, n_tasks, tuning)
    cdef Py_ssize_t group = max(1, tuning.panel_group_bytes
                                // (DILCONV_BLOCK_BYTES * chunk_taps * g.Cg))
    # No more panels in a group than the largest tile has: the scratch below is bounded by
    # the tiles, not by the knob (a group of 1 GiB of one-channel panels asked for 50 GiB).
    group = min(group, max(1, ceil_div(largest_tile(tiles), nr)))
    dtype = np.float32 if floating is float else np.float64
    cdef Py_ssize_t block_offset = group * nr * chunk_taps * g.Cg
    cdef floating[:, ::1] scratch = thread_scratch(n_threads,
                                                   block_offset + group * blocks
                                                   * DILCONV_MR * nr, dtype)
    cdef Py_ssize_t[:, ::1] tap_scratch = thread_scratch(n_threads, 4 * taps, np.intp)
    cdef floating[:, :, :, :, ::1] wp = aligned_empty(
        (g.groups, blocks, taps, g.Cg, DILCONV_MR), dtype)
    cdef floating[:, :, ::1] bp = np.empty((g.groups, blocks, DILCONV_MR), dtype=dtype)
    cdef const floating[:, :, :, :] w_view = weight
    cdef const floating[:] b_view = bias
    cdef Py_ssize_t task, tid, block
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for block in prange(g.groups * blocks, schedule='static'):
            _pack_weight_block(w_view, b_view, wp, bp, block)
        for task in prange(n_tasks, schedule='dynamic'):
            _forward_tile(x, wp, bp, out, tiles, g, task, &scratch[tid, 0],
                          &scratch[tid, block_offset],
                          &tap_scratch[tid, 0], &tap_scratch[tid, taps],
                          zero_fill, in_place_bytes, group, chunk_taps)


cdef struct Footprint:
    Py_ssize_t kh0, kh1, kw0, kw1   # the tile's taps in the image: [kh0, kh1) x [kw0, kw1)
    Py_ssize_t fh, fw               # the input they read, packed once for all of them
                                    # (0 x 0: packed tap by tap, which is fewer pixels)


cdef inline void _taps_at(const Py_ssize_t* lo, const Py_ssize_t* hi, Py_ssize_t taps,
                          Py_ssize_t at, Py_ssize_t* first, Py_ssize_t* stop) noexcept nogil:
    # The taps [first, stop) of one axis whose in-image range holds output `at`: an
    # output's in-image taps are contiguous.
    cdef Py_ssize_t t = 0
    while t < taps and not (lo[t] <= at < hi[t]):
        t += 1
    first[0] = t
    while t < taps and lo[t] <= at < hi[t]:
        t += 1
    stop[0] = t


cdef inline Footprint _footprint(Geom g, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                                 Py_ssize_t c1) noexcept nogil:
    # In an aligned tile the taps in the image are a range of rows x a range of columns,
    # whose input rows and columns are in the image from the first tap's first to the
    # last tap's last.
    cdef Footprint f
    _taps_at(g.oh_lo, g.oh_hi, g.kH, r0, &f.kh0, &f.kh1)
    _taps_at(g.ow_lo, g.ow_hi, g.kW, c0, &f.kw0, &f.kw1)
    f.fh = f.fw = 0
    if f.kh1 > f.kh0 and f.kw1 > f.kw0:
        f.fh = (r1 - r0 - 1) * g.sh + (f.kh1 - f.kh0 - 1) * g.dh + 1
        f.fw = (c1 - c0 - 1) * g.sw + (f.kw1 - f.kw0 - 1) * g.dw + 1
        # Dilations wider than the tile leave holes: tap by tap is then less to pack.
        if f.fh * f.fw >= (f.kh1 - f.kh0) * (f.kw1 - f.kw0) * (r1 - r0) * (c1 - c0):
            f.fh = f.fw = 0
    return f


cdef inline void _pack_pixels(const floating* src, Py_ssize_t step, Py_ssize_t count,
                              Py_ssize_t plane, Py_ssize_t lanes, Py_ssize_t nr,
                              floating* dst) noexcept nogil:
    # `count` pixels, `step` apart, of `lanes` channel planes into dst[q * nr + j] (zeros
    # past lanes), in runs of 64 pixels whose packed blocks (4 KiB in float32) stay in L1
    # while the channels fill them one lane at a time; where the pixels are consecutive and
    # the channels fill the block, squares of a vector's lanes first, transposed in
    # registers (weight gradients 1.03-1.30x faster than a value at a time: ERFNet's 3 x 1
    # 1.30x, context_d8 1.18x, 2048 -> 256 1.07x; float32, one thread, AVX-512 Xeon).
    cdef Py_ssize_t L = DILCONV_VEC_BYTES // sizeof(floating), q0, q1, q, j, done = 0
    if step == 1 and lanes == nr:
        j = 0
        while j < nr:
            done = pack_squares(src + j * plane, plane, count, dst + j, nr)
            j = j + L
    for q0 in range(done, count, 64):
        q1 = min(q0 + 64, count)
        for j in range(nr):
            if j < lanes:
                for q in range(q0, q1):
                    dst[q * nr + j] = src[j * plane + q * step]
            else:
                for q in range(q0, q1):
                    dst[q * nr + j] = 0


cdef void _grad_weight_block(const floating[:, :, :, ::1] gy,   # IN  (N, O, Ho, Wo)
                             const floating[:, :, :, ::1] x,    # IN  (N, C, H, W)
                             floating[:, :, ::1] gwt,           # OUT (kH*kW, O, C/g padded)
                             const Py_ssize_t[:, ::1] tiles,    # IN  (T, 4) aligned tiles
                             Py_ssize_t o_chunk, Py_ssize_t c_group, bint packed_a,
                             Geom g, Py_ssize_t task, Py_ssize_t n0, Py_ssize_t n1,
                             floating* pack, floating* a_pack,                  # SCRATCH
                             Py_ssize_t* offsets) noexcept nogil:
    # One task: c_group blocks of NR input channels x o_chunk output channels of one
    # group, for every tap, summed over images [n0, n1) and tiles. Per tile and tap, A is
    # grad_output (a term is a pixel, a segment a tile row): with `packed_a`, packed once
    # per tile for all the task's channel blocks, MR_GW output channels per pixel; else
    # read in place, MR rows of planes. B is the tap's input pixels of the NR channels,
    # pixel by pixel: packed once per tile for all its taps (their footprint), or tap by
    # tap where that is fewer pixels.
    cdef Py_ssize_t nr = block_pixels(pack)
    cdef Py_ssize_t mr = DILCONV_MR_GW if packed_a else DILCONV_MR
    cdef Py_ssize_t c_blocks = (g.Cg + nr - 1) // nr
    cdef Py_ssize_t c_groups = (c_blocks + c_group - 1) // c_group
    cdef Py_ssize_t o_chunks = (g.Og + o_chunk - 1) // o_chunk
    cdef Py_ssize_t cb0 = task % c_groups * c_group
    cdef Py_ssize_t oc = (task // c_groups) % o_chunks
    cdef Py_ssize_t grp = task // (c_groups * o_chunks)
    cdef Py_ssize_t o_first = grp * g.Og + oc * o_chunk
    cdef Py_ssize_t o_stop = grp * g.Og + min(g.Og, (oc + 1) * o_chunk)
    cdef Py_ssize_t n, t, r0, r1, c0, c1, tw, th, rr, o, kh, kw, q, cb, ci0, lanes, i, m
    cdef Py_ssize_t plane = g.H * g.W
    cdef floating* a_row
    cdef const floating* a
    cdef Footprint f
    cdef Terms terms

    terms.a_step = mr if packed_a else 1
    terms.a_row = 1 if packed_a else g.Ho * g.Wo
    for n in range(n0, n1):
        for t in range(tiles.shape[0]):
            r0, r1, c0, c1 = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
            tw = c1 - c0
            th = r1 - r0
            f = _footprint(g, r0, r1, c0, c1)
            if packed_a:
                # Block b: th * tw pixels, each its mr channels from o_first + b * mr,
                # written in order (a channel at a time across the pixels, each store
                # on another line, was 1.03x slower on 512 -> 512 at 64 x 64).
                o = o_first
                while o < o_stop:
                    m = min(mr, o_stop - o)
                    a_row = a_pack + (o - o_first) * th * tw
                    for rr in range(th):
                        for q in range(tw):
                            for i in range(m):
                                a_row[i] = gy[n, o + i, r0 + rr, c0 + q]
                            a_row = a_row + mr
                    o = o + mr
            for rr in range(th):
                offsets[rr] = rr * tw * mr if packed_a else (r0 + rr) * g.Wo + c0
            terms.n_seg = th
            terms.seg_len = tw
            terms.a_off = offsets
            terms.b_off = offsets + th
            terms.b_step = g.sw * nr if f.fh else nr
            for cb in range(cb0, min(c_blocks, cb0 + c_group)):
                ci0 = grp * g.Cg + cb * nr
                lanes = min(nr, g.Cg - cb * nr)
                for rr in range(f.fh):
                    _pack_pixels(&x[n, ci0, r0 * g.sh + f.kh0 * g.dh - g.pt + rr,
                                    c0 * g.sw + f.kw0 * g.dw - g.pl],
                                 1, f.fw, plane, lanes, nr, pack + rr * f.fw * nr)
                # Aligned tiles: a tap reads the image for all of the tile or for none.
                for kh in range(f.kh0, f.kh1):
                    for kw in range(f.kw0, f.kw1):
                        for rr in range(th):
                            if f.fh:
                                offsets[th + rr] = ((rr * g.sh + (kh - f.kh0) * g.dh) * f.fw
                                                    + (kw - f.kw0) * g.dw) * nr
                            else:
                                offsets[th + rr] = rr * tw * nr
                                _pack_pixels(&x[n, ci0, (r0 + rr) * g.sh + kh * g.dh - g.pt,
                                                c0 * g.sw + kw * g.dw - g.pl],
                                             g.sw, tw, plane, lanes, nr, pack + rr * tw * nr)
                        o = o_first
                        while o < o_stop:
                            a = (a_pack + (o - o_first) * th * tw if packed_a
                                 else &gy[n, o, 0, 0])
                            ukr(&terms, a, pack, NULL, 1, &gwt[kh * g.kW + kw, o, cb * nr],
                                gwt.shape[2], min(mr, o_stop - o), lanes)
                            o = o + mr


def grad_weight_blocks(spec, Py_ssize_t itemsize, tuning):
    """(o_chunk, c_group, packed, parts) of grad_weight's tasks: output and input channel
    blocks per task, whether grad_output is packed (blocks of MR_GW rows, else MR), and
    the parts of the images; `tuning`'s panel_grad_weight_* knobs, where set, decide
    c_group and packed instead."""
    cdef Py_ssize_t nr = DILCONV_BLOCK_BYTES // itemsize
    cdef Py_ssize_t cg = spec.c // spec.groups, og = spec.o // spec.groups
    cdef Py_ssize_t o_chunk = min(og, PANEL_GRAD_WEIGHT_O_CHUNK)
    cdef Py_ssize_t parts = max(1, min(spec.n, PANEL_GRAD_WEIGHT_IMAGE_PARTS))
    c_group = tuning.panel_grad_weight_c_group
    if c_group is None:
        c_group = max(1, min(PANEL_GRAD_WEIGHT_C_GROUP,
                             parts * spec.groups * ceil_div(cg, nr) * ceil_div(og, o_chunk)
                             // PANEL_GRAD_WEIGHT_MIN_TASKS))
    packed = tuning.panel_grad_weight_packed
    if packed is None:
        packed = spec.kh * spec.kw * c_group >= PANEL_GRAD_WEIGHT_PACKED_TERMS
    packed = DILCONV_MR_GW > DILCONV_MR and og > DILCONV_MR and packed
    cdef Py_ssize_t mr = DILCONV_MR_GW if packed else DILCONV_MR
    return ceil_div(o_chunk, mr) * mr, c_group, packed, parts


def grad_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x, gw, spec,
                tuning):
    """Weight gradient into `gw`. The plan: tiles aligned with the tap ranges, whose NR
    channels of packed input take at most PANEL_GRAD_WEIGHT_PACK_BYTES per tap (scratch:
    the larger of that and a tile's footprint, per thread, and with packed grad_output a
    tile of its o_chunk channels); tasks of c_group blocks of NR input channels (up to
    PANEL_GRAD_WEIGHT_C_GROUP, keeping PANEL_GRAD_WEIGHT_MIN_TASKS tasks) x o_chunk output
    channels (a multiple of the block's rows) of one group and one part of the
    images (PANEL_GRAD_WEIGHT_IMAGE_PARTS); grad_output packed for blocks of MR_GW rows
    where the tier has them and a task's tiles take PANEL_GRAD_WEIGHT_PACKED_TERMS taps x
    channel blocks or more (else read in place, MR rows); each part's sums go into a
    (kH*kW, O, ceil(C/g / NR) * NR) array of zeros, and the parts, added in order, into
    `gw`."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t nr = DILCONV_BLOCK_BYTES // sizeof(floating)
    cdef Py_ssize_t taps = g.kH * g.kW
    cdef Py_ssize_t target = min(tuning.max_tile_pixels,
                                 max(1, PANEL_GRAD_WEIGHT_PACK_BYTES // DILCONV_BLOCK_BYTES))
    cdef const Py_ssize_t[:, ::1] tiles = aligned_tiles(spec, target)
    cdef Py_ssize_t c_blocks = (g.Cg + nr - 1) // nr, o_chunk, c_group, parts
    cdef bint packed_a
    o_chunk, c_group, packed_a, parts = grad_weight_blocks(spec, sizeof(floating), tuning)
    cdef Py_ssize_t part_tasks = (g.groups * ceil_div(c_blocks, c_group)
                                  * ceil_div(g.Og, o_chunk))
    cdef Py_ssize_t n_tasks = parts * part_tasks
    cdef int n_threads = kernel_threads(spec, n_tasks, tuning)
    cdef Py_ssize_t t, rows = 0, pack_pixels = largest_tile(tiles)
    cdef Footprint f
    for t in range(tiles.shape[0]):
        rows = max(rows, tiles[t, 1] - tiles[t, 0])
        f = _footprint(g, tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3])
        pack_pixels = max(pack_pixels, f.fh * f.fw)
    dtype = np.float32 if floating is float else np.float64
    # Per thread: B's packed input, then A's packed grad_output (o_chunk x a tile).
    cdef Py_ssize_t a_at = nr * pack_pixels
    cdef floating[:, ::1] scratch = thread_scratch(
        n_threads, a_at + (o_chunk * largest_tile(tiles) if packed_a else 0), dtype)
    cdef Py_ssize_t[:, ::1] offset_scratch = thread_scratch(n_threads, 2 * rows, np.intp)
    # Aligned: each task's NR channels of a row are then whole cache lines of their own
    # (numpy's 16-byte alignment put every block's edges on lines shared with the
    # neighbouring tasks', which two threads wrote at once: aspp_r6's weight gradient
    # took as long at two threads as at one).
    gwt = aligned_empty((parts, taps, g.O, c_blocks * nr), dtype)
    gwt.fill(0)
    cdef floating[:, :, :, ::1] gwt_view = gwt
    cdef floating[:, :, :, :] gw_view = gw
    cdef Py_ssize_t task, tid, part, o
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for task in prange(n_tasks, schedule='dynamic'):
            part = task // part_tasks
            _grad_weight_block(gy, x, gwt_view[part], tiles, o_chunk, c_group, packed_a, g,
                               task % part_tasks, part * g.N // parts,
                               (part + 1) * g.N // parts,
                               &scratch[tid, 0],
                               &scratch[tid, a_at] if packed_a else NULL,
                               &offset_scratch[tid, 0])
        # The parts added in order, into gw's layout, an output channel per task (serial,
        # this took a tenth of aspp_r6's weight gradient at 2 threads).
        for o in prange(g.O, schedule='static'):
            _sum_weight_parts(gwt_view, gw_view, o)


cdef void _sum_weight_parts(const floating[:, :, :, ::1] gwt,   # IN  (parts, taps, O, Cpad)
                            floating[:, :, :, :] gw,            # OUT (O, C/g, kH, kW)
                            Py_ssize_t o) noexcept nogil:
    # gw[o, c, kh, kw] = ((gwt[0, t, o, c] + gwt[1, t, o, c]) + ...) for t = kh*kW + kw.
    cdef Py_ssize_t parts = gwt.shape[0], kw_size = gw.shape[3], t, c, part
    cdef floating total
    for t in range(gwt.shape[1]):
        for c in range(gw.shape[1]):
            total = gwt[0, t, o, c]
            for part in range(1, parts):
                total = total + gwt[part, t, o, c]
            gw[o, c, t // kw_size, t % kw_size] = total


def copy_into(const floating[:, :, :, ::1] src, floating[:, :, :, :] dst, spec, tuning):
    """dst[...] = src, for a dst of any strides (a stride phase of the input gradient),
    a plane per task: numpy's serial strided copy took a third of stride2_d2's input
    gradient."""
    cdef Py_ssize_t planes = src.shape[0] * src.shape[1], plane
    cdef int n_threads = kernel_threads(spec, planes, tuning)
    with nogil, parallel(num_threads=n_threads):
        for plane in prange(planes, schedule='static'):
            _copy_plane(src, dst, plane)


cdef void _copy_plane(const floating[:, :, :, ::1] src, floating[:, :, :, :] dst,
                      Py_ssize_t plane) noexcept nogil:
    cdef Py_ssize_t n = plane // src.shape[1], c = plane % src.shape[1], i, j
    for i in range(src.shape[2]):
        for j in range(src.shape[3]):
            dst[n, c, i, j] = src[n, c, i, j]
