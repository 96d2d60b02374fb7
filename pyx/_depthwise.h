/* Depthwise rows: every output is its bias plus its in-image taps, summed in registers in a
   fixed order (kernel row, then kernel column) and stored once. A block of R output rows x
   V vectors keeps its R*V sums in registers over all taps, so a tap costs one load and one
   multiply-add per vector (an axpy into memory would also load and store the sums), and the
   R*V independent chains of additions hide their latency.

   Output j of row r of a run: y[r*y_next + j] = b + sum_{i < nh} sum_{k < nk}
       w[i*w_row + k] * x[r*x_next + i*x_row + k*dw + j*sw].
   The caller passes only taps whose input pixel is in the image: padding is never
   multiplied. setup.py builds this without fused multiply-adds (gcc fused the sums of
   some block shapes and not of others), so every block rounds alike: an output's bits do
   not depend on the block, the band or the thread that computes it. */
#ifndef DILCONV_DEPTHWISE_H
#define DILCONV_DEPTHWISE_H
#include <stddef.h>
#include "_vec.h"

#if defined(__GNUC__) || defined(__clang__)
/* GCC/Clang vector types: gcc left plain loops over a block scalar or vectorised them
   across taps, with shuffles. may_alias and element alignment: they load and store
   unaligned runs of a float array, like the types of the unaligned intrinsics. */
#define DILCONV_DW_BLOCK(NAME, T, BYTES, R, V)                                       \
typedef T NAME##_vec __attribute__((vector_size(BYTES), may_alias, aligned(sizeof(T))));\
static inline void NAME(const T *restrict x, ptrdiff_t x_next, ptrdiff_t x_row,       \
                        ptrdiff_t nh, ptrdiff_t dw, const T *restrict w,              \
                        ptrdiff_t w_row, ptrdiff_t nk, T b, T *restrict y,            \
                        ptrdiff_t y_next) {                                           \
    enum { L = (BYTES) / sizeof(T) };                                                 \
    const NAME##_vec bv = b - (NAME##_vec){0};   /* broadcast (b - 0 is b, even -0) */\
    NAME##_vec acc[R][V];                                                             \
    for (int r = 0; r < R; r++)                                                       \
        for (int v = 0; v < V; v++) acc[r][v] = bv;                                   \
    for (ptrdiff_t i = 0; i < nh; i++)                                                \
        for (ptrdiff_t k = 0; k < nk; k++) {                                          \
            const T wv = w[i * w_row + k];                                            \
            const T *xp = x + i * x_row + k * dw;                                     \
            for (int r = 0; r < R; r++)                                               \
                for (int v = 0; v < V; v++)                                           \
                    acc[r][v] += wv * *(const NAME##_vec *)(xp + r * x_next + v * L); \
        }                                                                             \
    for (int r = 0; r < R; r++)                                                       \
        for (int v = 0; v < V; v++) *(NAME##_vec *)(y + r * y_next + v * L) = acc[r][v];\
}
#else
/* Other compilers: the same sums, in the same order, on plain arrays. */
#define DILCONV_DW_BLOCK(NAME, T, BYTES, R, V)                                       \
static inline void NAME(const T *restrict x, ptrdiff_t x_next, ptrdiff_t x_row,       \
                        ptrdiff_t nh, ptrdiff_t dw, const T *restrict w,              \
                        ptrdiff_t w_row, ptrdiff_t nk, T b, T *restrict y,            \
                        ptrdiff_t y_next) {                                           \
    enum { N = (BYTES) / sizeof(T) * (V) };                                           \
    T acc[R][N];                                                                      \
    for (int r = 0; r < R; r++)                                                       \
        for (int l = 0; l < N; l++) acc[r][l] = b;                                    \
    for (ptrdiff_t i = 0; i < nh; i++)                                                \
        for (ptrdiff_t k = 0; k < nk; k++) {                                          \
            const T wv = w[i * w_row + k];                                            \
            const T *xp = x + i * x_row + k * dw;                                     \
            for (int r = 0; r < R; r++)                                               \
                for (int l = 0; l < N; l++) acc[r][l] += wv * xp[r * x_next + l];     \
        }                                                                             \
    for (int r = 0; r < R; r++)                                                       \
        for (int l = 0; l < N; l++) y[r * y_next + l] = acc[r][l];                    \
}
#endif

/* One output in each of R rows (plain scalars: gcc kept one-element vectors on the
   stack). Any column stride: x points at the output's own input pixel. */
#define DILCONV_DW_ONE(NAME, T, R)                                                   \
static inline void NAME(const T *restrict x, ptrdiff_t x_next, ptrdiff_t x_row,       \
                        ptrdiff_t nh, ptrdiff_t dw, const T *restrict w,              \
                        ptrdiff_t w_row, ptrdiff_t nk, T b, T *restrict y,            \
                        ptrdiff_t y_next) {                                           \
    T acc[R];                                                                         \
    for (int r = 0; r < R; r++) acc[r] = b;                                           \
    for (ptrdiff_t i = 0; i < nh; i++)                                                \
        for (ptrdiff_t k = 0; k < nk; k++) {                                          \
            const T wv = w[i * w_row + k];                                            \
            const T *xp = x + i * x_row + k * dw;                                     \
            for (int r = 0; r < R; r++) acc[r] += wv * xp[r * x_next];                \
        }                                                                             \
    for (int r = 0; r < R; r++) y[r * y_next] = acc[r];                               \
}

/* A run of n outputs in each of R rows. Unit stride: blocks of four vectors, then
   one block of the whole vectors left (more sums in flight than one vector at a time); a
   rest shorter than a vector is covered by one more vector that ends at the run's end and
   recomputes some outputs (same sums, stored again). Runs shorter than a vector take half
   vectors the same way, or single outputs. */
#define DILCONV_DW_ROWS(NAME, T, R, BYTES)                                            \
DILCONV_DW_BLOCK(NAME##_v4, T, (BYTES), R, 4)                                         \
DILCONV_DW_BLOCK(NAME##_v3, T, (BYTES), R, 3)                                         \
DILCONV_DW_BLOCK(NAME##_v2, T, (BYTES), R, 2)                                         \
DILCONV_DW_BLOCK(NAME##_v1, T, (BYTES), R, 1)                                         \
DILCONV_DW_BLOCK(NAME##_half, T, (BYTES) / 2, R, 1)                                   \
DILCONV_DW_ONE(NAME##_one, T, R)                                                      \
static inline void NAME(ptrdiff_t n, const T *x, ptrdiff_t x_next, ptrdiff_t x_row,   \
                        ptrdiff_t nh, ptrdiff_t dw, ptrdiff_t sw, const T *w,         \
                        ptrdiff_t w_row, ptrdiff_t nk, T b, T *y, ptrdiff_t y_next) { \
    const ptrdiff_t lanes = (BYTES) / sizeof(T), half = lanes / 2;                    \
    ptrdiff_t j = 0;                                                                  \
    if (sw == 1 && n >= lanes) {                                                      \
        for (; j + 4 * lanes <= n; j += 4 * lanes)                                    \
            NAME##_v4(x + j, x_next, x_row, nh, dw, w, w_row, nk, b, y + j, y_next);  \
        switch ((n - j) / lanes) {                                                    \
        case 3:                                                                       \
            NAME##_v3(x + j, x_next, x_row, nh, dw, w, w_row, nk, b, y + j, y_next);  \
            break;                                                                    \
        case 2:                                                                       \
            NAME##_v2(x + j, x_next, x_row, nh, dw, w, w_row, nk, b, y + j, y_next);  \
            break;                                                                    \
        case 1:                                                                       \
            NAME##_v1(x + j, x_next, x_row, nh, dw, w, w_row, nk, b, y + j, y_next);  \
            break;                                                                    \
        }                                                                             \
        j += (n - j) / lanes * lanes;                                                 \
        if (j < n)                                                                    \
            NAME##_v1(x + n - lanes, x_next, x_row, nh, dw, w, w_row, nk, b,          \
                      y + n - lanes, y_next);                                         \
        j = n;                                                                        \
    } else if (sw == 1 && n >= half) {                                                \
        for (; j < n; j += half) {                                                    \
            if (j + half > n)                                                         \
                j = n - half;                                                         \
            NAME##_half(x + j, x_next, x_row, nh, dw, w, w_row, nk, b, y + j, y_next);\
        }                                                                             \
    }                                                                                 \
    for (; j < n; j++)                                                                \
        NAME##_one(x + j * sw, x_next, x_row, nh, dw, w, w_row, nk, b, y + j, y_next);\
}

/* n outputs in each of `rows` (1 or DILCONV_DW_ROW_BLOCK) consecutive output rows with
   the same taps. Two rows: eight independent sums per block; four rows were as fast on
   float32 in cache but slower from memory (more interleaved streams), most on float64. */
enum { DILCONV_DW_ROW_BLOCK = 2 };
#define DILCONV_DW_RUN(NAME, T, BYTES)                                                \
DILCONV_DW_ROWS(NAME##_r1, T, 1, BYTES)                                               \
DILCONV_DW_ROWS(NAME##_rb, T, DILCONV_DW_ROW_BLOCK, BYTES)                            \
static inline void NAME(ptrdiff_t rows, ptrdiff_t n, const T *x, ptrdiff_t x_next,    \
                        ptrdiff_t x_row, ptrdiff_t nh, ptrdiff_t dw, ptrdiff_t sw,    \
                        const T *w, ptrdiff_t w_row, ptrdiff_t nk, T b, T *y,         \
                        ptrdiff_t y_next) {                                           \
    if (rows == DILCONV_DW_ROW_BLOCK)                                                 \
        NAME##_rb(n, x, x_next, x_row, nh, dw, sw, w, w_row, nk, b, y, y_next);       \
    else                                                                              \
        NAME##_r1(n, x, x_next, x_row, nh, dw, sw, w, w_row, nk, b, y, y_next);       \
}

/* Fetch `bytes` from p into cache ahead of their use (the next task's input plane: from
   memory, the hardware prefetchers followed its short row streams too late). */
static inline void dilconv_dw_prefetch(const void *p, ptrdiff_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
    for (ptrdiff_t i = 0; i < bytes; i += 64)
        __builtin_prefetch((const char *)p + i);
#else
    (void)p; (void)bytes;
#endif
}

DILCONV_DW_RUN(dilconv_dw_run_f, float, DILCONV_VEC256_BYTES)
DILCONV_DW_RUN(dilconv_dw_run_d, double, DILCONV_VEC256_BYTES)
/* float32 in the tier's widest vectors, for the long runs of zero-filled rows laid end
   to end (float64's ran slower in them than in 32-byte ones: MobileNetV2's 33 columns).
   Under AddressSanitizer 32-byte ones: its stack of frames kept for use-after-return
   checks aligns them to 32 bytes, where gcc stores a block's 64-byte sums with aligned
   moves (a fault, not a finding). */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DILCONV_DW_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(DILCONV_DW_ASAN)
#define DILCONV_DW_WIDE_BYTES DILCONV_VEC256_BYTES
#else
#define DILCONV_DW_WIDE_BYTES DILCONV_VEC_BYTES
#endif
DILCONV_DW_RUN(dilconv_dw_wide_run_f, float, DILCONV_DW_WIDE_BYTES)
/* Weight gradient: one tap's sum over a rectangle of `rows` rows x n columns (unit column
   stride), acc += sum g[r*g_next + j] * x[r*x_next + j]. The sums persist across calls
   (images) in acc: DILCONV_DW_CHAINS vectors of partial sums, then one scalar for runs
   shorter than a vector. A row goes in blocks of DILCONV_DW_CHAINS vectors, then one
   vector per chain, then a last vector ending at the row's end whose lanes already summed
   are masked to zero after the multiply (padding is never multiplied: every product is of
   two in-image values). Which chain and lane a term joins depends only on the geometry, so
   the sums are the same for any thread count. dilconv_dw_total_* reduces acc in a fixed
   order. */
enum { DILCONV_DW_CHAINS = 4 };
#if defined(__GNUC__) || defined(__clang__)
#define DILCONV_DW_GRAD(NAME, T, IT)                                                 \
typedef T NAME##_vec __attribute__((vector_size(DILCONV_VEC256_BYTES), may_alias,     \
                                    aligned(sizeof(T))));                             \
typedef IT NAME##_ivec __attribute__((vector_size(DILCONV_VEC256_BYTES)));            \
static inline void NAME(ptrdiff_t rows, ptrdiff_t n, const T *restrict g,             \
                        ptrdiff_t g_next, const T *restrict x, ptrdiff_t x_next,      \
                        T *restrict acc) {                                            \
    enum { L = DILCONV_VEC256_BYTES / sizeof(T), A = DILCONV_DW_CHAINS };             \
    NAME##_vec s[A];                                                                  \
    T t = acc[A * L];                                                                 \
    for (int a = 0; a < A; a++) s[a] = *(const NAME##_vec *)(acc + a * L);            \
    const ptrdiff_t blocks = n / (A * L) * (A * L), whole = n / L * L;                \
    NAME##_ivec keep;                    /* lanes of the last vector not yet summed */\
    for (int l = 0; l < L; l++) keep[l] = n - L + l >= whole ? (IT)-1 : 0;            \
    for (ptrdiff_t r = 0; r < rows; r++) {                                            \
        const T *gr = g + r * g_next, *xr = x + r * x_next;                           \
        if (n < L) {                                                                  \
            for (ptrdiff_t j = 0; j < n; j++) t += gr[j] * xr[j];                     \
            continue;                                                                 \
        }                                                                             \
        ptrdiff_t j = 0;                                                              \
        for (; j < blocks; j += A * L)                                                \
            for (int a = 0; a < A; a++)                                               \
                s[a] += *(const NAME##_vec *)(gr + j + a * L)                         \
                      * *(const NAME##_vec *)(xr + j + a * L);                        \
        for (int a = 0; j < whole; j += L, a++)                                       \
            s[a] += *(const NAME##_vec *)(gr + j) * *(const NAME##_vec *)(xr + j);    \
        if (whole < n) {                                                              \
            NAME##_vec p = *(const NAME##_vec *)(gr + n - L)                          \
                         * *(const NAME##_vec *)(xr + n - L);                         \
            s[A - 1] += (NAME##_vec)((NAME##_ivec)p & keep);                          \
        }                                                                             \
    }                                                                                 \
    for (int a = 0; a < A; a++) *(NAME##_vec *)(acc + a * L) = s[a];                  \
    acc[A * L] = t;                                                                   \
}
#else
/* Other compilers: the same sums, in the same order, lane by lane. */
#define DILCONV_DW_GRAD(NAME, T, IT)                                                 \
static inline void NAME(ptrdiff_t rows, ptrdiff_t n, const T *restrict g,             \
                        ptrdiff_t g_next, const T *restrict x, ptrdiff_t x_next,      \
                        T *restrict acc) {                                            \
    enum { L = DILCONV_VEC256_BYTES / sizeof(T), A = DILCONV_DW_CHAINS };             \
    const ptrdiff_t whole = n / L * L;                                                \
    for (ptrdiff_t r = 0; r < rows; r++)                                              \
        for (ptrdiff_t j = 0; j < n; j++) {                                           \
            /* chain and lane of column j, as in the vector version */                \
            ptrdiff_t slot = n < L ? A * L                                            \
                : j < n / (A * L) * (A * L) ? j % (A * L)                              \
                : j < whole ? (j - n / (A * L) * (A * L)) / L * L + j % L              \
                : (A - 1) * L + (j - (n - L));                                        \
            acc[slot] += g[r * g_next + j] * x[r * x_next + j];                       \
        }                                                                             \
}
#endif
#define DILCONV_DW_TOTAL(NAME, T)                                                    \
static inline T NAME(const T *acc) {                                                  \
    enum { L = DILCONV_VEC256_BYTES / sizeof(T), A = DILCONV_DW_CHAINS };             \
    T s = 0;                                                                          \
    for (int l = 0; l < L; l++)                                                       \
        s += (acc[l] + acc[L + l]) + (acc[2 * L + l] + acc[3 * L + l]);               \
    return s + acc[A * L];                                                            \
}
DILCONV_DW_GRAD(dilconv_dw_grad_f, float, int)
DILCONV_DW_GRAD(dilconv_dw_grad_d, double, long long)
DILCONV_DW_TOTAL(dilconv_dw_total_f, float)
DILCONV_DW_TOTAL(dilconv_dw_total_d, double)
#endif
