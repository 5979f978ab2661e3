# cython: boundscheck=False, wraparound=False, cdivision=True
"""OpenMP facts for fastnorm._threads (whether the build has OpenMP, the default thread count)."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTNORM_HAVE_OPENMP 1
    static int fastnorm_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define FASTNORM_HAVE_OPENMP 0
    static int fastnorm_omp_max_threads(void) { return 1; }
    #endif
    """
    int FASTNORM_HAVE_OPENMP
    int fastnorm_omp_max_threads() nogil

OPENMP = bool(FASTNORM_HAVE_OPENMP)


def default_threads():
    """OpenMP's default team size (honours ``OMP_NUM_THREADS``); 1 in a serial build."""
    return fastnorm_omp_max_threads()
