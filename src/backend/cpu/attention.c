/* Causal grouped-query attention over the KV cache (one layer).
 *
 * The contract that shapes everything here: the output for a query depends
 * only on its position and the keys/values before it, bit for bit, whatever
 * the batch (n_tokens), chunk start (pos0) or thread count. Chunked prefill and
 * the Cake loader rely on it. So each query's arithmetic is fixed, as scalar
 * operations in a fixed order:
 *
 *   q'[d] = q[d] * (1/sqrt(head_dim))
 *   s_j   = FMA chain over d = 0, 1, ..., head_dim-1 of q'[d] * k_j[d], from 0
 *   keys in blocks of 64 at absolute positions [64b, 64b + 64); per block,
 *   over the keys j <= the query's position only (and, with a sliding
 *   window W, j > position - W; blocks before the window are not visited;
 *   with a soft cap c, s_j = c (1 - 2 / (1 + exp(2 s_j / c))), c tanh(s_j / c)):
 *       m' = max(m, max_j s_j);  alpha = exp(m - m');  p_j = exp(s_j - m')
 *       l  = l * alpha, then l = l + p_j for j ascending
 *       o[d] = o[d] * alpha, then o[d] = fma(p_j, v_j[d], o[d]) for j ascending
 *   out[d] = o[d] * (1 / l)
 *
 * (exp is the polynomial of simd.h.) Each score, sum and output element is a
 * sequential chain, so it can be computed with the query rows in the vector
 * lanes or with the keys in the lanes and give the same bits; that freedom is
 * what makes both prefill and decode fast:
 *
 *  - prefill (>= 16 query rows per task): rows in lanes. A task is (KV head,
 *    block of query tokens); its rows are all tokens x the heads sharing the KV
 *    head. Q is transposed once per task to [d][row]; per key block the scores
 *    S^T[key][row] come from broadcasts of k_j[d] (the block as the cache
 *    keeps it, [d][key], converted to f32) times Q^T rows (a 8-key x
 *    48-row register tile), the softmax runs down the key axis with no
 *    horizontal reductions, and the causal mask is a lane mask on every update
 *    (masked FMAs leave a row's state untouched, not "add zero") in the blocks
 *    on the diagonal; below it, plain FMAs do the same arithmetic.
 *  - decode / few rows: keys in lanes. The cache keeps each 64-key block of
 *    K transposed ([d][key], kv/kv_cache.h); the task converts it to f32, so 64
 *    scores of a row are 4 vectors of FMA chains (the rows of one token, up
 *    to 4, share the loads); P.V runs with o in registers over the row's
 *    valid keys only, reading V from the cache directly. A task takes a range
 *    of KV heads (one task per thread), one head after another; the cache
 *    keeps each head's positions in one run (kv_cache.h), so every thread
 *    reads one sequential stream of K and one of V at a time, which the
 *    hardware prefetchers serve at memory speed (software prefetches only
 *    slowed them down).
 * Tasks are handed out dynamically, the longest (last query blocks) first.
 *
 * cake_attention_lanes() is the list above in scalar C; the tests hold the
 * fast kernel bit-identical to it for every batch, chunking and thread count.
 * The only inputs where bits may differ are NaNs in an f16 cache (the hardware
 * conversion quiets signalling NaNs); the output is NaN either way. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "kv/kv_cache.h"

#define ATT_BK         64    /* keys per softmax block, aligned to absolute positions */
#define ATT_MAX_HD     256   /* largest head_dim of the fast kernel */
#define ATT_ROW_FLOATS 16384 /* query rows x head_dim per task (64 KiB) */
#define ATT_MAX_ROWS   256   /* query rows per task at most (small head_dim) */
#define ATT_ROWS_MIN_B 16    /* tasks with at least this many rows put rows in lanes */

_Static_assert(ATT_BK == CAKE_KV_KBLOCK, "softmax blocks are the cache's key blocks");

/* Element offsets in the cache (kv_cache.h): the start of KV head kvh's key
 * block at kb0 (a multiple of ATT_BK: [d][64]), and its value row at pos. */
static inline size_t k_block(const cake_attn_args *a, int kvh, int kb0) {
    return cake_kv_k_index(a->kv_ctx, a->head_dim, kvh, kb0, 0);
}
static inline size_t v_row(const cake_attn_args *a, int kvh, int pos) {
    return cake_kv_v_index(a->kv_ctx, a->head_dim, kvh, pos, 0);
}

/* The cache's elements as f32. Q8_0: int8 times its f16 scale; Q4_0: (q -
 * 8) times it; products that are exact in f32 (8 or 5 + 11 significant
 * bits), so every kernel that dequantizes this way gets the same values. */
static float scale_at(const cake_f16 *scales, size_t i) {
    return cake_f16_to_f32(scales[i]);
}
static float k_at(const cake_attn_args *a, int pos, int kvh, int d) {
    const int hc = a->kv_ctx, hd = a->head_dim;
    const size_t i = cake_kv_k_index(hc, hd, kvh, pos, d);
    switch (a->kv_type) {
    case CAKE_KV_F16:
        return cake_f16_to_f32(((const cake_f16 *)a->k)[i]);
    case CAKE_KV_Q8_0:
        return (float)((const int8_t *)a->k)[i] *
               scale_at(a->k_scales, cake_kv_k_scale_index(hc, hd, kvh, pos, d / 32));
    case CAKE_KV_Q4_0: {
        const uint8_t b = ((const uint8_t *)a->k)[cake_kv_k4_byte(hc, hd, kvh, pos, d)];
        return (float)((b >> cake_kv_k4_shift(d) & 15) - 8) *
               scale_at(a->k_scales, cake_kv_k_scale_index(hc, hd, kvh, pos, d / 32));
    }
    default:
        return ((const float *)a->k)[i];
    }
}
static float v_at(const cake_attn_args *a, int pos, int kvh, int d) {
    const int hc = a->kv_ctx, hd = a->head_dim;
    const size_t i = v_row(a, kvh, pos) + (size_t)d;
    switch (a->kv_type) {
    case CAKE_KV_F16:
        return cake_f16_to_f32(((const cake_f16 *)a->v)[i]);
    case CAKE_KV_Q8_0:
        return (float)((const int8_t *)a->v)[i] *
               scale_at(a->v_scales, cake_kv_v_scale_index(hc, hd, kvh, pos, d / 32));
    case CAKE_KV_Q4_0: {
        const uint8_t b = ((const uint8_t *)a->v)[cake_kv_v4_byte(hc, hd, kvh, pos, d)];
        return (float)((b >> cake_kv_v4_shift(d) & 15) - 8) *
               scale_at(a->v_scales, cake_kv_v_scale_index(hc, hd, kvh, pos, d / 32));
    }
    default:
        return ((const float *)a->v)[i];
    }
}

static int args_ok(const cake_attn_args *a) {
    const int quantized = cake_kv_quantized(a->kv_type);
    return a->n_tokens > 0 && a->pos0 >= 0 && a->n_heads > 0 && a->n_kv_heads > 0 &&
           a->head_dim > 0 && a->n_heads % a->n_kv_heads == 0 &&
           (long long)a->pos0 + a->n_tokens <= a->kv_ctx && a->kv_ctx % ATT_BK == 0 &&
           a->window >= 0 && a->softcap >= 0 &&
           (!quantized || (a->head_dim % 32 == 0 && a->k_scales && a->v_scales));
}

/* Gemma 2's soft cap c tanh(s / c), y = s / c (inv = 1 / c): tanh as
 * 1 - 2 / (1 + exp(2y)) with the exp polynomial, or, for |y| < 1/8 where
 * that would cancel, its series to y^7 (error < 1e-10); these steps in this
 * order, with explicit FMAs, in every form. */
#define TANH_SERIES_MAX 0.125f
static inline float softcap_lanes(float s, float c, float inv) {
    const float y = s * inv;
    if (fabsf(y) < TANH_SERIES_MAX) {
        const float y2 = y * y;
        const float p = fmaf(fmaf(-17.0f / 315.0f, y2, 2.0f / 15.0f), y2, -1.0f / 3.0f);
        return c * fmaf(y * y2, p, y);
    }
    const float e = cake_exp_lanes(y + y);
    return c * (1.0f - 2.0f / (1.0f + e));
}

/* The first key the query at pos sees: 0, or the start of its window. */
static inline int key_lo(const cake_attn_args *a, int pos) {
    return a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
}

/* ===================== reference ===================== */

void cake_attention_ref(const cake_attn_args *a) {
    if (!args_ok(a)) return;
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    const double scale = 1.0 / sqrt((double)hd);
    for (int t = 0; t < a->n_tokens; t++) {
        const int pos = a->pos0 + t;
        for (int h = 0; h < a->n_heads; h++) {
            const float *q = a->q + ((size_t)t * a->n_heads + h) * (size_t)hd;
            float *out = a->out + ((size_t)t * a->n_heads + h) * (size_t)hd;
            const int kvh = h / group;
            /* softmax(q.k / sqrt(hd)) . v in double, in two passes over the keys
             * (max, then sums) so no buffer of n_ctx scores is needed */
            const int lo = key_lo(a, pos);
            double mx = -INFINITY;
            const double cap = a->softcap;
            for (int j = lo; j <= pos; j++) {
                double s = 0.0;
                for (int d = 0; d < hd; d++) s += (double)q[d] * k_at(a, j, kvh, d);
                s *= scale;
                if (cap > 0) s = cap * tanh(s / cap);
                if (s > mx) mx = s;
            }
            for (int d0 = 0; d0 < hd; d0 += 64) { /* 64 outputs at a time */
                const int d1 = d0 + 64 < hd ? d0 + 64 : hd;
                double acc[64] = {0}, sum = 0.0;
                for (int j = lo; j <= pos; j++) {
                    double s = 0.0;
                    for (int d = 0; d < hd; d++) s += (double)q[d] * k_at(a, j, kvh, d);
                    s *= scale;
                    if (cap > 0) s = cap * tanh(s / cap);
                    const double p = exp(s - mx);
                    sum += p;
                    for (int d = d0; d < d1; d++) acc[d - d0] += p * v_at(a, j, kvh, d);
                }
                for (int d = d0; d < d1; d++) out[d] = (float)(acc[d - d0] / sum);
            }
        }
    }
}

/* ===================== portable lanes kernel ===================== */

/* One query row (token t, head h), exactly the order described at the top. */
static void lanes_row(const cake_attn_args *a, int t, int h) {
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads, kvh = h / group;
    const int pos = a->pos0 + t;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *q = a->q + ((size_t)t * a->n_heads + h) * (size_t)hd;
    float *out = a->out + ((size_t)t * a->n_heads + h) * (size_t)hd;
    float m = -INFINITY, l = 0.0f;
    for (int d = 0; d < hd; d++) out[d] = 0.0f; /* o accumulates in place */
    const int lo = key_lo(a, pos);
    for (int kb0 = lo / ATT_BK * ATT_BK; kb0 <= pos; kb0 += ATT_BK) {
        /* the block's keys j0..nv-1 are in the query's window */
        const int nv = pos - kb0 + 1 < ATT_BK ? pos - kb0 + 1 : ATT_BK,
                  j0 = lo > kb0 ? lo - kb0 : 0;
        float s[ATT_BK], p[ATT_BK];
        float mb = -INFINITY;
        for (int j = j0; j < nv; j++) {
            float acc = 0.0f;
            for (int d = 0; d < hd; d++) acc = fmaf(q[d] * scale, k_at(a, kb0 + j, kvh, d), acc);
            s[j] = a->softcap > 0 ? softcap_lanes(acc, a->softcap, 1.0f / a->softcap) : acc;
            mb = s[j] > mb ? s[j] : mb;
        }
        const float mn = m > mb ? m : mb;
        const float alpha = cake_exp_lanes(m - mn);
        l = l * alpha;
        for (int j = j0; j < nv; j++) {
            p[j] = cake_exp_lanes(s[j] - mn);
            l = l + p[j];
        }
        for (int d = 0; d < hd; d++) {
            float o = out[d] * alpha;
            for (int j = j0; j < nv; j++) o = fmaf(p[j], v_at(a, kb0 + j, kvh, d), o);
            out[d] = o;
        }
        m = mn;
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < hd; d++) out[d] = out[d] * inv;
}

void cake_attention_lanes(const cake_attn_args *a) {
    if (!args_ok(a)) return;
    for (int t = 0; t < a->n_tokens; t++)
        for (int h = 0; h < a->n_heads; h++) lanes_row(a, t, h);
}

/* ===================== threaded drivers ===================== */

typedef struct {
    const cake_attn_args *a;
    int group; /* query heads per KV head */
    int bq;    /* query tokens per task */
    int n_qb;  /* query blocks */
    int hg;    /* KV heads per task: 1 with rows in lanes */
    float *sc; /* per-thread scratch (fast kernel), sc_floats each, 64-byte aligned */
    size_t sc_floats;
} att_job;

static void lanes_task(void *ctx, int task, int tid) {
    (void)tid;
    const att_job *j = ctx;
    const cake_attn_args *a = j->a;
    /* task = (token, KV head): the heads of one group */
    const int t = task / a->n_kv_heads, kvh = task % a->n_kv_heads;
    for (int hh = 0; hh < j->group; hh++) lanes_row(a, t, kvh * j->group + hh);
}

#ifdef CAKE_AVX512

#define UNROLL  _Pragma("GCC unroll 16")
#define KEEP(v) __asm__("" : "+v"(v)) /* keep a vector in a register (see matmul.c) */

/* softcap_lanes on 16 scores */
CAKE_INLINE __m512 softcap512(__m512 s, float c, float inv) {
    const __m512 y = _mm512_mul_ps(s, _mm512_set1_ps(inv)), one = _mm512_set1_ps(1.0f);
    const __m512 e = cake_exp512(_mm512_add_ps(y, y));
    const __m512 far =
        _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)));
    const __m512 y2 = _mm512_mul_ps(y, y);
    const __m512 p = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_set1_ps(-17.0f / 315.0f), y2, _mm512_set1_ps(2.0f / 15.0f)), y2,
        _mm512_set1_ps(-1.0f / 3.0f));
    const __m512 near = _mm512_fmadd_ps(_mm512_mul_ps(y, y2), p, y);
    const __mmask16 small =
        _mm512_cmp_ps_mask(_mm512_abs_ps(y), _mm512_set1_ps(TANH_SERIES_MAX), _CMP_LT_OQ);
    return _mm512_mul_ps(_mm512_set1_ps(c), _mm512_mask_blend_ps(small, far, near));
}

/* 16 int8 as f32, times their scales: Q8_0's exact dequantization. The
 * masked form reads only the bytes of m (a key block's last keys may be
 * an I/O worker's to install meanwhile: not even read). */
CAKE_INLINE __m512 q8_load16(const int8_t *p, __m512 scale) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), scale);
}
CAKE_INLINE __m512 q8_maskload16(const int8_t *p, __mmask16 m, __m512 scale) {
    const __m128i b = _mm_maskz_loadu_epi8(m, p);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), scale);
}

/* 16 Q4_0 values, the low (hi 0) or high nibbles of 16 bytes (those of m),
 * minus 8, times their scales: exact as Q8_0's. */
CAKE_INLINE __m512 q4_load16(const uint8_t *p, __mmask16 m, const int hi, __m512 scale) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p));
    b = hi ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(15));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(b, _mm512_set1_epi32(8))), scale);
}

/* Q8_0, Q4_0: the scales of values [kb0, kb0 + nk) of KV head kvh as f32,
 * dst[nk][head_dim / 32] (consecutive in the cache). */
static void load_value_scales(float *dst, const cake_attn_args *a, int kvh, int kb0, int nk) {
    const int n = nk * (a->head_dim / 32);
    const cake_f16 *src = a->v_scales + cake_kv_v_scale_index(a->kv_ctx, a->head_dim, kvh, kb0, 0);
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(dst + i,
                         cake_maskload_f16(src + i, cake_tail_mask(n - i < 16 ? n - i : 16)));
}

/* Values [kb0, kb0 + nk) of KV head kvh as f32 rows dst[64][ld] (ld >=
 * head_dim; columns past head_dim and rows past nk are zero). */
static void load_values(float *dst, int ld, const cake_attn_args *a, int kvh, int kb0, int nk) {
    const int hd = a->head_dim, dfull = hd & ~15;
    for (int r = 0; r < ATT_BK; r++) {
        float *o = dst + (size_t)r * ld;
        int d = 0;
        if (r < nk) {
            const size_t off = v_row(a, kvh, kb0 + r);
            if (a->kv_type == CAKE_KV_F16) {
                const cake_f16 *src = (const cake_f16 *)a->v + off;
                for (; d < dfull; d += 16) _mm512_storeu_ps(o + d, cake_load_f16(src + d));
            } else if (a->kv_type == CAKE_KV_Q4_0) { /* dims 32 g + [0, 16), + [16, 32) */
                const uint8_t *src = (const uint8_t *)a->v + v_row(a, kvh, kb0 + r) / 2;
                const cake_f16 *sc =
                    a->v_scales + cake_kv_v_scale_index(a->kv_ctx, hd, kvh, kb0 + r, 0);
                for (; d < hd; d += 32) {
                    const __m512 s = _mm512_set1_ps(cake_f16_to_f32(sc[d / 32]));
                    _mm512_storeu_ps(o + d, q4_load16(src + d / 2, 0xffff, 0, s));
                    _mm512_storeu_ps(o + d + 16, q4_load16(src + d / 2, 0xffff, 1, s));
                }
            } else if (a->kv_type == CAKE_KV_Q8_0) { /* head_dim is whole groups of 32 */
                const int8_t *src = (const int8_t *)a->v + off;
                const cake_f16 *sc =
                    a->v_scales + cake_kv_v_scale_index(a->kv_ctx, hd, kvh, kb0 + r, 0);
                for (; d < hd; d += 16)
                    _mm512_storeu_ps(
                        o + d, q8_load16(src + d, _mm512_set1_ps(cake_f16_to_f32(sc[d / 32]))));
            } else {
                const float *src = (const float *)a->v + off;
                for (; d < dfull; d += 16) _mm512_storeu_ps(o + d, _mm512_loadu_ps(src + d));
            }
            if (d < hd) { /* f16 or f32: the last dims */
                const __mmask16 m = cake_tail_mask(hd - d);
                const __m512 v = a->kv_type == CAKE_KV_F16
                                     ? cake_maskload_f16((const cake_f16 *)a->v + off + d, m)
                                     : _mm512_maskz_loadu_ps(m, (const float *)a->v + off + d);
                _mm512_mask_storeu_ps(o + d, cake_tail_mask(ld - d < 16 ? ld - d : 16), v);
                d += 16;
            }
        }
        for (; d < ld; d += 16)
            _mm512_mask_storeu_ps(o + d, cake_tail_mask(ld - d < 16 ? ld - d : 16),
                                  _mm512_setzero_ps());
    }
}

/* In-register transpose of 16 rows of 16 floats. */
CAKE_INLINE void transpose16(__m512 r[16]) {
    __m512 t[16];
    UNROLL for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    UNROLL for (int i = 0; i < 4; i++) {
        const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    /* r[4i + k], 128-bit lane L: rows 4i..4i+3 at column 4L + k */
    UNROLL for (int k = 0; k < 4; k++) {
        const __m512 a = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
        const __m512 b = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
        const __m512 c = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
        const __m512 e = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
        t[k] = _mm512_shuffle_f32x4(a, c, 0x88);
        t[8 + k] = _mm512_shuffle_f32x4(a, c, 0xdd);
        t[4 + k] = _mm512_shuffle_f32x4(b, e, 0x88);
        t[12 + k] = _mm512_shuffle_f32x4(b, e, 0xdd);
    }
    UNROLL for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Keys [kb0, kb0 + nk) of KV head kvh as f32, dim-major: dst[d][64], keys
 * >= nk zero. The cache holds the block transposed already (kv_cache.h): a
 * conversion of head_dim x 64 consecutive elements. */
static void load_keys(float *dst, const cake_attn_args *a, int kvh, int kb0, int nk) {
    const size_t base = k_block(a, kvh, kb0);
    __mmask16 m[4];
    for (int c = 0; c < 4; c++)
        m[c] = cake_tail_mask(nk - 16 * c < 0 ? 0 : nk - 16 * c < 16 ? nk - 16 * c : 16);
    __m512 ksc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()}; /* Q8_0: the scales of the current group */
    for (int d = 0; d < a->head_dim; d++) {
        const size_t off = base + (size_t)d * ATT_BK;
        float *o = dst + (size_t)d * ATT_BK;
        if (cake_kv_quantized(a->kv_type)) {
            if (d % 32 == 0) { /* the block's 64 scales of this group, as the keys lie */
                const cake_f16 *sc =
                    a->k_scales + cake_kv_k_scale_index(a->kv_ctx, a->head_dim, kvh, kb0, d / 32);
                UNROLL for (int c = 0; c < 4; c++) ksc[c] = cake_maskload_f16(sc + 16 * c, m[c]);
            }
            __m512 kq[4];
            if (a->kv_type == CAKE_KV_Q8_0) {
                const int8_t *src = (const int8_t *)a->k + off;
                UNROLL for (int c = 0; c < 4; c++) kq[c] =
                    q8_maskload16(src + 16 * c, m[c], ksc[c]);
            } else { /* the dim's 64 keys' bytes, shared with its even or odd twin */
                const uint8_t *src =
                    (const uint8_t *)a->k + cake_kv_k4_byte(a->kv_ctx, a->head_dim, kvh, kb0, d);
                if (d % 2)
                    UNROLL for (int c = 0; c < 4; c++) kq[c] =
                        q4_load16(src + 16 * c, m[c], 1, ksc[c]);
                else
                    UNROLL for (int c = 0; c < 4; c++) kq[c] =
                        q4_load16(src + 16 * c, m[c], 0, ksc[c]);
            }
            UNROLL for (int c = 0; c < 4; c++) _mm512_store_ps(
                o + 16 * c, nk == ATT_BK ? kq[c] : _mm512_maskz_mov_ps(m[c], kq[c]));
        } else if (a->kv_type == CAKE_KV_F16) {
            const cake_f16 *src = (const cake_f16 *)a->k + off;
            if (nk == ATT_BK) {
                UNROLL for (int c = 0; c < 4; c++)
                    _mm512_store_ps(o + 16 * c, cake_load_f16(src + 16 * c));
            } else {
                UNROLL for (int c = 0; c < 4; c++)
                    _mm512_store_ps(o + 16 * c, cake_maskload_f16(src + 16 * c, m[c]));
            }
        } else {
            const float *src = (const float *)a->k + off;
            UNROLL for (int c = 0; c < 4; c++)
                _mm512_store_ps(o + 16 * c, _mm512_maskz_loadu_ps(m[c], src + 16 * c));
        }
    }
}

/* ---------- rows in lanes (prefill) ---------- */

#define ROWS_V 3 /* row vectors (of 16 rows) per register tile: 8 x 3 accumulators */

/* S^T[j][row] for keys [0, nkv) of the block and NRV vectors of 16 rows from
 * rv0: 8 keys x NRV vectors per register tile, the chain over d. */
CAKE_INLINE void rows_scores(float *sT, int ldr, const float *Qt, const float *kf, int hd, int rv0,
                             int nkv, const int NRV) {
    for (int j0 = 0; j0 < nkv; j0 += 8) {
        __m512 acc[8][ROWS_V];
        UNROLL for (int jj = 0; jj < 8; jj++) UNROLL for (int v = 0; v < NRV; v++) acc[jj][v] =
            _mm512_setzero_ps();
        for (int d = 0; d < hd; d++) {
            const float *kr = kf + (size_t)d * ATT_BK + j0;
            __m512 qv[ROWS_V];
            UNROLL for (int v = 0; v < NRV; v++) {
                qv[v] = _mm512_load_ps(Qt + (size_t)d * ldr + (size_t)(rv0 + v) * 16);
                KEEP(qv[v]);
            }
            UNROLL for (int jj = 0; jj < 8; jj++) {
                const __m512 kb = _mm512_set1_ps(kr[jj]);
                UNROLL for (int v = 0; v < NRV; v++) acc[jj][v] =
                    _mm512_fmadd_ps(qv[v], kb, acc[jj][v]);
            }
        }
        UNROLL for (int jj = 0; jj < 8; jj++) UNROLL for (int v = 0; v < NRV; v++)
            _mm512_store_ps(sT + (size_t)(j0 + jj) * ldr + (size_t)(rv0 + v) * 16, acc[jj][v]);
    }
}

/* oT[d][row] = oT * alpha, then FMAs with p_j v_j[d] for the 8 columns from
 * d0 and NRV row vectors from rv0: masked, or (FULL: every key valid for
 * every row) plain, the same arithmetic without a mask move per key, which
 * would take the FMAs' port. */
CAKE_INLINE void rows_pv(float *oT, int ldr, const float *sT, const __mmask16 *msk, int nrv_all,
                         const float *vf, int ldv, const __m512 *alpha, int rv0, int d0, int nkv,
                         const int NRV, const int FULL) {
    __m512 acc[8][ROWS_V];
    UNROLL for (int dd = 0; dd < 8; dd++) UNROLL for (int v = 0; v < NRV; v++) acc[dd][v] =
        _mm512_mul_ps(_mm512_load_ps(oT + (size_t)(d0 + dd) * ldr + (size_t)(rv0 + v) * 16),
                      alpha[v]);
    for (int j = 0; j < nkv; j++) {
        __m512 pv[ROWS_V];
        __mmask16 mv[ROWS_V];
        UNROLL for (int v = 0; v < NRV; v++) {
            pv[v] = _mm512_load_ps(sT + (size_t)j * ldr + (size_t)(rv0 + v) * 16);
            KEEP(pv[v]);
            mv[v] = FULL ? 0xffff : msk[(size_t)j * nrv_all + rv0 + v];
        }
        const float *vr = vf + (size_t)j * ldv + d0;
        UNROLL for (int dd = 0; dd < 8; dd++) {
            const __m512 vb = _mm512_set1_ps(vr[dd]);
            UNROLL for (int v = 0; v < NRV; v++) acc[dd][v] =
                FULL ? _mm512_fmadd_ps(pv[v], vb, acc[dd][v])
                     : _mm512_mask3_fmadd_ps(pv[v], vb, acc[dd][v], mv[v]);
        }
    }
    UNROLL for (int dd = 0; dd < 8; dd++) UNROLL for (int v = 0; v < NRV; v++)
        _mm512_store_ps(oT + (size_t)(d0 + dd) * ldr + (size_t)(rv0 + v) * 16, acc[dd][v]);
}

/* A task's working state with rows in lanes (task_rows_in_lanes lays it out). */
typedef struct {
    int ldr, nrv, hd, ldv;
    int window;    /* the sliding window, 0 for none */
    float softcap; /* the scores' soft cap, 0 for none */
    float *Qt, *oT, *sT, *kf, *vf, *ms, *ls;
    int32_t *pos;
    __mmask16 *msk;
} rows_state;

/* Row vectors [rv, rv + NRV) against the key block [kb0, kb0 + nk): their
 * scores for the nkv keys up to the last row's position, the online softmax
 * down the key axis, then P.V. FULL: every row real, after the block and
 * with the whole block in its window. A row that sees no key of the block
 * (before it, or before its window) keeps its state: alpha 1, masked
 * updates. */
CAKE_INLINE void rows_group(const rows_state *st, int rv, int kb0, int nkv, const int NRV,
                            const int FULL) {
    const int ldr = st->ldr;
    rows_scores(st->sT, ldr, st->Qt, st->kf, st->hd, rv, nkv, NRV);
    if (st->softcap > 0)
        for (int j = 0; j < nkv; j++) UNROLL for (int v = 0; v < NRV; v++) {
                float *sp = st->sT + (size_t)j * ldr + (size_t)(rv + v) * 16;
                _mm512_store_ps(sp,
                                softcap512(_mm512_load_ps(sp), st->softcap, 1.0f / st->softcap));
            }
    __m512 alpha[ROWS_V];
    UNROLL for (int v = 0; v < NRV; v++) {
        const int r0 = (rv + v) * 16;
        const __m512i lim =
            _mm512_sub_epi32(_mm512_loadu_si512(st->pos + r0), _mm512_set1_epi32(kb0));
        /* key j of the block is in a row's window when j > lim - window */
        const __m512i wlim = st->window ? _mm512_sub_epi32(lim, _mm512_set1_epi32(st->window))
                                        : _mm512_set1_epi32(-1);
        __m512 mx = _mm512_set1_ps(-INFINITY);
        __mmask16 seen = 0; /* rows with a key in the block */
        for (int j = 0; j < nkv; j++) {
            const __m512 sj = _mm512_load_ps(st->sT + (size_t)j * ldr + r0);
            if (FULL) {
                mx = _mm512_max_ps(mx, sj);
            } else {
                const __m512i jv = _mm512_set1_epi32(j);
                const __mmask16 mk =
                    _mm512_cmpge_epi32_mask(lim, jv) & _mm512_cmpgt_epi32_mask(jv, wlim);
                st->msk[(size_t)j * st->nrv + rv + v] = mk;
                seen |= mk;
                mx = _mm512_mask_max_ps(mx, mk, mx, sj);
            }
        }
        const __m512 mo = _mm512_load_ps(st->ms + r0);
        const __m512 mn = _mm512_max_ps(mo, mx);
        alpha[v] = cake_exp512(_mm512_sub_ps(mo, mn));
        if (!FULL) /* (exp(-inf - -inf) would be NaN for a row yet to see a key) */
            alpha[v] = _mm512_mask_blend_ps(seen, _mm512_set1_ps(1.0f), alpha[v]);
        __m512 l = _mm512_mul_ps(_mm512_load_ps(st->ls + r0), alpha[v]);
        for (int j = 0; j < nkv; j++) {
            float *sp = st->sT + (size_t)j * ldr + r0;
            const __m512 e = cake_exp512(_mm512_sub_ps(_mm512_load_ps(sp), mn));
            if (FULL) {
                _mm512_store_ps(sp, e);
                l = _mm512_add_ps(l, e);
            } else {
                const __mmask16 mk = st->msk[(size_t)j * st->nrv + rv + v];
                const __m512 p = _mm512_maskz_mov_ps(mk, e);
                _mm512_store_ps(sp, p);
                l = _mm512_mask_add_ps(l, mk, l, p);
            }
        }
        _mm512_store_ps(st->ls + r0, l);
        _mm512_store_ps(st->ms + r0, mn);
    }
    for (int d0 = 0; d0 < st->ldv; d0 += 8)
        rows_pv(st->oT, ldr, st->sT, st->msk, st->nrv, st->vf, st->ldv, alpha, rv, d0, nkv, NRV,
                FULL);
}

/* The task's rows (tokens t0..t1-1 x G heads, row r = (t - t0) * G + head)
 * with the rows in vector lanes. */
static void task_rows_in_lanes(const att_job *job, int kvh, int t0, int t1, float *sc) {
    const cake_attn_args *a = job->a;
    const int G = job->group, hd = a->head_dim;
    const int R = (t1 - t0) * G, Rp = (R + 15) / 16 * 16, nrv = Rp / 16;
    /* Qt, oT and sT hold a row of Rp floats per d or key; their stride is an
     * odd number of cache lines, or the 64 keys' (or d's) vectors of a row
     * group would share a few L1 sets (Rp = 256: 4 of 64) and evict each
     * other. V and o get head_dim rounded up to 8 (zero columns), P.V's tile
     * width. */
    const int ldr = (nrv | 1) * 16, ldv = (hd + 7) / 8 * 8;
    rows_state st = {
        .ldr = ldr, .nrv = nrv, .hd = hd, .ldv = ldv, .window = a->window, .softcap = a->softcap};
    st.Qt = sc;                           /* [hd][ldr] */
    st.oT = st.Qt + (size_t)hd * ldr;     /* [ldv][ldr] */
    st.sT = st.oT + (size_t)ldv * ldr;    /* [64][ldr] scores, then p */
    st.kf = st.sT + (size_t)ATT_BK * ldr; /* [hd][64] */
    st.vf = st.kf + (size_t)ATT_BK * hd;  /* [64][ldv] */
    st.ms = st.vf + (size_t)ATT_BK * ldv; /* [Rp] */
    st.ls = st.ms + Rp;                   /* [Rp] */
    st.pos = (int32_t *)(st.ls + Rp);     /* [Rp] position of each row */
    st.msk = (__mmask16 *)(st.pos + Rp);  /* [64][nrv] */
    float *Qt = st.Qt, *oT = st.oT, *ms = st.ms, *ls = st.ls;
    int32_t *pos = st.pos;

    /* Q^T, scaled, 16 rows x 16 columns at a time; padding rows are zero */
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)hd));
    for (int r0 = 0; r0 < Rp; r0 += 16)
        for (int d0 = 0; d0 < hd; d0 += 16) {
            const int nd = hd - d0 < 16 ? hd - d0 : 16;
            __m512 x[16];
            UNROLL for (int i = 0; i < 16; i++) {
                const int r = r0 + i, t = t0 + r / G, hh = r % G;
                x[i] =
                    r < R
                        ? _mm512_mul_ps(
                              _mm512_maskz_loadu_ps(
                                  cake_tail_mask(nd),
                                  a->q + ((size_t)t * a->n_heads + (size_t)kvh * G + hh) * hd + d0),
                              scale)
                        : _mm512_setzero_ps();
            }
            transpose16(x);
            for (int i = 0; i < nd; i++) _mm512_store_ps(Qt + (size_t)(d0 + i) * ldr + r0, x[i]);
        }
    memset(oT, 0, (size_t)ldv * ldr * sizeof(float));
    for (int r = 0; r < Rp; r++) {
        /* padding rows: no valid key ever (pos -1), state that stays finite */
        pos[r] = r < R ? a->pos0 + t0 + r / G : -1;
        ms[r] = r < R ? -INFINITY : 0.0f;
        ls[r] = 0.0f;
    }

    const int kv_end = a->pos0 + t1;
    for (int kb0 = key_lo(a, a->pos0 + t0) / ATT_BK * ATT_BK; kb0 < kv_end; kb0 += ATT_BK) {
        const int nk = kv_end - kb0 < ATT_BK ? kv_end - kb0 : ATT_BK;
        load_keys(st.kf, a, kvh, kb0, nk);
        load_values(st.vf, ldv, a, kvh, kb0, nk);
        /* Rows are in position order. Vectors whose last row is before kb0 sit
         * this block out, and so do those whose first row's window starts
         * after it; each group of vectors needs the keys up to its last
         * row's position. (A row inside a working vector that sees no key
         * of the block keeps its state: rows_group.) */
        int rv_first = 0, rv_end = nrv;
        while (pos[(rv_first * 16 + 15 < R ? rv_first * 16 + 15 : R - 1)] < kb0) rv_first++;
        while (rv_end > rv_first && key_lo(a, pos[(rv_end - 1) * 16]) > kb0 + nk - 1) rv_end--;
        for (int rv = rv_first; rv < rv_end; rv += ROWS_V) {
            const int nv = rv_end - rv < ROWS_V ? rv_end - rv : ROWS_V;
            const int last = pos[(rv + nv) * 16 - 1 < R ? (rv + nv) * 16 - 1 : R - 1];
            const int nkv = last - kb0 + 1 < nk ? last - kb0 + 1 : nk;
            /* full: every row of the vectors is real and sees every key of
             * the block (all but the blocks on the diagonal and at the
             * windows' starts): no masks */
            const int full =
                (rv + nv) * 16 <= R && pos[rv * 16] >= kb0 + nk - 1 && key_lo(a, last) <= kb0;
            switch (nv * 2 + full) { /* nv and full as constants in each copy */
            case 7:
                rows_group(&st, rv, kb0, nkv, 3, 1);
                break;
            case 6:
                rows_group(&st, rv, kb0, nkv, 3, 0);
                break;
            case 5:
                rows_group(&st, rv, kb0, nkv, 2, 1);
                break;
            case 4:
                rows_group(&st, rv, kb0, nkv, 2, 0);
                break;
            case 3:
                rows_group(&st, rv, kb0, nkv, 1, 1);
                break;
            default:
                rows_group(&st, rv, kb0, nkv, 1, 0);
                break;
            }
        }
    }

    /* out = o * (1 / l), transposed back 16 x 16 at a time */
    for (int r0 = 0; r0 < Rp; r0 += 16) {
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_load_ps(ls + r0));
        for (int d0 = 0; d0 < hd; d0 += 16) {
            const int nd = hd - d0 < 16 ? hd - d0 : 16;
            __m512 x[16];
            UNROLL for (int i = 0; i < 16; i++) x[i] =
                i < nd ? _mm512_mul_ps(_mm512_load_ps(oT + (size_t)(d0 + i) * ldr + r0), inv)
                       : _mm512_setzero_ps();
            transpose16(x);
            for (int i = 0; i < 16 && r0 + i < R; i++) {
                const int r = r0 + i, t = t0 + r / G, hh = r % G;
                _mm512_mask_storeu_ps(a->out +
                                          ((size_t)t * a->n_heads + (size_t)kvh * G + hh) * hd + d0,
                                      cake_tail_mask(nd), x[i]);
            }
        }
    }
}

/* ---------- keys in lanes (decode, few rows) ---------- */

/* P.V of NR rows for one group of 4 vectors of head_dim (ng of them real, cm
 * their masks): acc += p_j v_j for keys j0..nv-1 in order, and, with SUM_L,
 * the rows' sums l += p_j. WHOLE: 4 real vectors with no tail, known at
 * compile time, so the loop has no per-key checks or masked loads. */
CAKE_INLINE void keys_pv(__m512 acc[4][4], float l[4], const void *v, size_t vr0, size_t vstride,
                         const float *pbuf, int j0, int nv, int ng, const __mmask16 cm[4],
                         const float *vsc, int vsc_stride, const int NR, const int SUM_L,
                         const int WHOLE, const int KT) {
    for (int j = j0; j < nv; j++) {
        const size_t vr = vr0 + (size_t)j * vstride;
        __m512 vv[4];
        UNROLL for (int g = 0; g < 4; g++) {
            if (!WHOLE && g >= ng)
                vv[g] = _mm512_setzero_ps();
            else if (KT == CAKE_KV_Q8_0) /* whole vectors: head_dim is groups of 32 */
                vv[g] = q8_load16((const int8_t *)v + vr + g * 16,
                                  _mm512_set1_ps(vsc[(size_t)j * vsc_stride + g / 2]));
            else if (KT == CAKE_KV_Q4_0) /* vr: a multiple of 64 elements */
                vv[g] = q4_load16((const uint8_t *)v + vr / 2 + g / 2 * 16, 0xffff, g % 2,
                                  _mm512_set1_ps(vsc[(size_t)j * vsc_stride + g / 2]));
            else if (KT == CAKE_KV_F16)
                vv[g] = WHOLE ? cake_load_f16((const cake_f16 *)v + vr + g * 16)
                              : cake_maskload_f16((const cake_f16 *)v + vr + g * 16, cm[g]);
            else
                vv[g] = WHOLE ? _mm512_loadu_ps((const float *)v + vr + g * 16)
                              : _mm512_maskz_loadu_ps(cm[g], (const float *)v + vr + g * 16);
            KEEP(vv[g]);
        }
        UNROLL for (int i = 0; i < NR; i++) {
            const float pj = pbuf[i * ATT_BK + j];
            if (SUM_L) l[i] = l[i] + pj;
            const __m512 pb = _mm512_set1_ps(pj);
            UNROLL for (int g = 0; g < 4; g++) if (WHOLE || g < ng) acc[i][g] =
                _mm512_fmadd_ps(pb, vv[g], acc[i][g]);
        }
    }
}

/* NR query rows of one token (same position, so the same nv valid keys of
 * the block) against the block: scores with the keys in lanes (NC vectors of
 * 16 keys, a constant, or 0 for "ncv, at run time"), softmax, P.V with o for
 * the NR rows in registers, 4 vectors of head_dim at a time, reading V from
 * the cache directly (KT: a constant, the cache's type; Q8_0's scales of the
 * block's values from vsc, [key][head_dim / 32] as f32). */
CAKE_INLINE void keys_rows(const float *qs, int hd, const float *kt, const void *v, size_t vstride,
                           size_t vbase, const float *vsc, int hdp, float *o, float *ms, float *ls,
                           float *pbuf, int j0, int nv, float cap, const int NR, const int NC,
                           const int KT) {
    const int ncv = NC ? NC : (nv + 15) / 16;
    __m512 s[4][4];
    UNROLL for (int i = 0; i < NR; i++) UNROLL for (int c = 0; c < 4; c++) s[i][c] =
        _mm512_setzero_ps();
    for (int d = 0; d < hd; d++) {
        const float *kr = kt + (size_t)d * ATT_BK;
        __m512 kv[4];
        UNROLL for (int c = 0; c < 4; c++) {
            kv[c] = (NC ? c < NC : c < ncv) ? _mm512_load_ps(kr + c * 16) : _mm512_setzero_ps();
            KEEP(kv[c]);
        }
        UNROLL for (int i = 0; i < NR; i++) {
            const __m512 qb = _mm512_set1_ps(qs[(size_t)i * hd + d]);
            UNROLL for (int c = 0; c < 4; c++) if (NC ? c < NC : c < ncv) s[i][c] =
                _mm512_fmadd_ps(qb, kv[c], s[i][c]);
        }
    }
    if (cap > 0)
        UNROLL for (int i = 0; i < NR; i++)
            UNROLL for (int c = 0; c < 4; c++) if (NC ? c < NC : c < ncv) s[i][c] =
                softcap512(s[i][c], cap, 1.0f / cap);
    float alpha[4], l[4];
    UNROLL for (int i = 0; i < NR; i++) {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        UNROLL for (int c = 0; c < 4; c++) if (NC ? c < NC : c < ncv) {
            const int cnt = nv - c * 16 < 16 ? nv - c * 16 : 16;
            const int below = j0 - c * 16 < 0 ? 0 : j0 - c * 16 < 16 ? j0 - c * 16 : 16;
            mx = _mm512_mask_max_ps(mx, cake_tail_mask(cnt) & ~cake_tail_mask(below), mx, s[i][c]);
        }
        const float mb = _mm512_reduce_max_ps(mx), mo = ms[i];
        const float mn = mo > mb ? mo : mb;
        alpha[i] = cake_exp_lanes(mo - mn);
        const __m512 mnv = _mm512_set1_ps(mn);
        UNROLL for (int c = 0; c < 4; c++) if (NC ? c < NC : c < ncv)
            _mm512_store_ps(pbuf + i * ATT_BK + c * 16, cake_exp512(_mm512_sub_ps(s[i][c], mnv)));
        ms[i] = mn;
        l[i] = ls[i] * alpha[i];
    }
    /* o in groups of 4 vectors; the sums l ride along in the first group (an
     * add per key next to the FMAs hides the add chain's latency) */
    const int nds = hdp / 16;
    for (int ds = 0; ds < nds; ds += 4) {
        const int ng = nds - ds < 4 ? nds - ds : 4;
        __mmask16 cm[4];
        UNROLL for (int g = 0; g < 4; g++) {
            const int left = hd - (ds + g) * 16;
            cm[g] = cake_tail_mask(left < 0 ? 0 : left < 16 ? left : 16);
        }
        __m512 acc[4][4];
        UNROLL for (int i = 0; i < NR; i++) {
            const __m512 av = _mm512_set1_ps(alpha[i]);
            UNROLL for (int g = 0; g < 4; g++) acc[i][g] =
                g < ng ? _mm512_mul_ps(_mm512_load_ps(o + (size_t)i * hdp + (ds + g) * 16), av)
                       : _mm512_setzero_ps();
        }
        const size_t vr0 = vbase + (size_t)ds * 16;
        const float *vg = vsc + ds / 2;       /* Q8_0: the scales' group of dim 16 ds */
        if (ng == 4 && hd >= (ds + 4) * 16) { /* 4 whole vectors: no checks per key */
            if (ds == 0)
                keys_pv(acc, l, v, vr0, vstride, pbuf, j0, nv, 4, cm, vg, hd / 32, NR, 1, 1, KT);
            else
                keys_pv(acc, l, v, vr0, vstride, pbuf, j0, nv, 4, cm, vg, hd / 32, NR, 0, 1, KT);
        } else {
            keys_pv(acc, l, v, vr0, vstride, pbuf, j0, nv, ng, cm, vg, hd / 32, NR, ds == 0, 0, KT);
        }
        UNROLL for (int i = 0; i < NR; i++) UNROLL for (int g = 0; g < 4; g++) if (g < ng)
            _mm512_store_ps(o + (size_t)i * hdp + (ds + g) * 16, acc[i][g]);
    }
    UNROLL for (int i = 0; i < NR; i++) ls[i] = l[i];
}

#define KEYS_ROWS_F(R, NR, NC, KT)                                                                 \
    keys_rows(qs + (size_t)(R)*hd, hd, kt, a->v, (size_t)hd, vbase, vsc, hdp, o + (size_t)(R)*hdp, \
              ms + (R), ls + (R), p, j0, nv, a->softcap, NR, NC, KT)
#define KEYS_ROWS_T(R, NR, KT)                                                                     \
    do {                                                                                           \
        if (nv == ATT_BK)                                                                          \
            KEYS_ROWS_F(R, NR, 4, KT);                                                             \
        else                                                                                       \
            KEYS_ROWS_F(R, NR, 0, KT);                                                             \
    } while (0)
#ifdef CAKE_SANITIZED
/* Sanitizer builds take the cache's type at run time: one copy of the
 * kernel, not four (the same bits; ASan took ~2 minutes to compile them) */
#define KEYS_ROWS(R, NR) KEYS_ROWS_T(R, NR, a->kv_type)
#else
#define KEYS_ROWS(R, NR)                                                                           \
    do {                                                                                           \
        if (a->kv_type == CAKE_KV_F16)                                                             \
            KEYS_ROWS_T(R, NR, CAKE_KV_F16);                                                       \
        else if (a->kv_type == CAKE_KV_Q8_0)                                                       \
            KEYS_ROWS_T(R, NR, CAKE_KV_Q8_0);                                                      \
        else if (a->kv_type == CAKE_KV_Q4_0)                                                       \
            KEYS_ROWS_T(R, NR, CAKE_KV_Q4_0);                                                      \
        else                                                                                       \
            KEYS_ROWS_T(R, NR, CAKE_KV_F32);                                                       \
    } while (0)
#endif

/* Tokens [t0, t1) of KV heads [h0, h1): one head after another, its rows
 * against its keys block by block, so that the task reads one sequential
 * stream at a time (why: the top of the file; docs/ENGINE.md has the rates). */
static void task_keys_in_lanes(const att_job *job, int h0, int h1, int t0, int t1, float *sc) {
    const cake_attn_args *a = job->a;
    const int G = job->group, hd = a->head_dim, hdp = (hd + 15) / 16 * 16;
    const int Rh = (t1 - t0) * G, R = Rh * (h1 - h0); /* rows per head, in all */
    float *qs = sc;                                   /* [R][hd] scaled queries */
    float *o = qs + ((size_t)R * hd + 15) / 16 * 16;  /* [R][hdp] */
    float *kt = o + (size_t)R * hdp;                  /* [hd][64] */
    float *p = kt + (size_t)hd * ATT_BK;              /* [4][64] */
    float *vsc = p + 4 * ATT_BK;                      /* [64][hd / 32]: Q8_0 value scales */
    float *ms = vsc + (size_t)ATT_BK * hdp / 16;      /* [R] */
    float *ls = ms + R;                               /* [R] */
    /* every region starts 64-byte aligned (sizes are multiples of 16 floats);
     * head kvh's rows are (kvh - h0) * Rh + (t - t0) * G + hh */

    const float scale = 1.0f / sqrtf((float)hd);
    for (int r = 0; r < R; r++) {
        const int kvh = h0 + r / Rh, t = t0 + r % Rh / G, hh = r % G;
        const float *q = a->q + ((size_t)t * a->n_heads + (size_t)kvh * G + hh) * hd;
        for (int d = 0; d < hd; d++) qs[(size_t)r * hd + d] = q[d] * scale;
        for (int d = 0; d < hdp; d++) o[(size_t)r * hdp + d] = 0.0f;
        ms[r] = -INFINITY;
        ls[r] = 0.0f;
    }

    const int kv_end = a->pos0 + t1;
    for (int kvh = h0; kvh < h1; kvh++)
        for (int kb0 = key_lo(a, a->pos0 + t0) / ATT_BK * ATT_BK; kb0 < kv_end; kb0 += ATT_BK) {
            const int nk = kv_end - kb0 < ATT_BK ? kv_end - kb0 : ATT_BK;
            load_keys(kt, a, kvh, kb0, nk);
            /* P.V reads the values from the cache itself; Q8_0's and
             * Q4_0's scales as f32 once for all the task's rows */
            const size_t vbase = v_row(a, kvh, kb0);
            if (cake_kv_quantized(a->kv_type)) load_value_scales(vsc, a, kvh, kb0, nk);
            for (int t = t0; t < t1; t++) {
                const int pos = a->pos0 + t, lo = key_lo(a, pos);
                if (pos < kb0 || lo >= kb0 + nk) continue; /* the block is outside its window */
                /* its keys j0..nv-1 of the block */
                const int nv = pos - kb0 + 1 < nk ? pos - kb0 + 1 : nk,
                          j0 = lo > kb0 ? lo - kb0 : 0;
                /* the token's G rows, up to 4 at a time */
                for (int hh = 0; hh < G; hh += 4) {
                    const int r = (kvh - h0) * Rh + (t - t0) * G + hh;
#ifdef CAKE_SANITIZED
                    /* Sanitizer builds compile 4 rows and 1 only, and take
                     * fewer rows one at a time (each row's sums are its own:
                     * the same bits); every size took ASan + UBSan 2 minutes
                     * to compile. */
                    if (G - hh >= 4)
                        KEYS_ROWS(r, 4);
                    else
                        for (int i = r; i < r + G - hh; i++) KEYS_ROWS(i, 1);
#else
                    switch (G - hh < 4 ? G - hh : 4) {
                    case 4:
                        KEYS_ROWS(r, 4);
                        break;
                    case 3:
                        KEYS_ROWS(r, 3);
                        break;
                    case 2:
                        KEYS_ROWS(r, 2);
                        break;
                    default:
                        KEYS_ROWS(r, 1);
                        break;
                    }
#endif
                }
            }
        }

    for (int r = 0; r < R; r++) {
        const int kvh = h0 + r / Rh, t = t0 + r % Rh / G, hh = r % G;
        float *out = a->out + ((size_t)t * a->n_heads + (size_t)kvh * G + hh) * hd;
        const float inv = 1.0f / ls[r];
        for (int d = 0; d < hd; d++) out[d] = o[(size_t)r * hdp + d] * inv;
    }
}

static void fast_task(void *ctx, int task, int tid) {
    const att_job *j = ctx;
    const cake_attn_args *a = j->a;
    /* the last query blocks (the most keys) first, so the dynamic schedule
     * ends with small tasks */
    const int n_hg = (a->n_kv_heads + j->hg - 1) / j->hg;
    const int h0 = task % n_hg * j->hg, qb = j->n_qb - 1 - task / n_hg;
    const int h1 = h0 + j->hg < a->n_kv_heads ? h0 + j->hg : a->n_kv_heads;
    const int t0 = qb * j->bq;
    const int t1 = t0 + j->bq < a->n_tokens ? t0 + j->bq : a->n_tokens;
    float *sc = j->sc + (size_t)tid * j->sc_floats;
    if (j->hg == 1 && (t1 - t0) * j->group >= ATT_ROWS_MIN_B)
        task_rows_in_lanes(j, h0, t0, t1, sc);
    else
        task_keys_in_lanes(j, h0, h1, t0, t1, sc);
}

/* Scratch floats per thread for tasks of R rows (the larger of the two kinds). */
static size_t scratch_floats(int R, int hd) {
    const size_t Rp = (size_t)(R + 15) / 16 * 16, hdp = (size_t)(hd + 15) / 16 * 16;
    /* rows in lanes: Qt, oT, sT, kf, vf, ms, ls, pos, msk (see task_rows_in_lanes) */
    const size_t ldv = (size_t)(hd + 7) / 8 * 8, ldr = (Rp / 16 | 1) * 16;
    const size_t rows_b =
        (hd + ldv + ATT_BK) * ldr + ATT_BK * (hd + ldv) + 3 * Rp + (ATT_BK * (Rp / 16) + 1) / 2;
    /* keys in lanes: qs (padded), o, kt, p, vsc, ms, ls (see task_keys_in_lanes) */
    const size_t keys_a = ((size_t)R * hd + 15) / 16 * 16 + (size_t)R * hdp + (size_t)hd * ATT_BK +
                          4 * ATT_BK + ATT_BK * hdp / 16 + 2 * (size_t)R;
    const size_t n = rows_b > keys_a ? rows_b : keys_a;
    return (n + 15) / 16 * 16 + 16;
}

#endif /* CAKE_AVX512 */

void cake_attention(const cake_attn_args *a, cake_threadpool *pool) {
    if (!args_ok(a)) return;
    att_job j = {.a = a, .group = a->n_heads / a->n_kv_heads};
#ifdef CAKE_AVX512
    if (a->head_dim <= ATT_MAX_HD) {
        const int hdp = (a->head_dim + 15) / 16 * 16;
        const int n_threads = cake_threadpool_size(pool);
        /* Query tokens per task: as many rows as fit ATT_ROW_FLOATS. Every
         * task converts the K and V blocks it reads (a strided read of the
         * cache) once for all its rows: with 64 rows that took a fifth of an
         * MHA prefill. Fewer rows only to give each thread 3 tasks. */
        const int rows = ATT_ROW_FLOATS / hdp < ATT_MAX_ROWS ? ATT_ROW_FLOATS / hdp : ATT_MAX_ROWS;
        int bq = rows / j.group < 1 ? 1 : rows / j.group;
        while (bq * j.group >= 128 && (a->n_tokens + bq - 1) / bq * a->n_kv_heads < 3 * n_threads)
            bq /= 2;
        j.bq = bq < a->n_tokens ? bq : a->n_tokens;
        j.n_qb = (a->n_tokens + j.bq - 1) / j.bq;
        /* every task puts keys in lanes (decode, small batches): as many KV
         * heads per task as leave one task per thread (task_keys_in_lanes) */
        j.hg = 1;
        if (j.bq * j.group < ATT_ROWS_MIN_B) j.hg = (a->n_kv_heads + n_threads - 1) / n_threads;
        j.sc_floats = scratch_floats(j.bq * j.group * j.hg, a->head_dim);
        j.sc = aligned_alloc(64, j.sc_floats * sizeof(float) * (size_t)n_threads);
        if (j.sc) {
            cake_threadpool_run(pool, j.n_qb * ((a->n_kv_heads + j.hg - 1) / j.hg), fast_task, &j);
            free(j.sc);
            return;
        }
    }
#endif
    /* portable build, head_dim > 256 or no memory for scratch: same bits, slower */
    cake_threadpool_run(pool, a->n_tokens * a->n_kv_heads, lanes_task, &j);
}
