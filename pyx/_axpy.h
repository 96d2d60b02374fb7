/* y += w * x over n contiguous elements. restrict tells the compiler the two runs do not
   overlap, which it cannot prove from Cython's pointers: without it the loop is left
   scalar ("complicated access pattern"). */
#ifndef DILCONV_AXPY_H
#define DILCONV_AXPY_H
#include <stddef.h>
#include "_vec.h"

static inline void dilconv_axpy_f(ptrdiff_t n, float w, const float *restrict x,
                                  float *restrict y) {
    for (ptrdiff_t i = 0; i < n; i++) y[i] += w * x[i];
}

static inline void dilconv_axpy_d(ptrdiff_t n, double w, const double *restrict x,
                                  double *restrict y) {
    for (ptrdiff_t i = 0; i < n; i++) y[i] += w * x[i];
}

/* sum a[i] * b[i] in a fixed order, so the result depends on nothing but n and the data:
   with vector extensions, four vector accumulators (one would wait on its own
   multiply-adds) and a fixed tree; otherwise eight partial sums, which compilers
   vectorise into one register. */
#if defined(__GNUC__) || defined(__clang__)
#define DILCONV_DOT(NAME, T)                                                   \
typedef T NAME##_v __attribute__((vector_size(DILCONV_VEC256_BYTES)));        \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC256_BYTES),         \
                                   aligned(sizeof(T)), may_alias));            \
static inline T NAME(ptrdiff_t n, const T *restrict a, const T *restrict b) {  \
    enum { L = DILCONV_VEC256_BYTES / sizeof(T) };                            \
    if (n < L) {             /* the tail alone: the lanes would add +0 to it */ \
        T tail = 0;                                                            \
        for (ptrdiff_t i = 0; i < n; i++) tail += a[i] * b[i];                 \
        return tail;                                                           \
    }                                                                          \
    NAME##_v acc[4] = {{0}, {0}, {0}, {0}};                                    \
    ptrdiff_t i = 0;                                                           \
    for (; i + 4 * L <= n; i += 4 * L)                                         \
        for (int v = 0; v < 4; v++)                                            \
            acc[v] += *(const NAME##_vu *)(a + i + v * L)                      \
                      * *(const NAME##_vu *)(b + i + v * L);                   \
    for (; i + L <= n; i += L)                                                 \
        acc[0] += *(const NAME##_vu *)(a + i) * *(const NAME##_vu *)(b + i);   \
    T tail = 0;                                                                \
    for (; i < n; i++) tail += a[i] * b[i];                                    \
    acc[0] = (acc[0] + acc[1]) + (acc[2] + acc[3]);                            \
    T sum = 0;                                                                 \
    for (int l = 0; l < L; l++) sum += acc[0][l];                              \
    return sum + tail;                                                         \
}
#else
#define DILCONV_DOT(NAME, T)                                                   \
static inline T NAME(ptrdiff_t n, const T *restrict a, const T *restrict b) {  \
    T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                      \
    ptrdiff_t i = 0;                                                           \
    for (; i + 8 <= n; i += 8)                                                 \
        for (int l = 0; l < 8; l++) part[l] += a[i + l] * b[i + l];           \
    T tail = 0;                                                                \
    for (; i < n; i++) tail += a[i] * b[i];                                    \
    return (((part[0] + part[1]) + (part[2] + part[3]))                        \
            + ((part[4] + part[5]) + (part[6] + part[7]))) + tail;             \
}
#endif
DILCONV_DOT(dilconv_dot_f, float)
DILCONV_DOT(dilconv_dot_d, double)

/* out[k] += sum over r < rows, i < n of a[r * a_row + i] * b[r * b_row + k * b_gap + i],
   k < 3: three taps of a kernel row against the same run of each of `rows` rows (a weight
   gradient's terms). Each sum keeps four vector accumulators over all the rows and reduces
   them once in a fixed tree (a reduction per row would cost more than a short row's
   multiply-adds); the same operations in the same order on every FMA tier. */
#define DILCONV_ROW_DOTS3(NAME, T)                                             \
typedef T NAME##_v __attribute__((vector_size(DILCONV_VEC256_BYTES)));        \
typedef T NAME##_vu __attribute__((vector_size(DILCONV_VEC256_BYTES),         \
                                   aligned(sizeof(T)), may_alias));            \
static inline void NAME(ptrdiff_t rows, ptrdiff_t n, const T *restrict a,      \
                        ptrdiff_t a_row, const T *restrict b, ptrdiff_t b_row, \
                        ptrdiff_t b_gap, T *restrict out) {                    \
    enum { L = DILCONV_VEC256_BYTES / sizeof(T) };                            \
    NAME##_v acc[3][4];                                                        \
    T tail[3] = {0, 0, 0};                                                     \
    for (int k = 0; k < 3; k++)                                                \
        for (int v = 0; v < 4; v++) acc[k][v] = (NAME##_v){0};                 \
    for (ptrdiff_t r = 0; r < rows; r++) {                                     \
        const T *ar = a + r * a_row, *br = b + r * b_row;                      \
        ptrdiff_t i = 0;                                                       \
        for (; i + 4 * L <= n; i += 4 * L)                                     \
            for (int v = 0; v < 4; v++) {                                      \
                NAME##_v av = *(const NAME##_vu *)(ar + i + v * L);            \
                for (int k = 0; k < 3; k++)                                    \
                    acc[k][v] += av                                    \
                                 * *(const NAME##_vu *)(br + k * b_gap + i + v * L); \
            }                                                                  \
        for (int v = 0; i + L <= n; i += L, v++) {                             \
            NAME##_v av = *(const NAME##_vu *)(ar + i);                        \
            for (int k = 0; k < 3; k++)                                        \
                acc[k][v] += av * *(const NAME##_vu *)(br + k * b_gap + i);    \
        }                                                                      \
        for (; i < n; i++)                                                     \
            for (int k = 0; k < 3; k++) tail[k] += ar[i] * br[k * b_gap + i];  \
    }                                                                          \
    for (int k = 0; k < 3; k++) {                                              \
        acc[k][0] = (acc[k][0] + acc[k][1]) + (acc[k][2] + acc[k][3]);         \
        T sum = 0;                                                             \
        for (int l = 0; l < L; l++) sum += acc[k][0][l];                       \
        out[k] += sum + tail[k];                                               \
    }                                                                          \
}
#if defined(__GNUC__) || defined(__clang__)
DILCONV_ROW_DOTS3(dilconv_row_dots3_f, float)
DILCONV_ROW_DOTS3(dilconv_row_dots3_d, double)
#else
#define DILCONV_ROW_DOTS3_PLAIN(NAME, DOT, T)                                  \
static inline void NAME(ptrdiff_t rows, ptrdiff_t n, const T *a, ptrdiff_t a_row, \
                        const T *b, ptrdiff_t b_row, ptrdiff_t b_gap, T *out) { \
    for (int k = 0; k < 3; k++)                                                \
        for (ptrdiff_t r = 0; r < rows; r++)                                   \
            out[k] += DOT(n, a + r * a_row, b + r * b_row + k * b_gap);        \
}
DILCONV_ROW_DOTS3_PLAIN(dilconv_row_dots3_f, dilconv_dot_f, float)
DILCONV_ROW_DOTS3_PLAIN(dilconv_row_dots3_d, dilconv_dot_d, double)
#endif

/* sum a[i]: sixteen partial sums in a fixed order (two to four vector registers, so the
   adds overlap), then a fixed tree. */
#define DILCONV_SUM(NAME, T)                                                   \
static inline T NAME(ptrdiff_t n, const T *restrict a) {                       \
    T part[16] = {0};                                                          \
    ptrdiff_t i = 0;                                                           \
    for (; i + 16 <= n; i += 16)                                               \
        for (int l = 0; l < 16; l++) part[l] += a[i + l];                      \
    for (; i < n; i++) part[i % 16] += a[i];                                   \
    for (int w = 8; w > 0; w /= 2)                                             \
        for (int l = 0; l < w; l++) part[l] += part[l + w];                    \
    return part[0];                                                            \
}
DILCONV_SUM(dilconv_sum_f, float)
DILCONV_SUM(dilconv_sum_d, double)

/* dst[i] = src[i * step]: with restrict, steps of 1 and 2 copy with vector moves and
   shuffles instead of one element at a time. */
#define DILCONV_GATHER(NAME, T)                                                \
static inline void NAME(ptrdiff_t n, const T *restrict src, ptrdiff_t step,    \
                        T *restrict dst) {                                     \
    if (step == 1)                                                             \
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[i];                     \
    else if (step == 2)                                                        \
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[2 * i];                 \
    else                                                                       \
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = src[i * step];              \
}
DILCONV_GATHER(dilconv_gather_f, float)
DILCONV_GATHER(dilconv_gather_d, double)
#endif
