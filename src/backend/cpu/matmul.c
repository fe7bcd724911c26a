/* y (T, n_out) = x (T, n_in) . W^T with W (n_out, n_in) in F32, F16 or BF16,
 * read in place from the (read-only, mmapped) model file.
 *
 * One reduction order for every path. Each output is
 *     lane[l] = fma chain over k = l, l+16, l+32, ... (k < n_in) of x[k]*w[k]
 *     y = fold16(lane)                     (the fixed tree in simd.h)
 * so the result for a token never depends on how many tokens share the call,
 * which path ran, how the rows were split into panels or across threads.
 * Chunked prefill, decode and a whole-prompt prefill produce the same bits,
 * and cake_matmul_lanes() (portable scalar code) reproduces them exactly.
 *
 * Why not OpenBLAS: its sgemm is fast (~90 GFLOP/s per core here) but its
 * per-element order (sequential FMA within K blocks of a size chosen by the
 * library build) cannot be matched by a decode kernel streaming W rows, so a
 * token computed in a batch of 1 would differ from the same token in a batch of
 * 512. The "dot-product" GEMM below keeps 16-lane accumulators per output
 * instead, which is the order the decode kernel has naturally, at the same
 * speed as sgemm on this machine (see bench/bench_kernels.c).
 *
 * Two kernels (AVX-512; other builds use the scalar lanes code):
 *  - few tokens (decode): each thread streams a contiguous range of W rows
 *    once, 4 rows at a time, converting f16/bf16 in registers, for up to 6
 *    tokens per pass. Memory-bound: W is read once per pass.
 *  - many tokens (prefill): each thread takes panels of W rows (static
 *    striding), converts a panel to f32 in a per-thread scratch laid out for the
 *    micro-kernel ([4-row tile][k step][row][16]), and runs a 6-token x 4-row
 *    register tile over K blocks of 512, keeping the 16-lane partial sums of
 *    every output of the panel between blocks. The panel (<= 256 KiB) stays in
 *    L2 while all token tiles pass over it; the 6 x rows of a K block stay in
 *    L1. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "model/gguf.h"

/* Batches of at least this many tokens use the panel GEMM. */
#define MM_GEMM_MIN_TOKENS 8
#define MM_MR              6     /* tokens per GEMM register tile */
#define MM_NR              4     /* W rows per register tile (both kernels) */
#ifndef MM_KC_STEPS
#define MM_KC_STEPS 32 /* K block of the GEMM, in 16-element steps */
#endif
#ifndef MM_PANEL_FLOATS
#define MM_PANEL_FLOATS 524288 /* max f32 panel per thread (2 MiB) */
#endif
#define MM_GEMV_MT         6     /* tokens per pass of the decode kernel */

static int dtype_ok(int dt) {
    return dt == CAKE_DTYPE_F32 || dt == CAKE_DTYPE_F16 || dt == CAKE_DTYPE_BF16;
}

static float w_at(const void *w, int dt, size_t i) {
    switch (dt) {
    case CAKE_DTYPE_F32: return ((const float *)w)[i];
    case CAKE_DTYPE_F16: return cake_f16_to_f32(((const cake_f16 *)w)[i]);
    default: return cake_bf16_to_f32(((const cake_bf16 *)w)[i]);
    }
}

/* ===================== reference ===================== */

int cake_matmul_ref(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                    int n_out) {
    if (!dtype_ok(w_dtype)) return -1;
    for (int t = 0; t < n_tokens; t++)
        for (int n = 0; n < n_out; n++) {
            double s = 0.0;
            for (int k = 0; k < n_in; k++)
                s += (double)x[(size_t)t * n_in + k] * (double)w_at(w, w_dtype, (size_t)n * n_in + k);
            y[(size_t)t * n_out + n] = (float)s;
        }
    return 0;
}

/* ===================== portable lanes kernel ===================== */

static float dot_lanes(const float *x, const void *w, int dt, size_t row_off, int n_in) {
    float lane[16] = {0};
    for (int k0 = 0; k0 < n_in; k0 += 16)
        for (int l = 0; l < 16; l++) {
            const int k = k0 + l;
            /* past the end both operands are 0, as the masked vector loads */
            const float xv = k < n_in ? x[k] : 0.0f;
            const float wv = k < n_in ? w_at(w, dt, row_off + (size_t)k) : 0.0f;
            lane[l] = fmaf(xv, wv, lane[l]);
        }
    return cake_fold16_lanes(lane);
}

static void lanes_rows(float *y, const float *x, const void *w, int dt, int n_tokens, int n_in,
                       int n_out, int r0, int r1) {
    for (int t = 0; t < n_tokens; t++)
        for (int n = r0; n < r1; n++)
            y[(size_t)t * n_out + n] =
                dot_lanes(x + (size_t)t * n_in, w, dt, (size_t)n * (size_t)n_in, n_in);
}

int cake_matmul_lanes(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                      int n_out) {
    if (!dtype_ok(w_dtype)) return -1;
    lanes_rows(y, x, w, w_dtype, n_tokens, n_in, n_out, 0, n_out);
    return 0;
}

/* ===================== threaded drivers ===================== */

typedef struct {
    float *y;
    const float *x;
    const void *w;
    int dt, T, n_in, n_out;
    int rows_per_task; /* row-range kernels */
    /* GEMM */
    int nc;        /* W rows per panel, multiple of MM_NR */
    int ksteps;    /* ceil(n_in / 16) */
    float *sc;     /* per-thread scratch, sc_floats each, 64-byte aligned */
    size_t sc_floats;
} mm_job;

#ifndef CAKE_AVX512
static void lanes_task(void *ctx, int task, int tid) {
    (void)tid;
    const mm_job *j = ctx;
    const int r0 = task * j->rows_per_task;
    const int r1 = r0 + j->rows_per_task < j->n_out ? r0 + j->rows_per_task : j->n_out;
    lanes_rows(j->y, j->x, j->w, j->dt, j->T, j->n_in, j->n_out, r0, r1);
}
#endif

#ifdef CAKE_AVX512

#define UNROLL _Pragma("GCC unroll 8")

CAKE_INLINE __m512 w_load(const void *w, int dt, size_t off) {
    switch (dt) {
    case CAKE_DTYPE_F32: return _mm512_loadu_ps((const float *)w + off);
    case CAKE_DTYPE_F16: return cake_load_f16((const cake_f16 *)w + off);
    default: return cake_load_bf16((const cake_bf16 *)w + off);
    }
}

CAKE_INLINE __m512 w_maskload(const void *w, int dt, size_t off, __mmask16 m) {
    switch (dt) {
    case CAKE_DTYPE_F32: return _mm512_maskz_loadu_ps(m, (const float *)w + off);
    case CAKE_DTYPE_F16: return cake_maskload_f16((const cake_f16 *)w + off, m);
    default: return cake_maskload_bf16((const cake_bf16 *)w + off, m);
    }
}

/* Keeps a loaded x vector in a register: without this GCC folds the load into
 * every FMA that uses it, re-reading it from L1 once per W row. */
#define KEEP(v) __asm__("" : "+v"(v))

/* ---- decode kernel: MT tokens x NR rows (rows >= nr are not loaded) ---- */
CAKE_INLINE void gemv_tile(float *y, const float *x, const void *w, int dt, int n_in, int n_out,
                           int t0, int r0, const int MT, const int nr) {
    __m512 acc[MM_GEMV_MT][MM_NR];
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int j = 0; j < MM_NR; j++) acc[i][j] =
        _mm512_setzero_ps();
    const float *xr = x + (size_t)t0 * n_in;
    const size_t wr = (size_t)r0 * n_in;
    const int kfull = n_in & ~15;
    for (int k = 0; k < kfull; k += 16) {
        __m512 wv[MM_NR];
        UNROLL for (int j = 0; j < nr; j++) wv[j] = w_load(w, dt, wr + (size_t)j * n_in + k);
        UNROLL for (int i = 0; i < MT; i++) {
            __m512 xv = _mm512_loadu_ps(xr + (size_t)i * n_in + k);
            KEEP(xv);
            UNROLL for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (kfull < n_in) {
        const __mmask16 m = cake_tail_mask(n_in - kfull);
        __m512 wv[MM_NR];
        UNROLL for (int j = 0; j < nr; j++) wv[j] =
            w_maskload(w, dt, wr + (size_t)j * n_in + kfull, m);
        UNROLL for (int i = 0; i < MT; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, xr + (size_t)i * n_in + kfull);
            UNROLL for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    const __mmask8 sm = (__mmask8)((1u << nr) - 1u);
    UNROLL for (int i = 0; i < MT; i++) {
        __m128 s = cake_fold4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        _mm_mask_storeu_ps(y + (size_t)(t0 + i) * n_out + r0, sm, s);
    }
}

CAKE_INLINE void gemv_rows_dt(const mm_job *j, int r0, int r1, const int dt) {
    for (int r = r0; r < r1; r += MM_NR) {
        const int nr = r1 - r < MM_NR ? r1 - r : MM_NR;
        for (int t0 = 0; t0 < j->T; t0 += MM_GEMV_MT) {
            const int mt = j->T - t0 < MM_GEMV_MT ? j->T - t0 : MM_GEMV_MT;
#define GEMV_CASE(MT)                                                                              \
    case MT:                                                                                       \
        if (nr == 4) gemv_tile(j->y, j->x, j->w, dt, j->n_in, j->n_out, t0, r, MT, 4);            \
        else if (nr == 3) gemv_tile(j->y, j->x, j->w, dt, j->n_in, j->n_out, t0, r, MT, 3);       \
        else if (nr == 2) gemv_tile(j->y, j->x, j->w, dt, j->n_in, j->n_out, t0, r, MT, 2);       \
        else gemv_tile(j->y, j->x, j->w, dt, j->n_in, j->n_out, t0, r, MT, 1);                    \
        break;
            switch (mt) {
                GEMV_CASE(1)
                GEMV_CASE(2)
                GEMV_CASE(3)
                GEMV_CASE(4)
                GEMV_CASE(5)
                GEMV_CASE(6)
            }
#undef GEMV_CASE
        }
    }
}

static void gemv_task(void *ctx, int task, int tid) {
    (void)tid;
    const mm_job *j = ctx;
    const int r0 = task * j->rows_per_task;
    const int r1 = r0 + j->rows_per_task < j->n_out ? r0 + j->rows_per_task : j->n_out;
    switch (j->dt) {
    case CAKE_DTYPE_F32: gemv_rows_dt(j, r0, r1, CAKE_DTYPE_F32); break;
    case CAKE_DTYPE_F16: gemv_rows_dt(j, r0, r1, CAKE_DTYPE_F16); break;
    default: gemv_rows_dt(j, r0, r1, CAKE_DTYPE_BF16); break;
    }
}

/* ---- GEMM micro-kernel: MT tokens x 4 packed rows over k steps [s0, s1) ----
 * wp: the packed tile, [k step][row 0..3][16]; part: the tile's 16-lane partial
 * sums, [token][row], carried between K blocks. */
CAKE_INLINE void gemm_tile(const float *x, int ldx, const float *wp, int s0, int s1, int sfull,
                           __mmask16 tail, __m512 *part, int first, const int MT) {
    __m512 acc[MM_MR][MM_NR];
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int j = 0; j < MM_NR; j++) acc[i][j] =
        first ? _mm512_setzero_ps() : part[i * MM_NR + j];
    const int se = s1 < sfull ? s1 : sfull;
    for (int s = s0; s < se; s++) {
        const float *wq = wp + (size_t)s * (MM_NR * 16);
        __m512 wv[MM_NR];
        UNROLL for (int j = 0; j < MM_NR; j++) wv[j] = _mm512_load_ps(wq + j * 16);
        UNROLL for (int i = 0; i < MT; i++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)i * ldx + (size_t)s * 16);
            KEEP(xv);
            UNROLL for (int j = 0; j < MM_NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (s1 > sfull) { /* the masked last step (n_in % 16 != 0) */
        const float *wq = wp + (size_t)sfull * (MM_NR * 16);
        __m512 wv[MM_NR];
        UNROLL for (int j = 0; j < MM_NR; j++) wv[j] = _mm512_load_ps(wq + j * 16);
        UNROLL for (int i = 0; i < MT; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + (size_t)i * ldx + (size_t)sfull * 16);
            UNROLL for (int j = 0; j < MM_NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    UNROLL for (int i = 0; i < MT; i++) UNROLL for (int j = 0; j < MM_NR; j++) part[i * MM_NR + j] =
        acc[i][j];
}

/* Converts W rows [n0, n1) to the packed f32 layout; rows past n1 of the last
 * tile and k past n_in are zero (their products then add exact zeros). */
CAKE_INLINE void pack_panel(float *wp, const void *w, const int dt, int n_in, int ksteps, int n0,
                            int n1) {
    const int kfull = n_in & ~15;
    const __mmask16 tail = cake_tail_mask(n_in - kfull);
    const int ntiles = (n1 - n0 + MM_NR - 1) / MM_NR;
    for (int jt = 0; jt < ntiles; jt++) {
        float *tile = wp + (size_t)jt * ksteps * (MM_NR * 16);
        for (int j = 0; j < MM_NR; j++) {
            const int row = n0 + jt * MM_NR + j;
            float *dst = tile + j * 16;
            if (row >= n1) {
                for (int s = 0; s < ksteps; s++)
                    _mm512_store_ps(dst + (size_t)s * (MM_NR * 16), _mm512_setzero_ps());
                continue;
            }
            const size_t off = (size_t)row * n_in;
            int s = 0;
            for (; s * 16 < kfull; s++)
                _mm512_store_ps(dst + (size_t)s * (MM_NR * 16), w_load(w, dt, off + (size_t)s * 16));
            if (s < ksteps)
                _mm512_store_ps(dst + (size_t)s * (MM_NR * 16),
                                w_maskload(w, dt, off + (size_t)s * 16, tail));
        }
    }
}

static void gemm_task(void *ctx, int task, int tid) {
    const mm_job *j = ctx;
    const int n0 = task * j->nc;
    const int n1 = n0 + j->nc < j->n_out ? n0 + j->nc : j->n_out;
    const int ntiles = (n1 - n0 + MM_NR - 1) / MM_NR;
    const int ksteps = j->ksteps, n_in = j->n_in;
    const int sfull = n_in / 16;
    const __mmask16 tail = cake_tail_mask(n_in - sfull * 16);
    float *wp = j->sc + (size_t)tid * j->sc_floats;
    __m512 *part = (__m512 *)(wp + (size_t)j->nc * ksteps * 16);

    switch (j->dt) {
    case CAKE_DTYPE_F32: pack_panel(wp, j->w, CAKE_DTYPE_F32, n_in, ksteps, n0, n1); break;
    case CAKE_DTYPE_F16: pack_panel(wp, j->w, CAKE_DTYPE_F16, n_in, ksteps, n0, n1); break;
    default: pack_panel(wp, j->w, CAKE_DTYPE_BF16, n_in, ksteps, n0, n1); break;
    }

    for (int t0 = 0; t0 < j->T; t0 += MM_MR) {
        const int mt = j->T - t0 < MM_MR ? j->T - t0 : MM_MR;
        const float *xt = j->x + (size_t)t0 * n_in;
        for (int s0 = 0; s0 < ksteps; s0 += MM_KC_STEPS) {
            const int s1 = s0 + MM_KC_STEPS < ksteps ? s0 + MM_KC_STEPS : ksteps;
            for (int jt = 0; jt < ntiles; jt++) {
                const float *wt = wp + (size_t)jt * ksteps * (MM_NR * 16);
                __m512 *pt = part + (size_t)jt * (MM_MR * MM_NR);
                switch (mt) {
                case 6: gemm_tile(xt, n_in, wt, s0, s1, sfull, tail, pt, s0 == 0, 6); break;
                case 5: gemm_tile(xt, n_in, wt, s0, s1, sfull, tail, pt, s0 == 0, 5); break;
                case 4: gemm_tile(xt, n_in, wt, s0, s1, sfull, tail, pt, s0 == 0, 4); break;
                case 3: gemm_tile(xt, n_in, wt, s0, s1, sfull, tail, pt, s0 == 0, 3); break;
                case 2: gemm_tile(xt, n_in, wt, s0, s1, sfull, tail, pt, s0 == 0, 2); break;
                default: gemm_tile(xt, n_in, wt, s0, s1, sfull, tail, pt, s0 == 0, 1); break;
                }
            }
        }
        for (int jt = 0; jt < ntiles; jt++) {
            const int r = n0 + jt * MM_NR;
            const int nr = n1 - r < MM_NR ? n1 - r : MM_NR;
            const __mmask8 sm = (__mmask8)((1u << nr) - 1u);
            const __m512 *pt = part + (size_t)jt * (MM_MR * MM_NR);
            for (int i = 0; i < mt; i++) {
                const __m512 *a = pt + i * MM_NR;
                _mm_mask_storeu_ps(j->y + (size_t)(t0 + i) * j->n_out + r, sm,
                                   cake_fold4(a[0], a[1], a[2], a[3]));
            }
        }
    }
}

#endif /* CAKE_AVX512 */

/* Contiguous row ranges, a multiple of MM_NR rows each, one per thread. */
static int split_rows(mm_job *j, int n_threads) {
    int per = (j->n_out + n_threads - 1) / n_threads;
    per = (per + MM_NR - 1) / MM_NR * MM_NR;
    j->rows_per_task = per;
    return (j->n_out + per - 1) / per;
}

int cake_matmul(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                int n_out, cake_threadpool *pool) {
    if (!dtype_ok(w_dtype)) return -1;
    if (n_tokens <= 0 || n_out <= 0) return 0;
    if (n_in <= 0) {
        memset(y, 0, (size_t)n_tokens * n_out * sizeof(float));
        return 0;
    }
    mm_job j = {.y = y, .x = x, .w = w, .dt = w_dtype, .T = n_tokens, .n_in = n_in, .n_out = n_out};
    const int n_threads = cake_threadpool_size(pool);
#ifdef CAKE_AVX512
    if (n_tokens >= MM_GEMM_MIN_TOKENS) {
        j.ksteps = (n_in + 15) / 16;
        int nc = MM_PANEL_FLOATS / (j.ksteps * 16) / MM_NR * MM_NR;
        j.nc = nc < MM_NR ? MM_NR : nc > 64 ? 64 : nc;
        j.sc_floats = (size_t)j.nc * j.ksteps * 16 + (size_t)MM_MR * j.nc * 16;
        j.sc = aligned_alloc(64, j.sc_floats * sizeof(float) * (size_t)n_threads);
        /* Without scratch the decode kernel does the job: slower, same bits. */
        if (j.sc) {
            cake_threadpool_run(pool, (n_out + j.nc - 1) / j.nc, gemm_task, &j);
            free(j.sc);
            return 0;
        }
    }
    cake_threadpool_run(pool, split_rows(&j, n_threads), gemv_task, &j);
#else
    cake_threadpool_run(pool, split_rows(&j, n_threads), lanes_task, &j);
#endif
    return 0;
}
