/* OpenMP entry points with serial stand-ins, so the kernels build without OpenMP. */
#ifndef DILCONV_OMP_COMPAT_H
#define DILCONV_OMP_COMPAT_H
#ifdef _OPENMP
#include <omp.h>
#define DILCONV_OPENMP 1
#else
#define DILCONV_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#endif
