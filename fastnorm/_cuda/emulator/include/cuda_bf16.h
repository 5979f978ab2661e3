// cuda_bf16.h for the CUDA emulator: a software __nv_bfloat16 with CUDA's conversions
// (round to nearest even; NaN becomes the canonical 0x7fff as __float2bfloat16_rn does).
#pragma once
#include <stdint.h>
#include <string.h>

namespace fnemu {
inline uint16_t float_to_bf16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
    const uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}
}  // namespace fnemu

struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(fnemu::float_to_bf16_bits(f)) {}
    __nv_bfloat16(double d) : __x(fnemu::float_to_bf16_bits((float)d)) {}
    operator float() const { return fnemu::bf16_bits_to_float(__x); }
};
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float __bfloat162float(__nv_bfloat16 b) { return fnemu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    __nv_bfloat16 b;
    b.__x = fnemu::float_to_bf16_bits(f);
    return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16_rn((float)d); }
