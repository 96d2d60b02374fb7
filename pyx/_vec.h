/* Bytes of the kernels' GCC/Clang vector types: 32 where AVX is enabled; else 16 (SSE2,
   NEON), since vectors wider than the target has are emulated slowly. */
#ifndef DILCONV_VEC_H
#define DILCONV_VEC_H
#if defined(__AVX__)
#define DILCONV_VEC_BYTES 32
#else
#define DILCONV_VEC_BYTES 16
#endif
#endif
