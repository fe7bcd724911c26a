/* CPU kernels: every fast kernel against its reference on awkward sizes, plus
 * the determinism contracts the engine relies on:
 *  - conversions: bit-exact against util/f16.h over all 65536 f16/bf16 values
 *    and a sweep of f32 bit patterns;
 *  - RoPE: bit-exact against the reference (same products, same rounding);
 *  - RMSNorm, SwiGLU: within stated tolerances (different summation order, a
 *    polynomial exp);
 *  - matmul and attention: bit-exact against their portable "lanes" twins
 *    (which define the reduction order) for every batch size, thread count and
 *    chunking, and within stated tolerances of the plain double-precision
 *    references.
 * Supported attention head dims: any; 1..256 take the AVX-512 kernel, larger
 * ones the portable kernel (both are tested). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backend/cpu/kernels.h"
#include "kv/kv_cache.h"
#include "backend/cpu/simd.h"
#include "model/dequant.h"
#include "model/gguf.h"
#include "util/f16.h"
#include "util/q8_0.h"

/* ---- deterministic random numbers (xorshift) ---- */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}
static float rnd_f(float lo, float hi) { /* uniform in [lo, hi) */
    return lo + (hi - lo) * (float)(rnd_u32() >> 8) * (1.0f / 16777216.0f);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

/* n bytes that end exactly where a page no one may touch begins: a kernel
 * that reaches past the end of its output faults, even through a store
 * whose lanes there are masked off. (This VM's Zen 4 CPU faults on a masked
 * VEXTRACTF32X4 to memory, which gcc made of the matmul's partial-tile
 * store: a server crashed when its logits buffer ended at a page.) */
static void *guarded_alloc(size_t n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (n + page - 1) / page * page;
    uint8_t *base =
        mmap(NULL, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(base != MAP_FAILED);
    assert_int_equal(mprotect(base + body, page, PROT_NONE), 0);
    return base + body - n;
}

static void guarded_free(void *p, size_t n) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (n + page - 1) / page * page;
    munmap((uint8_t *)p + n - body, body + page);
}

static cake_threadpool *pools[4]; /* NULL, 1, 2, 3 threads */

static int setup_pools(void **state) {
    (void)state;
    pools[0] = NULL;
    for (int i = 1; i < 4; i++)
        if (!(pools[i] = cake_threadpool_create(i))) return -1;
    return 0;
}

static int teardown_pools(void **state) {
    (void)state;
    for (int i = 1; i < 4; i++) cake_threadpool_free(pools[i]);
    return 0;
}

/* ===================== conversions ===================== */

static void test_f16_to_f32_all_values(void **state) {
    (void)state;
    /* all 65536 values, in rows of awkward lengths starting at odd offsets, so
     * both the vector body and the masked tail see every value */
    cake_f16 *h = xmalloc(65536 * sizeof(cake_f16));
    float *f = guarded_alloc(65536 * sizeof(float));
    for (uint32_t i = 0; i < 65536; i++) h[i] = (cake_f16)i;
    const size_t lens[] = {65536, 1, 15, 17, 33, 1000};
    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
        memset(f, 0xff, 65536 * sizeof(float));
        for (size_t s = 0; s < 65536; s += lens[li]) {
            const size_t n = 65536 - s < lens[li] ? 65536 - s : lens[li];
            cake_f16_to_f32_row(h + s, f + s, n);
        }
        for (uint32_t i = 0; i < 65536; i++) {
            const uint32_t want = cake_bits_from_f32(cake_f16_to_f32((cake_f16)i));
            if (cake_bits_from_f32(f[i]) != want)
                fail_msg("f16 0x%04x: row gives 0x%08x, reference 0x%08x", i,
                         cake_bits_from_f32(f[i]), want);
        }
    }
    free(h);
    guarded_free(f, 65536 * sizeof(float));
}

static void test_f16_round_trip_all_values(void **state) {
    (void)state;
    /* f16 -> f32 -> f16 with the row kernels gives the reference's bits */
    cake_f16 *h = xmalloc(65536 * sizeof(cake_f16)), *back = xmalloc(65536 * sizeof(cake_f16));
    float *f = xmalloc(65536 * sizeof(float));
    for (uint32_t i = 0; i < 65536; i++) h[i] = (cake_f16)i;
    cake_f16_to_f32_row(h, f, 65536);
    cake_f32_to_f16_row(f, back, 65536);
    for (uint32_t i = 0; i < 65536; i++) {
        const cake_f16 want = cake_f32_to_f16(cake_f16_to_f32((cake_f16)i));
        if (back[i] != want)
            fail_msg("f16 0x%04x round trip: 0x%04x, want 0x%04x", i, back[i], want);
        /* and every non-NaN value survives the round trip unchanged */
        if ((i & 0x7c00) != 0x7c00 || (i & 0x3ff) == 0) assert_int_equal(back[i], i);
    }
    free(h);
    free(back);
    free(f);
}

static void test_f32_to_f16_bit_patterns(void **state) {
    (void)state;
    /* a stride through all 2^32 f32 bit patterns (every exponent, NaN payloads,
     * subnormals), plus the halfway points between neighbouring f16 values
     * (ties to even) */
    enum { N = 1 << 20 };
    float *f = xmalloc(N * sizeof(float));
    size_t n = 0;
    for (uint64_t u = 0; u <= 0xffffffffull && n < N - 70000; u += 65521)
        f[n++] = cake_f32_from_bits((uint32_t)u);
    for (uint32_t i = 0; i < 0x7c00 && n < N; i++) { /* midpoints above each positive f16 */
        const float a = cake_f16_to_f32((cake_f16)i), b = cake_f16_to_f32((cake_f16)(i + 1));
        f[n++] = (float)(((double)a + (double)b) / 2);
    }
    n -= n % 16 ? 0 : 5; /* a masked tail */
    cake_f16 *h = guarded_alloc(n * sizeof(cake_f16));
    cake_f32_to_f16_row(f, h, n);
    for (size_t i = 0; i < n; i++) {
        const cake_f16 want = cake_f32_to_f16(f[i]);
        if (h[i] != want)
            fail_msg("f32 0x%08x: row gives 0x%04x, reference 0x%04x", cake_bits_from_f32(f[i]),
                     h[i], want);
    }
    free(f);
    guarded_free(h, n * sizeof(cake_f16));
}

static void test_bf16_to_f32_all_values(void **state) {
    (void)state;
    cake_bf16 *h = xmalloc(65536 * sizeof(cake_bf16));
    float *f = xmalloc(65536 * sizeof(float));
    for (uint32_t i = 0; i < 65536; i++) h[i] = (cake_bf16)i;
    cake_bf16_to_f32_row(h, f, 65535); /* odd length: a tail */
    f[65535] = 0.0f;
    cake_bf16_to_f32_row(h + 65535, f + 65535, 1);
    for (uint32_t i = 0; i < 65536; i++)
        assert_int_equal(cake_bits_from_f32(f[i]),
                         cake_bits_from_f32(cake_bf16_to_f32((cake_bf16)i)));
    free(h);
    free(f);
}

/* ===================== exp and the fold tree (simd.h) ===================== */

static void test_exp_twins(void **state) {
    (void)state;
    /* accuracy of the polynomial against libm over the range softmax and SiLU
     * use: <= 2 ulp-ish (2.5e-7 relative) where the result is normal */
    for (float x = -87.0f; x < 88.0f; x += 0.0137f) {
        const double want = exp((double)x);
        const double got = cake_exp_lanes(x);
        assert_true(fabs(got - want) <= 2.5e-7 * want);
    }
    assert_true(cake_exp_lanes(-INFINITY) == 0.0f);
    assert_true(cake_exp_lanes(-200.0f) == 0.0f);
    assert_true(isinf(cake_exp_lanes(100.0f)));
    assert_true(cake_exp_lanes(0.0f) == 1.0f);
#ifdef CAKE_AVX512
    /* the vector form gives the scalar form's bits for every input class */
    float in[16], out[16];
    for (uint64_t u = 0; u <= 0xffffffffull; u += 16 * 40009) {
        for (int l = 0; l < 16; l++)
            in[l] = cake_f32_from_bits((uint32_t)(u + (uint64_t)l * 40009));
        _mm512_storeu_ps(out, cake_exp512(_mm512_loadu_ps(in)));
        for (int l = 0; l < 16; l++)
            if (cake_bits_from_f32(out[l]) != cake_bits_from_f32(cake_exp_lanes(in[l])))
                fail_msg("exp(0x%08x): vector 0x%08x, scalar 0x%08x", cake_bits_from_f32(in[l]),
                         cake_bits_from_f32(out[l]), cake_bits_from_f32(cake_exp_lanes(in[l])));
    }
    /* fold16 / fold4 give the scalar tree's bits */
    for (int rep = 0; rep < 2000; rep++) {
        float v[16][16];
        __m512 vv[16];
        for (int i = 0; i < 16; i++) {
            for (int l = 0; l < 16; l++) v[i][l] = rnd_f(-1, 1) * (float)(1 << (rnd_u32() % 24));
            vv[i] = _mm512_loadu_ps(v[i]);
        }
        float o16[16], o4[4];
        _mm512_storeu_ps(o16, cake_fold16(vv));
        _mm_storeu_ps(o4, cake_fold4(vv[0], vv[1], vv[2], vv[3]));
        for (int i = 0; i < 16; i++) {
            const float want = cake_fold16_lanes(v[i]);
            assert_int_equal(cake_bits_from_f32(o16[i]), cake_bits_from_f32(want));
            if (i < 4) assert_int_equal(cake_bits_from_f32(o4[i]), cake_bits_from_f32(want));
        }
    }
#endif
}

/* ===================== RMSNorm ===================== */

static void test_rmsnorm(void **state) {
    (void)state;
    const int dims[] = {1, 7, 15, 16, 17, 63, 64, 65, 100, 2051};
    for (size_t di = 0; di < sizeof(dims) / sizeof(dims[0]); di++)
        for (int T = 1; T <= 3; T++) {
            const int dim = dims[di];
            const size_t n = (size_t)T * dim;
            float *x = xmalloc(n * 4), *w = xmalloc((size_t)dim * 4), *y = xmalloc(n * 4),
                  *yr = xmalloc(n * 4), *xa = xmalloc(n * 4);
            for (size_t i = 0; i < n; i++) x[i] = rnd_f(-4, 4);
            for (int i = 0; i < dim; i++) w[i] = rnd_f(-2, 2);
            cake_rmsnorm(y, x, w, T, dim, 1e-5f);
            cake_rmsnorm_ref(yr, x, w, T, dim, 1e-5f);
            /* 1e-5 relative to |y|: the f32 sum of squares (64 lanes + tree) is
             * within ~dim/64 * 2^-24 relative of the double one; the scale and
             * two products add a few ulp. */
            for (size_t i = 0; i < n; i++)
                assert_true(fabsf(y[i] - yr[i]) <= 1e-5f * fabsf(yr[i]) + 1e-30f);
            /* in place (y aliases x) gives the same bits */
            memcpy(xa, x, n * 4);
            cake_rmsnorm(xa, xa, w, T, dim, 1e-5f);
            assert_memory_equal(xa, y, n * 4);
            /* a token's row does not depend on the rest of the batch */
            cake_rmsnorm(xa, x + (size_t)(T - 1) * dim, w, 1, dim, 1e-5f);
            assert_memory_equal(xa, y + (size_t)(T - 1) * dim, (size_t)dim * 4);
            free(x);
            free(w);
            free(y);
            free(yr);
            free(xa);
        }
}

/* ===================== RoPE ===================== */

/* RoPE frequencies theta^(-2i/hd) * scale, as the model computes them. */
static double *rope_freqs(int hd, double theta, double scale) {
    double *f = xmalloc((size_t)(hd / 2) * sizeof(*f));
    for (int i = 0; i < hd / 2; i++) f[i] = pow(theta, -2.0 * i / hd) * scale;
    return f;
}

static void test_rope(void **state) {
    (void)state;
    const int hds[] = {2, 8, 30, 48, 64, 128};
    const int pos0s[] = {0, 5, 4093, 100000};
    for (size_t hi = 0; hi < sizeof(hds) / sizeof(hds[0]); hi++)
        for (size_t pi = 0; pi < sizeof(pos0s) / sizeof(pos0s[0]); pi++) {
            const int hd = hds[hi], nh = 3, T = 4, pos0 = pos0s[pi];
            const size_t n = (size_t)T * nh * hd;
            double *freqs = rope_freqs(hd, 500000.0, 1.0);
            float *a = xmalloc(n * 4), *b = xmalloc(n * 4), *c = xmalloc(n * 4);
            for (size_t i = 0; i < n; i++) a[i] = b[i] = c[i] = rnd_f(-3, 3);
            cake_rope(a, T, nh, hd, pos0, freqs);
            cake_rope_ref(b, T, nh, hd, pos0, freqs);
            assert_memory_equal(a, b, n * 4); /* same products, same rounding */
            /* chunk invariance: token by token at its own position */
            for (int t = 0; t < T; t++)
                cake_rope(c + (size_t)t * nh * hd, 1, nh, hd, pos0 + t, freqs);
            assert_memory_equal(a, c, n * 4);
            /* position 0 is the identity */
            if (pos0 == 0) {
                float *d = xmalloc((size_t)nh * hd * 4);
                for (int i = 0; i < nh * hd; i++) d[i] = rnd_f(-1, 1);
                float *e = xmalloc((size_t)nh * hd * 4);
                memcpy(e, d, (size_t)nh * hd * 4);
                cake_rope(d, 1, nh, hd, 0, freqs);
                assert_memory_equal(d, e, (size_t)nh * hd * 4);
                free(d);
                free(e);
            }
            /* NeoX style: the same turns of pairs (i, i + hd/2), to the bit */
            float *x = xmalloc(n * 4);
            for (size_t i = 0; i < n; i++) x[i] = rnd_f(-3, 3);
            for (size_t r = 0; r < n / hd; r++)
                for (int i = 0; i < hd / 2; i++) {
                    c[r * hd + 2 * i] = x[r * hd + i];
                    c[r * hd + 2 * i + 1] = x[r * hd + hd / 2 + i];
                }
            cake_rope(c, T, nh, hd, pos0, freqs);
            cake_rope_neox(x, T, nh, hd, hd, pos0, freqs);
            for (size_t r = 0; r < n / hd; r++)
                for (int i = 0; i < hd / 2; i++) {
                    assert_memory_equal(&x[r * hd + i], &c[r * hd + 2 * i], 4);
                    assert_memory_equal(&x[r * hd + hd / 2 + i], &c[r * hd + 2 * i + 1], 4);
                }
            /* partial (Phi-4-mini): the first nr values of each head turned
             * as a head of nr, the rest as they were */
            const int nr = hd / 4 * 2;
            if (nr >= 2 && nr < hd) {
                double *fr = rope_freqs(nr, 500000.0, 1.0);
                float *part = xmalloc((size_t)T * nh * nr * 4);
                for (size_t i = 0; i < n; i++) x[i] = c[i] = rnd_f(-3, 3);
                for (size_t r = 0; r < n / hd; r++) memcpy(part + r * nr, x + r * hd, nr * 4);
                cake_rope_neox(x, T, nh, hd, nr, pos0, fr);
                cake_rope_neox(part, T, nh, nr, nr, pos0, fr);
                for (size_t r = 0; r < n / hd; r++) {
                    assert_memory_equal(x + r * hd, part + r * nr, nr * 4);
                    assert_memory_equal(x + r * hd + nr, c + r * hd + nr, (hd - nr) * 4);
                }
                free(part);
                free(fr);
            }
            free(x);
            free(freqs);
            free(a);
            free(b);
            free(c);
        }
    /* a rotation keeps each pair's norm, and turns pair i by pos * freqs[i]
     * (per-pair frequencies as Llama 3.1's scaled ones: any values) */
    double freqs[32];
    for (int i = 0; i < 32; i++) freqs[i] = pow(10000.0, -2.0 * i / 64) / (1.0 + (i % 5));
    float v[64], w[64];
    for (int i = 0; i < 64; i++) v[i] = w[i] = rnd_f(-1, 1);
    cake_rope(v, 1, 1, 64, 1234, freqs);
    for (int i = 0; i < 32; i++) {
        const double n0 = hypot(w[2 * i], w[2 * i + 1]), n1 = hypot(v[2 * i], v[2 * i + 1]);
        assert_true(fabs(n0 - n1) <= 1e-6 * (n0 + 1e-30));
        const double a = 1234.0 * freqs[i];
        const double x0 = w[2 * i] * cos(a) - w[2 * i + 1] * sin(a);
        const double x1 = w[2 * i] * sin(a) + w[2 * i + 1] * cos(a);
        assert_true(fabs(v[2 * i] - x0) <= 1e-6 && fabs(v[2 * i + 1] - x1) <= 1e-6);
    }
}

/* ===================== SwiGLU ===================== */

/* A gated activation h = act(g) * u against its formula in double (within
 * tol(g) relative), in place (h aliases g), and bit for bit one element at a
 * time (the scalar path: an element's bits must not depend on where it
 * falls in a row). */
typedef void (*gated_fn)(float *h, const float *g, const float *u, size_t n);

static void check_gated(const char *name, gated_fn fast, gated_fn ref, float (*tol)(float g)) {
    const size_t lens[] = {1, 15, 16, 17, 100, 1027};
    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
        const size_t n = lens[li];
        float *g = xmalloc(n * 4), *u = xmalloc(n * 4), *h = xmalloc(n * 4), *hr = xmalloc(n * 4);
        for (size_t i = 0; i < n; i++) {
            g[i] = i % 7 == 3 ? rnd_f(-120, 120) : rnd_f(-8, 8);
            u[i] = rnd_f(-3, 3);
        }
        fast(h, g, u, n);
        ref(hr, g, u, n);
        for (size_t i = 0; i < n; i++)
            if (!(fabsf(h[i] - hr[i]) <= tol(g[i]) * fabsf(hr[i]) + 1e-35f))
                fail_msg("%s(%g) * %g: %.9g, want %.9g", name, g[i], u[i], h[i], hr[i]);
        for (size_t i = 0; i < n; i++) {
            float one;
            fast(&one, &g[i], &u[i], 1);
            assert_memory_equal(&one, &h[i], 4);
        }
        fast(g, g, u, n);
        assert_memory_equal(g, h, n * 4);
        free(g);
        free(u);
        free(h);
        free(hr);
    }
}

/* 1e-6: the exp polynomial is within ~1.5 ulp of expf's result (itself <1
 * ulp), then one add, one divide, one multiply; far from 0 the value is
 * tiny and the absolute term covers it */
static float swiglu_tol(float g) {
    (void)g;
    return 1e-6f;
}

/* GELU's exponent is c1 g + c2 g^3 (up to 1.6 |g| + 0.07 |g|^3), itself
 * rounded to f32: ~1 ulp of it more */
static float geglu_tol(float g) {
    const float a = fabsf(g);
    return 2e-6f + 1.2e-7f * (1.6f * a + 0.0714f * a * a * a);
}

static void test_swiglu(void **state) {
    (void)state;
    check_gated("swiglu", cake_swiglu, cake_swiglu_ref, swiglu_tol);
}

static void test_geglu(void **state) {
    (void)state;
    check_gated("geglu", cake_geglu, cake_geglu_ref, geglu_tol);
}

/* ===================== matmul ===================== */

/* Weights in dtype, and their values as f32 in as_f32 (Q8_0: n a multiple of
 * 32; blocks of an f16 scale and 32 int8, value d * q, as ggml lays them out,
 * written here from that layout; Q4_K: n a multiple of 256, random bytes
 * under positive d and dmin, so every 6-bit scale and min occurs, the
 * values as the decoder gives them, which test_dequant holds to ggml's). */
static void *make_weights(int dtype, size_t n, float *as_f32) {
    if (dtype == CAKE_DTYPE_Q4_0 || dtype == CAKE_DTYPE_IQ4_NL) { /* per 32: d, random nibbles */
        uint8_t *w = xmalloc(n / 32 * 18);
        for (size_t b = 0; b < n / 32; b++) {
            const cake_f16 d = cake_f32_to_f16(rnd_f(0.001f, 0.02f));
            memcpy(w + b * 18, &d, 2);
            for (int i = 2; i < 18; i++) w[b * 18 + i] = (uint8_t)rnd_f(0, 255.99f);
        }
        cake_dequant_to_f32(dtype, w, 0, as_f32, n);
        return w;
    }
    if (dtype == CAKE_DTYPE_Q6_K || dtype == CAKE_DTYPE_Q3_K) { /* random bytes, then d */
        const size_t bb = cake_dequant_block_bytes(dtype);      /* Q6_K: int8 scales -128..127 */
        uint8_t *w = xmalloc(n / 256 * bb);
        for (size_t b = 0; b < n / 256; b++) {
            uint8_t *blk = w + b * bb;
            for (size_t i = 0; i < bb - 2; i++) blk[i] = (uint8_t)rnd_f(0, 255.99f);
            const cake_f16 d = cake_f32_to_f16(rnd_f(0.00002f, 0.0002f));
            memcpy(blk + bb - 2, &d, 2);
        }
        cake_dequant_to_f32(dtype, w, 0, as_f32, n);
        return w;
    }
    if (dtype == CAKE_DTYPE_Q4_K || dtype == CAKE_DTYPE_Q5_K || dtype == CAKE_DTYPE_IQ4_XS) {
        const size_t bb = cake_dequant_block_bytes(dtype);
        uint8_t *w = xmalloc(n / 256 * bb);
        for (size_t b = 0; b < n / 256; b++) {
            uint8_t *blk = w + b * bb;
            const cake_f16 d = cake_f32_to_f16(rnd_f(0.0002f, 0.002f)),
                           dmin = cake_f32_to_f16(rnd_f(0.0f, 0.01f));
            memcpy(blk, &d, 2);
            memcpy(blk + 2, &dmin, 2); /* IQ4_XS: its scales' high bits, random too */
            for (size_t i = 4; i < bb; i++) blk[i] = (uint8_t)rnd_f(0, 255.99f);
            if (dtype == CAKE_DTYPE_IQ4_XS)
                for (int i = 2; i < 4; i++) blk[i] = (uint8_t)rnd_f(0, 255.99f);
        }
        cake_dequant_to_f32(dtype, w, 0, as_f32, n);
        return w;
    }
    if (dtype == CAKE_DTYPE_Q8_0) {
        uint8_t *w = xmalloc(n / 32 * 34);
        for (size_t b = 0; b < n / 32; b++) {
            const cake_f16 d = cake_f32_to_f16(rnd_f(0.001f, 0.02f));
            memcpy(w + b * 34, &d, 2);
            for (int j = 0; j < 32; j++) {
                const int q = (int)rnd_f(-127.99f, 127.99f);
                w[b * 34 + 2 + j] = (uint8_t)(int8_t)q;
                as_f32[b * 32 + j] = (float)((double)cake_f16_to_f32(d) * q);
            }
        }
        return w;
    }
    const size_t es = dtype == CAKE_DTYPE_F32 ? 4 : 2;
    void *w = xmalloc(n * es);
    for (size_t i = 0; i < n; i++) {
        const float v = rnd_f(-1, 1);
        if (dtype == CAKE_DTYPE_F32) {
            ((float *)w)[i] = v;
            as_f32[i] = v;
        } else if (dtype == CAKE_DTYPE_F16) {
            ((cake_f16 *)w)[i] = cake_f32_to_f16(v);
            as_f32[i] = cake_f16_to_f32(((cake_f16 *)w)[i]);
        } else {
            ((cake_bf16 *)w)[i] = cake_f32_to_bf16(v);
            as_f32[i] = cake_bf16_to_f32(((cake_bf16 *)w)[i]);
        }
    }
    return w;
}

/* The activations the Q8_0 matmul multiplies: x rounded per block of 32 as
 * llama.cpp's quantize_row_q8_0 (d = max |x| / 127, q = round(x * (1 / d))),
 * written here apart from the kernel, as the values q * d. */
static float *q8_0_activations(const float *x, size_t n) {
    float *xq = xmalloc(n * 4);
    for (size_t b = 0; b < n; b += 32) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b + j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) {
            const float q = nearbyintf(x[b + j] * id);
            xq[b + j] = (float)((double)q * d);
            /* each value within half a step of x, so the product is within
             * sum |w| d / 2 of the exact one; plus the rounding of x * (1 / d)
             * in f32, up to 127 * 2^-23 of a step, which can tip a value
             * just inside a half step over it (seen: -1.92571, step 0.0153) */
            if (fabs(x[b + j] - xq[b + j]) > 0.5 * d * (1 + 1e-4))
                fail_msg("activation %g quantized to %g (step %g)", x[b + j], xq[b + j], d);
        }
    }
    return xq;
}

static void check_matmul_shape(int dtype, int T, int n_in, int n_out) {
    const size_t nx = (size_t)T * n_in, nw = (size_t)n_out * n_in, ny = (size_t)T * n_out;
    float *x = xmalloc(nx * 4), *wf = xmalloc(nw * 4);
    for (size_t i = 0; i < nx; i++) x[i] = rnd_f(-2, 2);
    void *w = make_weights(dtype, nw, wf);
    /* The values the weights multiply: x itself, or for Q8_0 x quantized. */
    float *xv = x;
    if (dtype == CAKE_DTYPE_Q8_0 || cake_kquant_x16_for(dtype)) {
        /* repacked, as at load */
        if (n_in >= 64) memset(x, 0, 32 * 4); /* a block of zeros: d = 0 */
        const int x16 = dtype == CAKE_DTYPE_Q8_0 ? CAKE_DTYPE_Q8_0_X16 : cake_kquant_x16_for(dtype);
        void *packed = xmalloc(x16 == CAKE_DTYPE_Q8_0_X16 ? cake_q8_0_x16_size(n_out, n_in)
                                                          : cake_kquant_x16_size(x16, n_out, n_in));
        if (x16 == CAKE_DTYPE_Q8_0_X16)
            cake_q8_0_pack_x16(packed, w, n_out, n_in);
        else
            cake_kquant_pack_x16(x16, packed, w, n_out, n_in);
        free(w);
        w = packed;
        dtype = x16;
        xv = q8_0_activations(x, nx);
    }
    float *y = guarded_alloc(ny * 4), *yl = xmalloc(ny * 4), *yr = xmalloc(ny * 4),
          *y1 = guarded_alloc((size_t)n_out * 4);

    assert_int_equal(cake_matmul_lanes(yl, x, w, dtype, T, n_in, n_out), 0);
    assert_int_equal(cake_matmul_ref(yr, x, w, dtype, T, n_in, n_out), 0);
    /* the reference reads the weights as make_weights wrote them */
    for (int t = 0; t < T; t++)
        for (int n = 0; n < n_out; n++) {
            double s = 0, mag = 0, exact = 0, wsum = 0;
            for (int k = 0; k < n_in; k++) {
                const double wk = wf[(size_t)n * n_in + k],
                             p = (double)xv[(size_t)t * n_in + k] * wk;
                s += p;
                mag += fabs(p);
                exact += (double)x[(size_t)t * n_in + k] * wk;
                wsum += fabs(wk) * fabs(x[(size_t)t * n_in + k] - xv[(size_t)t * n_in + k]);
            }
            if (fabs(s - yr[(size_t)t * n_out + n]) > 1e-6 * mag + 1e-30)
                fail_msg("matmul_ref dtype %d: y[%d][%d] %g, from the weights' values %g", dtype, t,
                         n, yr[(size_t)t * n_out + n], s);
            /* Q8_0: the activations' rounding is all that separates the result
             * from the exact product */
            if (fabs(exact - yr[(size_t)t * n_out + n]) > wsum * (1 + 1e-6) + 1e-6 * mag + 1e-30)
                fail_msg("matmul_ref dtype %d: y[%d][%d] %g, exact %g, more than the rounding",
                         dtype, t, n, yr[(size_t)t * n_out + n], exact);
        }
    /* Against the double-precision reference: 1e-5 of sum |x_k w_k|. The f32
     * result is 16 FMA chains of n_in/16 terms plus a 4-level tree, so its
     * error is at most ~(n_in/16 + 4) * 2^-24 of that sum (3e-5 at n_in 8192,
     * worst case); random signs make it ~sqrt of that in practice. (Q8_0: one
     * chain of n_in/32 exact block sums.) */
    for (int t = 0; t < T; t++)
        for (int n = 0; n < n_out; n++) {
            double mag = 0;
            for (int k = 0; k < n_in; k++)
                mag += fabs((double)xv[(size_t)t * n_in + k] * wf[(size_t)n * n_in + k]);
            const double d = fabs((double)yl[(size_t)t * n_out + n] - yr[(size_t)t * n_out + n]);
            if (d > 1e-5 * mag + 1e-30)
                fail_msg("matmul dtype %d T %d n_in %d n_out %d: y[%d][%d] %g vs ref %g", dtype, T,
                         n_in, n_out, t, n, yl[(size_t)t * n_out + n], yr[(size_t)t * n_out + n]);
        }
    /* the fast kernel equals the lanes kernel bit for bit, for every thread count */
    for (int p = 0; p < 4; p++) {
        memset(y, 0, ny * 4);
        assert_int_equal(cake_matmul(y, x, w, dtype, T, n_in, n_out, pools[p]), 0);
        if (memcmp(y, yl, ny * 4))
            fail_msg("matmul dtype %d T %d n_in %d n_out %d threads %d: differs from lanes", dtype,
                     T, n_in, n_out, p);
    }
    /* and a token's row does not depend on the batch it came in */
    for (int t = 0; t < T; t += (T > 4 ? 3 : 1)) {
        assert_int_equal(cake_matmul(y1, x + (size_t)t * n_in, w, dtype, 1, n_in, n_out, pools[2]),
                         0);
        assert_memory_equal(y1, yl + (size_t)t * n_out, (size_t)n_out * 4);
    }
    if (xv != x) free(xv);
    free(x);
    free(wf);
    free(w);
    guarded_free(y, ny * 4);
    free(yl);
    free(yr);
    guarded_free(y1, (size_t)n_out * 4);
}

static void test_matmul(void **state) {
    (void)state;
    const int dtypes[] = {CAKE_DTYPE_F32, CAKE_DTYPE_F16, CAKE_DTYPE_BF16};
    /* T around the decode/GEMM switch, the 6-token tile and the 24-token
     * block; n_in around 16 and the 512-element K block (1030: a last block
     * of only the masked tail); n_out around the 4-row tile and the 64-row
     * panel */
    const int shapes[][3] = {{1, 1, 1},     {1, 16, 4},      {2, 15, 5},     {3, 17, 3},
                             {5, 33, 7},    {6, 64, 8},      {7, 100, 13},   {8, 16, 4},
                             {9, 31, 65},   {13, 257, 67},   {31, 48, 130},  {64, 130, 9},
                             {20, 2048, 6}, {7, 1000, 129},  {40, 1100, 70}, {33, 2048, 5},
                             {2, 4100, 9},  {50, 1030, 131}, {48, 512, 66},  {32, 528, 4}};
    for (size_t di = 0; di < 3; di++)
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
            check_matmul_shape(dtypes[di], shapes[si][0], shapes[si][1], shapes[si][2]);
    /* Q8_0: rows of whole blocks of 32; n_out around the 16-row groups, the
     * 2-group tile and the 64-row task; T around the 6-token tile */
    const int q8_shapes[][3] = {{1, 32, 1},     {1, 64, 16},   {2, 96, 17},   {6, 64, 33},
                                {7, 256, 13},   {13, 512, 67}, {31, 1024, 9}, {20, 2048, 6},
                                {40, 1088, 70}, {12, 64, 300}, {1, 4128, 9},  {5, 4096, 129}};
    for (size_t si = 0; si < sizeof(q8_shapes) / sizeof(q8_shapes[0]); si++)
        check_matmul_shape(CAKE_DTYPE_Q8_0, q8_shapes[si][0], q8_shapes[si][1], q8_shapes[si][2]);
    /* Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, Q4_0 and IQ4_NL: rows of whole blocks of 256 */
    const int q4_shapes[][3] = {{1, 256, 1},    {1, 256, 16},   {2, 512, 17},  {6, 256, 33},
                                {7, 768, 13},   {13, 512, 67},  {20, 2048, 6}, {1, 4096, 9},
                                {5, 4096, 129}, {12, 256, 300}, {40, 1024, 70}};
    for (size_t si = 0; si < sizeof(q4_shapes) / sizeof(q4_shapes[0]); si++) {
        check_matmul_shape(CAKE_DTYPE_Q4_K, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
        check_matmul_shape(CAKE_DTYPE_Q5_K, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
        check_matmul_shape(CAKE_DTYPE_Q6_K, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
        check_matmul_shape(CAKE_DTYPE_Q3_K, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
        check_matmul_shape(CAKE_DTYPE_Q4_0, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
        check_matmul_shape(CAKE_DTYPE_IQ4_NL, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
        check_matmul_shape(CAKE_DTYPE_IQ4_XS, q4_shapes[si][0], q4_shapes[si][1], q4_shapes[si][2]);
    }
}

/* The Q3_K ... Q6_K, IQ4_XS, Q4_0 and IQ4_NL repacks keep every weight:
 * scale * level - min through the layout's lookups, exact in double and
 * rounded once, is the decoder's value bit for bit (ggml's d1 * q - m1,
 * d sc (q - 32), dl * table[q], d (q - 8), dl (q - 4): one rounding each), and the
 * padding rows of the last group are zeros. */
static void check_kquant_pack(int dtype, int x16, size_t group_bytes) {
    const int n_out = 21, n_in = 512;
    float *want = xmalloc((size_t)n_out * n_in * 4);
    void *w = make_weights(dtype, (size_t)n_out * n_in, want);
    uint8_t *packed = xmalloc(cake_kquant_x16_size(x16, n_out, n_in));
    assert_int_equal(cake_kquant_x16_size(x16, n_out, n_in), 2 * 2 * group_bytes);
    cake_kquant_pack_x16(x16, packed, w, n_out, n_in);
    const size_t ns = n_in / 256;
    int high = 0, higher = 0, eight = 0; /* levels of 16 and more (bit 4), 32 (bit 5), 8 (bit 3) */
    for (int r = 0; r < 32; r++)
        for (int k = 0; k < n_in; k++) {
            const int q = cake_kquant_x16_level(x16, packed, ns, r, k);
            const float s = cake_kquant_x16_scale(x16, packed, ns, r, k),
                        m = cake_kquant_x16_min(x16, packed, ns, r, k),
                        got = (float)((double)s * q - (double)m);
            high += q >= 16;
            higher += q >= 32;
            eight += q >= 8;
            if (r >= n_out) {
                const int zero = x16 == CAKE_DTYPE_IQ4_XS_X16 || x16 == CAKE_DTYPE_IQ4_NL_X16
                                     ? cake_iq4_values[0] + 128
                                     : 0;
                if (q != zero || s != 0.0f || m != 0.0f)
                    fail_msg("padding row %d col %d not zero", r, k);
            } else if (got != want[(size_t)r * n_in + k]) { /* (-0: IQ4_XS scale 0) */
                fail_msg("%s row %d col %d: %g * %d - %g = %.9g, decoder %.9g",
                         cake_dtype_name((uint32_t)dtype), r, k, s, q, m, got,
                         want[(size_t)r * n_in + k]);
            }
        }
    const bool iq4 = x16 == CAKE_DTYPE_IQ4_XS_X16 || x16 == CAKE_DTYPE_IQ4_NL_X16,
               four_bits = x16 == CAKE_DTYPE_Q4_K_X16 || x16 == CAKE_DTYPE_Q4_0_X16;
    if (x16 == CAKE_DTYPE_Q3_K_X16 ? eight != 0 || high != 0 : four_bits ? high != 0 : high < 1000)
        fail_msg("%s: %d levels of 16 or more", cake_dtype_name((uint32_t)dtype), high);
    if (x16 == CAKE_DTYPE_Q6_K_X16 || iq4 ? higher < 1000 : higher != 0)
        fail_msg("%s: %d levels of 32 or more", cake_dtype_name((uint32_t)dtype), higher);
    free(want);
    free(w);
    free(packed);
}

static void test_kquant_pack(void **state) {
    (void)state;
    check_kquant_pack(CAKE_DTYPE_Q4_K, CAKE_DTYPE_Q4_K_X16, 2368);
    check_kquant_pack(CAKE_DTYPE_Q5_K, CAKE_DTYPE_Q5_K_X16, 2880);
    check_kquant_pack(CAKE_DTYPE_Q6_K, CAKE_DTYPE_Q6_K_X16, 3392);
    check_kquant_pack(CAKE_DTYPE_Q4_0, CAKE_DTYPE_Q4_0_X16, 2304);
    check_kquant_pack(CAKE_DTYPE_Q3_K, CAKE_DTYPE_Q3_K_X16, 2368);
    check_kquant_pack(CAKE_DTYPE_IQ4_NL, CAKE_DTYPE_IQ4_NL_X16, 2304);
    check_kquant_pack(CAKE_DTYPE_IQ4_XS, CAKE_DTYPE_IQ4_XS_X16, 2368);
}

/* Elements first..first+n of a CAKE_DTYPE_Q8_0_X16 matrix of rows n_in wide,
 * row-major, read through util/q8_0.h's lookups. */
static void x16_to_f32(const void *w, int n_in, size_t first, float *dst, size_t n) {
    const size_t nb = (size_t)n_in / CAKE_Q8_0_BLOCK;
    for (size_t i = 0; i < n; i++) {
        const size_t e = first + i, r = e / (size_t)n_in, k = e % (size_t)n_in;
        dst[i] = cake_q8_0_x16_scale(w, nb, r, k / CAKE_Q8_0_BLOCK) *
                 (float)cake_q8_0_x16_weight(w, nb, r, k);
    }
}

/* Q8_0 read back as floats (embedding rows; the CUDA backend's upload, in
 * pieces that start anywhere) from the file's blocks, and the repacked
 * layout's values: those make_weights computed, for any range of elements. */
/* The row quantizer (SIMD where built) writes cake_q8_0_quantize_block's
 * bytes: random rows, rows whose values land on halves of a step (rounded
 * away from zero), zeros, -0 and a NaN. */
static void test_q8_0_quantize_row(void **state) {
    (void)state;
    enum { N = 32 * 40 };
    float x[N];
    uint8_t got[N / 32 * CAKE_Q8_0_BYTES], want[N / 32 * CAKE_Q8_0_BYTES];
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < N; i++) {
            const int b = i / 32, j = i % 32;
            const float s = ldexpf(1.0f, (int)(rnd_u32() % 8) - 4);
            if (b % 4 == 0) /* max 127 s, the rest on halves: q = j - 15.5 */
                x[i] = j == 0 ? 127.0f * s : ((float)j - 15.5f) * s;
            else if (b % 4 == 1)
                x[i] = b == 1 && j < 16 ? (j % 2 ? -0.0f : 0.0f) : rnd_f(-3.0f, 3.0f);
            else
                x[i] = rnd_f(-1.0f, 1.0f) * s;
        }
        if (round == 0) x[70] = NAN; /* max |x| skips it, as fmaxf does */
        if (round == 1) {            /* (KV rows of broken weights: no undefined conversion) */
            x[100] = INFINITY;
            x[140] = -INFINITY;
            x[141] = NAN;
        }
        cake_q8_0_quantize_row(x, got, N);
        for (int b = 0; b < N / 32; b++)
            cake_q8_0_quantize_block(x + 32 * b, want + b * CAKE_Q8_0_BYTES);
        for (size_t k = 0; k < sizeof(got); k++)
            if (got[k] != want[k])
                fail_msg("round %d, block %zu byte %zu: %d, not %d", round, k / CAKE_Q8_0_BYTES,
                         k % CAKE_Q8_0_BYTES, got[k], want[k]);
    }
}

static void test_q8_0_to_f32(void **state) {
    (void)state;
    const int n_out = 37, n_in = 96; /* 3 groups of 16 rows, the last padded */
    const size_t n = (size_t)n_out * n_in;
    float *want = xmalloc(n * 4), *got = xmalloc(n * 4);
    void *raw = make_weights(CAKE_DTYPE_Q8_0, n, want);
    void *packed = xmalloc(cake_q8_0_x16_size(n_out, n_in));
    cake_q8_0_pack_x16(packed, raw, n_out, n_in);
    const size_t ranges[][2] = {{0, n},           {5, 70},    {95, 3}, {103, 500},
                                {16 * 96 - 1, 2}, {n - 1, 1}, {0, 0}};
    for (size_t ri = 0; ri < sizeof(ranges) / sizeof(ranges[0]); ri++) {
        const size_t first = ranges[ri][0], cnt = ranges[ri][1];
        for (int layout = 0; layout < 2; layout++) {
            for (size_t i = 0; i < n; i++) got[i] = -1e30f;
            if (layout == 0)
                cake_q8_0_to_f32(raw, first, got + first, cnt);
            else
                x16_to_f32(packed, n_in, first, got + first, cnt);
            for (size_t i = 0; i < n; i++) {
                const float expect = i >= first && i < first + cnt ? want[i] : -1e30f;
                if (got[i] != expect)
                    fail_msg("%s, elements [%zu, %zu): element %zu is %g, not %g",
                             layout ? "Q8_0_X16" : "Q8_0", first, first + cnt, i, got[i], expect);
            }
        }
    }
    free(want);
    free(got);
    free(raw);
    free(packed);
}

static void test_matmul_bad_dtype(void **state) {
    (void)state;
    float x[4] = {1, 2, 3, 4}, y[1] = {0};
    const uint8_t w[8] = {0};
    /* Q8_0 rows must be whole blocks of 32 */
    assert_int_equal(cake_matmul(y, x, w, CAKE_DTYPE_Q8_0_X16, 1, 4, 1, NULL), -1);
    assert_int_equal(cake_matmul(y, x, w, 12345, 1, 4, 1, pools[2]), -1);
    assert_int_equal(cake_matmul_ref(y, x, w, CAKE_DTYPE_Q8_0_X16, 1, 4, 1), -1);
    assert_int_equal(cake_matmul_lanes(y, x, w, 7, 1, 4, 1), -1);
    /* Q8_0 in the file's layout is repacked first, never read as it is */
    float x32[32] = {0};
    const uint8_t w34[34] = {0};
    assert_int_equal(cake_matmul(y, x32, w34, CAKE_DTYPE_Q8_0, 1, 32, 1, NULL), -1);
    assert_int_equal(cake_matmul_lanes(y, x32, w34, CAKE_DTYPE_Q8_0, 1, 32, 1), -1);
}

/* ===================== attention ===================== */

/* The cache's element type in these cases: kv_f16's 0 (f32) and 1 (f16),
 * KV_Q8 (Q8_0) or KV_Q4 (Q4_0). */
#define KV_Q8 2
#define KV_Q4 3

typedef struct {
    int n_ctx, n_heads, n_kv_heads, head_dim, kv_f16;
    int head_ctx;      /* positions per head in k, v: n_ctx rounded up to a key block */
    float *q;          /* (n_ctx, n_heads, head_dim): the queries of every position */
    float *kf, *vf;    /* the cache contents as f32 */
    void *k, *v;       /* the cache in its dtype, laid out as kv/kv_cache.h says */
    cake_f16 *ks, *vs; /* KV_Q8: the scales, laid out as kv/kv_cache.h says */
    int window;        /* the sliding window (0: none) */
    float softcap;     /* the scores' soft cap (0: none) */
} attn_case;

static enum cake_kv_type case_type(int kv_f16) {
    return kv_f16 == KV_Q8   ? CAKE_KV_Q8_0
           : kv_f16 == KV_Q4 ? CAKE_KV_Q4_0
           : kv_f16          ? CAKE_KV_F16
                             : CAKE_KV_F32;
}

/* Q8_0 and Q4_0 cases: random values and scales (f16) that make values of
 * about the f32 cases' size; each element is int8 * scale, or (q - 8) *
 * scale with q in its nibble (kv/kv_cache.h). */
static void fill_quantized(attn_case *c, int q4) {
    const int hd = c->head_dim, hc = c->head_ctx;
    const float top = q4 ? 8.0f : 127.0f; /* the largest |value| a scale multiplies */
    memset(c->k, 0, (size_t)hc * c->n_kv_heads * hd);
    memset(c->v, 0, (size_t)hc * c->n_kv_heads * hd);
    for (int h = 0; h < c->n_kv_heads; h++)
        for (int p = 0; p < hc; p++)
            for (int g = 0; g < hd / 32; g++) {
                const size_t ksi = cake_kv_k_scale_index(hc, hd, h, p, g),
                             vsi = cake_kv_v_scale_index(hc, hd, h, p, g);
                c->ks[ksi] = cake_f32_to_f16(rnd_f(1.0f, 1.5f) / top);
                c->vs[vsi] = cake_f32_to_f16(rnd_f(0.5f, 1.0f) / top);
                for (int d = 32 * g; d < 32 * g + 32; d++) {
                    const size_t ki = cake_kv_k_index(hc, hd, h, p, d),
                                 vi = cake_kv_v_index(hc, hd, h, p, d);
                    int kq, vq; /* the values the scales multiply */
                    if (q4) {
                        const int kn = (int)(rnd_u32() % 16), vn = (int)(rnd_u32() % 16);
                        ((uint8_t *)c->k)[cake_kv_k4_byte(hc, hd, h, p, d)] |=
                            (uint8_t)(kn << cake_kv_k4_shift(d));
                        ((uint8_t *)c->v)[cake_kv_v4_byte(hc, hd, h, p, d)] |=
                            (uint8_t)(vn << cake_kv_v4_shift(d));
                        kq = kn - 8;
                        vq = vn - 8;
                    } else {
                        kq = (int)(rnd_u32() % 255) - 127;
                        vq = (int)(rnd_u32() % 255) - 127;
                        ((int8_t *)c->k)[ki] = (int8_t)kq;
                        ((int8_t *)c->v)[vi] = (int8_t)vq;
                    }
                    c->kf[ki] = (float)kq * cake_f16_to_f32(c->ks[ksi]);
                    c->vf[vi] = (float)vq * cake_f16_to_f32(c->vs[vsi]);
                }
            }
}

static attn_case make_case(int n_ctx, int n_heads, int n_kv_heads, int hd, int kv_f16) {
    const int head_ctx = (n_ctx + CAKE_KV_KBLOCK - 1) / CAKE_KV_KBLOCK * CAKE_KV_KBLOCK;
    attn_case c = {.n_ctx = n_ctx,
                   .n_heads = n_heads,
                   .n_kv_heads = n_kv_heads,
                   .head_dim = hd,
                   .kv_f16 = kv_f16,
                   .head_ctx = head_ctx};
    const size_t nq = (size_t)n_ctx * n_heads * hd, nkv = (size_t)head_ctx * n_kv_heads * hd;
    c.q = xmalloc(nq * 4);
    c.kf = xmalloc(nkv * 4);
    c.vf = xmalloc(nkv * 4);
    c.k = xmalloc(nkv * 4);
    c.v = xmalloc(nkv * 4);
    c.ks = xmalloc(nkv / 32 * 2 + 2);
    c.vs = xmalloc(nkv / 32 * 2 + 2);
    /* scores of a few units, so the softmax is neither flat nor one-hot */
    for (size_t i = 0; i < nq; i++) c.q[i] = rnd_f(-1.5f, 1.5f);
    if (kv_f16 == KV_Q8 || kv_f16 == KV_Q4) {
        fill_quantized(&c, kv_f16 == KV_Q4);
        return c;
    }
    for (size_t i = 0; i < nkv; i++) {
        float kv = rnd_f(-1.5f, 1.5f), vv = rnd_f(-1, 1);
        if (kv_f16) {
            ((cake_f16 *)c.k)[i] = cake_f32_to_f16(kv);
            ((cake_f16 *)c.v)[i] = cake_f32_to_f16(vv);
            kv = cake_f16_to_f32(((cake_f16 *)c.k)[i]);
            vv = cake_f16_to_f32(((cake_f16 *)c.v)[i]);
        } else {
            ((float *)c.k)[i] = kv;
            ((float *)c.v)[i] = vv;
        }
        c.kf[i] = kv;
        c.vf[i] = vv;
    }
    return c;
}

static void free_case(attn_case *c) {
    free(c->q);
    free(c->kf);
    free(c->vf);
    free(c->k);
    free(c->v);
    free(c->ks);
    free(c->vs);
}

static cake_attn_args case_args(const attn_case *c, int pos0, int n, const void *k, const void *v,
                                const cake_f16 *ks, const cake_f16 *vs, float *out) {
    const int q8 = c->kv_f16 == KV_Q8 || c->kv_f16 == KV_Q4;
    cake_attn_args a = {.n_tokens = n,
                        .pos0 = pos0,
                        .n_heads = c->n_heads,
                        .n_kv_heads = c->n_kv_heads,
                        .head_dim = c->head_dim,
                        .kv_type = case_type(c->kv_f16),
                        .kv_ctx = c->head_ctx,
                        .window = c->window,
                        .softcap = c->softcap,
                        .q = c->q + (size_t)pos0 * c->n_heads * c->head_dim,
                        .k = k,
                        .v = v,
                        .k_scales = q8 ? ks : NULL,
                        .v_scales = q8 ? vs : NULL,
                        .out = out};
    return a;
}

/* Prefill in chunks of `chunk` tokens, the cache filled progressively: before
 * each chunk only positions [0, pos0 + n) hold data; the rest is NaN, so any
 * read past the chunk's end would show in the output. The cache has a key
 * block more per head than the case uses (a model's holds its whole context),
 * so a head found by the wrong stride shows too. */
static void run_chunked(const attn_case *c, int chunk, cake_threadpool *pool, float *out) {
    /* (Q4_0's bytes lie as the elements of a cache of half the head_dim) */
    const size_t es = c->kv_f16 >= KV_Q8 ? 1 : c->kv_f16 ? 2 : 4;
    const int cap = c->head_ctx + CAKE_KV_KBLOCK, hd = c->head_dim;
    const int ed = c->kv_f16 == KV_Q4 ? hd / 2 : hd; /* elements (bytes) a head */
    const size_t all = (size_t)c->n_kv_heads * (size_t)cap * (size_t)hd * es;
    const size_t all_s = (size_t)c->n_kv_heads * (size_t)cap * (size_t)(hd / 32) * 2 + 2;
    uint8_t *k = xmalloc(all), *v = xmalloc(all);
    cake_f16 *kscale = xmalloc(all_s), *vscale = xmalloc(all_s);
    memset(k, 0xff, all); /* 0xffff.. is a NaN in f16 and f32 */
    memset(v, 0xff, all);
    memset(kscale, 0xff, all_s); /* and Q8_0's scales */
    memset(vscale, 0xff, all_s);
    const size_t orow = (size_t)c->n_heads * c->head_dim;
    for (int p0 = 0; p0 < c->n_ctx; p0 += chunk) {
        const int n = c->n_ctx - p0 < chunk ? c->n_ctx - p0 : chunk;
        for (int h = 0; h < c->n_kv_heads; h++)
            for (int p = p0; p < p0 + n; p++)
                for (int d = 0; d < ed; d++) {
                    const size_t kd = cake_kv_k_index(cap, ed, h, p, d) * es;
                    const size_t ks = cake_kv_k_index(c->head_ctx, ed, h, p, d) * es;
                    const size_t vd = cake_kv_v_index(cap, ed, h, p, d) * es;
                    const size_t vs = cake_kv_v_index(c->head_ctx, ed, h, p, d) * es;
                    memcpy(k + kd, (const uint8_t *)c->k + ks, es);
                    memcpy(v + vd, (const uint8_t *)c->v + vs, es);
                    if (c->kv_f16 >= KV_Q8 && d < hd / 32) {
                        kscale[cake_kv_k_scale_index(cap, hd, h, p, d)] =
                            c->ks[cake_kv_k_scale_index(c->head_ctx, hd, h, p, d)];
                        vscale[cake_kv_v_scale_index(cap, hd, h, p, d)] =
                            c->vs[cake_kv_v_scale_index(c->head_ctx, hd, h, p, d)];
                    }
                }
        cake_attn_args a = case_args(c, p0, n, k, v, kscale, vscale, out + (size_t)p0 * orow);
        a.kv_ctx = cap;
        cake_attention(&a, pool);
    }
    free(k);
    free(v);
    free(kscale);
    free(vscale);
}

/* The checks below with a sliding window of `window` positions (0: none)
 * and a soft cap on the scores (0: none). */
static void check_attention_capped(int n_ctx, int n_heads, int n_kv_heads, int hd, int kv_f16,
                                   int window, float softcap) {
    attn_case c = make_case(n_ctx, n_heads, n_kv_heads, hd, kv_f16);
    c.window = window;
    c.softcap = softcap;
    if (softcap > 0) /* scores of tens of units, which the cap bends */
        for (size_t i = 0; i < (size_t)n_ctx * n_heads * hd; i++) c.q[i] *= 8.0f;
    const size_t nout = (size_t)n_ctx * n_heads * hd;
    float *lanes = xmalloc(nout * 4), *ref = xmalloc(nout * 4), *out = guarded_alloc(nout * 4);

    cake_attn_args a = case_args(&c, 0, n_ctx, c.k, c.v, c.ks, c.vs, lanes);
    cake_attention_lanes(&a);
    a.out = ref;
    cake_attention_ref(&a);
    /* Against the double-precision reference: 1e-5 absolute (outputs are
     * convex combinations of |v| <= 1). The f32 kernel's errors: ~1e-7
     * relative in each score (a 16-lane dot product of head_dim terms, scores
     * of a few units, so ~1e-6 absolute in the exponent), 1-2 ulp per exp, and
     * sums over <= n_ctx/64 blocks of 64. */
    for (size_t i = 0; i < nout; i++)
        if (!(fabsf(lanes[i] - ref[i]) <= 1e-5f))
            fail_msg("attention n_ctx %d heads %d/%d hd %d f16 %d: out[%zu] %g vs ref %g", n_ctx,
                     n_heads, n_kv_heads, hd, kv_f16, i, lanes[i], ref[i]);

    /* fast == lanes, bit for bit, whatever the thread count */
    for (int p = 0; p < 4; p++) {
        memset(out, 0, nout * 4);
        a.out = out;
        cake_attention(&a, pools[p]);
        if (memcmp(out, lanes, nout * 4))
            fail_msg("attention n_ctx %d heads %d/%d hd %d f16 %d threads %d: differs from lanes",
                     n_ctx, n_heads, n_kv_heads, hd, kv_f16, p);
    }
    /* Q8_0: int8 times its scale is exact in f32, so the kernel equals the
     * f32 kernel on the dequantized values, bit for bit */
    if (kv_f16 >= KV_Q8) {
        attn_case f = c;
        f.kv_f16 = 0;
        cake_attn_args af = case_args(&f, 0, n_ctx, c.kf, c.vf, NULL, NULL, out);
        cake_attention(&af, pools[2]);
        if (memcmp(out, lanes, nout * 4))
            fail_msg("attention n_ctx %d heads %d/%d hd %d type %d: differs from f32 on its values",
                     n_ctx, n_heads, n_kv_heads, hd, kv_f16);
    }
    /* ... and whatever the chunking (progressively filled cache) */
    const int chunks[] = {1, 7, 64};
    for (size_t ci = 0; ci < 3; ci++) {
        memset(out, 0, nout * 4);
        run_chunked(&c, chunks[ci], pools[(ci % 3) + 1], out);
        if (memcmp(out, lanes, nout * 4))
            fail_msg("attention n_ctx %d heads %d/%d hd %d f16 %d: chunks of %d differ", n_ctx,
                     n_heads, n_kv_heads, hd, kv_f16, chunks[ci]);
    }
    if (softcap > 0) { /* the cap matters */
        c.softcap = 0;
        a = case_args(&c, 0, n_ctx, c.k, c.v, c.ks, c.vs, out);
        cake_attention(&a, pools[1]);
        assert_memory_not_equal(out, lanes, nout * 4);
        c.softcap = softcap;
    }
    if (window && window < n_ctx) { /* the window matters: the rows past it differ */
        c.window = 0;
        a = case_args(&c, 0, n_ctx, c.k, c.v, c.ks, c.vs, out);
        cake_attention(&a, pools[1]);
        const size_t row = (size_t)n_heads * hd;
        assert_memory_equal(out, lanes, (size_t)window * row * 4);
        assert_memory_not_equal(out + (size_t)window * row, lanes + (size_t)window * row,
                                (size_t)(n_ctx - window) * row * 4);
    }
    free(lanes);
    free(ref);
    guarded_free(out, nout * 4);
    free_case(&c);
}

static void check_attention_window(int n_ctx, int n_heads, int n_kv_heads, int hd, int kv_f16,
                                   int window) {
    check_attention_capped(n_ctx, n_heads, n_kv_heads, hd, kv_f16, window, 0);
}

static void check_attention_case(int n_ctx, int n_heads, int n_kv_heads, int hd, int kv_f16) {
    check_attention_window(n_ctx, n_heads, n_kv_heads, hd, kv_f16, 0);
}

/* Gemma 2's soft cap on the scores (50 there; 5 here, so that it bends the
 * scores of this test's queries), alone and with a window, prefill and
 * decode, the portable kernel too */
static void test_attention_softcap(void **state) {
    (void)state;
    check_attention_capped(150, 8, 2, 64, 1, 0, 5.0f);
    check_attention_capped(300, 4, 1, 64, 1, 100, 5.0f);
    check_attention_capped(90, 5, 5, 64, 0, 0, 5.0f);
    check_attention_capped(24, 2, 1, 272, 0, 5, 5.0f);
}

/* A sliding window (Phi-3 4K, Mistral, Gemma's local layers): windows inside
 * a key block, across blocks, of one position, longer than the context; in
 * prefill (rows in lanes, tasks whose rows start their windows in different
 * blocks) and decode (keys in lanes), every chunking. */
static void test_attention_window(void **state) {
    (void)state;
    check_attention_window(300, 4, 1, 64, 1, 100);
    check_attention_window(300, 8, 2, 64, 1, 64);
    check_attention_window(200, 4, 4, 64, 0, 1);
    check_attention_window(600, 2, 2, 64, 1, 130);
    check_attention_window(150, 8, 2, 128, 1, 37);
    check_attention_window(70, 4, 4, 64, 1, 500);
    check_attention_window(24, 2, 1, 272, 0, 5); /* the portable kernel */
    check_attention_window(90, 5, 5, 64, 1, 20);
}

static void test_attention_gqa_and_head_dims(void **state) {
    (void)state;
    /* GQA ratios 1, 2, 3, 4, 8; head dims 64, 128, and odd ones (8, 48, 100) */
    check_attention_case(70, 4, 4, 64, 1);
    check_attention_case(70, 4, 4, 64, 0);
    check_attention_case(150, 8, 2, 64, 1);
    check_attention_case(131, 8, 2, 128, 1);
    check_attention_case(65, 4, 1, 128, 0);
    check_attention_case(40, 8, 1, 8, 1);
    check_attention_case(67, 3, 3, 48, 1);
    check_attention_case(33, 2, 1, 100, 0);
    check_attention_case(20, 16, 2, 64, 1);
    check_attention_case(50, 6, 2, 64, 1); /* 3 heads per KV head */
    /* 5 KV heads: decode tasks of 3 + 2 heads on 2 threads, 2 + 2 + 1 on 3 */
    check_attention_case(90, 5, 5, 64, 1);
}

static void test_attention_long_context(void **state) {
    (void)state;
    /* several key blocks, chunks that straddle block boundaries */
    check_attention_case(300, 4, 1, 64, 1);
    /* MHA: tasks of 256 rows (1 and 2 threads) and 128 (3 threads), row
     * groups of 3 vectors with tails of 1 and 2, unmasked blocks below the
     * diagonal, a last block of 88 rows with padding */
    check_attention_case(600, 2, 2, 64, 1);
}

/* A Q8_0 cache (int8 and a scale per 32 dims, kv/kv_cache.h) and a Q4_0
 * one (two 4-bit values a byte): prefill and decode, GQA and MHA, head dims
 * 32 to 256 and the portable kernel's 288, a window over several key
 * blocks, a soft cap; each equal to the f32 kernel on the dequantized values and to
 * itself whatever the threads and chunks. */
static void test_attention_quantized(void **state) {
    (void)state;
    for (int type = KV_Q8; type <= KV_Q4; type++) {
        check_attention_case(70, 4, 4, 64, type);
        check_attention_case(150, 8, 2, 64, type);
        check_attention_case(131, 8, 2, 128, type);
        check_attention_case(67, 3, 3, 32, type);
        check_attention_case(40, 4, 2, 96, type);
        check_attention_case(24, 2, 1, 256, type);
        check_attention_case(18, 2, 2, 288, type); /* the portable kernel */
        check_attention_window(300, 8, 2, 64, type, 100);
        check_attention_capped(150, 8, 2, 64, type, 0, 5.0f);
    }
}

static void test_attention_large_head_dim(void **state) {
    (void)state;
    /* 256 is the fast kernel's largest; 272 goes to the portable kernel */
    check_attention_case(24, 2, 1, 256, 1);
    check_attention_case(18, 2, 2, 272, 0);
}

static void test_attention_decode_matches_prefill(void **state) {
    (void)state;
    /* a single query at position p (decode) equals the same query inside a
     * long prefill, for p on and around block boundaries */
    attn_case c = make_case(200, 8, 2, 64, 1);
    const size_t orow = (size_t)c.n_heads * c.head_dim;
    float *all = xmalloc((size_t)c.n_ctx * orow * 4), *one = xmalloc(orow * 4);
    cake_attn_args a = case_args(&c, 0, c.n_ctx, c.k, c.v, c.ks, c.vs, all);
    cake_attention(&a, pools[2]);
    const int ps[] = {0, 1, 62, 63, 64, 65, 127, 128, 199};
    for (size_t i = 0; i < sizeof(ps) / sizeof(ps[0]); i++) {
        cake_attn_args d = case_args(&c, ps[i], 1, c.k, c.v, c.ks, c.vs, one);
        cake_attention(&d, pools[1 + i % 3]);
        assert_memory_equal(one, all + (size_t)ps[i] * orow, orow * 4);
    }
    free(all);
    free(one);
    free_case(&c);
}

static void test_attention_single_key(void **state) {
    (void)state;
    /* position 0 attends only to itself: out = v_0 exactly (query head h
     * reads KV head h / 2) */
    attn_case c = make_case(3, 4, 2, 64, 0);
    float out[4 * 64];
    cake_attn_args a = case_args(&c, 0, 1, c.k, c.v, c.ks, c.vs, out);
    cake_attention(&a, pools[2]);
    for (int h = 0; h < 4; h++)
        for (int d = 0; d < 64; d++)
            assert_true(out[h * 64 + d] == c.vf[cake_kv_v_index(c.head_ctx, 64, h / 2, 0, d)]);
    free_case(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_to_f32_all_values),
        cmocka_unit_test(test_f16_round_trip_all_values),
        cmocka_unit_test(test_f32_to_f16_bit_patterns),
        cmocka_unit_test(test_bf16_to_f32_all_values),
        cmocka_unit_test(test_exp_twins),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_geglu),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_bad_dtype),
        cmocka_unit_test(test_q8_0_to_f32),
        cmocka_unit_test(test_kquant_pack),
        cmocka_unit_test(test_q8_0_quantize_row),
        cmocka_unit_test(test_attention_gqa_and_head_dims),
        cmocka_unit_test(test_attention_long_context),
        cmocka_unit_test(test_attention_window),
        cmocka_unit_test(test_attention_softcap),
        cmocka_unit_test(test_attention_large_head_dim),
        cmocka_unit_test(test_attention_quantized),
        cmocka_unit_test(test_attention_decode_matches_prefill),
        cmocka_unit_test(test_attention_single_key),
    };
    return cmocka_run_group_tests(tests, setup_pools, teardown_pools);
}
