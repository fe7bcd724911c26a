/* Causal grouped-query attention over the KV cache (one layer).
 *
 * The contract that shapes everything here: the output for a query depends
 * only on its position and the keys/values before it, bit for bit, whatever
 * the batch (n_tokens), chunk start (pos0) or thread count. Chunked prefill and
 * the Cake loader rely on it. So each query's arithmetic is fixed:
 *
 *   q' = q * (1/sqrt(head_dim))                          (elementwise)
 *   s_j = fold16(16 lanes, lane l an FMA chain over d = l, l+16, ...)   (q'.k_j)
 *   keys are taken in blocks of 64 at absolute positions [64b, 64b + 64);
 *   per block (only keys j <= the query's position):
 *       m' = max(m, max_j s_j);  alpha = exp(m - m');  p_j = exp(s_j - m')
 *       l  = l * alpha + fold16(lane l: ((p_l + p_16+l) + p_32+l) + p_48+l)
 *       o[d] = o[d] * alpha, then o[d] = fma(p_j, v_j[d], o[d]) for j ascending
 *   out = o * (1 / l)
 *
 * (exp is the polynomial in simd.h; fold16 the tree there.) Nothing in that
 * list depends on which other queries are processed alongside, so batches are
 * free to group queries any way they like. cake_attention_lanes() is the same
 * list in scalar C; the tests hold the fast kernel bit-identical to it.
 *
 * The fast kernel (AVX-512): one task per (KV head, block of query tokens),
 * static striding over tasks. A task converts each 64-key block of its KV head
 * to f32 once (f16 KV) into per-thread scratch, then runs every query row of
 * the group (all tokens of the block x the n_heads/n_kv_heads heads sharing the
 * KV head) over it: 16 keys at a time, 16 accumulators folded together into a
 * vector of 16 scores; online softmax per block; P.V with o in registers. The
 * per-row state (o, m, l) lives in scratch between key blocks. Decode (one
 * token) is the same code with one token per task. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"

#define ATT_BK        64    /* keys per softmax block, aligned to absolute positions */
#define ATT_MAX_HDP   256   /* largest head_dim (rounded up to 16) of the fast kernel */
#define ATT_ROW_FLOATS 16384 /* query rows x padded head_dim per task (64 KiB) */

static float kv_at(const cake_attn_args *a, const void *base, int pos, int kvh, int d) {
    const size_t i = ((size_t)pos * a->n_kv_heads + kvh) * (size_t)a->head_dim + (size_t)d;
    return a->kv_f16 ? cake_f16_to_f32(((const cake_f16 *)base)[i]) : ((const float *)base)[i];
}

static int args_ok(const cake_attn_args *a) {
    return a->n_tokens > 0 && a->pos0 >= 0 && a->n_heads > 0 && a->n_kv_heads > 0 &&
           a->head_dim > 0 && a->n_heads % a->n_kv_heads == 0;
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
            /* two passes over the keys, so no buffer of n_ctx scores is needed */
            double mx = -INFINITY;
            for (int j = 0; j <= pos; j++) {
                double s = 0.0;
                for (int d = 0; d < hd; d++) s += (double)q[d] * kv_at(a, a->k, j, kvh, d);
                if (s * scale > mx) mx = s * scale;
            }
            double sum = 0.0;
            for (int d = 0; d < hd; d++) out[d] = 0.0f;
            double acc[ATT_MAX_HDP];
            const int chunk = hd < ATT_MAX_HDP ? hd : ATT_MAX_HDP;
            for (int d0 = 0; d0 < hd; d0 += chunk) {
                const int d1 = d0 + chunk < hd ? d0 + chunk : hd;
                for (int d = d0; d < d1; d++) acc[d - d0] = 0.0;
                sum = 0.0;
                for (int j = 0; j <= pos; j++) {
                    double s = 0.0;
                    for (int d = 0; d < hd; d++) s += (double)q[d] * kv_at(a, a->k, j, kvh, d);
                    const double p = exp(s * scale - mx);
                    sum += p;
                    for (int d = d0; d < d1; d++) acc[d - d0] += p * kv_at(a, a->v, j, kvh, d);
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
    for (int kb0 = 0; kb0 <= pos; kb0 += ATT_BK) {
        const int nvalid = pos - kb0 + 1 < ATT_BK ? pos - kb0 + 1 : ATT_BK;
        float s[ATT_BK], p[ATT_BK];
        float mb = -INFINITY;
        for (int j = 0; j < nvalid; j++) {
            float lane[16] = {0};
            for (int d0 = 0; d0 < hd; d0 += 16)
                for (int li = 0; li < 16; li++) {
                    const int d = d0 + li;
                    const float qv = d < hd ? q[d] * scale : 0.0f;
                    const float kv = d < hd ? kv_at(a, a->k, kb0 + j, kvh, d) : 0.0f;
                    lane[li] = fmaf(qv, kv, lane[li]);
                }
            s[j] = cake_fold16_lanes(lane);
            mb = s[j] > mb ? s[j] : mb;
        }
        const float mn = m > mb ? m : mb;
        const float alpha = cake_exp_lanes(m - mn);
        for (int j = 0; j < ATT_BK; j++) p[j] = j < nvalid ? cake_exp_lanes(s[j] - mn) : 0.0f;
        float sv[16];
        for (int li = 0; li < 16; li++) {
            float x = p[li];
            x = x + p[16 + li];
            x = x + p[32 + li];
            x = x + p[48 + li];
            sv[li] = x;
        }
        l = l * alpha;
        l = l + cake_fold16_lanes(sv);
        for (int d = 0; d < hd; d++) {
            float o = out[d] * alpha;
            for (int j = 0; j < nvalid; j++) o = fmaf(p[j], kv_at(a, a->v, kb0 + j, kvh, d), o);
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
    int group;   /* query heads per KV head */
    int bq;      /* query tokens per task */
    int n_qb;    /* query blocks */
    int hdp;     /* head_dim rounded up to 16 */
    float *sc;   /* per-thread scratch (fast kernel), sc_floats each */
    size_t sc_floats;
} att_job;

static void lanes_task(void *ctx, int task, int tid) {
    (void)tid;
    const att_job *j = ctx;
    const cake_attn_args *a = j->a;
    /* task = (token, KV head): each does the heads of one group */
    const int t = task / a->n_kv_heads, kvh = task % a->n_kv_heads;
    for (int hh = 0; hh < j->group; hh++) lanes_row(a, t, kvh * j->group + hh);
}

#ifdef CAKE_AVX512

#define UNROLL _Pragma("GCC unroll 16")

/* Copies keys/values [kb0, kb0 + nk) of KV head kvh into dst[64][hdp] as f32,
 * zero-padding d >= head_dim and rows nk..63 (their scores are computed with
 * the others and then masked). */
static void load_kv_block(float *dst, const cake_attn_args *a, const void *base, int kvh, int kb0,
                          int nk, int hdp) {
    const int hd = a->head_dim;
    const size_t stride = (size_t)a->n_kv_heads * hd;
    for (int r = 0; r < ATT_BK; r++) {
        float *o = dst + (size_t)r * hdp;
        if (r >= nk) {
            for (int d = 0; d < hdp; d += 16) _mm512_store_ps(o + d, _mm512_setzero_ps());
            continue;
        }
        const size_t off = (size_t)(kb0 + r) * stride + (size_t)kvh * hd;
        int d = 0;
        if (a->kv_f16) {
            const cake_f16 *src = (const cake_f16 *)base + off;
            for (; d + 16 <= hd; d += 16) _mm512_store_ps(o + d, cake_load_f16(src + d));
            if (d < hd) _mm512_store_ps(o + d, cake_maskload_f16(src + d, cake_tail_mask(hd - d)));
        } else {
            const float *src = (const float *)base + off;
            for (; d + 16 <= hd; d += 16) _mm512_store_ps(o + d, _mm512_loadu_ps(src + d));
            if (d < hd) _mm512_store_ps(o + d, _mm512_maskz_loadu_ps(cake_tail_mask(hd - d), src + d));
        }
    }
}

/* Scores of one query row against 16 consecutive keys of the block. */
CAKE_INLINE __m512 scores16(const float *qs, const float *kf, int nds, int hdp) {
    __m512 acc[16];
    UNROLL for (int jj = 0; jj < 16; jj++) acc[jj] = _mm512_setzero_ps();
    for (int ds = 0; ds < nds; ds++) {
        const __m512 qv = _mm512_load_ps(qs + ds * 16);
        UNROLL for (int jj = 0; jj < 16; jj++) acc[jj] =
            _mm512_fmadd_ps(qv, _mm512_load_ps(kf + (size_t)jj * hdp + ds * 16), acc[jj]);
    }
    return cake_fold16(acc);
}

/* o = o * alpha, then o = fma(p_j, v_j, o) for j < nv; NDS vectors of o kept in
 * registers (NDS a constant), or, for NDS == 0, a loop over d outside j. */
CAKE_INLINE void pv_accum(float *o, const float *vf, const float *p, int nv, __m512 alpha, int nds,
                          int hdp, const int NDS) {
    if (NDS > 0) {
        __m512 acc[16];
        UNROLL for (int ds = 0; ds < NDS; ds++) acc[ds] =
            _mm512_mul_ps(_mm512_load_ps(o + ds * 16), alpha);
        for (int jv = 0; jv < nv; jv++) {
            const __m512 pj = _mm512_set1_ps(p[jv]);
            const float *vr = vf + (size_t)jv * hdp;
            UNROLL for (int ds = 0; ds < NDS; ds++) acc[ds] =
                _mm512_fmadd_ps(pj, _mm512_load_ps(vr + ds * 16), acc[ds]);
        }
        UNROLL for (int ds = 0; ds < NDS; ds++) _mm512_store_ps(o + ds * 16, acc[ds]);
    } else {
        for (int ds = 0; ds < nds; ds++) {
            __m512 acc = _mm512_mul_ps(_mm512_load_ps(o + ds * 16), alpha);
            for (int jv = 0; jv < nv; jv++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(p[jv]),
                                      _mm512_load_ps(vf + (size_t)jv * hdp + ds * 16), acc);
            _mm512_store_ps(o + ds * 16, acc);
        }
    }
}

/* One query row over one key block with nv valid keys (1..64). */
static void row_block(const float *qs, float *o, float *m, float *l, const float *kf,
                      const float *vf, float *pbuf, int nv, int nds, int hdp) {
    __m512 s[4];
    const int ng = (nv + 15) / 16;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < ng; c++) {
        const int cnt = nv - c * 16 < 16 ? nv - c * 16 : 16;
        const __mmask16 mk = cake_tail_mask(cnt);
        s[c] = scores16(qs, kf + (size_t)c * 16 * hdp, nds, hdp);
        mx = _mm512_mask_max_ps(mx, mk, mx, s[c]);
    }
    const float mb = _mm512_reduce_max_ps(mx);
    const float mo = *m;
    const float mn = mo > mb ? mo : mb;
    const float alpha = cake_exp_lanes(mo - mn);
    const __m512 mnv = _mm512_set1_ps(mn);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; c++) {
        __m512 p = _mm512_setzero_ps();
        if (c < ng) {
            const int cnt = nv - c * 16 < 16 ? nv - c * 16 : 16;
            p = _mm512_maskz_mov_ps(cake_tail_mask(cnt), cake_exp512(_mm512_sub_ps(s[c], mnv)));
        }
        _mm512_store_ps(pbuf + c * 16, p);
        sum = c == 0 ? p : _mm512_add_ps(sum, p);
    }
    float lv = *l * alpha;
    lv = lv + _mm_cvtss_f32(cake_fold4(sum, sum, sum, sum));
    *l = lv;
    *m = mn;
    const __m512 av = _mm512_set1_ps(alpha);
    switch (nds) {
    case 1: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 1); break;
    case 2: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 2); break;
    case 3: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 3); break;
    case 4: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 4); break;
    case 5: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 5); break;
    case 6: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 6); break;
    case 7: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 7); break;
    case 8: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 8); break;
    default: pv_accum(o, vf, pbuf, nv, av, nds, hdp, 0); break;
    }
}

static void fast_task(void *ctx, int task, int tid) {
    const att_job *j = ctx;
    const cake_attn_args *a = j->a;
    const int kvh = task % a->n_kv_heads, qb = task / a->n_kv_heads;
    const int G = j->group, hd = a->head_dim, hdp = j->hdp, nds = hdp / 16;
    const int t0 = qb * j->bq;
    const int t1 = t0 + j->bq < a->n_tokens ? t0 + j->bq : a->n_tokens;
    const int rows = (t1 - t0) * G;

    float *qs = j->sc + (size_t)tid * j->sc_floats; /* [rows][hdp] */
    float *o = qs + (size_t)rows * hdp;              /* [rows][hdp] */
    float *kf = o + (size_t)rows * hdp;              /* [64][hdp] */
    float *vf = kf + (size_t)ATT_BK * hdp;           /* [64][hdp] */
    float *pbuf = vf + (size_t)ATT_BK * hdp;         /* [64] */
    float *ms = pbuf + ATT_BK;                       /* [rows] */
    float *ls = ms + rows;                           /* [rows] */

    const float scale = 1.0f / sqrtf((float)hd);
    const __m512 sv = _mm512_set1_ps(scale);
    for (int t = t0; t < t1; t++)
        for (int hh = 0; hh < G; hh++) {
            const int r = (t - t0) * G + hh;
            const float *q = a->q + ((size_t)t * a->n_heads + (size_t)kvh * G + hh) * hd;
            float *qr = qs + (size_t)r * hdp;
            for (int d = 0; d < hdp; d += 16) {
                const __mmask16 mk = cake_tail_mask(hd - d < 16 ? hd - d : 16);
                _mm512_store_ps(qr + d, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, q + d), sv));
                _mm512_store_ps(o + (size_t)r * hdp + d, _mm512_setzero_ps());
            }
            ms[r] = -INFINITY;
            ls[r] = 0.0f;
        }

    const int kv_end = a->pos0 + t1;
    for (int kb0 = 0; kb0 < kv_end; kb0 += ATT_BK) {
        const int nk = kv_end - kb0 < ATT_BK ? kv_end - kb0 : ATT_BK;
        load_kv_block(kf, a, a->k, kvh, kb0, nk, hdp);
        load_kv_block(vf, a, a->v, kvh, kb0, nk, hdp);
        const int tfirst = kb0 - a->pos0 > t0 ? kb0 - a->pos0 : t0;
        for (int t = tfirst; t < t1; t++) {
            const int pos = a->pos0 + t;
            const int nv = pos - kb0 + 1 < nk ? pos - kb0 + 1 : nk;
            for (int hh = 0; hh < G; hh++) {
                const int r = (t - t0) * G + hh;
                row_block(qs + (size_t)r * hdp, o + (size_t)r * hdp, ms + r, ls + r, kf, vf, pbuf,
                          nv, nds, hdp);
            }
        }
    }

    for (int t = t0; t < t1; t++)
        for (int hh = 0; hh < G; hh++) {
            const int r = (t - t0) * G + hh;
            float *out = a->out + ((size_t)t * a->n_heads + (size_t)kvh * G + hh) * hd;
            const __m512 inv = _mm512_set1_ps(1.0f / ls[r]);
            for (int d = 0; d < hd; d += 16) {
                const __mmask16 mk = cake_tail_mask(hd - d < 16 ? hd - d : 16);
                _mm512_mask_storeu_ps(out + d, mk,
                                      _mm512_mul_ps(_mm512_load_ps(o + (size_t)r * hdp + d), inv));
            }
        }
}

#endif /* CAKE_AVX512 */

void cake_attention(const cake_attn_args *a, cake_threadpool *pool) {
    if (!args_ok(a)) return;
    att_job j = {.a = a, .group = a->n_heads / a->n_kv_heads};
    j.hdp = (a->head_dim + 15) / 16 * 16;
#ifdef CAKE_AVX512
    if (j.hdp <= ATT_MAX_HDP) {
        int bq = ATT_ROW_FLOATS / (j.group * j.hdp);
        bq = bq < 1 ? 1 : bq > 64 ? 64 : bq;
        j.bq = bq < a->n_tokens ? bq : a->n_tokens;
        j.n_qb = (a->n_tokens + j.bq - 1) / j.bq;
        const size_t rows = (size_t)j.bq * j.group;
        j.sc_floats = 2 * rows * j.hdp + 2 * (size_t)ATT_BK * j.hdp + ATT_BK + 2 * rows;
        j.sc_floats = (j.sc_floats + 15) / 16 * 16; /* keep each thread's part 64-byte aligned */
        const int n_threads = cake_threadpool_size(pool);
        j.sc = aligned_alloc(64, j.sc_floats * sizeof(float) * (size_t)n_threads);
        if (j.sc) {
            cake_threadpool_run(pool, j.n_qb * a->n_kv_heads, fast_task, &j);
            free(j.sc);
            return;
        }
    }
#endif
    /* portable build, head_dim > 256, or no memory for scratch: same bits, slower */
    cake_threadpool_run(pool, a->n_tokens * a->n_kv_heads, lanes_task, &j);
}
