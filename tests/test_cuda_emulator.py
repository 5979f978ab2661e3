"""The CUDA emulator itself: CUDA semantics (barriers, shuffles, votes, atomics, half types) on
small kernels, and a deliberately broken kernel for every detector, which must fire."""
import numpy as np
import pytest

emu = pytest.importorskip("fastnorm._cuda.emulator")
pytestmark = pytest.mark.emulated

HEADER = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"


def kernel(code, name, *more):
    """Kernel ``name`` of a small CUDA source (all ``names`` instantiated)."""
    mod = emu.RawModule(code=HEADER + code, options=("--std=c++17",),
                        name_expressions=(name,) + more)
    return mod.get_function(name)


def fails(match, f, *args, **kwargs):
    with pytest.raises(emu.EmulatorError, match=match):
        f(*args, **kwargs)


# ---------------------------------------------------------------- CUDA semantics

def test_block_reduction_with_barriers_and_shuffles(rng):
    k = kernel(r"""
    __global__ void block_sum(const float* x, float* out, int n) {
        __shared__ float part[32];
        float v = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
        __syncthreads();
        if (threadIdx.x == 0) {
            float s = 0;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += part[w];
            out[blockIdx.x] = s;
        }
    }""", "block_sum")
    x = rng.integers(-8, 8, (5, 1000)).astype(np.float32)    # exact sums
    out = emu.empty(5, np.float32)
    k((5,), (256,), (emu.asarray(x), out, np.int32(1000)))
    np.testing.assert_array_equal(out.get(), x.sum(1))


def test_shuffle_variants_and_votes():
    k = kernel(r"""
    __global__ void lanes(int* out) {
        const int l = threadIdx.x;
        out[0 * 64 + l] = __shfl_down_sync(0xffffffffu, l, 3);
        out[1 * 64 + l] = __shfl_up_sync(0xffffffffu, l, 5);
        out[2 * 64 + l] = __shfl_sync(0xffffffffu, l, 7);
        out[3 * 64 + l] = __shfl_xor_sync(0xffffffffu, l * 10, 4, 8);
        out[4 * 64 + l] = (int)__ballot_sync(0xffffffffu, (l & 3) == 0);
        out[5 * 64 + l] = __any_sync(0xffffffffu, l == 40) + 2 * __all_sync(0xffffffffu, l < 64);
        const double d = __shfl_down_sync(0xffffffffu, 0.5 * l, 1);
        out[6 * 64 + l] = (int)(4 * d);
    }""", "lanes")
    out = emu.zeros(7 * 64, np.int32)
    k((1,), (64,), (out,))
    o = out.get().reshape(7, 2, 32)
    lane = np.arange(32)
    for w in range(2):
        base = 32 * w
        np.testing.assert_array_equal(o[0, w], base + np.where(lane + 3 < 32, lane + 3, lane))
        np.testing.assert_array_equal(o[1, w], base + np.where(lane >= 5, lane - 5, lane))
        np.testing.assert_array_equal(o[2, w], np.full(32, base + 7))
        np.testing.assert_array_equal(o[3, w], 10 * (base + (lane ^ 4)))
        np.testing.assert_array_equal(o[4, w].view(np.uint32), np.full(32, 0x11111111, np.uint32))
        np.testing.assert_array_equal(o[5, w], np.full(32, (1 if w == 1 else 0) + 2))
        np.testing.assert_array_equal(o[6, w], 2 * (base + np.where(lane + 1 < 32, lane + 1, lane)))


def test_multidimensional_indices_and_atomics():
    k = kernel(r"""
    __global__ void count(unsigned int* hits, float* total) {
        const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
        const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        atomicAdd(&hits[b * blockDim.x * blockDim.y * blockDim.z + t], 1u);
        atomicAdd(total, 1.0f);
    }""", "count")
    grid, block = (2, 3, 2), (4, 2, 3)
    hits = emu.zeros(12 * 24, np.uint32)
    total = emu.zeros(1, np.float32)
    k(grid, block, (hits, total))
    assert (hits.get() == 1).all() and total.get()[0] == 12 * 24


def test_launch_counts_for_the_cost_model():
    """emulator.counting() logs per launch the blocks and threads launched, the barriers each
    block completes, the warp-synchronous calls each warp completes and every atomic operation
    (the cost model's inputs), from the first run only (not the race-check re-run)."""
    k = kernel(r"""
    __global__ void steps(unsigned int* c, int rounds) {
        for (int r = 0; r < rounds; ++r) {
            if (threadIdx.x % 4 == 0) atomicAdd(c, 1u);
            __syncthreads();
        }
        const unsigned v = __ballot_sync(0xffffffffu, threadIdx.x & 1);
        if (threadIdx.x == 0) atomicCAS(c + 1, 0u, v);
    }""", "steps")
    c = emu.zeros(2, np.uint32)
    with emu.counting() as n:
        k((3, 2), (64,), (c, np.int32(5)))
    (e,) = n.log
    assert (e.kernel, e.blocks, e.threads) == ("steps", 6, 6 * 64)
    assert e.barriers == 6 * 5                    # per block, not per thread
    assert e.warp_syncs == 6 * 2                  # one ballot per warp
    assert e.atomics == 6 * (5 * 16 + 1)          # 16 adders per round, one CAS
    assert c.get()[0] == 6 * 5 * 16               # the first run's result, not doubled
    assert n.total("barriers") == 30 and "barriers=30" in repr(n)
    with emu.counting() as m:
        k((1,), (32,), (c, np.int32(0)))
    assert m.log[0][3:] == (0, 1, 1)


def test_half_conversions_match_numpy_and_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    k = kernel(r"""
    __global__ void conv(const float* x, __half* h, __nv_bfloat16* b, float* back, int n) {
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= n) return;
        h[i] = __float2half_rn(x[i]);
        b[i] = __float2bfloat16_rn(x[i]);
        back[2 * i] = __half2float(h[i]);
        back[2 * i + 1] = __bfloat162float(b[i]);
    }""", "conv")
    # every float16 neighbourhood: subnormals, ties, overflow to inf, signed zeros
    bits = np.arange(0, 1 << 16, dtype=np.uint32)
    h16 = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        x = np.concatenate([h16, np.nextafter(h16, np.float32(np.inf)),
                            np.nextafter(h16, np.float32(-np.inf)),
                            (h16[:-1] + h16[1:]) / 2,        # exact ties between neighbours
                            rng.standard_normal(20000).astype(np.float32) * 1e4,
                            np.array([65519.9, 65520.0, 1e-8, -0.0, np.inf, -np.inf], np.float32)])
        expect_h = x.astype(np.float16)
        expect_b = x.astype(ml_dtypes.bfloat16)
    n = x.size
    h, b = emu.empty(n, np.float16), emu.empty(n, ml_dtypes.bfloat16)
    back = emu.empty(2 * n, np.float32)
    k(((n + 255) // 256,), (256,), (emu.asarray(x), h, b, back, np.int32(n)))
    nan = np.isnan(x)
    assert nan.any()
    np.testing.assert_array_equal(h.get().view(np.uint16)[~nan], expect_h.view(np.uint16)[~nan])
    np.testing.assert_array_equal(b.get().view(np.uint16)[~nan], expect_b.view(np.uint16)[~nan])
    np.testing.assert_array_equal(back.get()[0::2], expect_h.astype(np.float32))
    np.testing.assert_array_equal(back.get()[1::2], expect_b.astype(np.float32))
    assert (h.get().view(np.uint16)[nan] == 0x7fff).all()       # CUDA's canonical NaN
    assert (b.get().view(np.uint16)[nan] == 0x7fff).all()


# ---------------------------------------------------------------- detectors

COPY = r"""
__global__ void copy_shift(const float* x, float* y, int n, int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];
}
__global__ void write_shift(float* y, int n, int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i + shift] = 1.0f;
}"""


@pytest.mark.parametrize("n", [64, 61])          # the end on the guard page / 3 bytes before it
def test_out_of_bounds_read_past_the_end(n):
    k = kernel(COPY, "copy_shift", "write_shift")
    x, y = emu.asarray(np.ones(n, np.float32)), emu.zeros(n, np.float32)
    k((1,), (64,), (x, y, np.int32(n), np.int32(0)))          # in bounds: fine
    fails(r"element \d+ of argument #0 .*past its end|just outside a buffer", k, (1,), (64,),
          (x, y, np.int32(n), np.int32(1)))


@pytest.mark.parametrize("n", [64, 61])
def test_out_of_bounds_write_past_the_end(n):
    k = kernel(COPY, "write_shift", "copy_shift")
    y = emu.zeros(n, np.float32)
    fails(r"(invalid write|canary).*of argument #0 .*past its end", k, (1,), (64,),
          (y, np.int32(n), np.int32(1)))


def test_out_of_bounds_before_the_start():
    k = kernel(COPY, "copy_shift", "write_shift")
    x, y = emu.asarray(np.ones(64, np.float32)), emu.zeros(64, np.float32)
    fails(r"element -1 of argument #0 .*before its start", k, (1,), (64,),
          (x, y, np.int32(64), np.int32(-1)))
    kw = kernel(COPY, "write_shift", "copy_shift")
    fails(r"element -2 of argument #0 .*before its start", kw, (1,), (64,),
          (y, np.int32(64), np.int32(-2)))


def test_null_pointer_of_an_empty_array():
    k = kernel(COPY, "copy_shift", "write_shift")
    fails(r"invalid read of address \(nil\)|invalid read of address 0x0", k, (1,), (64,),
          (emu.empty(0, np.float32), emu.zeros(4, np.float32), np.int32(4), np.int32(0)))


def test_shared_memory_race_missing_barrier():
    k = kernel(r"""
    __global__ void neighbour(float* out) {
        __shared__ float s[256];
        s[threadIdx.x] = (float)threadIdx.x;
        // missing __syncthreads()
        out[threadIdx.x] = s[threadIdx.x == 0 ? 0 : threadIdx.x - 1];
    }""", "neighbour")
    fails(r"race.*argument #0", k, (1,), (256,), (emu.zeros(256, np.float32),))


def test_global_race_between_blocks():
    k = kernel(r"""
    __global__ void last_writer(int* out) { if (threadIdx.x == 0) out[0] = blockIdx.x; }
    """, "last_writer")
    fails(r"race.*element 0 of argument #0", k, (8,), (32,), (emu.zeros(1, np.int32),))


def test_float_atomics_are_allowed_to_depend_on_order():
    k = kernel(r"""
    __global__ void accumulate(const float* x, float* out) {
        atomicAdd(out, x[blockIdx.x * blockDim.x + threadIdx.x]);
    }""", "accumulate")
    x = np.float32([1e8, 1, -1e8, 1] * 64)
    out = emu.zeros(1, np.float32)
    k((4,), (64,), (emu.asarray(x), out))                     # order-dependent, but no error


def test_uninitialised_shared_memory_reads_poison():
    k = kernel(r"""
    __global__ void forgot(float* out) {
        __shared__ float s[64];
        if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
        __syncthreads();
        out[threadIdx.x] = s[threadIdx.x];
    }""", "forgot")
    out = emu.zeros(64, np.float32)
    k((1,), (64,), (out,))
    o = out.get()
    assert (o[:32] == 1).all() and np.isnan(o[32:]).all()


def test_unwritten_output_is_poisoned():
    k = kernel(COPY, "copy_shift", "write_shift")
    y = emu.empty(8, np.float32)
    k((1,), (8,), (emu.asarray(np.ones(8, np.float32)), y, np.int32(6), np.int32(0)))
    assert np.isnan(y.get()[6:]).all() and (emu.empty(3, np.int64).get() == -1).all()


def test_divergent_barrier_and_early_exit():
    k = kernel(r"""
    __global__ void divergent(float* out, int mode) {
        if (mode == 0) {
            if (threadIdx.x < 16) __syncthreads();
            else __syncthreads();
        } else {
            if (threadIdx.x == 3) return;
            __syncthreads();
        }
        out[threadIdx.x] = 1;
    }""", "divergent")
    out = emu.zeros(32, np.float32)
    fails(r"divergent __syncthreads", k, (1,), (32,), (out, np.int32(0)))
    fails(r"while 1 have exited.*\(3,0,0\)", k, (1,), (32,), (out, np.int32(1)))


def test_shuffle_with_exited_lanes_and_partial_warps():
    k = kernel(r"""
    __global__ void shuffles(float* out, int mode) {
        float v = threadIdx.x;
        if (mode == 0 && threadIdx.x >= 16) return;
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        out[threadIdx.x] = v;
    }""", "shuffles")
    out = emu.zeros(64, np.float32)
    fails(r"__shfl_xor_sync with mask 0xffffffff: lane 16 has exited", k, (1,), (32,),
          (out, np.int32(0)))
    fails(r"lane 16, which does not exist in a block of 48 threads", k, (1,), (48,),
          (out, np.int32(1)))
    k((1,), (64,), (out, np.int32(1)))                        # whole warps: fine


def test_argument_checks():
    k = kernel(COPY, "copy_shift", "write_shift")
    x, y = emu.asarray(np.ones(4, np.float32)), emu.zeros(4, np.float32)
    fails(r"argument #2 \(signed int of 4 bytes\) got a int64 scalar", k, (1,), (4,),
          (x, y, np.int64(4), np.int32(0)))
    fails(r"argument #0 \(const float of 4 bytes\*\) got an array of float64", k, (1,), (4,),
          (emu.asarray(np.ones(4)), y, np.int32(4), np.int32(0)))
    fails(r"argument #1 .* got a NumPy array", k, (1,), (4,),
          (x, np.zeros(4, np.float32), np.int32(4), np.int32(0)))
    fails(r"4 parameters, launched with 3 arguments", k, (1,), (4,), (x, y, np.int32(4)))
    fails(r"argument #2 \(signed int of 4 bytes\) got a int64 scalar", k, (1,), (4,),
          (x, y, 4, np.int32(0)))                               # Python ints are int64 in CuPy
    fails(r"non-contiguous", k, (1,), (4,),
          (emu.asarray(np.ones(8, np.float32))[::2], y, np.int32(4), np.int32(0)))


def test_launch_limits():
    k = kernel(COPY, "write_shift", "copy_shift")
    y = emu.zeros(4, np.float32)
    args = (y, np.int32(0), np.int32(0))
    fails(r"2048 threads per block", k, (1,), (64, 32), args)
    fails(r"block.x = 2048", k, (1,), (2048,), args)
    fails(r"grid.y = 70000", k, (1, 70000), (32,), args)
    fails(r"grid.x = 0", k, (0,), (32,), args)
    fails(r"dynamic shared memory", k, (1,), (32,), args, shared_mem=64 << 10)
    big = kernel(r"""
    __global__ void big(float* out) {
        __shared__ double s[7000];
        s[threadIdx.x] = 1;
        out[0] = s[0];
    }
    """, "big")
    fails(r"56000 bytes of static", big, (1,), (32,), (y,))


def test_const_buffer_written_and_device_mismatch():
    k = kernel(r"""
    __global__ void sneaky(const float* x) { const_cast<float*>(x)[threadIdx.x] = 2; }
    """, "sneaky")
    fails(r"write to a buffer passed only as const.*element 0 of argument #0", k, (1,), (4,),
          (emu.asarray(np.ones(4, np.float32)),))
    with emu.Device(1):
        y1 = emu.zeros(4, np.float32)
    k2 = kernel(COPY, "write_shift", "copy_shift")
    fails(r"lives on device 1, the launch is on device 0", k2, (1,), (4,),
          (y1, np.int32(4), np.int32(0)))
    with pytest.raises(ValueError, match="Array device must be same as the current device"):
        y1 + 1


def test_stack_overflow_and_division_by_zero():
    k = kernel(r"""
    __device__ __noinline__ int deep(volatile int* p, int n) {
        volatile char pad[512]; pad[0] = (char)n;
        return n <= 0 ? pad[0] : deep(p, n - 1) + pad[0];
    }
    __global__ void faults(int* out, int mode, int d) {
        if (mode == 0) out[0] = deep(out, 1 << 20);
        else out[threadIdx.x] = 100 / (d + (int)threadIdx.x - 1);
    }""", "faults")
    out = emu.zeros(4, np.int32)
    fails(r"stack overflow", k, (1,), (1,), (out, np.int32(0), np.int32(0)))
    fails(r"arithmetic exception", k, (1,), (4,), (out, np.int32(1), np.int32(0)))


def test_misaligned_vector_access():
    k = kernel(r"""
    struct alignas(16) V4 { float v[4]; };
    __global__ void vec(const float* x, float* out, int shift) {
        const V4 q = *reinterpret_cast<const V4*>(x + shift + 4 * threadIdx.x);
        out[threadIdx.x] = q.v[0] + q.v[3];
    }""", "vec")
    x, out = emu.asarray(np.arange(40, dtype=np.float32)), emu.zeros(8, np.float32)
    k((1,), (8,), (x, out, np.int32(0)))
    np.testing.assert_array_equal(out.get(), np.arange(8) * 8 + 3)
    fails(r"misaligned address", k, (1,), (8,), (x, out, np.int32(1)))


def test_compile_errors_are_reported():
    fails(r"(?s)host compiler rejected.*NAN", kernel,
          "__global__ void k(float* x) { x[0] = NAN; }", "k")


# ---------------------------------------------------------------- cuBLAS (GemmEx)

def gemm(c, a, b, m, n, k, *, lda, ldb, ldc, transa=0, transb=0, batch=1, strides=(0, 0, 0),
         beta=0.0, compute=emu.CUBLAS_COMPUTE_32F, handle=None, offsets=(0, 0, 0)):
    """cublasGemmStridedBatchedEx on emulated arrays (column-major, as cuBLAS), types from the
    arrays' dtypes."""
    types = {"float16": emu.CUDA_R_16F, "bfloat16": emu.CUDA_R_16BF, "float32": emu.CUDA_R_32F,
             "float64": emu.CUDA_R_64F}
    scalar = np.float64 if compute == emu.CUBLAS_COMPUTE_64F else np.float32
    one, bt = np.ones((), scalar), np.full((), beta, scalar)
    ptr = [x.data.ptr + o * x.itemsize for x, o in zip((a, b, c), offsets)]
    emu.cuda.cublas.gemmStridedBatchedEx(
        emu.cuda.get_cublas_handle() if handle is None else handle, transa, transb, m, n, k,
        one.ctypes.data, ptr[0], types[str(a.dtype)], lda, strides[0], ptr[1],
        types[str(b.dtype)], ldb, strides[1], bt.ctypes.data, ptr[2], types[str(c.dtype)], ldc,
        strides[2], batch, compute, emu.cuda.cublas.CUBLAS_GEMM_DEFAULT)


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_gemm_half_products_float32_sums_one_rounding(half):
    # 1 + u + u (u: half the half type's ulp at 1) is 1 + 2u exactly in float32 and representable
    # in the half type; summed in the half type it would stay 1 (each + u ties to even)
    t = np.dtype(half) if half == "float16" else _bf16()
    u = 2.0**-11 if half == "float16" else 2.0**-8
    a = emu.asarray(np.ones((1, 3)).astype(t))                   # column-major 3 x 1 = row 1 x 3
    b = emu.asarray(np.array([1, u, u]).astype(t))
    for c_type in (t, np.float32):
        c = emu.empty((1,), c_type)                               # NaN: beta = 0 must not read it
        gemm(c, a, b, 1, 1, 3, lda=3, ldb=3, ldc=1, transa=emu.CUBLAS_OP_T)
        assert c.get().astype(np.float64)[0] == 1 + 2 * u
        gemm(c, a, b, 1, 1, 3, lda=3, ldb=3, ldc=1, transa=emu.CUBLAS_OP_T, beta=1.0)
        assert c.get().astype(np.float64)[0] == 2 + 4 * u         # C added in float32


def test_gemm_transposes_strides_and_batches_match_numpy(rng):
    # C_i = op(A_i) op(B_i) + C_i on column-major matrices inside bigger arrays (leading
    # dimensions past the rows, batch strides, a broadcast B with stride 0), float64 exact
    m, n, k, batch = 5, 4, 3, 3
    for transa in (0, 1):
        for transb in (0, 1):
            ar, ac = (m, k) if transa == 0 else (k, m)
            br, bc = (k, n) if transb == 0 else (n, k)
            A = rng.integers(-4, 4, (batch, ac, ar + 2)).astype(np.float64)  # column-major, ld+2
            B = rng.integers(-4, 4, (bc, br + 1)).astype(np.float64)
            C = rng.integers(-4, 4, (batch, n, m + 3)).astype(np.float64)
            c = emu.asarray(C)
            gemm(c, emu.asarray(A), emu.asarray(B), m, n, k, lda=ar + 2, ldb=br + 1, ldc=m + 3,
                 transa=transa, transb=transb, batch=batch,
                 strides=(ac * (ar + 2), 0, n * (m + 3)), beta=1.0, compute=emu.CUBLAS_COMPUTE_64F)
            opa = A[:, :, :ar].transpose(0, 2, 1)
            opa = opa if transa == 0 else opa.transpose(0, 2, 1)
            opb = B[:, :br].T if transb == 0 else B[:, :br]
            want = C.copy()
            want[:, :, :m] += (opa @ opb).transpose(0, 2, 1)
            np.testing.assert_array_equal(c.get(), want)


def test_gemm_tf32_rounds_float32_inputs():
    a = emu.asarray(np.full((1,), 1 + 2.0**-12, np.float32))    # below half a TF32 ulp: 1
    b = emu.asarray(np.full((1,), 1 + 2.0**-10 + 2.0**-11, np.float32))   # a tie: away from 0
    c = emu.empty((1,), np.float32)
    gemm(c, a, b, 1, 1, 1, lda=1, ldb=1, ldc=1)
    assert c.get()[0] == np.float32(1 + 2.0**-12) * np.float32(1 + 2.0**-10 + 2.0**-11)
    gemm(c, a, b, 1, 1, 1, lda=1, ldb=1, ldc=1, compute=emu.CUBLAS_COMPUTE_32F_FAST_TF32)
    assert c.get()[0] == 1 + 2.0**-9


def test_gemm_checks():
    a, b = emu.asarray(np.ones(6, np.float32)), emu.asarray(np.ones(6, np.float32))
    c = emu.zeros(4, np.float32)
    args = (2, 2, 3)
    kw = dict(lda=2, ldb=3, ldc=2)
    fails(r"not inside one device allocation", gemm, c, a, b, *args, **dict(kw, ldb=4))
    fails(r"ldC = 1 < max\(1, 2\)", gemm, c, a, b, *args, **dict(kw, ldc=1))
    fails(r"not supported", gemm, c, emu.asarray(np.ones(6, np.float16)),
          emu.asarray(np.ones(6, np.float16)), *args, **kw,
          compute=emu.CUBLAS_COMPUTE_32F_FAST_TF32)
    fails(r"not supported", gemm, emu.zeros(4), a, b, *args, **kw)       # float32 -> float64
    fails(r"C overlaps A", gemm, a, a, b, *args, **dict(kw, ldc=2))
    fails(r"C matrices of the batch overlap", gemm, c, a, b, 2, 1, 3, lda=2, ldb=3, ldc=2,
          batch=2, strides=(0, 0, 1))
    fails(r"not the current device's", gemm, c, a, b, *args, **kw,
          handle=emu.cuda.get_cublas_handle() + 1)
    with emu.Device(1):
        c1 = emu.zeros(4, np.float32)
    fails(r"memory of device 1 used on device 0", gemm, c1, a, b, *args, **kw)
    with emu.counting() as n:
        gemm(c, a, b, *args, **kw)
    assert n.launches == 0 and [(g.m, g.n, g.k, g.batch) for g in n.gemms] == [(2, 2, 3, 1)]
    np.testing.assert_array_equal(c.get(), np.full(4, 3, np.float32))


def test_profile_times_every_launch_of_a_call(rng):
    """fastnorm._cuda.profile() records each kernel a call launches, by name and in launch order
    (the same launches the emulator counts), each with its event-timed milliseconds, and the
    whole block's device time; outside the block nothing is recorded."""
    import fastnorm
    from fastnorm import _cuda
    x = emu.asarray(rng.standard_normal((2, 8, 5, 7)).astype(np.float32))
    with emu.counting() as c, _cuda.profile(emu) as p:
        fastnorm.group_norm(x, 4)
        fastnorm.roi_align(x, emu.asarray(np.array([[1, 0, 0, 4, 3]], np.float32)), 2)
    names = [name for name, _ in p.launches]
    assert names == [k.split("::")[-1] for k in c.kernels] and len(names) == 5
    assert names[0].startswith("gn_stats_nchw<float") and names[-1] == "align_fwd<float>"
    assert all(ms >= 0 for _, ms in p.launches)
    assert p.total_ms >= sum(ms for _, ms in p.launches) > 0
    assert p.by_kernel()["align_fwd<float>"][0] == 1
    assert sum(n for n, _ in p.by_kernel().values()) == 5     # (roi_align: its rois_check too)
    assert _cuda._profile.get() is None
    with emu.counting() as c2:
        fastnorm.group_norm(x, 4)
    assert len(c2.kernels) == 3 and len(p.launches) == 5
