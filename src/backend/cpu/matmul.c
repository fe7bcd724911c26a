/* y (T, n_out) = x (T, n_in) . W^T with W (n_out, n_in) in F32, F16 or BF16,
 * read in place from the (read-only, mmapped) model file: W is not converted
 * or copied up front, so memory stays at the file's size. Q8_0 weights take
 * a path of their own (integer dot products), at the end of this file.
 *
 * One reduction order for every path. Each output is
 *     lane[l] = FMA chain over k = l, l+16, l+32, ... (k < n_in) of x[k]*w[k]
 *     y = fold16(lane)                     (the fixed tree in simd.h)
 * so the result for a token never depends on how many tokens share the call,
 * how the rows were split into panels or across threads, or which loop order
 * ran. Chunked prefill, decode and a whole-prompt prefill produce the same
 * bits, and cake_matmul_lanes() (portable scalar code) reproduces them.
 *
 * Why not OpenBLAS sgemm on converted panels: its per-element order
 * (sequential FMAs within K blocks whose size the library build picks) cannot
 * be matched by a decode kernel that streams W rows, so a token computed in a
 * batch of 1 would differ from the same token in a batch of 512; and the
 * conversion pass costs memory traffic. This "dot-product" kernel keeps 16-lane
 * accumulators per output, the order a row-streaming decode kernel has
 * naturally, and converts f16/bf16 in registers (vcvtph2ps / a shift), at
 * sgemm's speed on this machine (bench/bench_kernels.c prints both).
 *
 * The kernel: a 6-token x 4-row register tile (24 accumulators), per 16-element
 * k step 4 W loads (converted in registers) and 6 x loads for 24 FMAs; folded
 * and stored at the end of K. Threads take tasks of 64 W rows (dynamically):
 *  - few tokens (decode, small chunks): each 4-row group against every
 *    6-token tile, over all of K. The group is read from memory once and
 *    stays in L1/L2 for the later tiles; decode streams W at memory speed.
 *  - 32 tokens or more: x is packed once per call (up to MM_XP_MAX bytes of
 *    it: larger batches go in slices), 6-token tile after tile; then blocks
 *    of 24 tokens x 512 elements of K. Each tile's packed x block (12 KiB,
 *    stays in L1) passes over the task's 16 groups, whose W slices stay in
 *    L2 for the block's other tiles; the accumulators wait in memory between
 *    K blocks (the same chains). ~93% of the FMA peak on a Zen 4; on a Xeon
 *    VM (two FMA units, where a tile's rows read in place, n_in apart, all
 *    fell in one L1 set) packing took one thread from ~0.6 to ~0.85 of
 *    OpenBLAS sgemm's speed. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/simd.h"
#include "model/gguf.h"
#include "util/q8_0.h"

/* Kernel shape and blocking (see the top of the file). */
#define MM_MR               6   /* tokens per register tile */
#define MM_NR               4   /* W rows per register tile */
#define MM_PANEL_MIN_TOKENS 32  /* from this batch size on, panels of MM_PANEL rows */
#define MM_PANEL            64  /* W rows per panel (task) */
#define MM_TB               24  /* tokens per block for large batches (4 tiles) */
#define MM_KB               512 /* K elements per block for large batches */
/* accumulators of one block: MM_TB / MM_MR tiles x MM_PANEL / MM_NR groups */
#define MM_ACC_VECS   ((MM_TB / MM_MR) * (MM_PANEL / MM_NR) * MM_MR * MM_NR)
#define MM_SEQ_MAX_IN 4096       /* one token: rows one by one up to this n_in */
#define MM_XP_MAX     (64 << 20) /* packed x per call at most (bytes) */

/* The layouts of matmul_kquant.c. */
static bool is_kquant(int dt) {
    return dt >= CAKE_DTYPE_Q4_K_X16 && dt <= CAKE_DTYPE_Q3_K_X16; /* consecutive */
}

static int dtype_ok(int dt, int n_in) {
    return dt == CAKE_DTYPE_F32 || dt == CAKE_DTYPE_F16 || dt == CAKE_DTYPE_BF16 ||
           (dt == CAKE_DTYPE_Q8_0_X16 && n_in % CAKE_Q8_0_BLOCK == 0) ||
           (is_kquant(dt) && n_in % 256 == 0);
}

static float w_at(const void *w, int dt, size_t i) {
    switch (dt) {
    case CAKE_DTYPE_F32:
        return ((const float *)w)[i];
    case CAKE_DTYPE_F16:
        return cake_f16_to_f32(((const cake_f16 *)w)[i]);
    default:
        return cake_bf16_to_f32(((const cake_bf16 *)w)[i]);
    }
}

/* ===================== reference ===================== */

int cake_matmul_ref(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                    int n_out) {
    if (!dtype_ok(w_dtype, n_in)) return -1;
    if (w_dtype == CAKE_DTYPE_Q8_0_X16) return cake_matmul_q8_0_ref(y, x, w, n_tokens, n_in, n_out);
    if (is_kquant(w_dtype)) return cake_matmul_kquant_ref(w_dtype, y, x, w, n_tokens, n_in, n_out);
    for (int t = 0; t < n_tokens; t++)
        for (int n = 0; n < n_out; n++) {
            double s = 0.0;
            for (int k = 0; k < n_in; k++)
                s += (double)x[(size_t)t * n_in + k] *
                     (double)w_at(w, w_dtype, (size_t)n * n_in + k);
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
    if (!dtype_ok(w_dtype, n_in)) return -1;
    if (w_dtype == CAKE_DTYPE_Q8_0_X16)
        cake_matmul_q8_0_lanes(y, x, w, n_tokens, n_in, n_out);
    else if (is_kquant(w_dtype))
        cake_matmul_kquant_lanes(w_dtype, y, x, w, n_tokens, n_in, n_out);
    else
        lanes_rows(y, x, w, w_dtype, n_tokens, n_in, n_out, 0, n_out);
    return 0;
}

/* ===================== threaded drivers ===================== */

typedef struct {
    float *y;
    const float *x;
    const void *w;
    int dt, T, n_in, n_out;
#ifdef CAKE_AVX512
    __m512 *acc; /* many tokens: MM_ACC_VECS of scratch per thread */
    float *xp;   /* many tokens: x packed by pack_x_task, tile after tile */
    int kp;      /* n_in rounded up to 16: one packed tile is MM_MR * kp floats */
#endif
} mm_job;

static void lanes_task(void *ctx, int task, int tid) {
    (void)tid;
    const mm_job *j = ctx;
    const int r0 = task * MM_PANEL;
    const int r1 = r0 + MM_PANEL < j->n_out ? r0 + MM_PANEL : j->n_out;
    lanes_rows(j->y, j->x, j->w, j->dt, j->T, j->n_in, j->n_out, r0, r1);
}

#ifdef CAKE_AVX512

#define UNROLL _Pragma("GCC unroll 8")

CAKE_INLINE __m512 w_load(const void *w, int dt, size_t off) {
    switch (dt) {
    case CAKE_DTYPE_F32:
        return _mm512_loadu_ps((const float *)w + off);
    case CAKE_DTYPE_F16:
        return cake_load_f16((const cake_f16 *)w + off);
    default:
        return cake_load_bf16((const cake_bf16 *)w + off);
    }
}

CAKE_INLINE __m512 w_maskload(const void *w, int dt, size_t off, __mmask16 m) {
    switch (dt) {
    case CAKE_DTYPE_F32:
        return _mm512_maskz_loadu_ps(m, (const float *)w + off);
    case CAKE_DTYPE_F16:
        return cake_maskload_f16((const cake_f16 *)w + off, m);
    default:
        return cake_maskload_bf16((const cake_bf16 *)w + off, m);
    }
}

/* Keeps a loaded x vector in a register: without this GCC folds the load into
 * every FMA that uses it, re-reading it from L1 once per W row. */
#define KEEP(v) __asm__("" : "+v"(v))

/* Where the tile finds x: token i's elements k..k+15 at
 * x + i * ti + (k - k0) / 16 * tk (k0 the start of the tile's K range). The
 * rows of the batch: ti = n_in, tk = 16. A packed block: ti = 16, tk = 16 * MM_MR. */
typedef struct {
    const float *x;
    size_t ti, tk;
} mm_x;

CAKE_INLINE const float *x_at(mm_x x, int i, int k, int k0) {
    return x.x + (size_t)i * x.ti + (size_t)((k - k0) / 16) * x.tk;
}

/* ---- the register tile: MT tokens x NR rows of W (rows r..r+NR-1) ----
 * 24 accumulators, each a 16-lane FMA chain over k in [k0, k1); then, at the
 * end of K, each token's 4 rows are folded together and stored. A tile that
 * runs over K in blocks (acc != NULL) keeps its chains in acc between blocks:
 * the same FMAs in the same order, so the same bits. W is converted to f32 in
 * registers. */
CAKE_INLINE void mm_tile(float *y, int n_out, mm_x x, int n_in, const void *w, const int dt, int r,
                         int k0, int k1, __m512 *acc_mem, const int MT, const int NR,
                         const int SEQ) {
    __m512 acc[MM_MR][MM_NR];
    UNROLL for (int i = 0; i < MM_MR; i++) UNROLL for (int j = 0; j < MM_NR; j++) acc[i][j] =
        acc_mem && k0 > 0 && i < MT && j < NR ? acc_mem[i * MM_NR + j] : _mm512_setzero_ps();
    const size_t wr = (size_t)r * n_in;
    const int kf = n_in & ~15, ke = k1 < kf ? k1 : kf;
    if (SEQ && MT == 1) {
        /* One token, few tokens in the batch: the 4 rows one after another,
         * so W is read as a single sequential stream. This machine's hardware
         * prefetcher follows one stream far better than 4 interleaved ones
         * (decode: ~29 vs ~18 GB/s per thread at n_in 2048); the FMA chains
         * are the same. Once x outgrows L1 (n_in > 4096) reading it 4 times
         * costs more than that gains, and the interleaved loop runs. */
        UNROLL for (int j = 0; j < NR; j++) for (int k = k0; k < ke; k += 16) acc[0][j] =
            _mm512_fmadd_ps(_mm512_loadu_ps(x_at(x, 0, k, k0)),
                            w_load(w, dt, wr + (size_t)j * n_in + k), acc[0][j]);
    } else
        for (int k = k0; k < ke; k += 16) {
            __m512 wv[MM_NR];
            UNROLL for (int j = 0; j < MM_NR; j++) wv[j] =
                j < NR ? w_load(w, dt, wr + (size_t)j * n_in + k) : _mm512_setzero_ps();
            UNROLL for (int i = 0; i < MT; i++) {
                __m512 xv = _mm512_loadu_ps(x_at(x, i, k, k0));
                KEEP(xv);
                UNROLL for (int j = 0; j < NR; j++) acc[i][j] =
                    _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    if (k1 < n_in) { /* more blocks of K to come */
        UNROLL for (int i = 0; i < MT; i++) UNROLL for (int j = 0; j < NR; j++)
            acc_mem[i * MM_NR + j] = acc[i][j];
        return;
    }
    if (kf < n_in) {
        /* n_in % 16 != 0: the masked last step, both operands 0 past n_in */
        const __mmask16 m = cake_tail_mask(n_in - kf);
        __m512 wv[MM_NR];
        UNROLL for (int j = 0; j < MM_NR; j++) wv[j] =
            j < NR ? w_maskload(w, dt, wr + (size_t)j * n_in + kf, m) : _mm512_setzero_ps();
        UNROLL for (int i = 0; i < MT; i++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x_at(x, i, kf, k0));
            UNROLL for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    /* A partial tile stores its NR floats one by one: a masked 4-lane store
     * at the last rows of y reaches past its end, and gcc made of it a
     * masked VEXTRACTF32X4 to memory, which faults on this VM's Zen 4 CPU
     * when the masked-off lanes lie in an inaccessible page (unlike a
     * masked VMOVUPS). A server crashed so when its logits buffer ended at
     * a page; test_kernels puts every output before a guard page. */
    UNROLL for (int i = 0; i < MT; i++) {
        const __m128 v = cake_fold4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        float *yi = y + (size_t)i * n_out + r;
        if (NR == MM_NR) {
            _mm_storeu_ps(yi, v);
        } else {
            float lanes[4];
            _mm_storeu_ps(lanes, v);
            for (int j = 0; j < NR; j++) yi[j] = lanes[j];
        }
    }
}

CAKE_INLINE void mm_tile_any(float *y, int n_out, mm_x x, int n_in, const void *w, const int dt,
                             int r, int k0, int k1, __m512 *acc_mem, int mt, int nr,
                             const int SEQ) {
#define MM_TILE(MT, NR) mm_tile(y, n_out, x, n_in, w, dt, r, k0, k1, acc_mem, MT, NR, SEQ)
#ifdef CAKE_SANITIZED
    /* Sanitizer builds compile the whole tile and the 1 x 1 one only, and run
     * a partial tile as 1 x 1 tiles: each output is the same FMA chain and
     * fold whatever tile computes it, so the same bits. Every size took ASan
     * + UBSan 2.5 minutes to compile. */
    if (mt == MM_MR && nr == MM_NR) {
        MM_TILE(MM_MR, MM_NR);
        return;
    }
    for (int i = 0; i < mt; i++)
        for (int jr = 0; jr < nr; jr++) {
            const mm_x xi = {x.x + (size_t)i * x.ti, x.ti, x.tk};
            mm_tile(y + (size_t)i * n_out, n_out, xi, n_in, w, dt, r + jr, k0, k1,
                    acc_mem ? acc_mem + i * MM_NR + jr : NULL, 1, 1, SEQ);
        }
    return;
#endif
#define MM_TILE_NR(MT)                                                                             \
    if (nr == 4)                                                                                   \
        MM_TILE(MT, 4);                                                                            \
    else if (nr == 3)                                                                              \
        MM_TILE(MT, 3);                                                                            \
    else if (nr == 2)                                                                              \
        MM_TILE(MT, 2);                                                                            \
    else                                                                                           \
        MM_TILE(MT, 1);
    if (mt == 6) {
        MM_TILE_NR(6)
    } else if (mt == 5) {
        MM_TILE_NR(5)
    } else if (mt == 4) {
        MM_TILE_NR(4)
    } else if (mt == 3) {
        MM_TILE_NR(3)
    } else if (mt == 2) {
        MM_TILE_NR(2)
    } else {
        MM_TILE_NR(1)
    }
#undef MM_TILE_NR
#undef MM_TILE
}

/* Few tokens (decode, small chunks): rows [r0, r1) in groups of 4, each
 * group against every 6-token tile; the group's W rows are read from memory
 * once and stay in L1/L2 for the later token tiles. */
CAKE_INLINE void mm_rows_few(const mm_job *j, int r0, int r1, const int dt) {
    const int n_in = j->n_in;
    /* single-stream rows for one token (see mm_tile) while x (n_in f32) stays
     * in L1 beside the stream; past that, 4 interleaved rows read x once */
    const int seq = n_in <= MM_SEQ_MAX_IN;
    for (int r = r0; r < r1; r += MM_NR) {
        const int nr = r1 - r < MM_NR ? r1 - r : MM_NR;
        for (int t0 = 0; t0 < j->T; t0 += MM_MR) {
            const int mt = j->T - t0 < MM_MR ? j->T - t0 : MM_MR;
            float *yt = j->y + (size_t)t0 * j->n_out;
            const mm_x xt = {j->x + (size_t)t0 * n_in, (size_t)n_in, 16};
            if (seq)
                mm_tile_any(yt, j->n_out, xt, n_in, j->w, dt, r, 0, n_in, NULL, mt, nr, 1);
            else
                mm_tile_any(yt, j->n_out, xt, n_in, j->w, dt, r, 0, n_in, NULL, mt, nr, 0);
        }
    }
}

/* Many tokens: x packed once for the whole call, before the panels. Tile
 * `task` (tokens t0 .. t0 + 5) goes to xp + t0 * kp as [k / 16][i][16], zero
 * past n_in and for missing tokens, so that a tile's x for each K block is
 * contiguous. (Packed by each task instead, every panel copied all of x
 * again: 20% of the time of a 2048 x 2048 matmul of 512 tokens on a Xeon
 * VM.) */
static void pack_x_task(void *ctx, int task, int tid) {
    (void)tid;
    const mm_job *j = ctx;
    const int n_in = j->n_in, t0 = task * MM_MR, mt = j->T - t0 < MM_MR ? j->T - t0 : MM_MR;
    float *xp = j->xp + (size_t)t0 * j->kp;
    for (int k = 0; k < n_in; k += 16, xp += 16 * MM_MR) {
        const __mmask16 m = cake_tail_mask(n_in - k < 16 ? n_in - k : 16);
        for (int i = 0; i < MM_MR; i++)
            _mm512_store_ps(xp + i * 16,
                            i < mt ? _mm512_maskz_loadu_ps(m, j->x + (size_t)(t0 + i) * n_in + k)
                                   : _mm512_setzero_ps());
    }
}

/* Many tokens: the panel of rows [r0, r1) (up to MM_PANEL) in blocks of
 * MM_TB tokens x MM_KB elements of K. Within a block, each 6-token tile's
 * packed x (6 x MM_KB f32, 12 KiB) stays in L1 while it passes over the
 * panel's 4-row groups, whose W slices (MM_PANEL x MM_KB) stay in L2 for the
 * block's other tiles; the tiles' accumulators wait in acc between K blocks.
 * Read in place over all of K (rows n_in apart), a tile's 6 x rows and 4 W
 * rows fell in one L1 set at n_in 2048, and x came from L2 on every step:
 * ~0.6 of sgemm's speed on a Xeon VM. */
CAKE_INLINE void mm_rows_panel(const mm_job *j, int r0, int r1, __m512 *acc, const int dt) {
    const int n_in = j->n_in;
    for (int tb0 = 0; tb0 < j->T; tb0 += MM_TB) {
        const int tb1 = tb0 + MM_TB < j->T ? tb0 + MM_TB : j->T;
        for (int k0 = 0; k0 < n_in; k0 += MM_KB) {
            const int k1 = k0 + MM_KB < n_in ? k0 + MM_KB : n_in;
            __m512 *a = acc;
            for (int t0 = tb0; t0 < tb1; t0 += MM_MR) {
                const int mt = tb1 - t0 < MM_MR ? tb1 - t0 : MM_MR;
                float *yt = j->y + (size_t)t0 * j->n_out;
                const mm_x xt = {j->xp + (size_t)t0 * j->kp + (size_t)k0 * MM_MR, 16, 16 * MM_MR};
                for (int r = r0; r < r1; r += MM_NR, a += MM_MR * MM_NR) {
                    const int nr = r1 - r < MM_NR ? r1 - r : MM_NR;
                    mm_tile_any(yt, j->n_out, xt, n_in, j->w, dt, r, k0, k1, a, mt, nr, 0);
                }
            }
        }
    }
}

/* Rows [r0, r1) for all tokens, by batch size (dt a constant in each copy). */
CAKE_INLINE void mm_rows(const mm_job *j, int r0, int r1, int tid, const int dt) {
    if (j->T < MM_PANEL_MIN_TOKENS) {
        mm_rows_few(j, r0, r1, dt);
        return;
    }
    __m512 *acc = j->acc + (size_t)tid * MM_ACC_VECS;
    mm_rows_panel(j, r0, r1, acc, dt);
}

static void mm_task(void *ctx, int task, int tid) {
    const mm_job *j = ctx;
    const int r0 = task * MM_PANEL;
    const int r1 = r0 + MM_PANEL < j->n_out ? r0 + MM_PANEL : j->n_out;
    switch (j->dt) {
    case CAKE_DTYPE_F32:
        mm_rows(j, r0, r1, tid, CAKE_DTYPE_F32);
        break;
    case CAKE_DTYPE_F16:
        mm_rows(j, r0, r1, tid, CAKE_DTYPE_F16);
        break;
    default:
        mm_rows(j, r0, r1, tid, CAKE_DTYPE_BF16);
        break;
    }
}

#endif /* CAKE_AVX512 */

int cake_matmul(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                int n_out, cake_threadpool *pool) {
    if (!dtype_ok(w_dtype, n_in)) return -1;
    if (n_tokens <= 0 || n_out <= 0) return 0;
    if (n_in <= 0) {
        memset(y, 0, (size_t)n_tokens * n_out * sizeof(float));
        return 0;
    }
    if (w_dtype == CAKE_DTYPE_Q8_0_X16) {
        cake_matmul_q8_0(y, x, w, n_tokens, n_in, n_out, pool);
        return 0;
    }
    if (is_kquant(w_dtype)) {
        cake_matmul_kquant(w_dtype, y, x, w, n_tokens, n_in, n_out, pool);
        return 0;
    }
    mm_job j = {.y = y, .x = x, .w = w, .dt = w_dtype, .T = n_tokens, .n_in = n_in, .n_out = n_out};
    /* Tasks of MM_PANEL rows, taken dynamically: threads that run slower
     * (memory contention, a shared machine) simply take fewer. */
    const int n_tasks = (n_out + MM_PANEL - 1) / MM_PANEL;
#ifdef CAKE_AVX512
    if (n_tokens >= MM_PANEL_MIN_TOKENS) {
        /* Large batches in slices, so that packed x stays under MM_XP_MAX
         * (a token's row is the same bits in any batch) */
        j.kp = (n_in + 15) / 16 * 16;
        const int slice = (int)(MM_XP_MAX / ((size_t)j.kp * sizeof(float))) / MM_TB * MM_TB;
        if (n_tokens > slice && slice >= MM_PANEL_MIN_TOKENS) {
            for (int t = 0; t < n_tokens; t += slice)
                cake_matmul(y + (size_t)t * n_out, x + (size_t)t * n_in, w, w_dtype,
                            n_tokens - t < slice ? n_tokens - t : slice, n_in, n_out, pool);
            return 0;
        }
        const size_t bytes = MM_ACC_VECS * sizeof(__m512) * (size_t)cake_threadpool_size(pool);
        const int n_tiles = (n_tokens + MM_MR - 1) / MM_MR;
        j.acc = aligned_alloc(64, bytes);
        j.xp = aligned_alloc(64, (size_t)n_tiles * MM_MR * j.kp * sizeof(float));
        if (!j.acc || !j.xp) { /* no memory for the scratch: the same bits, slower */
            free(j.acc);
            free(j.xp);
            cake_threadpool_run(pool, n_tasks, lanes_task, &j);
            return 0;
        }
        cake_threadpool_run(pool, n_tiles, pack_x_task, &j);
    }
    cake_threadpool_run(pool, n_tasks, mm_task, &j);
    free(j.acc);
    free(j.xp);
#else
    cake_threadpool_run(pool, n_tasks, lanes_task, &j);
#endif
    return 0;
}
