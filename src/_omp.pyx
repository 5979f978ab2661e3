# cython: boundscheck=False, wraparound=False, cdivision=True
"""OpenMP facts for fastnorm._threads (whether the build has OpenMP, the default thread count)."""

cdef extern from *:
    """
    #ifndef FASTNORM_BUILD_OPENMP
    #define FASTNORM_BUILD_OPENMP -2
    #endif
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
    int FASTNORM_BUILD_OPENMP
    int fastnorm_omp_max_threads() nogil

#: Whether this module was compiled with OpenMP.
OPENMP = bool(FASTNORM_HAVE_OPENMP)

#: What setup.py chose: "openmp"; "serial (FASTNORM_NO_OPENMP)"; "serial (no compiler support)";
#: "unknown" when built without setup.py. A build that chose OpenMP but lacks it lost its flags.
BUILD_OPENMP = {1: "openmp", 0: "serial (FASTNORM_NO_OPENMP)",
                -1: "serial (no compiler support)"}.get(FASTNORM_BUILD_OPENMP, "unknown")


def default_threads():
    """OpenMP's default team size (honours ``OMP_NUM_THREADS``); 1 in a serial build."""
    return fastnorm_omp_max_threads()
