"""OpenMP state behind one module, with serial fallbacks (built without -fopenmp); and the
process environment read in C, for switches looked up on every kernel call."""
from libc.stdlib cimport getenv

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


def environ_value(bytes name):
    """The environment variable `name` as os.environ holds it (which writes through to
    the C environment), or None: os.environ.get raises and catches a KeyError for every
    unset name (half a microsecond on each call)."""
    cdef const char* value = getenv(name)
    return None if value is NULL else value.decode("utf-8", "surrogateescape")
