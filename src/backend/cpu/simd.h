/* Internal to the CPU kernels: the few arithmetic building blocks whose exact
 * rounding is part of the kernels' contract, each in a vector form (AVX-512)
 * and a scalar twin that gives the same bits.
 *
 * Why twins: the fast matmul and attention kernels define their per-element
 * reduction order as "16 lanes, then a fixed tree" (see kernels.h). The
 * portable fallback (`*_lanes` functions) computes exactly that order with
 * scalar code, so a build without AVX-512, the AVX-512 build and every batch
 * size, chunking and thread count all produce identical results, and the tests
 * can compare the fast kernels to the fallback bit for bit.
 *
 * The scalar twins rely on C expressions not being contracted into FMAs: GCC
 * does not contract in ISO C mode (-std=c11); for clang the including file
 * turns FP_CONTRACT off. Explicit FMAs use fmaf(). */
#ifndef CAKE_CPU_SIMD_H
#define CAKE_CPU_SIMD_H

#include <math.h>
#include <stdint.h>

#include "util/f16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CAKE_AVX512 1
#include <immintrin.h>
#endif

#define CAKE_INLINE static inline __attribute__((always_inline))

/* ---- exp: clamp, split x = n*ln2 + r, degree-6 polynomial (Cephes expf
 * coefficients, ~1 ulp), scale by 2^n. Inputs below -104 give 0, above 89
 * give inf; NaN gives 0 (the clamp swallows it, the same way in both forms). */
#define CAKE_EXP_LO    (-104.0f)
#define CAKE_EXP_HI    89.0f
#define CAKE_EXP_LOG2E 1.44269504088896341f
#define CAKE_EXP_C1    0.693359375f
#define CAKE_EXP_C2    (-2.12194440e-4f)
#define CAKE_EXP_P0    1.9875691500e-4f
#define CAKE_EXP_P1    1.3981999507e-3f
#define CAKE_EXP_P2    8.3334519073e-3f
#define CAKE_EXP_P3    4.1665795894e-2f
#define CAKE_EXP_P4    1.6666665459e-1f
#define CAKE_EXP_P5    5.0000001201e-1f

static inline float cake_exp_lanes(float x) {
    x = x > CAKE_EXP_LO ? x : CAKE_EXP_LO; /* NaN -> LO, as _mm512_max_ps(x, LO) */
    x = x < CAKE_EXP_HI ? x : CAKE_EXP_HI;
    float t = x * CAKE_EXP_LOG2E;
    float n = nearbyintf(t); /* round half to even, as roundscale(.., NEAREST) */
    float r = fmaf(n, -CAKE_EXP_C1, x);
    r = fmaf(n, -CAKE_EXP_C2, r);
    float p = CAKE_EXP_P0;
    p = fmaf(p, r, CAKE_EXP_P1);
    p = fmaf(p, r, CAKE_EXP_P2);
    p = fmaf(p, r, CAKE_EXP_P3);
    p = fmaf(p, r, CAKE_EXP_P4);
    p = fmaf(p, r, CAKE_EXP_P5);
    float r2 = r * r;
    float yv = fmaf(p, r2, r);
    yv = yv + 1.0f;
    return scalbnf(yv, (int)n); /* exact scaling, one rounding, as vscalefps */
}

/* ---- the horizontal sum of 16 lanes, as a fixed tree:
 * a[l] = v[l] + v[l+8]; b[l] = a[l] + a[l+4]; c[l] = b[l] + b[l+2]; c[0] + c[1] */
static inline float cake_fold16_lanes(const float v[16]) {
    float a[8], b[4], c[2];
    for (int l = 0; l < 8; l++) a[l] = v[l] + v[l + 8];
    for (int l = 0; l < 4; l++) b[l] = a[l] + a[l + 4];
    for (int l = 0; l < 2; l++) c[l] = b[l] + b[l + 2];
    return c[0] + c[1];
}

#ifdef CAKE_AVX512

CAKE_INLINE __m512 cake_exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(CAKE_EXP_LO)); /* NaN in x -> LO */
    x = _mm512_min_ps(x, _mm512_set1_ps(CAKE_EXP_HI));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(CAKE_EXP_LOG2E));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-CAKE_EXP_C1), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-CAKE_EXP_C2), r);
    __m512 p = _mm512_set1_ps(CAKE_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAKE_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAKE_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAKE_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAKE_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAKE_EXP_P5));
    __m512 r2 = _mm512_mul_ps(r, r);
    __m512 y = _mm512_fmadd_ps(p, r2, r);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* Levels 1 and 2 of the fold tree for four vectors: returns
 * [b_A(4) | b_B(4) | b_C(4) | b_D(4)], the 4-lane partials of each. */
CAKE_INLINE __m512 cake_fold_l12(__m512 A, __m512 B, __m512 C, __m512 D) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(A, B, 0x44), _mm512_shuffle_f32x4(A, B, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(C, D, 0x44), _mm512_shuffle_f32x4(C, D, 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The fold-tree sums of four vectors, in lanes 0..3. */
CAKE_INLINE __m128 cake_fold4(__m512 A, __m512 B, __m512 C, __m512 D) {
    __m512 z = cake_fold_l12(A, B, C, D);
    z = _mm512_add_ps(z, _mm512_permute_ps(z, _MM_SHUFFLE(1, 0, 3, 2)));
    z = _mm512_add_ps(z, _mm512_permute_ps(z, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, z));
}

/* The fold-tree sums of sixteen vectors v[0..15], in lanes 0..15. */
CAKE_INLINE __m512 cake_fold16(const __m512 v[16]) {
    __m512 z0 = cake_fold_l12(v[0], v[1], v[2], v[3]);
    __m512 z1 = cake_fold_l12(v[4], v[5], v[6], v[7]);
    __m512 z2 = cake_fold_l12(v[8], v[9], v[10], v[11]);
    __m512 z3 = cake_fold_l12(v[12], v[13], v[14], v[15]);
    /* level 3: per quad [c(first)0, c(first)1, c(second)0, c(second)1] */
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_ps(z0, z1, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(z0, z1, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_ps(z2, z3, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_ps(z2, z3, _MM_SHUFFLE(3, 2, 3, 2)));
    /* level 4: lanes hold v0 v4 v8 v12 | v1 v5 v9 v13 | v2 .. | v3 .. */
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(idx, r);
}

/* 16 (or, masked, fewer: the rest are 0) f16 / bf16 / f32 values as f32. */
CAKE_INLINE __m512 cake_load_f16(const cake_f16 *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
CAKE_INLINE __m512 cake_maskload_f16(const cake_f16 *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
CAKE_INLINE __m512 cake_load_bf16(const cake_bf16 *p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
CAKE_INLINE __m512 cake_maskload_bf16(const cake_bf16 *p, __mmask16 m) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
CAKE_INLINE __mmask16 cake_tail_mask(int n) { /* n in 0..16 */
    return (__mmask16)((1u << n) - 1u);
}

#endif /* CAKE_AVX512 */

#endif
