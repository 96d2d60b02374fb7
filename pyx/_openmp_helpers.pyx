"""OpenMP state behind one module, with serial fallbacks (built without -fopenmp)."""

cdef extern from "_omp_compat.h":
    int DILCONV_OPENMP
    int omp_get_max_threads() nogil
    void omp_set_num_threads(int n) nogil

OPENMP_ENABLED = bool(DILCONV_OPENMP)


def max_threads():
    """OpenMP's thread count for the calling thread (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()


def set_max_threads(int n):
    omp_set_num_threads(n)
