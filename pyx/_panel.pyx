"""Packed panels and a register-blocked micro-kernel (layers with many channels).

The output plane is cut into tiles aligned with the taps' in-bounds ranges, so in a tile
every tap reads the image for all of its pixels or for none: a tile sums exactly its taps
in the image, with no zero padding and no bounds tests (where border columns are thin and
the weights finite, the caller may cut along rows only: column taps then read zeros). A
tile is computed NR pixels at a time: their input pixels, for all of the taps and
channels, form a panel, packed per thread a group of panels at a time just before use
(or, at unit stride with few terms or few output channels, read in place), and the
micro-kernel (pyx/_microkernel.h) holds MR output channels x NR pixels in registers over
the whole sum, once per block of MR output channels, while the panel is still in cache.
Each output is written once. Every output sums its taps and channels
in one fixed order, so results are bitwise identical for any thread count (and tasks,
which own their outputs, are handed out dynamically: tiles differ in size). The weight
gradient runs on the same micro-kernel, with pixels as the terms of its sums.
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from libc.string cimport memset

from _common cimport Geom, make_geom


cdef extern from "_microkernel.h":
    enum: DILCONV_MR, DILCONV_MR_GW, DILCONV_BLOCK_BYTES
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
                              const float* bias, float* c, Py_ssize_t ldc, Py_ssize_t m,
                              Py_ssize_t n) noexcept nogil
    void dilconv_ukr_d_packed(const Terms* terms, const double* a, const double* b,
                              const double* bias, double* c, Py_ssize_t ldc, Py_ssize_t m,
                              Py_ssize_t n) noexcept nogil
    void dilconv_copy_block_f(const float* src, float* dst) noexcept nogil
    void dilconv_copy_block_d(const double* src, double* dst) noexcept nogil
    void dilconv_gather2_block_f(const float* src, float* dst) noexcept nogil
    void dilconv_gather2_block_d(const double* src, double* dst) noexcept nogil

MR = DILCONV_MR

cdef extern from "_axpy.h":
    void dilconv_gather_f(Py_ssize_t n, const float* src, Py_ssize_t step,
                          float* dst) noexcept nogil
    void dilconv_gather_d(Py_ssize_t n, const double* src, Py_ssize_t step,
                          double* dst) noexcept nogil


# Bytes of pixels per output channel in a micro-kernel block (NR pixels).
BLOCK_NBYTES = DILCONV_BLOCK_BYTES


cdef inline void ukr(const Terms* terms, const floating* a, const floating* b,
                     const floating* bias, int accumulate, floating* c, Py_ssize_t ldc,
                     Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    if floating is float:
        dilconv_ukr_f(terms, a, b, bias, accumulate, c, ldc, m, n)
    else:
        dilconv_ukr_d(terms, a, b, bias, accumulate, c, ldc, m, n)


cdef inline void ukr_packed(const Terms* terms, const floating* a, const floating* b,
                            const floating* bias, floating* c, Py_ssize_t ldc,
                            Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    # The forward's: A is packed weights (MR per term, zero past m) and bias MR values.
    if floating is float:
        dilconv_ukr_f_packed(terms, a, b, bias, c, ldc, m, n)
    else:
        dilconv_ukr_d_packed(terms, a, b, bias, c, ldc, m, n)


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


cdef void _forward_tile(const floating[:, :, :, ::1] x,          # IN  (N, C, H, W)
                        const floating[:, :, :, :, ::1] wp,      # IN  (groups, blocks, taps, Cg, MR)
                        const floating[:, :, ::1] bp,            # IN  (groups, blocks, MR)
                        floating[:, :, :, ::1] out,              # OUT (N, O, Ho, Wo)
                        const Py_ssize_t[:, ::1] tiles,          # IN  (T, 4) r0 r1 c0 c1
                        Geom g, Py_ssize_t task,
                        floating* pack, floating* block,                 # SCRATCH
                        Py_ssize_t* taps, Py_ssize_t* offsets, bint zero_fill,
                        Py_ssize_t in_place_bytes, Py_ssize_t group) noexcept nogil:
    cdef Py_ssize_t n_tiles = tiles.shape[0], t = task % n_tiles
    cdef Py_ssize_t n = task // (g.groups * n_tiles), grp = (task // n_tiles) % g.groups
    cdef Py_ssize_t r0 = tiles[t, 0], r1 = tiles[t, 1], c0 = tiles[t, 2], c1 = tiles[t, 3]
    cdef Py_ssize_t tw = c1 - c0, pixels = (r1 - r0) * tw, nr = block_pixels(pack)
    cdef Py_ssize_t ci0 = grp * g.Cg
    cdef Py_ssize_t n_taps = 0, kh, kw, kh0 = 0, kw0 = 0, ti, rr, depth, p, p0
    cdef Py_ssize_t panels, direct_w = 0
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
    terms.n_seg = n_taps
    terms.seg_len = g.Cg
    terms.a_off = weight_off
    terms.a_step = DILCONV_MR
    terms.a_row = 1

    # Unit stride: a block of NR pixels along a row reads NR consecutive pixels of each
    # input row, so whole blocks can read the image in place, without packing. That pays
    # while one block's reads stay within L1; packed panels are read sequentially.
    if (n_taps > 0 and not zero_fill and g.sw == 1
            and depth * DILCONV_BLOCK_BYTES <= in_place_bytes):
        direct_w = tw - tw % nr
    if direct_w:
        terms.b_off = image_off
        terms.b_step = g.H * g.W
        for rr in range(r1 - r0):
            base = &x[n, ci0, (r0 + rr) * g.sh + kh0 * g.dh - g.pt, c0 + kw0 * g.dw - g.pl]
            for p in range(direct_w // nr):
                _blocks(wp, bp, out, g, n, grp, r0 + rr, c0 + p * nr, base + p * nr,
                        &terms, nr, 0, 0, block)
        if direct_w == tw:
            return

    # The rest of the tile, columns [c0 + direct_w, c1), a group of panels at a time:
    # each group is packed just before its blocks read it, so it is still in cache.
    c0 = c0 + direct_w
    tw = c1 - c0
    pixels = (r1 - r0) * tw
    panels = (pixels + nr - 1) // nr
    terms.b_off = packed_off
    terms.b_step = nr
    p0 = 0
    while p0 < panels:
        _pack_panels(&x[n, ci0, 0, 0], g, taps, n_taps, r0, c0, tw, p0 * nr,
                     min(group * nr, pixels - p0 * nr), depth, pack)
        for p in range(p0, min(p0 + group, panels)):
            _blocks(wp, bp, out, g, n, grp, r0, c0, pack + (p - p0) * depth * nr, &terms,
                    min(nr, pixels - p * nr), p * nr, tw, block)
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
    cdef Py_ssize_t nr = block_pixels(pack), plane = g.H * g.W
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
                  Py_ssize_t valid,
                  Py_ssize_t q0, Py_ssize_t tw, floating* block) noexcept nogil:
    """Outputs of `valid` pixels, from pixel q0 of the rectangle at (r0, c0) of width tw
    (or from (r0, c0) along one row if tw is 0), for every output channel of the group."""
    cdef Py_ssize_t nr = block_pixels(block), plane = g.Ho * g.Wo
    cdef Py_ssize_t o0 = grp * g.Og, ob, m, i, j, l, rq, cq, run
    cdef floating* dst
    for ob in range(wp.shape[1]):
        m = min(<Py_ssize_t> DILCONV_MR, g.Og - ob * DILCONV_MR)
        if tw == 0 or tw == g.Wo or q0 // tw == (q0 + valid - 1) // tw:
            # The pixels are consecutive in `out`.
            rq = r0 + (q0 // tw if tw else 0)
            cq = c0 + (q0 % tw if tw else 0)
            ukr_packed(terms, &wp[grp, ob, 0, 0, 0], b, &bp[grp, ob, 0],
                       &out[n, o0 + ob * DILCONV_MR, rq, cq], plane, m, valid)
            continue
        ukr_packed(terms, &wp[grp, ob, 0, 0, 0], b, &bp[grp, ob, 0], block, nr, DILCONV_MR, nr)
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


def pack_weights(const floating[:, :, :, :] w, const floating[:] bias,
                 floating[:, :, :, :, ::1] wp, floating[:, :, ::1] bp):
    """wp[grp, ob, kh*kW + kw, ci, i] = w[grp*O/g + ob*MR + i, ci, kh, kw] and bp likewise
    from `bias` (which may be empty), zero past O/g. `w` may have any strides."""
    cdef Py_ssize_t groups = wp.shape[0], blocks = wp.shape[1], cg = wp.shape[3]
    cdef Py_ssize_t og = w.shape[0] // groups, kh_size = w.shape[2], kw_size = w.shape[3]
    cdef Py_ssize_t grp, ob, ci, kh, kw, i, o, m
    with nogil:
        for grp in range(groups):
            for ob in range(blocks):
                m = min(<Py_ssize_t> DILCONV_MR, og - ob * DILCONV_MR)
                for i in range(DILCONV_MR):
                    o = grp * og + ob * DILCONV_MR + i
                    bp[grp, ob, i] = bias[o] if i < m and bias.shape[0] else 0
                for ci in range(cg):
                    for kh in range(kh_size):
                        for kw in range(kw_size):
                            for i in range(m):
                                wp[grp, ob, kh * kw_size + kw, ci, i] = w[
                                    grp * og + ob * DILCONV_MR + i, ci, kh, kw]
                            for i in range(m, DILCONV_MR):
                                wp[grp, ob, kh * kw_size + kw, ci, i] = 0


def forward(const floating[:, :, :, ::1] x, const floating[:, :, :, :, ::1] wp,
            const floating[:, :, ::1] bp, floating[:, :, :, ::1] out,
            const Py_ssize_t[:, ::1] tiles, bint zero_fill, floating[:, ::1] scratch,
            Py_ssize_t[:, ::1] tap_scratch, Py_ssize_t in_place_bytes, Py_ssize_t group,
            spec, int n_threads):
    """conv2d into `out`. `wp` is the weight packed as (groups, ceil(O/g / MR), kH*kW,
    C/g, MR), `bp` the bias as (groups, blocks, MR), both zero past O/g; `tiles` are
    aligned with the tap ranges (of the rows only with `zero_fill`, where column taps
    read zeros in the padding: finite weights only); `group` panels are packed at a time;
    `scratch` is (threads, group * NR * kH*kW * C/g + MR*NR) (the packed panels and one
    block); `tap_scratch` is (threads, 4 * kH*kW). Unit-stride blocks whose reads take at
    most `in_place_bytes` read the image in place."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t nr = DILCONV_BLOCK_BYTES // sizeof(floating)
    cdef Py_ssize_t task, tid
    cdef Py_ssize_t n_tasks = g.N * g.groups * tiles.shape[0]
    cdef Py_ssize_t block_offset = scratch.shape[1] - DILCONV_MR * nr
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for task in prange(n_tasks, schedule='dynamic'):
            _forward_tile(x, wp, bp, out, tiles, g, task, &scratch[tid, 0],
                          &scratch[tid, block_offset],
                          &tap_scratch[tid, 0], &tap_scratch[tid, g.kH * g.kW],
                          zero_fill, in_place_bytes, group)


cdef void _grad_weight_block(const floating[:, :, :, ::1] gy,   # IN  (N, O, Ho, Wo)
                             const floating[:, :, :, ::1] x,    # IN  (N, C, H, W)
                             floating[:, :, ::1] gwt,           # OUT (kH*kW, O, C/g padded)
                             const Py_ssize_t[:, ::1] tiles,    # IN  (T, 4) aligned tiles
                             Py_ssize_t o_chunk, Geom g, Py_ssize_t task,
                             floating* pack, Py_ssize_t* offsets) noexcept nogil:  # SCRATCH
    # One task: NR input channels x o_chunk output channels of one group, for every tap,
    # summed over images and tiles. Per tile and tap, A is grad_output read in place (a
    # term is a pixel, a segment a tile row: the tile stays in cache across the taps) and
    # B the tap's input pixels of the NR channels, packed pixel by pixel.
    cdef Py_ssize_t nr = block_pixels(pack)
    cdef Py_ssize_t c_blocks = (g.Cg + nr - 1) // nr
    cdef Py_ssize_t o_chunks = (g.Og + o_chunk - 1) // o_chunk
    cdef Py_ssize_t cb = task % c_blocks
    cdef Py_ssize_t oc = (task // c_blocks) % o_chunks
    cdef Py_ssize_t grp = task // (c_blocks * o_chunks)
    cdef Py_ssize_t o_first = grp * g.Og + oc * o_chunk
    cdef Py_ssize_t o_stop = grp * g.Og + min(g.Og, (oc + 1) * o_chunk)
    cdef Py_ssize_t ci0 = grp * g.Cg + cb * nr
    cdef Py_ssize_t lanes = min(nr, g.Cg - cb * nr)
    cdef Py_ssize_t n, t, r0, r1, c0, c1, tw, rr, j, q, q0, q1, o, kh, kw, plane = g.H * g.W
    cdef const floating* src
    cdef floating* dst
    cdef Terms terms

    terms.a_step = 1
    terms.a_row = g.Ho * g.Wo
    terms.b_step = nr
    for n in range(g.N):
        for t in range(tiles.shape[0]):
            r0, r1, c0, c1 = tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3]
            tw = c1 - c0
            for rr in range(r1 - r0):
                offsets[rr] = (r0 + rr) * g.Wo + c0
                offsets[(r1 - r0) + rr] = rr * tw * nr
            terms.n_seg = r1 - r0
            terms.seg_len = tw
            terms.a_off = offsets
            terms.b_off = offsets + (r1 - r0)
            for kh in range(g.kH):
                # Aligned tiles: a tap reads the image for all of the tile or for none.
                if not (g.oh_lo[kh] <= r0 < g.oh_hi[kh]):
                    continue
                for kw in range(g.kW):
                    if not (g.ow_lo[kw] <= c0 < g.ow_hi[kw]):
                        continue
                    # In runs of 64 pixels, whose packed blocks (4 KiB in float32) stay
                    # in L1 while the channels fill them one lane at a time.
                    for rr in range(r1 - r0):
                        src = &x[n, ci0, (r0 + rr) * g.sh + kh * g.dh - g.pt,
                                 c0 * g.sw + kw * g.dw - g.pl]
                        dst = pack + rr * tw * nr
                        for q0 in range(0, tw, 64):
                            q1 = min(q0 + 64, tw)
                            for j in range(nr):
                                if j < lanes:
                                    for q in range(q0, q1):
                                        dst[q * nr + j] = src[j * plane + q * g.sw]
                                else:
                                    for q in range(q0, q1):
                                        dst[q * nr + j] = 0
                    o = o_first
                    while o < o_stop:
                        ukr(&terms, &gy[n, o, 0, 0], pack, NULL, 1,
                            &gwt[kh * g.kW + kw, o, cb * nr], gwt.shape[2],
                            min(<Py_ssize_t> DILCONV_MR_GW, o_stop - o), lanes)
                        o = o + DILCONV_MR_GW


def grad_weight(const floating[:, :, :, ::1] gy, const floating[:, :, :, ::1] x,
                floating[:, :, ::1] gwt, const Py_ssize_t[:, ::1] tiles,
                Py_ssize_t o_chunk, floating[:, ::1] scratch,
                Py_ssize_t[:, ::1] offset_scratch, spec, int n_threads):
    """Weight gradient, summed into `gwt` (kH*kW, O, ceil(C/g / NR) * NR), which holds
    zeros on entry. `tiles` are aligned with the tap ranges; tasks take `o_chunk` output
    channels (a multiple of MR); `scratch` is (threads, NR * max tile pixels);
    `offset_scratch` is (threads, 2 * max tile rows)."""
    cdef Geom g = make_geom(spec)
    cdef Py_ssize_t nr = DILCONV_BLOCK_BYTES // sizeof(floating)
    cdef Py_ssize_t task, tid
    cdef Py_ssize_t n_tasks = (g.groups * ((g.Cg + nr - 1) // nr)
                               * ((g.Og + o_chunk - 1) // o_chunk))
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for task in prange(n_tasks, schedule='dynamic'):
            _grad_weight_block(gy, x, gwt, tiles, o_chunk, g, task, &scratch[tid, 0],
                               &offset_scratch[tid, 0])
