// cuda_fp16.h for the CUDA emulator: a software __half with CUDA's conversions
// (round to nearest even; NaN becomes the canonical 0x7fff as __float2half_rn does on the device).
#pragma once
#include <stdint.h>
#include <string.h>

namespace fnemu {
inline uint16_t float_to_half_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                      // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax < 0x38800000u) {                                    // half subnormal or zero
        if (ax < 0x33000000u) return (uint16_t)sign;            // < 2^-25: rounds to 0
        const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;                         // 14 .. 24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((ax >> 13) - (112u << 10));                  // rebias exponent 127 -> 15
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
}
inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    if (e == 0x1fu) {
        x = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {                                                // subnormal: normalise
            e = 113;
            while (!(m & 0x400u)) { m <<= 1; --e; }
            x = sign | (e << 23) | ((m & 0x3ffu) << 13);
        }
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}
}  // namespace fnemu

struct __half {
    uint16_t __x;
    __half() = default;
    __half(float f) : __x(fnemu::float_to_half_bits(f)) {}
    __half(double d) : __x(fnemu::float_to_half_bits((float)d)) {}
    operator float() const { return fnemu::half_bits_to_float(__x); }
};
struct alignas(4) __half2 { __half x, y; };

inline float __half2float(__half h) { return fnemu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) {
    __half h;
    h.__x = fnemu::float_to_half_bits(f);
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __double2half(double d) { return __float2half_rn((float)d); }
