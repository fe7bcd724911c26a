/* The CPU matmul for Q8_0 weights: integer dot products, as llama.cpp runs
 * Q8_0 on a CPU.
 *
 * A Q8_0 weight row is blocks of 32: an f16 scale d_w and 32 int8 q_w. Each
 * token's activations are quantized the same way per block of 32 (llama.cpp's
 * quantize_row_q8_0: d_x = max |x| / 127, q_x = round(x / d_x)), so a block
 * contributes d_w * d_x * isum with isum = sum of q_w * q_x, an exact integer.
 * Each output is
 *     y = FMA chain over blocks b = 0, 1, ... of (float)isum_b * (d_w,b * d_x,b)
 * with the scales' product rounded to f32 first. The integer sums have no order
 * to depend on and the chain is per output, so a token's row is the same bits
 * whatever the batch, the tiles and the threads (chunked prefill, decode and a
 * whole prompt agree), and the scalar twin below gives the same bits.
 *
 * Why quantize the activations: AVX512-VNNI's vpdpbusd does 64 u8 x s8
 * multiply-adds into int32 lanes in one instruction, where f32 FMAs on the
 * converted weights do 16 and spend more on the conversion. On this project's
 * machine the GEMM runs ~4x the F16 kernel (bench_kernels prints both), and
 * a llama-1b prefill ~4x the kernel it replaced (f32 activations times the
 * exact d * q; docs/BENCHMARKS.md). The cost is the activations' rounding, at
 * most d_x / 2 per element, the same that llama.cpp's Q8_0 results carry.
 *
 * The weights are repacked once, for the first CPU context
 * (cake_model_prepare_cpu calls cake_q8_0_pack_x16), into
 * CAKE_DTYPE_Q8_0_X16 (util/q8_0.h spells out the layout): rows in groups of
 * 16, per group and block the 16 scales d_w, then 4 weights of each row in
 * turn, + 128. One 64-byte load holds 4 consecutive weights of 16 rows; vpdpbusd against
 * 4 activation bytes broadcast adds the 16 rows' partial sums in 16 lanes, so
 * the rows are the lanes and nothing is summed across lanes. The +128 makes
 * the weights vpdpbusd's unsigned operand; 128 times the block's sum of q_x,
 * computed once per token and block, takes it off again. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "util/q8_0.h"

#if defined(CAKE_AVX512) && defined(__AVX512VNNI__)
#define Q8_VNNI 1
#endif

enum {
    Q8_ROWS = CAKE_Q8_0_X16_ROWS,               /* rows per group: the lanes */
    Q8_GROUP_BLOCK = CAKE_Q8_0_X16_GROUP_BLOCK, /* 544 bytes */
    Q8_QOFF = CAKE_Q8_0_X16_QOFF,               /* the int8 after the scales */
    Q8_MT = 6,                                  /* tokens per register tile */
    Q8_NG = 2,                                  /* row groups per register tile */
    Q8_TASK_GROUPS = 4,                         /* row groups per task (64 rows) */
    Q8_QUANT_TOKENS = 16,                       /* tokens per quantization task */
};

size_t cake_q8_0_x16_size(int n_out, int n_in) {
    return (size_t)((n_out + Q8_ROWS - 1) / Q8_ROWS) * (size_t)(n_in / CAKE_Q8_0_BLOCK) *
           Q8_GROUP_BLOCK;
}

void cake_q8_0_pack_x16(void *dst, const void *q8_0, int n_out, int n_in) {
    const int nb = n_in / CAKE_Q8_0_BLOCK, ng = (n_out + Q8_ROWS - 1) / Q8_ROWS;
    const size_t row_bytes = (size_t)nb * CAKE_Q8_0_BYTES;
    static const uint8_t zero_block[CAKE_Q8_0_BYTES]; /* padding rows: scale 0, weights 0 */
    uint8_t *d = dst;
    for (int g = 0; g < ng; g++)
        for (int b = 0; b < nb; b++, d += Q8_GROUP_BLOCK)
            for (int i = 0; i < Q8_ROWS; i++) {
                const int r = g * Q8_ROWS + i;
                const uint8_t *blk = r < n_out ? (const uint8_t *)q8_0 + (size_t)r * row_bytes +
                                                     (size_t)b * CAKE_Q8_0_BYTES
                                               : zero_block;
                memcpy(d + 2 * i, blk, 2);
                /* 4 weights at a time, + 128: each one's sign bit flipped */
                for (int s = 0; s < 8; s++) {
                    uint32_t four;
                    memcpy(&four, blk + 2 + 4 * s, 4);
                    four ^= 0x80808080u;
                    memcpy(d + Q8_QOFF + 64 * s + 4 * i, &four, 4);
                }
            }
}

#ifdef CAKE_AVX512
/* cake_q8_0_quantize_block in lanes: max_ps(a, m) is "a > m ? a : m" (the
 * second operand when either is NaN), and the rounding is the same
 * truncate-then-step; every operation is exact or the scalar's own. */
static void quantize_block_avx512(const float *x, uint8_t *dst) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const __m512 m =
        _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps()));
    const float amax = _mm512_reduce_max_ps(m);
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const cake_f16 h = cake_f32_to_f16(d);
    memcpy(dst, &h, 2);
    const __m512 vid = _mm512_set1_ps(id), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f),
                 sign = _mm512_set1_ps(-0.0f);
    for (int k = 0; k < 2; k++) {
        const __m512 v = _mm512_mul_ps(k ? x1 : x0, vid);
        const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __mmask16 up =
            _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), half, _CMP_GE_OQ);
        const __m512 step = _mm512_maskz_mov_ps(up, one);
        const __m512 r = _mm512_add_ps(t, _mm512_or_ps(step, _mm512_and_ps(v, sign)));
        _mm_storeu_si128((__m128i *)(dst + 2 + 16 * k),
                         _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r)));
    }
}
#endif

void cake_q8_0_quantize_row(const float *x, uint8_t *dst, size_t n) {
    for (size_t b = 0; b < n / CAKE_Q8_0_BLOCK; b++)
#ifdef CAKE_AVX512
        quantize_block_avx512(x + b * CAKE_Q8_0_BLOCK, dst + b * CAKE_Q8_0_BYTES);
#else
        cake_q8_0_quantize_block(x + b * CAKE_Q8_0_BLOCK, dst + b * CAKE_Q8_0_BYTES);
#endif
}

/* ===================== activations ===================== */

/* One block of 32 activations: q (int8), d (the scale) and c = 128 * sum q.
 * NaN inputs count as 0 in max |x| and quantize to -127, in both forms. */
void cake_q8_quantize_block_lanes(const float *x, int8_t *q, float *d, int32_t *c) {
    float amax = 0.0f;
    for (int j = 0; j < CAKE_Q8_0_BLOCK; j++) {
        const float a = fabsf(x[j]);
        amax = a > amax ? a : amax; /* as _mm512_max_ps(a, amax) */
    }
    const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int sum = 0;
    for (int j = 0; j < CAKE_Q8_0_BLOCK; j++) {
        float v = x[j] * id;
        v = v > -127.0f ? v : -127.0f; /* NaN -> -127, as _mm512_max_ps(v, -127) */
        v = v < 127.0f ? v : 127.0f;
        const int qi = (int)nearbyintf(v); /* half to even, as vcvtps2dq */
        q[j] = (int8_t)qi;
        sum += qi;
    }
    *d = dd;
    *c = 128 * sum;
}

#ifdef Q8_VNNI
CAKE_INLINE void quantize_block(const float *x, int8_t *q, float *d, int32_t *c) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    __m512 m = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps());
    m = _mm512_max_ps(_mm512_abs_ps(x1), m);
    const float amax = _mm512_reduce_max_ps(m);
    const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i q0 =
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x0, vid), lo), hi));
    const __m512i q1 =
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x1, vid), lo), hi));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    *d = dd;
    *c = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}
#else
#define quantize_block cake_q8_quantize_block_lanes
#endif

/* ===================== reference and scalar twin ===================== */

int cake_matmul_q8_0_ref(float *y, const float *x, const void *w, int n_tokens, int n_in,
                         int n_out) {
    const int nb = n_in / CAKE_Q8_0_BLOCK;
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
                    isum += (long)cake_q8_0_x16_weight(w, nb, n, b * CAKE_Q8_0_BLOCK + k) * q[k];
                s += (double)cake_q8_0_x16_scale(w, nb, n, b) * (double)dx * (double)isum;
            }
            y[(size_t)t * n_out + n] = (float)s;
        }
    return 0;
}

/* Rows [r0, r1) of every token in the kernel's order: per token and block,
 * the block is quantized once and each row's chain takes one FMA (y holds
 * the chains). */
static void lanes_rows_q8(float *y, const float *x, const uint8_t *w, int n_tokens, int n_in,
                          int n_out, int r0, int r1) {
    const int nb = n_in / CAKE_Q8_0_BLOCK;
    for (int t = 0; t < n_tokens; t++) {
        float *yt = y + (size_t)t * n_out;
        for (int n = r0; n < r1; n++) yt[n] = 0.0f;
        for (int b = 0; b < nb; b++) {
            int8_t q[CAKE_Q8_0_BLOCK];
            float dx;
            int32_t c;
            cake_q8_quantize_block_lanes(x + (size_t)t * n_in + (size_t)b * CAKE_Q8_0_BLOCK, q, &dx,
                                         &c);
            for (int n = r0; n < r1; n++) {
                int isum = 0;
                for (int k = 0; k < CAKE_Q8_0_BLOCK; k++)
                    isum += cake_q8_0_x16_weight(w, nb, n, b * CAKE_Q8_0_BLOCK + k) * q[k];
                yt[n] = fmaf((float)isum, cake_q8_0_x16_scale(w, nb, n, b) * dx, yt[n]);
            }
        }
    }
}

void cake_matmul_q8_0_lanes(float *y, const float *x, const void *w, int n_tokens, int n_in,
                            int n_out) {
    lanes_rows_q8(y, x, w, n_tokens, n_in, n_out, 0, n_out);
}

/* ===================== activations, quantized for a whole batch ===================== */

typedef struct {
    const float *x;
    int T, nb;
    cake_q8_acts *a;
} acts_job;

static void quantize_task(void *ctx, int task, int tid) {
    (void)tid;
    const acts_job *j = ctx;
    const int t1 = (task + 1) * Q8_QUANT_TOKENS < j->T ? (task + 1) * Q8_QUANT_TOKENS : j->T;
    for (int t = task * Q8_QUANT_TOKENS; t < t1; t++)
        for (int b = 0; b < j->nb; b++) {
            const size_t i = (size_t)t * j->nb + b;
            quantize_block(j->x + i * CAKE_Q8_0_BLOCK, j->a->q + i * CAKE_Q8_0_BLOCK, &j->a->d[i],
                           &j->a->c[i]);
        }
}

int cake_q8_acts_make(cake_q8_acts *a, const float *x, int n_tokens, int n_in,
                      cake_threadpool *pool) {
    const int nb = n_in / CAKE_Q8_0_BLOCK;
    const size_t nblk = (size_t)n_tokens * nb;
    a->d = malloc(nblk * (CAKE_Q8_0_BLOCK + sizeof(float) + sizeof(int32_t)));
    if (!a->d) return -1;
    a->c = (int32_t *)(a->d + nblk);
    a->q = (int8_t *)(a->c + nblk);
    acts_job j = {x, n_tokens, nb, a};
    cake_threadpool_run(pool, (n_tokens + Q8_QUANT_TOKENS - 1) / Q8_QUANT_TOKENS, quantize_task,
                        &j);
    return 0;
}

void cake_q8_acts_free(cake_q8_acts *a) {
    free(a->d);
    a->d = NULL;
}

/* ===================== the threaded kernel ===================== */

typedef struct {
    float *y;
    const float *x;
    const uint8_t *w;
    int T, n_in, n_out, nb;
    cake_q8_acts a; /* the quantized activations */
} q8_job;

#ifdef Q8_VNNI

#define UNROLL _Pragma("GCC unroll 8")

/* MT tokens (t0..) x NG row groups (g0..): per block, 8 vpdpbusd steps into
 * integer accumulators that start at -128 * sum q_x, then each lane's chain
 * takes one FMA with the block's scales. One token (decode) runs the even and
 * odd steps in two accumulators, added at the end: integer sums, so the same
 * bits, and two dependency chains instead of one (decode 0.23 -> 0.14 ms on
 * a 2048 x 2048 matrix). */
CAKE_INLINE void q8_tile(const q8_job *j, int t0, int g0, const int MT, const int NG) {
    const int nb = j->nb, n_in = j->n_in;
    __m512 f[Q8_MT][Q8_NG];
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) f[i][g] =
        _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb[Q8_NG];
        __m512 sc[Q8_NG];
        UNROLL for (int g = 0; g < NG; g++) {
            wb[g] = j->w + ((size_t)(g0 + g) * nb + b) * Q8_GROUP_BLOCK;
            sc[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)wb[g]));
        }
        __m512i acc[Q8_MT][Q8_NG], odd[Q8_NG];
        UNROLL for (int g = 0; g < NG; g++) odd[g] = _mm512_setzero_si512();
        UNROLL for (int i = 0; i < MT; i++) {
            const __m512i c = _mm512_set1_epi32(-j->a.c[(size_t)(t0 + i) * nb + b]);
            UNROLL for (int g = 0; g < NG; g++) acc[i][g] = c;
        }
        const int8_t *xb = j->a.q + (size_t)t0 * n_in + (size_t)b * CAKE_Q8_0_BLOCK;
        UNROLL for (int s = 0; s < 8; s++) {
            __m512i wv[Q8_NG];
            UNROLL for (int g = 0; g < NG; g++) wv[g] =
                _mm512_loadu_si512(wb[g] + Q8_QOFF + 64 * s);
            UNROLL for (int i = 0; i < MT; i++) {
                int32_t four;
                memcpy(&four, xb + (size_t)i * n_in + 4 * s, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                UNROLL for (int g = 0; g < NG; g++) {
                    if (MT == 1 && (s & 1))
                        odd[g] = _mm512_dpbusd_epi32(odd[g], wv[g], xv);
                    else
                        acc[i][g] = _mm512_dpbusd_epi32(acc[i][g], wv[g], xv);
                }
            }
        }
        if (MT == 1)
            UNROLL for (int g = 0; g < NG; g++) acc[0][g] = _mm512_add_epi32(acc[0][g], odd[g]);
        UNROLL for (int i = 0; i < MT; i++) {
            const __m512 dx = _mm512_set1_ps(j->a.d[(size_t)(t0 + i) * nb + b]);
            UNROLL for (int g = 0; g < NG; g++) f[i][g] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][g]), _mm512_mul_ps(sc[g], dx), f[i][g]);
        }
    }
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int g = 0; g < NG; g++) {
        const int r = (g0 + g) * Q8_ROWS, left = j->n_out - r;
        float *dst = j->y + (size_t)(t0 + i) * j->n_out + r;
        if (left >= Q8_ROWS)
            _mm512_storeu_ps(dst, f[i][g]);
        else /* the padded rows of the last group are not stored */
            _mm512_mask_storeu_ps(dst, cake_tail_mask(left), f[i][g]);
    }
}

CAKE_INLINE void q8_tile_any(const q8_job *j, int t0, int g0, int mt, int ng) {
#define Q8_TILE_NG(MT)                                                                             \
    if (ng == 2)                                                                                   \
        q8_tile(j, t0, g0, MT, 2);                                                                 \
    else                                                                                           \
        q8_tile(j, t0, g0, MT, 1);
    switch (mt) {
    case 6:
        Q8_TILE_NG(6)
        break;
    case 5:
        Q8_TILE_NG(5)
        break;
    case 4:
        Q8_TILE_NG(4)
        break;
    case 3:
        Q8_TILE_NG(3)
        break;
    case 2:
        Q8_TILE_NG(2)
        break;
    default:
        Q8_TILE_NG(1)
        break;
    }
#undef Q8_TILE_NG
}

/* A task: Q8_TASK_GROUPS row groups (a panel that stays in L2: 64 rows of
 * 8192 weights are 557 KB; panels of 128 rows ran the 2048 x 8192 matrix at
 * 263-333 GOP/s against 386-394) for every token, a 6-token tile at a time
 * across the panel. */
static void q8_task(void *ctx, int task, int tid) {
    (void)tid;
    const q8_job *j = ctx;
    const int n_groups = (j->n_out + Q8_ROWS - 1) / Q8_ROWS;
    const int g0 = task * Q8_TASK_GROUPS;
    const int g1 = g0 + Q8_TASK_GROUPS < n_groups ? g0 + Q8_TASK_GROUPS : n_groups;
    for (int t0 = 0; t0 < j->T; t0 += Q8_MT) {
        const int mt = j->T - t0 < Q8_MT ? j->T - t0 : Q8_MT;
        for (int g = g0; g < g1; g += Q8_NG) q8_tile_any(j, t0, g, mt, g1 - g < Q8_NG ? 1 : Q8_NG);
    }
}

#else /* no VNNI: the scalar twin, in tasks of rows */

static void q8_task(void *ctx, int task, int tid) {
    (void)tid;
    const q8_job *j = ctx;
    const int r0 = task * Q8_TASK_GROUPS * Q8_ROWS;
    const int r1 =
        r0 + Q8_TASK_GROUPS * Q8_ROWS < j->n_out ? r0 + Q8_TASK_GROUPS * Q8_ROWS : j->n_out;
    lanes_rows_q8(j->y, j->x, j->w, j->T, j->n_in, j->n_out, r0, r1);
}

#endif

void cake_matmul_q8_0(float *y, const float *x, const void *w, int n_tokens, int n_in, int n_out,
                      cake_threadpool *pool) {
    q8_job j = {.y = y,
                .x = x,
                .w = w,
                .T = n_tokens,
                .n_in = n_in,
                .n_out = n_out,
                .nb = n_in / CAKE_Q8_0_BLOCK};
    const int n_tasks = (n_out + Q8_TASK_GROUPS * Q8_ROWS - 1) / (Q8_TASK_GROUPS * Q8_ROWS);
#ifdef Q8_VNNI
    if (cake_q8_acts_make(&j.a, x, n_tokens, n_in, pool)) {
        /* out of memory: the scalar twin needs no buffer and gives the same bits */
        cake_matmul_q8_0_lanes(y, x, w, n_tokens, n_in, n_out);
        return;
    }
    cake_threadpool_run(pool, n_tasks, q8_task, &j);
    cake_q8_acts_free(&j.a);
#else
    cake_threadpool_run(pool, n_tasks, q8_task, &j);
#endif
}
