# Shared Cython types for the CPU kernels.
ctypedef fused floating:
    float
    double
