/* Bytes of the kernels' GCC/Clang vector types: 64 where AVX-512 is enabled, 32 where AVX
   is; else 16 (SSE2, NEON), since vectors wider than the target has are emulated slowly.

   DILCONV_VEC256_BYTES: 32 where AVX is enabled, v4 included, else 16, for two kinds of
   kernel: sums split across vector lanes (dot products, the depthwise weight gradient's
   partial sums), where the lanes decide which terms are added together and so the
   rounding, so v3 and v4 give the same bits; and the depthwise forward, whose unaligned
   64-byte loads (each across two cache lines) ran 1.7x slower than 32-byte ones on an
   AVX-512 EPYC (dw_d4, one thread).

   DILCONV_V4_LAYOUT (the test tier v4_on_v3) gives AVX2 code the v4 sizes: the compiler
   splits the wide vectors, so the v4 blocking runs, slowly, on any AVX2 CPU. */
#ifndef DILCONV_VEC_H
#define DILCONV_VEC_H
#if defined(__AVX512F__) || defined(DILCONV_V4_LAYOUT)
#define DILCONV_V4_SIZES 1
#endif
#if defined(DILCONV_V4_SIZES)
#define DILCONV_VEC_BYTES 64
#elif defined(__AVX__)
#define DILCONV_VEC_BYTES 32
#else
#define DILCONV_VEC_BYTES 16
#endif
#if defined(__AVX__)
#define DILCONV_VEC256_BYTES 32
#else
#define DILCONV_VEC256_BYTES 16
#endif
#endif
