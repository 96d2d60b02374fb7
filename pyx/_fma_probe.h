/* Register-only multiply-add loops that measure the CPU's own arithmetic peak per vector
   width, independent of any BLAS. Each width is compiled for the instructions it needs
   (target attributes), so one baseline build can run all the widths the CPU has; the
   caller checks the CPU supports a width before calling it.

   NACC independent accumulators hide the FMA latency (4-5 cycles x 2 ports needs >= 10),
   and with the two constants they fit the 16 xmm/ymm registers: 16 accumulators made GCC
   spill two to the stack, and their store-to-load chain halved the 128- and 256-bit peaks.
   acc = acc * m + a with m just under 1 converges to a/(1-m), so values stay normal. */
#ifndef DILCONV_FMA_PROBE_H
#define DILCONV_FMA_PROBE_H
#include <stddef.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define DILCONV_X86 1
#else
#define DILCONV_X86 0
#endif

#if DILCONV_X86
#include <cpuid.h>
#endif

#define DILCONV_PROBE_NACC 12

#if defined(__GNUC__) || defined(__clang__)
#define DILCONV_PROBE(NAME, T, BYTES, TARGET, FUSED)                                    \
TARGET static double NAME(long iters, T m, T a) {                                      \
    typedef T v __attribute__((vector_size(BYTES)));                                   \
    enum { L = BYTES / sizeof(T) };                                                    \
    v acc[DILCONV_PROBE_NACC], vm = (v){0} + m, va = (v){0} + a;                       \
    for (int i = 0; i < DILCONV_PROBE_NACC; i++) acc[i] = (v){0} + (T)i;               \
    for (long it = 0; it < iters; it++) {                                              \
        for (int i = 0; i < DILCONV_PROBE_NACC; i++) acc[i] = FUSED(acc[i], vm, va);   \
    }                                                                                  \
    double s = 0;                                                                      \
    for (int i = 0; i < DILCONV_PROBE_NACC; i++)                                       \
        for (int j = 0; j < L; j++) s += acc[i][j];                                    \
    return s;                                                                          \
}
/* The compiler contracts x*m+a into one FMA where the target has it (-ffp-contract=fast is
   GCC's default outside ISO mode); the SSE2 width counts a multiply and an add. */
#define DILCONV_MULADD(x, m, a) ((x) * (m) + (a))

#if DILCONV_X86
#define DILCONV_T128 __attribute__((target("sse2")))
#define DILCONV_T128F __attribute__((target("avx2,fma")))
#define DILCONV_T256 __attribute__((target("avx2,fma")))
#define DILCONV_T512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma")))
#define DILCONV_PROBES(T, SUF)                                                         \
    DILCONV_PROBE(dilconv_probe_##SUF##_128, T, 16, DILCONV_T128, DILCONV_MULADD)       \
    DILCONV_PROBE(dilconv_probe_##SUF##_128f, T, 16, DILCONV_T128F, DILCONV_MULADD)     \
    DILCONV_PROBE(dilconv_probe_##SUF##_256, T, 32, DILCONV_T256, DILCONV_MULADD)       \
    DILCONV_PROBE(dilconv_probe_##SUF##_512, T, 64, DILCONV_T512, DILCONV_MULADD)
DILCONV_PROBES(float, f32)
DILCONV_PROBES(double, f64)
#else
#define DILCONV_PROBES(T, SUF)                                                         \
    DILCONV_PROBE(dilconv_probe_##SUF##_128, T, 16, , DILCONV_MULADD)
DILCONV_PROBES(float, f32)
DILCONV_PROBES(double, f64)
#endif
#endif

/* kind: 0 = 128-bit without FMA, 1 = 128-bit FMA, 2 = 256-bit FMA, 3 = 512-bit FMA.
   Returns the loop's checksum (to keep the work), or -1 for a kind this build lacks. */
static double dilconv_fma_probe(int is_double, int kind, long iters) {
#if defined(__GNUC__) || defined(__clang__)
#if DILCONV_X86
    switch (kind * 2 + is_double) {
    case 0: return dilconv_probe_f32_128(iters, 0.999f, 1e-3f);
    case 1: return dilconv_probe_f64_128(iters, 0.999, 1e-3);
    case 2: return dilconv_probe_f32_128f(iters, 0.999f, 1e-3f);
    case 3: return dilconv_probe_f64_128f(iters, 0.999, 1e-3);
    case 4: return dilconv_probe_f32_256(iters, 0.999f, 1e-3f);
    case 5: return dilconv_probe_f64_256(iters, 0.999, 1e-3);
    case 6: return dilconv_probe_f32_512(iters, 0.999f, 1e-3f);
    case 7: return dilconv_probe_f64_512(iters, 0.999, 1e-3);
    }
#else
    if (kind <= 1)
        return is_double ? dilconv_probe_f64_128(iters, 0.999, 1e-3)
                         : dilconv_probe_f32_128(iters, 0.999f, 1e-3f);
#endif
#endif
    return -1;
}

/* CPU features, with the OS's saved register state (GCC's and Clang's runtime check XCR0
   for the AVX and AVX-512 states). */
static int dilconv_cpu_has(const char *name) {
#if (defined(__GNUC__) || defined(__clang__)) && DILCONV_X86
    __builtin_cpu_init();
#define DILCONV_FEATURE(S) if (__builtin_strcmp(name, S) == 0) return __builtin_cpu_supports(S) != 0;
    DILCONV_FEATURE("sse2") DILCONV_FEATURE("avx") DILCONV_FEATURE("avx2")
    DILCONV_FEATURE("fma") DILCONV_FEATURE("avx512f") DILCONV_FEATURE("avx512bw")
    DILCONV_FEATURE("avx512dq") DILCONV_FEATURE("avx512vl")
#undef DILCONV_FEATURE
    return 0;
#elif defined(__aarch64__)
    return __builtin_strcmp(name, "neon") == 0;   /* NEON is part of AArch64 */
#else
    (void)name;
    return 0;
#endif
}

/* The x86 family number, extended family included (AMD's Zen 4 is 25, Zen 5 26); 0 on
   other architectures. */
static int dilconv_cpu_family(void) {
#if (defined(__GNUC__) || defined(__clang__)) && DILCONV_X86
    unsigned int a, b, c, d, family;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    family = (a >> 8) & 0xf;
    return (int)(family == 0xf ? family + ((a >> 20) & 0xff) : family);
#else
    return 0;
#endif
}

/* "amd", "intel" or "" (any other CPU, or another architecture). */
static const char *dilconv_cpu_vendor(void) {
#if (defined(__GNUC__) || defined(__clang__)) && DILCONV_X86
    __builtin_cpu_init();
    if (__builtin_cpu_is("amd")) return "amd";
    if (__builtin_cpu_is("intel")) return "intel";
#endif
    return "";
}
#endif
