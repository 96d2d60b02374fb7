/* y += w * x over n contiguous elements. restrict tells the compiler the two runs do not
   overlap, which it cannot prove from Cython's pointers: without it the loop is left
   scalar ("complicated access pattern"). */
#ifndef DILCONV_AXPY_H
#define DILCONV_AXPY_H
#include <stddef.h>

static inline void dilconv_axpy_f(ptrdiff_t n, float w, const float *restrict x,
                                  float *restrict y) {
    for (ptrdiff_t i = 0; i < n; i++) y[i] += w * x[i];
}

static inline void dilconv_axpy_d(ptrdiff_t n, double w, const double *restrict x,
                                  double *restrict y) {
    for (ptrdiff_t i = 0; i < n; i++) y[i] += w * x[i];
}

/* sum a[i] * b[i]: eight partial sums in a fixed order (one vector register), so the loop
   vectorises and the result does not depend on anything but n and the data. */
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
DILCONV_DOT(dilconv_dot_f, float)
DILCONV_DOT(dilconv_dot_d, double)

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
