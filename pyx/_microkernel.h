/* Register-blocked micro-kernel: an MR x NR block of outputs (MR output channels x NR
   pixels) summed over packed panels, with the accumulators in vector registers.

   It is written with GCC/Clang vector extensions because accumulators kept in a C (or
   Cython) array are spilled to the stack by the compiler, which runs ~40x slower. A block
   is NV vectors of pixels per output channel: two 64-byte vectors with AVX-512 (v4), two
   32-byte ones with AVX (v3), else four 16-byte ones (SSE, NEON; wider vectors than the
   target has are emulated slowly). MR fits the accumulators in the registers (32 zmm,
   16 ymm or xmm, 32 on aarch64): 8 rows in v4, 6 in v3 and on aarch64, 3 on SSE2. Each
   term then costs MR broadcasts and NV loads for MR x NV multiply-adds: v4's 8 x 2
   kept 85-90% of the FMA peak with a panel streaming from L2 on a Xeon with two 512-bit
   FMA units, where 16 x 1 (17 loads per 16 multiply-adds) fell to 60-70%. The block
   sizes change which outputs share a block, and the plans built from them, never an
   output's sum.

   The sum runs over n_seg segments of seg_len terms, in that order for every output.
   Term k of segment s multiplies MR values of A, at a + a_off[s] + k*a_step + i*a_row
   (i < m; the rows past m are computed and dropped), with NR consecutive values of B at
   b + b_off[s] + k*b_step. In the forward, a segment is a kernel tap in the image and a
   term an input channel: A is the packed weights, B a packed panel or the image itself.
   In the weight gradient, a segment is a row of pixels and a term one pixel: A is
   grad_output packed (MR_GW rows), B packed input. A sum may be split over calls: one that
   accumulates starts from the stored partial sums, so the terms are added in the same
   order and the bits do not change. */
#ifndef DILCONV_MICROKERNEL_H
#define DILCONV_MICROKERNEL_H
#include <stddef.h>
#include "_vec.h"

/* DILCONV_MR_GW: rows of the weight gradient's blocks, whose A is grad_output packed
   MR_GW output channels per term (one stream of broadcasts): 14 x 2 vectors in v4, the
   lanes forward's block (28 accumulators, 16 loads per 28 multiply-adds, against 8 x 2's
   10 per 16); blocks of at most MR rows sum MR. */
#if defined(DILCONV_V4_SIZES)
#define DILCONV_MR 8
#define DILCONV_MR_GW 14
#define DILCONV_BLOCK_BYTES 128
#elif defined(__AVX__) || defined(__aarch64__)
#define DILCONV_MR 6
#else
#define DILCONV_MR 3
#endif
#ifndef DILCONV_MR_GW
#define DILCONV_MR_GW DILCONV_MR
#endif
#define DILCONV_MR_MAX (DILCONV_MR_GW > DILCONV_MR ? DILCONV_MR_GW : DILCONV_MR)
#ifndef DILCONV_BLOCK_BYTES
#define DILCONV_BLOCK_BYTES 64
#endif
/* Bytes of a panel's chunk of taps in the forward (pyx/_panel.pyx), the default of the
   tuning knob panel_chunk_bytes: in v4 a chunk of the panel stays in L1 while every
   block of output channels reads it (context_d8 6-9% faster than the whole depth at
   once, the other suite layers unchanged); v3's code, timed on the same AVX-512 Xeon,
   was no faster in chunks (aspp_r6 up to 12% slower), so it takes the whole depth. */
#if defined(DILCONV_V4_SIZES)
#define DILCONV_CHUNK_BYTES (16 * 1024)
#else
#define DILCONV_CHUNK_BYTES (1 << 30)
#endif
/* Pixels per block. */
#define DILCONV_NR(T) (DILCONV_BLOCK_BYTES / (ptrdiff_t)sizeof(T))

/* The terms of one block's sum. */
typedef struct {
    ptrdiff_t n_seg, seg_len;
    const ptrdiff_t *a_off, *b_off;   /* per segment */
    ptrdiff_t a_step, a_row;          /* A: next term, next of the MR rows */
    ptrdiff_t b_step;                 /* B: next term */
} dilconv_terms;

#if defined(__GNUC__) || defined(__clang__)
/* The loops over a block's rows and vectors are unrolled before gcc's scalar replacement
   runs: otherwise the accumulators live in a stack array, copied into registers around
   the sum and out again before the stores (32 spills and reloads per block: 1.15-1.3x
   slower with the 27 terms of an RGB stem). */
#define DILCONV_UNROLL _Pragma("GCC unroll 16")
/* One body, inlined with a constant `packed`: gcc keeps the accumulators in registers
   only while the code around them is this plain. Packed A (the forward's weights) is MR
   values per term, zero past the block's rows, with an MR-value bias: rows past m are
   then summed like the others. Otherwise rows past m repeat row m-1. */
#define DILCONV_UKR(NAME, T)                                                             \
typedef T NAME##_v __attribute__((vector_size(DILCONV_VEC_BYTES)));                      \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC_BYTES), aligned(sizeof(T)),   \
                                   may_alias));                                          \
static inline __attribute__((always_inline)) void NAME##_body(                           \
        const dilconv_terms *terms, const T *restrict a, const T *restrict b,            \
        const T *bias, int accumulate, T *restrict c, ptrdiff_t ldc, ptrdiff_t m,        \
        const int packed, const int rows) {                                              \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), MR = DILCONV_MR,                           \
           NV = DILCONV_BLOCK_BYTES / DILCONV_VEC_BYTES };                               \
    const ptrdiff_t a_step = packed ? MR : terms->a_step;                                \
    const ptrdiff_t a_row = packed ? 1 : terms->a_row;                                   \
    const ptrdiff_t b_step = terms->b_step, seg_len = terms->seg_len;                    \
    ptrdiff_t row[DILCONV_MR_MAX];                                                       \
    DILCONV_UNROLL for (int i = 0; i < rows; i++)                                        \
        row[i] = (packed || i < m ? i : m - 1) * a_row;                                  \
    NAME##_v acc[DILCONV_MR_MAX][NV];                                                    \
    DILCONV_UNROLL for (int i = 0; i < rows; i++)                                        \
        DILCONV_UNROLL for (int v = 0; v < NV; v++) {                                    \
            if (accumulate)                                                              \
                acc[i][v] = *(const NAME##_vu *)(c + (i < m ? i : m - 1) * ldc + v * L); \
            else                                                                         \
                acc[i][v] = (NAME##_v){0} + (bias ? bias[packed || i < m ? i : m - 1]    \
                                                  : (T)0);                               \
        }                                                                                \
    for (ptrdiff_t s = 0; s < terms->n_seg; s++) {                                       \
        const T *ak = a + terms->a_off[s], *bk = b + terms->b_off[s];                    \
        for (ptrdiff_t k = 0; k < seg_len; k++, ak += a_step, bk += b_step) {            \
            NAME##_v bv[NV];                                                             \
            DILCONV_UNROLL for (int v = 0; v < NV; v++)                                  \
                bv[v] = *(const NAME##_vu *)(bk + v * L);                                \
            DILCONV_UNROLL for (int i = 0; i < rows; i++)                                \
                DILCONV_UNROLL for (int v = 0; v < NV; v++)                              \
                    acc[i][v] += ak[row[i]] * bv[v];                                     \
        }                                                                                \
    }                                                                                    \
    DILCONV_UNROLL for (int i = 0; i < rows; i++)                                        \
        if (i < m)                                                                       \
            DILCONV_UNROLL for (int v = 0; v < NV; v++)                                  \
                *(NAME##_vu *)(c + i * ldc + v * L) = acc[i][v];                         \
}                                                                                        \
/* Any n <= NR: a partial block goes through a local full one. */                        \
static inline __attribute__((always_inline)) void NAME##_any(                            \
        const dilconv_terms *terms, const T *restrict a, const T *restrict b,            \
        const T *bias, int accumulate, T *restrict c, ptrdiff_t ldc, ptrdiff_t m,        \
        ptrdiff_t n, const int packed, const int rows) {                                 \
    enum { NR = DILCONV_BLOCK_BYTES / sizeof(T) };                                       \
    if (n == NR) {                                                                       \
        NAME##_body(terms, a, b, bias, accumulate, c, ldc, m, packed, rows);             \
        return;                                                                          \
    }                                                                                    \
    T part[DILCONV_MR_MAX][NR];   /* where the body wrote it, or loaded to accumulate */ \
    if (accumulate)                                                                      \
        for (ptrdiff_t i = 0; i < m; i++)                                                \
            for (ptrdiff_t j = 0; j < NR; j++) part[i][j] = j < n ? c[i * ldc + j] : (T)0; \
    NAME##_body(terms, a, b, bias, accumulate, &part[0][0], NR, m, packed, rows);        \
    for (ptrdiff_t i = 0; i < m; i++)                                                    \
        for (ptrdiff_t j = 0; j < n; j++) c[i * ldc + j] = part[i][j];                   \
}                                                                                        \
/* The weight gradient's: m <= MR_GW rows, a block of MR rows where m fits one. Not      \
   inlined, so that the block's loop has the registers to itself: inside the weight      \
   gradient's OpenMP body gcc once kept six of A's eight row pointers on the stack,       \
   reloaded every term. */                                                                \
static __attribute__((noinline)) void NAME(const dilconv_terms *terms, const T *a,      \
                        const T *b, const T *bias, int accumulate, T *c, ptrdiff_t ldc,  \
                        ptrdiff_t m, ptrdiff_t n) {                                      \
    if (m <= DILCONV_MR)                                                                 \
        NAME##_any(terms, a, b, bias, accumulate, c, ldc, m, n, 0, DILCONV_MR);          \
    else                                                                                 \
        NAME##_any(terms, a, b, bias, accumulate, c, ldc, m, n, 0, DILCONV_MR_GW);       \
}                                                                                        \
static inline void NAME##_packed(const dilconv_terms *terms, const T *a, const T *b,     \
                                 const T *bias, int accumulate, T *c, ptrdiff_t ldc,     \
                                 ptrdiff_t m, ptrdiff_t n) {                             \
    NAME##_any(terms, a, b, bias, accumulate, c, ldc, m, n, 1, DILCONV_MR);              \
}
#else
/* Other compilers: the same sums, in the same order, without vector types. */
#define DILCONV_UKR(NAME, T)                                                              \
static inline void NAME(const dilconv_terms *terms, const T *a, const T *b,              \
                        const T *bias, int accumulate,                                   \
                        T *c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n) {                 \
    enum { NR = DILCONV_NR(T), MR = DILCONV_MR_MAX };                                    \
    T acc[MR][NR];                                                                       \
    for (int i = 0; i < MR; i++)                                                         \
        for (int j = 0; j < NR; j++)                                                     \
            acc[i][j] = (accumulate && i < m && j < n) ? c[i * ldc + j]                  \
                        : (bias && i < m) ? bias[i] : (T)0;                              \
    for (ptrdiff_t s = 0; s < terms->n_seg; s++)                                         \
        for (ptrdiff_t k = 0; k < terms->seg_len; k++)                                   \
            for (int i = 0; i < MR; i++)                                                 \
                for (int j = 0; j < NR; j++)                                             \
                    acc[i][j] += a[terms->a_off[s] + k * terms->a_step                   \
                                   + (i < m ? i : m - 1) * terms->a_row]                 \
                                 * b[terms->b_off[s] + k * terms->b_step + j];           \
    for (ptrdiff_t i = 0; i < m; i++)                                                    \
        for (ptrdiff_t j = 0; j < n; j++) c[i * ldc + j] = acc[i][j];                    \
}                                                                                        \
static inline void NAME##_packed(const dilconv_terms *terms, const T *a, const T *b,     \
                                 const T *bias, int accumulate, T *c, ptrdiff_t ldc,     \
                                 ptrdiff_t m, ptrdiff_t n) {                             \
    NAME(terms, a, b, bias, accumulate, c, ldc, m, n);                                   \
}
#endif

/* One block of pixels (64 bytes) copied with vector moves: a copy loop would become a
   call to memmove, whose cost dominates copies this short. */
#if defined(__GNUC__) || defined(__clang__)
#define DILCONV_COPY_BLOCK(NAME, T)                                                       \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC_BYTES), aligned(sizeof(T)),  \
                                   may_alias));                                          \
static inline void NAME(const T *src, T *dst) {                                          \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), NV = DILCONV_BLOCK_BYTES / DILCONV_VEC_BYTES }; \
    NAME##_vu v[NV];                                                                     \
    for (int i = 0; i < NV; i++) v[i] = *(const NAME##_vu *)(src + i * L);               \
    for (int i = 0; i < NV; i++) *(NAME##_vu *)(dst + i * L) = v[i];                     \
}
#else
#include <string.h>
#define DILCONV_COPY_BLOCK(NAME, T)                                                       \
static inline void NAME(const T *src, T *dst) { memcpy(dst, src, DILCONV_BLOCK_BYTES); }
#endif

/* n < NR values into a block, where the `room` >= n values from dst may be written: the
   ones past n are rewritten later (pack_run in pyx/_panel.pyx fills a block's lanes in
   order, and zeros past the last pixel). A run of a few pixels, such as the one left of a
   65-pixel row after two blocks, was a scalar loop with its tails, a quarter of a grouped
   layer's forward; with AVX-512, whole vectors (the last one a masked load: nothing is
   read past n), or the last vector again ending at n. No masked stores: on an AVX-512
   EPYC they took 40% of that forward. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define DILCONV_COPY_PART(NAME, T)                                                        \
static inline void NAME(const T *restrict src, T *restrict dst, ptrdiff_t n,             \
                        ptrdiff_t room) {                                                \
    enum { L = DILCONV_VEC_BYTES / sizeof(T) };                                          \
    ptrdiff_t i = 0;                                                                     \
    for (; i + L <= n; i += L) NAME##_move(src + i, dst + i, L);                         \
    if (i == n) return;                                                                  \
    if (i + L <= room)                                                                   \
        NAME##_move(src + i, dst + i, n - i);                                            \
    else if (n >= L)                                                                     \
        NAME##_move(src + n - L, dst + n - L, L);                                        \
    else                                                                                 \
        for (; i < n; i++) dst[i] = src[i];                                              \
}
/* A whole vector stored from the first `count` values of src (a masked load below L). */
static inline void dilconv_copy_part_f_move(const float *src, float *dst,
                                            ptrdiff_t count) {
    _mm512_storeu_ps(dst, count == 16 ? _mm512_loadu_ps(src)
                          : _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1), src));
}
static inline void dilconv_copy_part_d_move(const double *src, double *dst,
                                            ptrdiff_t count) {
    _mm512_storeu_pd(dst, count == 8 ? _mm512_loadu_pd(src)
                          : _mm512_maskz_loadu_pd((__mmask8)((1u << count) - 1), src));
}
#else
#define DILCONV_COPY_PART(NAME, T)                                                        \
static inline void NAME(const T *restrict src, T *restrict dst, ptrdiff_t n,             \
                        ptrdiff_t room) {                                                \
    (void)room;                                                                          \
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[i];                                   \
}
#endif
DILCONV_COPY_PART(dilconv_copy_part_f, float)
DILCONV_COPY_PART(dilconv_copy_part_d, double)

/* One block of pixels from every other value (stride 2): whole-vector shuffles, where a
   loop over a run of any length pays its tail and set-up on every block. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define DILCONV_HAS_SHUFFLE 1
#endif
#endif
#if DILCONV_VEC_BYTES == 64
#define DILCONV_EVEN_F 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define DILCONV_EVEN_D 0, 2, 4, 6, 8, 10, 12, 14
#elif DILCONV_VEC_BYTES == 32
#define DILCONV_EVEN_F 0, 2, 4, 6, 8, 10, 12, 14
#define DILCONV_EVEN_D 0, 2, 4, 6
#else
#define DILCONV_EVEN_F 0, 2, 4, 6
#define DILCONV_EVEN_D 0, 2
#endif
#if defined(DILCONV_HAS_SHUFFLE)
#define DILCONV_GATHER2_BLOCK(NAME, T, EVEN)                                              \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC_BYTES), aligned(sizeof(T)),  \
                                   may_alias));                                          \
static inline void NAME(const T *src, T *dst) {                                          \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), NV = DILCONV_BLOCK_BYTES / DILCONV_VEC_BYTES }; \
    for (int i = 0; i < NV; i++) {                                                       \
        NAME##_vu lo = *(const NAME##_vu *)(src + 2 * i * L);                            \
        NAME##_vu hi = *(const NAME##_vu *)(src + 2 * i * L + L);                        \
        *(NAME##_vu *)(dst + i * L) = __builtin_shufflevector(lo, hi, EVEN);             \
    }                                                                                    \
}
#else
#define DILCONV_GATHER2_BLOCK(NAME, T, EVEN)                                              \
static inline void NAME(const T *restrict src, T *restrict dst) {                        \
    for (int i = 0; i < DILCONV_NR(T); i++) dst[i] = src[2 * i];                          \
}
#endif

DILCONV_UKR(dilconv_ukr_f, float)
DILCONV_UKR(dilconv_ukr_d, double)
DILCONV_COPY_BLOCK(dilconv_copy_block_f, float)
DILCONV_COPY_BLOCK(dilconv_copy_block_d, double)
DILCONV_GATHER2_BLOCK(dilconv_gather2_block_f, float, DILCONV_EVEN_F)
DILCONV_GATHER2_BLOCK(dilconv_gather2_block_d, double, DILCONV_EVEN_D)
#endif
