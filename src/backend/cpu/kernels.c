/* The elementwise CPU kernels: f16/bf16 conversions, RMSNorm, RoPE, SwiGLU.
 * (Matrix multiply: matmul.c; attention: attention.c.)
 *
 * Each fast kernel computes a row from that row alone, with a fixed operation
 * order, so its result never depends on how many tokens are in the batch.
 * Conversions and RoPE are bit-exact against their references; RMSNorm and
 * SwiGLU differ from theirs only by the summation order / the exp polynomial
 * (tests/test_kernels.c states the tolerances). */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"

#if !defined(CAKE_AVX512) && defined(__F16C__) && defined(__AVX2__)
#define CAKE_F16C_AVX2 1
#include <immintrin.h>
#endif

/* ===================== conversions ===================== */

#ifdef CAKE_AVX512
/* The hardware conversion quiets signalling NaNs (sets bit 22); the reference
 * in util/f16.h keeps the payload as it is. Undo the quieting on those lanes so
 * the row conversion is bit-identical to the reference for all 65536 inputs. */
CAKE_INLINE __m512 f16_to_f32_exact(__m256i h) {
    __m512 f = _mm512_cvtph_ps(h);
    __m512i hi = _mm512_cvtepu16_epi32(h);
    __mmask16 snan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(hi, _mm512_set1_epi32(0x7e00)),
                                             _mm512_set1_epi32(0x7c00)) &
                     _mm512_test_epi32_mask(hi, _mm512_set1_epi32(0x1ff));
    return _mm512_castsi512_ps(_mm512_mask_xor_epi32(
        _mm512_castps_si512(f), snan, _mm512_castps_si512(f), _mm512_set1_epi32(0x400000)));
}
#endif

#ifdef CAKE_F16C_AVX2
CAKE_INLINE __m256 f16_to_f32_exact8(__m128i h) {
    __m256 f = _mm256_cvtph_ps(h);
    __m256i hi = _mm256_cvtepu16_epi32(h);
    __m256i exp_ok = _mm256_cmpeq_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(0x7e00)),
                                        _mm256_set1_epi32(0x7c00));
    __m256i mant0 =
        _mm256_cmpeq_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(0x1ff)), _mm256_setzero_si256());
    __m256i fix = _mm256_and_si256(_mm256_andnot_si256(mant0, exp_ok), _mm256_set1_epi32(0x400000));
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(f), fix));
}
#endif

void cake_f16_to_f32_row(const cake_f16 *x, float *y, size_t n) {
    size_t i = 0;
#if defined(CAKE_AVX512)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, f16_to_f32_exact(_mm256_loadu_si256((const __m256i *)(x + i))));
    if (i < n) {
        __mmask16 m = cake_tail_mask((int)(n - i));
        _mm512_mask_storeu_ps(y + i, m, f16_to_f32_exact(_mm256_maskz_loadu_epi16(m, x + i)));
        i = n;
    }
#elif defined(CAKE_F16C_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, f16_to_f32_exact8(_mm_loadu_si128((const __m128i *)(x + i))));
#endif
    for (; i < n; i++) y[i] = cake_f16_to_f32(x[i]);
}

void cake_f32_to_f16_row(const float *x, cake_f16 *y, size_t n) {
    size_t i = 0;
#if defined(CAKE_AVX512)
    /* vcvtps2ph with round-to-nearest-even is what util/f16.h's reference models,
     * NaN payloads included (checked over all inputs by the tests). */
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    if (i < n) {
        __mmask16 m = cake_tail_mask((int)(n - i));
        _mm256_mask_storeu_epi16(
            y + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT));
        i = n;
    }
#elif defined(CAKE_F16C_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) y[i] = cake_f32_to_f16(x[i]);
}

void cake_bf16_to_f32_row(const cake_bf16 *x, float *y, size_t n) {
    size_t i = 0;
#if defined(CAKE_AVX512)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, cake_load_bf16(x + i));
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
    }
#endif
    for (; i < n; i++) y[i] = cake_bf16_to_f32(x[i]);
}

/* ===================== RMSNorm ===================== */

void cake_rmsnorm_ref(float *y, const float *x, const float *w, int n_tokens, int dim, float eps) {
    for (int t = 0; t < n_tokens; t++) {
        const float *xr = x + (size_t)t * (size_t)dim;
        float *yr = y + (size_t)t * (size_t)dim;
        double ss = 0.0;
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * (double)xr[i];
        const float s = (float)(1.0 / sqrt(ss / dim + (double)eps));
        for (int i = 0; i < dim; i++) yr[i] = xr[i] * s * w[i];
    }
}

/* Sum of squares with a fixed order: 64 lanes (four 16-lane accumulators)
 * over the row, then the accumulators added and the 16 lanes folded. */
static float sum_squares(const float *x, int n) {
#ifdef CAKE_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
        a0 = _mm512_fmadd_ps(v0, v0, a0);
        a1 = _mm512_fmadd_ps(v1, v1, a1);
        a2 = _mm512_fmadd_ps(v2, v2, a2);
        a3 = _mm512_fmadd_ps(v3, v3, a3);
    }
    for (; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(cake_tail_mask(n - i < 16 ? n - i : 16), x + i);
        a0 = _mm512_fmadd_ps(v, v, a0);
    }
    __m512 a = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    return _mm_cvtss_f32(cake_fold4(a, a, a, a));
#else
    float acc[16] = {0};
    for (int i = 0; i < n; i += 16)
        for (int l = 0; l < 16 && i + l < n; l++) acc[l] = fmaf(x[i + l], x[i + l], acc[l]);
    return cake_fold16_lanes(acc);
#endif
}

void cake_rmsnorm(float *y, const float *x, const float *w, int n_tokens, int dim, float eps) {
    for (int t = 0; t < n_tokens; t++) {
        const float *xr = x + (size_t)t * (size_t)dim;
        float *yr = y + (size_t)t * (size_t)dim;
        const float s = 1.0f / sqrtf(sum_squares(xr, dim) / (float)dim + eps);
        int i = 0;
#ifdef CAKE_AVX512
        const __m512 sv = _mm512_set1_ps(s);
        for (; i + 16 <= dim; i += 16)
            _mm512_storeu_ps(yr + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), sv),
                                                   _mm512_loadu_ps(w + i)));
#endif
        for (; i < dim; i++) yr[i] = xr[i] * s * w[i];
    }
}

/* ===================== RoPE ===================== */

/* cos and sin of position * freq_i, computed in double and rounded once: the
 * angle reaches ~10^4 rad at long context, where a float angle would already be
 * off by ~10^-3 rad. Shared by the fast kernel and the reference, so the two
 * rotate by identical floats. */
static void rope_cos_sin(int pos, int head_dim, const double *freqs, float *c, float *s) {
    for (int i = 0; i < head_dim / 2; i++) {
        const double a = (double)pos * freqs[i];
        c[i] = (float)cos(a);
        s[i] = (float)sin(a);
    }
}

enum { ROPE_MAX_HALF = 512 }; /* head_dim up to 1024 */

/* The plain rotation of each head's pairs: (2i, 2i + 1), or (i, i + half)
 * when neox. The reference, and the NeoX kernel. */
static void rope_pairs(float *x, int n_tokens, int n_heads, int head_dim, int n_rot, int pos0,
                       const double *freqs, bool neox) {
    float c[ROPE_MAX_HALF], s[ROPE_MAX_HALF];
    const int half = n_rot / 2;
    if (half > ROPE_MAX_HALF) return;
    for (int t = 0; t < n_tokens; t++) {
        rope_cos_sin(pos0 + t, n_rot, freqs, c, s);
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * (size_t)n_heads + (size_t)h) * (size_t)head_dim;
            for (int i = 0; i < half; i++) {
                float *p0 = v + (neox ? i : 2 * i), *p1 = neox ? p0 + half : p0 + 1;
                const float x0 = *p0, x1 = *p1;
                *p0 = x0 * c[i] - x1 * s[i];
                *p1 = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

void cake_rope_ref(float *x, int n_tokens, int n_heads, int head_dim, int pos0,
                   const double *freqs) {
    rope_pairs(x, n_tokens, n_heads, head_dim, head_dim, pos0, freqs, false);
}

void cake_rope(float *x, int n_tokens, int n_heads, int head_dim, int pos0, const double *freqs) {
    /* cc/ss hold each cos/sin twice, (c0 c0 c1 c1 ...), to match the pairs. */
    float c[ROPE_MAX_HALF], s[ROPE_MAX_HALF];
    float cc[2 * ROPE_MAX_HALF] __attribute__((aligned(64)));
    float ss[2 * ROPE_MAX_HALF] __attribute__((aligned(64)));
    const int half = head_dim / 2;
    if (half > ROPE_MAX_HALF) return;
    for (int t = 0; t < n_tokens; t++) {
        rope_cos_sin(pos0 + t, head_dim, freqs, c, s);
        for (int i = 0; i < half; i++) {
            cc[2 * i] = cc[2 * i + 1] = c[i];
            ss[2 * i] = ss[2 * i + 1] = s[i];
        }
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * (size_t)n_heads + (size_t)h) * (size_t)head_dim;
            int i = 0;
#ifdef CAKE_AVX512
            /* even lanes: x0*c - x1*s; odd lanes: x1*c + x0*s (= x0*s + x1*c,
             * addition commutes), each a product pair and one add/sub, exactly
             * as the reference rounds. */
            const __mmask16 even = 0x5555;
            for (; i + 16 <= 2 * half; i += 16) {
                __m512 xv = _mm512_loadu_ps(v + i);
                __m512 xs = _mm512_permute_ps(xv, _MM_SHUFFLE(2, 3, 0, 1));
                __m512 p = _mm512_mul_ps(xv, _mm512_load_ps(cc + i));
                __m512 q = _mm512_mul_ps(xs, _mm512_load_ps(ss + i));
                _mm512_storeu_ps(v + i, _mm512_mask_sub_ps(_mm512_add_ps(p, q), even, p, q));
            }
#endif
            for (; i < 2 * half; i += 2) {
                const float x0 = v[i], x1 = v[i + 1];
                v[i] = x0 * cc[i] - x1 * ss[i];
                v[i + 1] = x0 * ss[i] + x1 * cc[i];
            }
        }
    }
}

/* NeoX style: the products and sums are those of the adjacent-pair kernel,
 * so a head whose halves are interleaved into pairs turns into the same
 * floats. */
void cake_rope_neox(float *x, int n_tokens, int n_heads, int head_dim, int n_rot, int pos0,
                    const double *freqs) {
    rope_pairs(x, n_tokens, n_heads, head_dim, n_rot, pos0, freqs, true);
}

void cake_add_bias(float *x, const float *b, int n_rows, int n) {
    for (int r = 0; r < n_rows; r++) {
        float *row = x + (size_t)r * (size_t)n;
        for (int i = 0; i < n; i++) row[i] += b[i];
    }
}

/* ===================== SwiGLU ===================== */

void cake_swiglu_ref(float *h, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* GELU's tanh form is g * sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3):
 * h = g / (1 + exp(-(c1 g + c2 g^3))) * u, the same steps in both paths
 * (an explicit FMA, so the compiler contracts nothing differently). */
#define GELU_C1 1.5957691216057308f   /* 2 sqrt(2/pi) */
#define GELU_C2 0.071354816273314994f /* 2 sqrt(2/pi) 0.044715 */

void cake_geglu_ref(float *h, const float *g, const float *u, size_t n) {
    /* 0.5 (1 + tanh z) as 1 / (1 + exp(-2 z)): 1 + tanh(z) loses all its
     * digits in double where z is very negative */
    for (size_t i = 0; i < n; i++) {
        const double x = g[i], z = 0.7978845608028654 * (x + 0.044715 * x * x * x);
        h[i] = (float)(x / (1.0 + exp(-2.0 * z)) * u[i]);
    }
}

void cake_geglu(float *h, const float *g, const float *u, size_t n) {
    size_t i = 0;
#ifdef CAKE_AVX512
    const __m512 one = _mm512_set1_ps(1.0f), c1 = _mm512_set1_ps(-GELU_C1),
                 c2 = _mm512_set1_ps(-GELU_C2);
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(gv, gv), gv);
        const __m512 e = cake_exp512(_mm512_fmadd_ps(c2, g3, _mm512_mul_ps(c1, gv)));
        __m512 r = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i));
        _mm512_storeu_ps(h + i, r);
    }
#endif
    for (; i < n; i++) {
        const float g3 = g[i] * g[i] * g[i];
        h[i] = g[i] / (1.0f + cake_exp_lanes(fmaf(-GELU_C2, g3, -GELU_C1 * g[i]))) * u[i];
    }
}

void cake_swiglu(float *h, const float *g, const float *u, size_t n) {
    size_t i = 0;
#ifdef CAKE_AVX512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        __m512 e = cake_exp512(_mm512_castsi512_ps(
            _mm512_xor_si512(_mm512_castps_si512(gv), _mm512_set1_epi32((int)0x80000000u))));
        __m512 r = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i));
        _mm512_storeu_ps(h + i, r);
    }
#endif
    for (; i < n; i++) h[i] = g[i] / (1.0f + cake_exp_lanes(-g[i])) * u[i];
}
