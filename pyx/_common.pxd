# Shared declarations for the kernels: the geometry the Python layer validated.
from cython cimport floating
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy


cdef struct Geom:
    Py_ssize_t N, C, H, W        # input
    Py_ssize_t O, kH, kW         # weight
    Py_ssize_t sh, sw, dh, dw    # stride, dilation
    Py_ssize_t pt, pl            # top and left padding (bottom/right only shape Ho, Wo)
    Py_ssize_t Ho, Wo            # output
    Py_ssize_t groups, Cg, Og    # channels per group: input, output
    Py_ssize_t plane             # input channel stride in items: H*W, or the panel
                                 # forward's input's (its planes may lie apart)
    # Per kernel tap, the outputs [lo, hi) whose input pixel is in the image (kept alive by
    # the spec for the call).
    const Py_ssize_t* oh_lo
    const Py_ssize_t* oh_hi
    const Py_ssize_t* ow_lo
    const Py_ssize_t* ow_hi


cdef inline Geom make_geom(spec):
    # Remembered on the spec (whose memo never leaves the process: see ConvSpec), as
    # filling it (the tap ranges as memoryviews) costs microseconds on every call.
    cdef Geom g
    cdef dict memo = spec.memo
    cached = memo.get("geom")
    if cached is not None:
        memcpy(&g, <const char*> (<bytes> cached), sizeof(Geom))
        return g
    g.N, g.C, g.H, g.W = spec.n, spec.c, spec.h, spec.w
    g.O, g.kH, g.kW = spec.o, spec.kh, spec.kw
    g.sh, g.sw = spec.stride
    g.dh, g.dw = spec.dilation
    g.pt, g.pl = spec.padding[0][0], spec.padding[1][0]
    g.Ho, g.Wo = spec.ho, spec.wo
    g.groups = spec.groups
    g.Cg = spec.c // spec.groups
    g.Og = spec.o // spec.groups
    g.plane = spec.h * spec.w
    cdef const Py_ssize_t[::1] oh_lo = spec.oh_lo, oh_hi = spec.oh_hi
    cdef const Py_ssize_t[::1] ow_lo = spec.ow_lo, ow_hi = spec.ow_hi
    g.oh_lo, g.oh_hi = &oh_lo[0], &oh_hi[0]
    g.ow_lo, g.ow_hi = &ow_lo[0], &ow_hi[0]
    memo["geom"] = (<char*> &g)[:sizeof(Geom)]
    return g


cdef inline floating dot(const floating* a, const floating* b, Py_ssize_t n,
                         Py_ssize_t b_step) noexcept nogil:
    # Partial sums in a fixed order: faster than one chain, still deterministic.
    if b_step == 1:
        if floating is float:
            return dilconv_dot_f(n, a, b)
        else:
            return dilconv_dot_d(n, a, b)
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 = s0 + a[i] * b[i * b_step]
        s1 = s1 + a[i + 1] * b[(i + 1) * b_step]
        s2 = s2 + a[i + 2] * b[(i + 2) * b_step]
        s3 = s3 + a[i + 3] * b[(i + 3) * b_step]
        i = i + 4
    while i < n:
        s0 = s0 + a[i] * b[i * b_step]
        i = i + 1
    return (s0 + s1) + (s2 + s3)


cdef inline bint all_finite(const floating* v, Py_ssize_t count) noexcept nogil:
    """No inf or nan in v[:count]: every exponent short of all ones (integer tests
    vectorise)."""
    cdef Py_ssize_t i
    cdef const uint32_t* u32 = <const uint32_t*> v
    cdef const uint64_t* u64 = <const uint64_t*> v
    cdef uint32_t seen32 = 0
    cdef uint64_t seen64 = 0
    if floating is float:
        for i in range(count):
            seen32 = seen32 | ((u32[i] & 0x7f800000u) == 0x7f800000u)
        return seen32 == 0
    else:
        for i in range(count):
            seen64 = seen64 | ((u64[i] & 0x7ff0000000000000u) == 0x7ff0000000000000u)
        return seen64 == 0


cdef extern from "_axpy.h":
    void dilconv_axpy_f(Py_ssize_t n, float w, const float* x, float* y) noexcept nogil
    void dilconv_axpy_d(Py_ssize_t n, double w, const double* x, double* y) noexcept nogil
    float dilconv_dot_f(Py_ssize_t n, const float* a, const float* b) noexcept nogil
    double dilconv_dot_d(Py_ssize_t n, const double* a, const double* b) noexcept nogil
    void dilconv_row_dots3_f(Py_ssize_t rows, Py_ssize_t n, const float* a, Py_ssize_t a_row,
                             const float* b, Py_ssize_t b_row, Py_ssize_t b_gap,
                             float* out) noexcept nogil
    void dilconv_row_dots3_d(Py_ssize_t rows, Py_ssize_t n, const double* a,
                             Py_ssize_t a_row, const double* b, Py_ssize_t b_row,
                             Py_ssize_t b_gap, double* out) noexcept nogil
    float dilconv_sum_f(Py_ssize_t n, const float* a) noexcept nogil
    double dilconv_sum_d(Py_ssize_t n, const double* a) noexcept nogil


cdef inline void row_dots3(Py_ssize_t rows, Py_ssize_t n, const floating* a, Py_ssize_t a_row,
                           const floating* b, Py_ssize_t b_row, Py_ssize_t b_gap,
                           floating* out) noexcept nogil:
    """out[k] += sum over rows r of dot(a + r * a_row, b + r * b_row + k * b_gap, n), k < 3,
    in one fixed order (see _axpy.h)."""
    if floating is float:
        dilconv_row_dots3_f(rows, n, a, a_row, b, b_row, b_gap, out)
    else:
        dilconv_row_dots3_d(rows, n, a, a_row, b, b_row, b_gap, out)


cdef inline floating total(const floating* a, Py_ssize_t n) noexcept nogil:
    """sum a[:n], vectorised, in a fixed order."""
    if floating is float:
        return dilconv_sum_f(n, a)
    else:
        return dilconv_sum_d(n, a)


cdef inline void axpy(Py_ssize_t n, floating w, const floating* x, floating* y) noexcept nogil:
    """y[:n] += w * x[:n] (non-overlapping runs), vectorised."""
    if floating is float:
        dilconv_axpy_f(n, w, x, y)
    else:
        dilconv_axpy_d(n, w, x, y)
