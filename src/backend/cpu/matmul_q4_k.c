/* The CPU matmul for Q4_K weights, in the file's 4.5 bits a weight instead
 * of a Q8_0 copy (8.5): the integer kernel of matmul_q8_0.c with 4-bit
 * weights.
 *
 * A Q4_K block is 256 values in 8 sub-blocks of 32; value k of sub-block j
 * is s_j q_k - m_j with q_k in 0..15, s_j = d sc_j and m_j = dmin mn_j (d,
 * dmin f16; sc_j, mn_j 6-bit; both products exact in f32). Activations are
 * quantized per block of 32 as for Q8_0 (cake_q8_acts: dx, qx), so a
 * sub-block contributes
 *     s_j dx isum - m_j dx sum qx,   isum = sum q_k qx_k, exact integers,
 * and each output is one chain over the blocks b = 0, 1, ... of
 *     y = fma((float)isum_b, s_b * dx_b, y);  y = fma(-(m_b * dx_b), sum qx_b, y)
 * (products rounded to f32 first), so, as for Q8_0, a token's row is the
 * same bits whatever the batch, tiles and threads, and the scalar twin below
 * gives the same bits. No weight is rounded: the result differs from the
 * exact one only by the activations' rounding (the Q8_0 copy this replaces
 * also rounded every weight to 8 bits).
 *
 * CAKE_DTYPE_Q4_K_X16, made once from the file's blocks (cake_q4_k_pack_x16):
 * rows in groups of 16 (the last padded with zero rows), and per group and
 * block of 256 columns Q4K_GROUP_SUPER = 2368 bytes, 4.625 bits a weight:
 *     16 f16 d, then 16 f16 dmin (64 bytes);
 *     per sub-block j = 0..7: 16 sc_j, then 16 mn_j (one byte each);
 *     per sub-block j: for p = 0..3, for row i = 0..15, 4 bytes k = 0..3:
 *         low nibble q[i][32 j + 4 p + k], high nibble q[i][32 j + 16 + 4 p + k].
 * One 64-byte load holds 4 consecutive weights of 16 rows twice over: its
 * low nibbles (AND 0x0F) and its high ones (shift, AND) are two operands of
 * vpdpbusd with the rows in the lanes, as in the Q8_0 kernel, and the levels
 * are unsigned already (no +128 to take off). */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "model/dequant.h"

#if defined(CAKE_AVX512) && defined(__AVX512VNNI__)
#define Q4_VNNI 1
#endif

enum {
    Q4K_ROWS = 16,                               /* rows per group: the lanes */
    Q4K_SUPER = 256,                             /* columns per Q4_K block */
    Q4K_SUBS = 8,                                /* sub-blocks of 32 per block */
    Q4K_BLOCK_BYTES = 144,                       /* a Q4_K block in the file */
    Q4K_SCOFF = 64,                              /* the scales after the 16 d and 16 dmin */
    Q4K_QOFF = Q4K_SCOFF + Q4K_SUBS * 32,        /* the levels after the scales: 320 */
    Q4K_GROUP_SUPER = Q4K_QOFF + Q4K_SUBS * 256, /* 2368 bytes */
    Q4K_MT = 6,                                  /* tokens per register tile */
    Q4K_NG = 2,                                  /* row groups per register tile */
    Q4K_TASK_GROUPS = 4,                         /* row groups per task (64 rows) */
};

size_t cake_q4_k_x16_size(int n_out, int n_in) {
    return (size_t)((n_out + Q4K_ROWS - 1) / Q4K_ROWS) * (size_t)(n_in / Q4K_SUPER) *
           Q4K_GROUP_SUPER;
}

void cake_q4_k_pack_x16(void *dst, const void *q4_k, int n_out, int n_in) {
    const int ns = n_in / Q4K_SUPER, ng = (n_out + Q4K_ROWS - 1) / Q4K_ROWS;
    uint8_t *d = dst;
    for (int g = 0; g < ng; g++)
        for (int sb = 0; sb < ns; sb++, d += Q4K_GROUP_SUPER) {
            memset(d, 0, Q4K_GROUP_SUPER); /* padding rows: scales 0, levels 0 */
            for (int i = 0; i < Q4K_ROWS && g * Q4K_ROWS + i < n_out; i++) {
                const uint8_t *blk =
                    (const uint8_t *)q4_k +
                    ((size_t)(g * Q4K_ROWS + i) * ns + (size_t)sb) * Q4K_BLOCK_BYTES;
                uint16_t dd, dm;
                uint8_t sc[8], mn[8], q[256];
                cake_q4_k_unpack(blk, &dd, &dm, sc, mn, q);
                memcpy(d + 2 * i, &dd, 2);
                memcpy(d + 32 + 2 * i, &dm, 2);
                for (int j = 0; j < Q4K_SUBS; j++) {
                    d[Q4K_SCOFF + 32 * j + i] = sc[j];
                    d[Q4K_SCOFF + 32 * j + 16 + i] = mn[j];
                    for (int p = 0; p < 4; p++)
                        for (int k = 0; k < 4; k++)
                            d[Q4K_QOFF + 256 * j + 64 * p + 4 * i + k] =
                                (uint8_t)(q[32 * j + 4 * p + k] | q[32 * j + 16 + 4 * p + k] << 4);
                }
            }
        }
}

/* Row r of a CAKE_DTYPE_Q4_K_X16 matrix with ns blocks of 256 per row: the
 * group-block holding column k, its level q at k, and the scale s and min m
 * of the sub-block of 32 holding k. */
static const uint8_t *group_block(const void *w, size_t ns, size_t r, size_t k) {
    return (const uint8_t *)w + ((r / Q4K_ROWS) * ns + k / Q4K_SUPER) * Q4K_GROUP_SUPER;
}

int cake_q4_k_x16_level(const void *w, size_t ns, size_t r, size_t k) {
    const size_t e = k % Q4K_SUPER, j = e / 32, c = e % 32;
    const uint8_t b = group_block(
        w, ns, r, k)[Q4K_QOFF + 256 * j + 64 * (c % 16 / 4) + 4 * (r % Q4K_ROWS) + c % 4];
    return c < 16 ? b & 0xF : b >> 4;
}

static float f16_at(const uint8_t *p) {
    cake_f16 h;
    memcpy(&h, p, 2);
    return cake_f16_to_f32(h);
}

float cake_q4_k_x16_scale(const void *w, size_t ns, size_t r, size_t k) {
    const uint8_t *gb = group_block(w, ns, r, k);
    const size_t i = r % Q4K_ROWS, j = k % Q4K_SUPER / 32;
    return (float)gb[Q4K_SCOFF + 32 * j + i] * f16_at(gb + 2 * i);
}

float cake_q4_k_x16_min(const void *w, size_t ns, size_t r, size_t k) {
    const uint8_t *gb = group_block(w, ns, r, k);
    const size_t i = r % Q4K_ROWS, j = k % Q4K_SUPER / 32;
    return (float)gb[Q4K_SCOFF + 32 * j + 16 + i] * f16_at(gb + 32 + i * 2);
}

/* ===================== reference and scalar twin ===================== */

int cake_matmul_q4_k_ref(float *y, const float *x, const void *w, int n_tokens, int n_in,
                         int n_out) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ns = n_in / Q4K_SUPER;
    for (int t = 0; t < n_tokens; t++)
        for (int n = 0; n < n_out; n++) {
            double s = 0.0;
            for (int b = 0; b < nb; b++) {
                int8_t q[CAKE_Q8_0_BLOCK];
                float dx;
                int32_t c;
                cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q,
                                             &dx, &c);
                long isum = 0;
                for (int k = 0; k < CAKE_Q8_0_BLOCK; k++)
                    isum += (long)cake_q4_k_x16_level(w, ns, n, b * CAKE_Q8_0_BLOCK + k) * q[k];
                const size_t k0 = (size_t)b * CAKE_Q8_0_BLOCK;
                s += (double)dx * ((double)cake_q4_k_x16_scale(w, ns, n, k0) * (double)isum -
                                   (double)cake_q4_k_x16_min(w, ns, n, k0) * (double)(c / 128));
            }
            y[(size_t)t * n_out + n] = (float)s;
        }
    return 0;
}

/* Rows [r0, r1) of every token in the kernel's order. */
static void lanes_rows_q4(float *y, const float *x, const uint8_t *w, int n_tokens, int n_in,
                          int n_out, int r0, int r1) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ns = n_in / Q4K_SUPER;
    for (int t = 0; t < n_tokens; t++) {
        float *yt = y + (size_t)t * n_out;
        for (int n = r0; n < r1; n++) yt[n] = 0.0f;
        for (int b = 0; b < nb; b++) {
            int8_t q[CAKE_Q8_0_BLOCK];
            float dx;
            int32_t c;
            cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q, &dx,
                                         &c);
            const float sum_q = (float)(c / 128);
            const size_t k0 = (size_t)b * CAKE_Q8_0_BLOCK;
            for (int n = r0; n < r1; n++) {
                int isum = 0;
                for (int k = 0; k < CAKE_Q8_0_BLOCK; k++)
                    isum += cake_q4_k_x16_level(w, ns, n, k0 + k) * q[k];
                const float s = cake_q4_k_x16_scale(w, ns, n, k0),
                            m = cake_q4_k_x16_min(w, ns, n, k0);
                yt[n] = fmaf((float)isum, s * dx, yt[n]);
                yt[n] = fmaf(-(m * dx), sum_q, yt[n]);
            }
        }
    }
}

void cake_matmul_q4_k_lanes(float *y, const float *x, const void *w, int n_tokens, int n_in,
                            int n_out) {
    lanes_rows_q4(y, x, w, n_tokens, n_in, n_out, 0, n_out);
}

/* ===================== the threaded kernel ===================== */

typedef struct {
    float *y;
    const float *x;
    const uint8_t *w;
    int T, n_in, n_out, nb, ns;
    cake_q8_acts a;
} q4_job;

#ifdef Q4_VNNI

#define UNROLL _Pragma("GCC unroll 8")

/* MT tokens (t0..) x NG row groups (g0..): per sub-block, 4 loads of 64
 * bytes, each 2 vpdpbusd steps (low, then high nibbles) per token, then each
 * lane's chain takes its two FMAs. One token (decode) puts the high-nibble
 * steps in a second accumulator, added at the end (integers: the same bits,
 * two dependency chains instead of one). */
CAKE_INLINE void q4_tile(const q4_job *j, int t0, int g0, const int MT, const int NG) {
    const int ns = j->ns, nb = j->nb, n_in = j->n_in;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 f[Q4K_MT][Q4K_NG];
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) f[i][g] =
        _mm512_setzero_ps();
    for (int sb = 0; sb < ns; sb++) {
        const uint8_t *wb[Q4K_NG];
        __m512 dd[Q4K_NG], dm[Q4K_NG];
        UNROLL for (int g = 0; g < NG; g++) {
            wb[g] = j->w + ((size_t)(g0 + g) * ns + sb) * Q4K_GROUP_SUPER;
            dd[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)wb[g]));
            dm[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wb[g] + 32)));
        }
        for (int sub = 0; sub < Q4K_SUBS; sub++) {
            const int b = sb * Q4K_SUBS + sub;
            __m512i acc[Q4K_MT][Q4K_NG], hi_acc[Q4K_NG];
            UNROLL for (int g = 0; g < NG; g++) hi_acc[g] = _mm512_setzero_si512();
            UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) acc[i][g] =
                _mm512_setzero_si512();
            const int8_t *xb = j->a.q + (size_t)t0 * n_in + (size_t)b * CAKE_Q8_0_BLOCK;
            UNROLL for (int p = 0; p < 4; p++) {
                __m512i lo[Q4K_NG], hi[Q4K_NG];
                UNROLL for (int g = 0; g < NG; g++) {
                    const __m512i v = _mm512_loadu_si512(wb[g] + Q4K_QOFF + 256 * sub + 64 * p);
                    lo[g] = _mm512_and_si512(v, low4);
                    hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                }
                UNROLL for (int i = 0; i < MT; i++) {
                    int32_t x_lo, x_hi;
                    memcpy(&x_lo, xb + (size_t)i * n_in + 4 * p, 4);
                    memcpy(&x_hi, xb + (size_t)i * n_in + 16 + 4 * p, 4);
                    const __m512i vlo = _mm512_set1_epi32(x_lo), vhi = _mm512_set1_epi32(x_hi);
                    UNROLL for (int g = 0; g < NG; g++) {
                        acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], lo[g], vlo);
                        if (MT == 1)
                            hi_acc[g] = _mm512_dpbusd_epi32(hi_acc[g], hi[g], vhi);
                        else
                            acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], hi[g], vhi);
                    }
                }
            }
            if (MT == 1)
                UNROLL for (int g = 0; g < NG; g++) acc[0][g] =
                    _mm512_add_epi32(acc[0][g], hi_acc[g]);
            __m512 s[Q4K_NG], m[Q4K_NG];
            UNROLL for (int g = 0; g < NG; g++) {
                const uint8_t *sc = wb[g] + Q4K_SCOFF + 32 * sub;
                s[g] = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc))),
                    dd[g]);
                m[g] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                         _mm_loadu_si128((const __m128i *)(sc + 16)))),
                                     dm[g]);
            }
            UNROLL for (int i = 0; i < MT; i++) {
                const size_t xi = (size_t)(t0 + i) * nb + b;
                const __m512 dx = _mm512_set1_ps(j->a.d[xi]);
                const __m512 sum_q = _mm512_set1_ps((float)(j->a.c[xi] / 128));
                UNROLL for (int g = 0; g < NG; g++) {
                    f[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][g]),
                                              _mm512_mul_ps(s[g], dx), f[i][g]);
                    f[i][g] = _mm512_fnmadd_ps(_mm512_mul_ps(m[g], dx), sum_q, f[i][g]);
                }
            }
        }
    }
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) {
        const int r = (g0 + g) * Q4K_ROWS, left = j->n_out - r;
        float *dst = j->y + (size_t)(t0 + i) * j->n_out + r;
        if (left >= Q4K_ROWS)
            _mm512_storeu_ps(dst, f[i][g]);
        else /* the padded rows of the last group are not stored */
            _mm512_mask_storeu_ps(dst, cake_tail_mask(left), f[i][g]);
    }
}

CAKE_INLINE void q4_tile_any(const q4_job *j, int t0, int g0, int mt, int ng) {
#define Q4_TILE_NG(MT)                                                                             \
    if (ng == 2)                                                                                   \
        q4_tile(j, t0, g0, MT, 2);                                                                 \
    else                                                                                           \
        q4_tile(j, t0, g0, MT, 1);
    switch (mt) {
    case 6:
        Q4_TILE_NG(6)
        break;
    case 5:
        Q4_TILE_NG(5)
        break;
    case 4:
        Q4_TILE_NG(4)
        break;
    case 3:
        Q4_TILE_NG(3)
        break;
    case 2:
        Q4_TILE_NG(2)
        break;
    default:
        Q4_TILE_NG(1)
        break;
    }
#undef Q4_TILE_NG
}

/* A task: Q4K_TASK_GROUPS row groups for every token, a tile at a time. */
static void q4_task(void *ctx, int task, int tid) {
    (void)tid;
    const q4_job *j = ctx;
    const int n_groups = (j->n_out + Q4K_ROWS - 1) / Q4K_ROWS;
    const int g0 = task * Q4K_TASK_GROUPS;
    const int g1 = g0 + Q4K_TASK_GROUPS < n_groups ? g0 + Q4K_TASK_GROUPS : n_groups;
    for (int t0 = 0; t0 < j->T; t0 += Q4K_MT) {
        const int mt = j->T - t0 < Q4K_MT ? j->T - t0 : Q4K_MT;
        for (int g = g0; g < g1; g += Q4K_NG)
            q4_tile_any(j, t0, g, mt, g1 - g < Q4K_NG ? 1 : Q4K_NG);
    }
}

#else /* no VNNI: the scalar twin, in tasks of rows */

static void q4_task(void *ctx, int task, int tid) {
    (void)tid;
    const q4_job *j = ctx;
    const int r0 = task * Q4K_TASK_GROUPS * Q4K_ROWS;
    const int r1 =
        r0 + Q4K_TASK_GROUPS * Q4K_ROWS < j->n_out ? r0 + Q4K_TASK_GROUPS * Q4K_ROWS : j->n_out;
    lanes_rows_q4(j->y, j->x, j->w, j->T, j->n_in, j->n_out, r0, r1);
}

#endif

void cake_matmul_q4_k(float *y, const float *x, const void *w, int n_tokens, int n_in, int n_out,
                      cake_threadpool *pool) {
    q4_job j = {.y = y,
                .x = x,
                .w = w,
                .T = n_tokens,
                .n_in = n_in,
                .n_out = n_out,
                .nb = n_in / CAKE_Q8_0_BLOCK,
                .ns = n_in / Q4K_SUPER};
    const int n_tasks = (n_out + Q4K_TASK_GROUPS * Q4K_ROWS - 1) / (Q4K_TASK_GROUPS * Q4K_ROWS);
#ifdef Q4_VNNI
    if (cake_q8_acts_make(&j.a, x, n_tokens, n_in, pool)) {
        /* out of memory: the scalar twin needs no buffer and gives the same bits */
        cake_matmul_q4_k_lanes(y, x, w, n_tokens, n_in, n_out);
        return;
    }
    cake_threadpool_run(pool, n_tasks, q4_task, &j);
    cake_q8_acts_free(&j.a);
#else
    cake_threadpool_run(pool, n_tasks, q4_task, &j);
#endif
}
