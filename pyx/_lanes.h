/* The panel forward's lanes scheme (pyx/_panel.pyx): output channels in the vector lanes.

   A block is UR pixels x OB output channels (two vectors of channels), its accumulators
   in registers; each term broadcasts one input value per pixel and loads OB weights, so
   it costs UR + 2 loads for 2 UR multiply-adds, with no packed panel of pixels. A block
   of at most L channels (the last of the layer's, or its only one) sums one vector of
   them (UR + 1 loads for UR multiply-adds) and leaves the other lanes' sums as they
   were: the same sums, in half the multiply-adds where they would be padding. The input
   is read from rows of L interleaved channels, [channel block][row][column][L], packed
   once per band of output rows; the weights as [tap][channel][OB]. Where a plane of the
   image is a multiple of 4 KiB the panels' per-tile packing reads many planes at the
   same cache set; here each pixel's L channels are one line.

   The terms of a block are the channels, in order, of each of the taps that reach its
   pixels, taps in order (kh, kw), added to the stored partial sums of its pixels (their
   bias): every output adds its taps in the image in that order, each over its channels
   in order, as the panels do, so both schemes give the same bits. Channels past the
   layer's are zero in both the input and the weights (0 * 0 adds +0). */
#ifndef DILCONV_LANES_H
#define DILCONV_LANES_H
#include <stddef.h>
#include "_vec.h"
#include "_microkernel.h"   /* DILCONV_HAS_SHUFFLE */

/* Pixels per block: accumulators 2 UR vectors, plus two of weights and one broadcast,
   within the registers (32 zmm in v4 and on aarch64, else 16). */
#if defined(DILCONV_V4_SIZES) || defined(__aarch64__)
#define DILCONV_LANES_UR 14
#else
#define DILCONV_LANES_UR 6
#endif
/* Whether the tier's plans take the lanes scheme where it applies: v4 (aspp_r6 forward
   1.3x faster than its panels, context_d8 1.18x, on an AVX-512 Xeon) and v3 (its code on
   the same Xeon: 1.14-1.20x on aspp_r6, aspp_r18 and context_d8, with 6 pixels x 16
   float32 channels); not yet measured on SSE2 or NEON. */
#if defined(DILCONV_V4_SIZES) || defined(__AVX__)
#define DILCONV_LANES_DEFAULT 1
#else
#define DILCONV_LANES_DEFAULT 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DILCONV_LANES_BODY(NAME, T, UR_MAX)                                               \
static inline __attribute__((always_inline)) void NAME##_body(                           \
        const T *restrict x, ptrdiff_t px_step, ptrdiff_t cb_step, ptrdiff_t n_cb,       \
        const T *restrict w, ptrdiff_t n_taps, const ptrdiff_t *x_off,                   \
        const ptrdiff_t *w_off, T *restrict acc, const int ur, const int nv) {           \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), OB = 2 * L };                              \
    NAME##_v a[UR_MAX][2];                                                               \
    DILCONV_UNROLL for (int p = 0; p < ur; p++)                                          \
        DILCONV_UNROLL for (int v = 0; v < nv; v++)                                      \
            a[p][v] = *(const NAME##_vu *)(acc + p * OB + v * L);                        \
    for (ptrdiff_t t = 0; t < n_taps; t++) {                                             \
        const T *xt = x + x_off[t], *wt = w + w_off[t];                                  \
        for (ptrdiff_t cb = 0; cb < n_cb; cb++, xt += cb_step)                           \
            for (int c = 0; c < L; c++, wt += OB) {                                      \
                NAME##_v w0 = *(const NAME##_vu *)wt, w1 = w0;                           \
                if (nv > 1) w1 = *(const NAME##_vu *)(wt + L);                           \
                DILCONV_UNROLL for (int p = 0; p < ur; p++) {                            \
                    T b = xt[p * px_step + c];                                           \
                    a[p][0] += b * w0;                                                   \
                    if (nv > 1) a[p][1] += b * w1;                                       \
                }                                                                        \
            }                                                                            \
    }                                                                                    \
    DILCONV_UNROLL for (int p = 0; p < ur; p++)                                          \
        DILCONV_UNROLL for (int v = 0; v < nv; v++)                                      \
            *(NAME##_vu *)(acc + p * OB + v * L) = a[p][v];                              \
}

/* One ur of the switch: its own inlined body. */
#define DILCONV_LANES_CASE(NAME, UR)                                                      \
    case UR:                                                                             \
        NAME##_body(x, STEP, cb_step, n_cb, w, n_taps, x_off, w_off, acc, UR, NV); break;
/* Every ur, each its own inlined body, with STEP between pixels and NV vectors. */
#define DILCONV_LANES_SWITCH(NAME, STEP_, NV_)                                            \
    {                                                                                    \
        const ptrdiff_t STEP = (STEP_);                                                  \
        const int NV = (NV_);                                                            \
        switch (ur) {                                                                    \
        DILCONV_LANES_CASE(NAME, 1)                                                      \
        DILCONV_LANES_CASE(NAME, 2)                                                      \
        DILCONV_LANES_CASE(NAME, 3)                                                      \
        DILCONV_LANES_CASE(NAME, 4)                                                      \
        DILCONV_LANES_CASE(NAME, 5)                                                      \
        DILCONV_LANES_CASE(NAME, 6)                                                      \
        DILCONV_LANES_WIDE_CASES(NAME)                                                   \
        }                                                                                \
    }
/* NAME(x, px_step, cb_step, n_cb, w, n_taps, x_off, w_off, acc, ur, nv): acc[p][o] +=
   the sum over taps t < n_taps, in order, of the n_cb * L terms k of
   x[x_off[t] + (k / L) * cb_step + p * px_step + k % L] * w[w_off[t] + k * OB + o], for
   p < ur <= DILCONV_LANES_UR and o < nv * L (nv 1 or 2), in term order. Each ur and nv
   is its own inlined body: the accumulators stay in registers only with a constant
   count. So is unit stride: the pixels' offsets are then in the instructions, not in
   registers that the compiler spilled (1-3.5% faster on drn_512_d4 and context_d8). */
#define DILCONV_LANES(NAME, T)                                                            \
typedef T NAME##_v __attribute__((vector_size(DILCONV_VEC_BYTES)));                       \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC_BYTES), aligned(sizeof(T)),  \
                                   may_alias));                                          \
DILCONV_LANES_BODY(NAME, T, DILCONV_LANES_UR)                                            \
static inline void NAME(const T *x, ptrdiff_t px_step, ptrdiff_t cb_step, ptrdiff_t n_cb, \
                        const T *w, ptrdiff_t n_taps, const ptrdiff_t *x_off,            \
                        const ptrdiff_t *w_off, T *acc, ptrdiff_t ur, ptrdiff_t nv) {    \
    enum { L = DILCONV_VEC_BYTES / sizeof(T) };                                          \
    if (nv == 1) {                                                                       \
        if (px_step == L) DILCONV_LANES_SWITCH(NAME, L, 1)                               \
        else DILCONV_LANES_SWITCH(NAME, px_step, 1)                                      \
    } else if (px_step == L) {                                                           \
        DILCONV_LANES_SWITCH(NAME, L, 2)                                                 \
    } else {                                                                             \
        DILCONV_LANES_SWITCH(NAME, px_step, 2)                                           \
    }                                                                                    \
}
#if DILCONV_LANES_UR == 14
#define DILCONV_LANES_WIDE_CASES(NAME)                                                    \
    DILCONV_LANES_CASE(NAME, 7)                                                          \
    DILCONV_LANES_CASE(NAME, 8)                                                          \
    DILCONV_LANES_CASE(NAME, 9)                                                          \
    DILCONV_LANES_CASE(NAME, 10)                                                         \
    DILCONV_LANES_CASE(NAME, 11)                                                         \
    DILCONV_LANES_CASE(NAME, 12)                                                         \
    DILCONV_LANES_CASE(NAME, 13)                                                         \
    DILCONV_LANES_CASE(NAME, 14)
#else
#define DILCONV_LANES_WIDE_CASES(NAME)
#endif
#else
/* Other compilers: the same sums, in the same order, without vector types. */
#define DILCONV_LANES(NAME, T)                                                            \
static inline void NAME(const T *x, ptrdiff_t px_step, ptrdiff_t cb_step, ptrdiff_t n_cb, \
                        const T *w, ptrdiff_t n_taps, const ptrdiff_t *x_off,            \
                        const ptrdiff_t *w_off, T *acc, ptrdiff_t ur, ptrdiff_t nv) {    \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), OB = 2 * L };                              \
    for (ptrdiff_t t = 0; t < n_taps; t++)                                               \
        for (ptrdiff_t cb = 0; cb < n_cb; cb++)                                          \
            for (int c = 0; c < L; c++)                                                  \
                for (ptrdiff_t p = 0; p < ur; p++)                                       \
                    for (int o = 0; o < nv * L; o++)                                     \
                        acc[p * OB + o] += x[x_off[t] + cb * cb_step + p * px_step + c]  \
                                           * w[w_off[t] + (cb * L + c) * OB + o];        \
}
#endif

/* Packing and unpacking, with OB and L of the tier:
   NAME_pack(src, plane, count, channels, dst): `count` consecutive pixels of `channels`
   <= L planes (`plane` apart) into dst[q * L + c], zeros past `channels`;
   NAME_fill(bias, count, acc): acc[q * OB + o] = 0 + bias[o] (the panels' start);
   NAME_store(acc, count, m, plane, out): out[o * plane + q] = acc[q * OB + o], o < m;
   NAME_weights(w, ld, m, cols, taps, cpad, dst): rows [0, m) of contiguous weights (term
   k = c * taps + t of row o at w[o * ld + k]) into dst[(t * cpad + c) * OB + o].
   All but NAME_fill move L x L squares through registers (log2 L rounds of interleaving
   transpose them): one element at a time, the L planes a multiple of 4 KiB apart
   (context_d8, wavenet) share a cache set, and the copies cost a third of the
   multiply-adds. */
#if defined(DILCONV_HAS_SHUFFLE)
#define DILCONV_LANES_SQUARE(NAME, T, LO, HI)                                             \
static inline __attribute__((always_inline)) void NAME##_transpose(NAME##_v *r) {        \
    enum { L = DILCONV_VEC_BYTES / sizeof(T) };                                          \
    for (int round = L; round > 1; round /= 2) {                                         \
        NAME##_v t[L];                                                                   \
        for (int i = 0; i < L / 2; i++) {                                                \
            t[2 * i] = __builtin_shufflevector(r[i], r[i + L / 2], LO);                  \
            t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + L / 2], HI);              \
        }                                                                                \
        for (int i = 0; i < L; i++) r[i] = t[i];                                         \
    }                                                                                    \
}                                                                                        \
/* Squares of `count` pixels from the first, pixel q's L channels at dst + q * step;     \
   returns the pixels done. */                                                           \
static inline ptrdiff_t NAME##_pack_squares(const T *restrict src, ptrdiff_t plane,      \
                                            ptrdiff_t count, T *restrict dst,            \
                                            ptrdiff_t step) {                            \
    enum { L = DILCONV_VEC_BYTES / sizeof(T) };                                          \
    ptrdiff_t q = 0;                                                                     \
    for (; q + L <= count; q += L) {                                                     \
        NAME##_v r[L];                                                                   \
        for (int i = 0; i < L; i++) r[i] = *(const NAME##_vu *)(src + i * plane + q);    \
        NAME##_transpose(r);                                                             \
        for (int i = 0; i < L; i++) *(NAME##_vu *)(dst + (q + i) * step) = r[i];         \
    }                                                                                    \
    return q;                                                                            \
}                                                                                        \
static inline ptrdiff_t NAME##_store_squares(const T *restrict acc, ptrdiff_t count,     \
                                             ptrdiff_t m, ptrdiff_t plane,               \
                                             T *restrict out) {                          \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), OB = 2 * L };                              \
    ptrdiff_t q = 0;                                                                     \
    for (; q + L <= count; q += L)                                                       \
        for (int v = 0; v * L < m; v++) {                                                \
            NAME##_v r[L];                                                               \
            for (int i = 0; i < L; i++)                                                  \
                r[i] = *(const NAME##_vu *)(acc + (q + i) * OB + v * L);                \
            NAME##_transpose(r);                                                         \
            for (int i = 0; i < L && v * L + i < m; i++)                                 \
                *(NAME##_vu *)(out + (v * L + i) * plane + q) = r[i];                    \
        }                                                                                \
    return q;                                                                            \
}                                                                                        \
/* Rows [0, m) of `rows`, `ld` apart, each `cols` values with the term k's c = k / taps  \
   and t = k % taps, into dst[(t * cpad + c) * OB + o] (zeros past m) in squares;        \
   returns the terms done. */                                                            \
static inline ptrdiff_t NAME##_weight_squares(const T *restrict w, ptrdiff_t ld,         \
                                              ptrdiff_t m, ptrdiff_t cols,               \
                                              ptrdiff_t taps, ptrdiff_t cpad,            \
                                              T *restrict dst) {                         \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), OB = 2 * L };                              \
    ptrdiff_t k = 0;                                                                     \
    for (; k + L <= cols; k += L)                                                        \
        for (int v = 0; v < 2; v++) {                                                    \
            NAME##_v r[L];                                                               \
            for (int i = 0; i < L; i++) {                                                \
                r[i] = (NAME##_v){0};                                                    \
                if (v * L + i < m) r[i] = *(const NAME##_vu *)(w + (v * L + i) * ld + k); \
            }                                                                            \
            NAME##_transpose(r);                                                         \
            for (int i = 0; i < L; i++)                                                  \
                *(NAME##_vu *)(dst + ((k + i) % taps * cpad + (k + i) / taps) * OB      \
                               + v * L) = r[i];                                          \
        }                                                                                \
    return k;                                                                            \
}
#else
#define DILCONV_LANES_SQUARE(NAME, T, LO, HI)                                             \
static inline ptrdiff_t NAME##_weight_squares(const T *w, ptrdiff_t ld, ptrdiff_t m,     \
                                              ptrdiff_t cols, ptrdiff_t taps,            \
                                              ptrdiff_t cpad, T *dst) { return 0; }      \
static inline ptrdiff_t NAME##_pack_squares(const T *src, ptrdiff_t plane,               \
                                            ptrdiff_t count, T *dst,                     \
                                            ptrdiff_t step) { return 0; }                \
static inline ptrdiff_t NAME##_store_squares(const T *acc, ptrdiff_t count, ptrdiff_t m, \
                                             ptrdiff_t plane, T *out) { return 0; }
#endif
#define DILCONV_LANES_MOVES(NAME, T)                                                      \
static inline void NAME##_pack(const T *restrict src, ptrdiff_t plane, ptrdiff_t count,  \
                               ptrdiff_t channels, T *restrict dst) {                    \
    enum { L = DILCONV_VEC_BYTES / sizeof(T) };                                          \
    ptrdiff_t q = channels == L ? NAME##_pack_squares(src, plane, count, dst, L) : 0;    \
    for (; q < count; q++)                                                               \
        for (int c = 0; c < L; c++)                                                      \
            dst[q * L + c] = c < channels ? src[c * plane + q] : (T)0;                   \
}                                                                                        \
/* NAME_weights(w, ld, m, cols, taps, cpad, dst): as NAME_weight_squares, all terms. */  \
static inline void NAME##_weights(const T *restrict w, ptrdiff_t ld, ptrdiff_t m,        \
                                  ptrdiff_t cols, ptrdiff_t taps, ptrdiff_t cpad,        \
                                  T *restrict dst) {                                     \
    enum { OB = 2 * (DILCONV_VEC_BYTES / sizeof(T)) };                                   \
    ptrdiff_t k = NAME##_weight_squares(w, ld, m, cols, taps, cpad, dst);               \
    for (; k < cols; k++)                                                                \
        for (int o = 0; o < OB; o++)                                                     \
            dst[(k % taps * cpad + k / taps) * OB + o] = o < m ? w[o * ld + k] : (T)0;   \
}                                                                                        \
static inline void NAME##_fill(const T *restrict bias, ptrdiff_t count, T *restrict acc) { \
    enum { OB = 2 * (DILCONV_VEC_BYTES / sizeof(T)) };                                   \
    for (ptrdiff_t q = 0; q < count; q++)                                                \
        for (int o = 0; o < OB; o++) acc[q * OB + o] = (T)0 + bias[o];                   \
}                                                                                        \
static inline void NAME##_store(const T *restrict acc, ptrdiff_t count, ptrdiff_t m,     \
                                ptrdiff_t plane, T *restrict out) {                      \
    enum { OB = 2 * (DILCONV_VEC_BYTES / sizeof(T)) };                                   \
    for (ptrdiff_t q = NAME##_store_squares(acc, count, m, plane, out); q < count; q++)  \
        for (ptrdiff_t o = 0; o < m; o++) out[o * plane + q] = acc[q * OB + o];          \
}

#define DILCONV_ZIP16 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define DILCONV_ZIP16_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#define DILCONV_ZIP8 0, 8, 1, 9, 2, 10, 3, 11
#define DILCONV_ZIP8_HI 4, 12, 5, 13, 6, 14, 7, 15
#define DILCONV_ZIP4 0, 4, 1, 5
#define DILCONV_ZIP4_HI 2, 6, 3, 7
#define DILCONV_ZIP2 0, 2
#define DILCONV_ZIP2_HI 1, 3
#if DILCONV_VEC_BYTES == 64
#define DILCONV_ZIP_F DILCONV_ZIP16
#define DILCONV_ZIP_F_HI DILCONV_ZIP16_HI
#define DILCONV_ZIP_D DILCONV_ZIP8
#define DILCONV_ZIP_D_HI DILCONV_ZIP8_HI
#elif DILCONV_VEC_BYTES == 32
#define DILCONV_ZIP_F DILCONV_ZIP8
#define DILCONV_ZIP_F_HI DILCONV_ZIP8_HI
#define DILCONV_ZIP_D DILCONV_ZIP4
#define DILCONV_ZIP_D_HI DILCONV_ZIP4_HI
#else
#define DILCONV_ZIP_F DILCONV_ZIP4
#define DILCONV_ZIP_F_HI DILCONV_ZIP4_HI
#define DILCONV_ZIP_D DILCONV_ZIP2
#define DILCONV_ZIP_D_HI DILCONV_ZIP2_HI
#endif

DILCONV_LANES(dilconv_lanes_f, float)
DILCONV_LANES(dilconv_lanes_d, double)
DILCONV_LANES_SQUARE(dilconv_lanes_f, float, DILCONV_ZIP_F, DILCONV_ZIP_F_HI)
DILCONV_LANES_SQUARE(dilconv_lanes_d, double, DILCONV_ZIP_D, DILCONV_ZIP_D_HI)
DILCONV_LANES_MOVES(dilconv_lanes_f, float)
DILCONV_LANES_MOVES(dilconv_lanes_d, double)
#endif
