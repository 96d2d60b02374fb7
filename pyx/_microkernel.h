/* Register-blocked micro-kernel: an MR x NR block of outputs (MR output channels x NR
   pixels) summed over packed panels, with the accumulators in vector registers.

   It is written with GCC/Clang vector extensions because accumulators kept in a C (or
   Cython) array are spilled to the stack by the compiler, which runs ~40x slower. The
   32-byte vectors map to one AVX register, or to two SSE or NEON registers.

   The sum runs over n_seg segments of seg_len terms, in that order for every output.
   Term k of segment s multiplies MR values of A, at a + a_off[s] + k*a_step + i*a_row
   (i < m; the rows past m are computed and dropped), with NR consecutive values of B at
   b + b_off[s] + k*b_step. In the forward,
   a segment is a kernel tap in the image and a term an input channel: A is the packed
   weights, B a packed panel or the image itself. In the weight gradient, a segment is a
   row of pixels and a term one pixel: A is grad_output in place, B packed input. */
#ifndef DILCONV_MICROKERNEL_H
#define DILCONV_MICROKERNEL_H
#include <stddef.h>

#define DILCONV_MR 6
#define DILCONV_VEC_BYTES 32
/* Pixels per block: two vectors. */
#define DILCONV_NR(T) (2 * DILCONV_VEC_BYTES / (ptrdiff_t)sizeof(T))

/* The terms of one block's sum. */
typedef struct {
    ptrdiff_t n_seg, seg_len;
    const ptrdiff_t *a_off, *b_off;   /* per segment */
    ptrdiff_t a_step, a_row;          /* A: next term, next of the MR rows */
    ptrdiff_t b_step;                 /* B: next term */
} dilconv_terms;

#if defined(__GNUC__) || defined(__clang__)
#define DILCONV_UKR(NAME, T)                                                              \
typedef T NAME##_v __attribute__((vector_size(DILCONV_VEC_BYTES)));                       \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC_BYTES), aligned(sizeof(T)),  \
                                   may_alias));                                          \
static inline void NAME(const dilconv_terms *terms, const T *restrict a,                 \
                        const T *restrict b, const T *bias, int accumulate,              \
                        T *restrict c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n) {        \
    enum { L = DILCONV_VEC_BYTES / sizeof(T), MR = DILCONV_MR };                         \
    const ptrdiff_t a_step = terms->a_step, a_row = terms->a_row;                        \
    const ptrdiff_t b_step = terms->b_step, seg_len = terms->seg_len;                    \
    NAME##_v acc0[MR], acc1[MR];                                                         \
    T part[MR][2 * L];                                                                   \
    for (int i = 0; i < MR; i++) {                                                       \
        if (accumulate && i < m && n == 2 * L) {                                         \
            acc0[i] = *(const NAME##_vu *)(c + i * ldc);                                 \
            acc1[i] = *(const NAME##_vu *)(c + i * ldc + L);                             \
        } else if (accumulate && i < m) {  /* a partial block: through `part` */        \
            for (int j = 0; j < 2 * L; j++) part[i][j] = j < n ? c[i * ldc + j] : (T)0;  \
            acc0[i] = *(NAME##_vu *)part[i];                                             \
            acc1[i] = *(NAME##_vu *)(part[i] + L);                                       \
        } else {                                                                         \
            acc0[i] = (NAME##_v){0} + ((bias && i < m) ? bias[i] : (T)0);                \
            acc1[i] = acc0[i];                                                           \
        }                                                                                \
    }                                                                                    \
    /* Rows past m repeat row m-1, so A is never read past its m rows. */                \
    ptrdiff_t row[MR];                                                                   \
    for (int i = 0; i < MR; i++) row[i] = (i < m ? i : m - 1) * a_row;                   \
    for (ptrdiff_t s = 0; s < terms->n_seg; s++) {                                       \
        const T *ak = a + terms->a_off[s], *bk = b + terms->b_off[s];                    \
        for (ptrdiff_t k = 0; k < seg_len; k++, ak += a_step, bk += b_step) {            \
            NAME##_v b0 = *(const NAME##_vu *)bk, b1 = *(const NAME##_vu *)(bk + L);     \
            for (int i = 0; i < MR; i++) {                                               \
                acc0[i] += ak[row[i]] * b0;                                              \
                acc1[i] += ak[row[i]] * b1;                                              \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
    if (n == 2 * L) {                                                                    \
        for (int i = 0; i < MR && i < m; i++) {                                          \
            *(NAME##_vu *)(c + i * ldc) = acc0[i];                                       \
            *(NAME##_vu *)(c + i * ldc + L) = acc1[i];                                   \
        }                                                                                \
        return;                                                                          \
    }                                                                                    \
    for (int i = 0; i < MR && i < m; i++) {                                              \
        *(NAME##_vu *)part[i] = acc0[i];                                                 \
        *(NAME##_vu *)(part[i] + L) = acc1[i];                                           \
        for (ptrdiff_t j = 0; j < n; j++) c[i * ldc + j] = part[i][j];                   \
    }                                                                                    \
}
#else
/* Other compilers: the same sums, in the same order, without vector types. */
#define DILCONV_UKR(NAME, T)                                                              \
static inline void NAME(const dilconv_terms *terms, const T *a, const T *b,              \
                        const T *bias, int accumulate,                                   \
                        T *c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n) {                 \
    enum { NR = DILCONV_NR(T), MR = DILCONV_MR };                                        \
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
}
#endif

DILCONV_UKR(dilconv_ukr_f, float)
DILCONV_UKR(dilconv_ukr_d, double)
#endif
