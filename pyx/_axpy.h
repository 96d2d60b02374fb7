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
#endif
