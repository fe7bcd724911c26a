/* Half-precision (IEEE f16) and bfloat16 conversions.
 * The scalar versions are exact and portable; they are the reference that the
 * vectorised kernels (F16C/AVX-512) must match bit for bit. */
#ifndef CAKE_F16_H
#define CAKE_F16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t cake_f16;
typedef uint16_t cake_bf16;

static inline float cake_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t cake_bits_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* f16 -> f32, exact for every input including subnormals, inf and NaN. */
static inline float cake_f16_to_f32(cake_f16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f) return cake_f32_from_bits(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return cake_f32_from_bits(sign);
        /* subnormal: value = mant * 2^-24 */
        float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return cake_f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

/* f32 -> f16 with round-to-nearest-even, matching the hardware (F16C) conversion. */
static inline cake_f16 cake_f32_to_f16(float f) {
    uint32_t x = cake_bits_from_f32(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or NaN (keep a quiet NaN) */
        return (cake_f16)(sign | 0x7c00 |
                          (absx > 0x7f800000u ? 0x200 | ((absx >> 13) & 0x3ff) : 0));
    if (absx >= 0x477ff000u) return (cake_f16)(sign | 0x7c00); /* rounds to inf */
    if (absx < 0x38800000u) {                                  /* subnormal or zero in f16 */
        if (absx < 0x33000000u) return (cake_f16)sign;         /* < 2^-25 rounds to 0 */
        uint32_t exp = absx >> 23;
        uint32_t mant = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - exp; /* 14..24 */
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (cake_f16)(sign | half);
    }
    uint32_t r = absx + 0xfff + ((absx >> 13) & 1); /* round to nearest even */
    return (cake_f16)(sign | ((r - 0x38000000u) >> 13));
}

static inline float cake_bf16_to_f32(cake_bf16 h) {
    return cake_f32_from_bits((uint32_t)h << 16);
}

static inline cake_bf16 cake_f32_to_bf16(float f) {
    uint32_t x = cake_bits_from_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (cake_bf16)((x >> 16) | 0x40); /* quiet NaN */
    return (cake_bf16)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

#endif
