/* Micro-benchmark of the CPU kernels on llama-1b shapes (dim 2048, ffn 8192,
 * vocab 32000, 32 heads / 8 KV heads, head_dim 64), plus mha-160m attention
 * and a loaded chunk's install into the KV cache.
 *
 *   bench_kernels [--threads N] [--quick] [--only matmul|attention|misc|install]
 *
 * Each figure is the best of several runs (the machine is shared; the best run
 * is the one least disturbed). Matmul: GFLOP/s = 2*T*n_out*n_in / time, and the
 * weight bytes streamed per second (for T = 1 from memory, not the L3 cache);
 * OpenBLAS sgemm on f32 weights is timed alongside for comparison. Attention: one layer's call;
 * GFLOP/s counts the causal half, 4*n_heads*head_dim*sum(keys per query). Decode is timed
 * twice: with the KV in the caches (calls back to back), and with it in memory, as in a
 * model, where the weights read since the layer's last call have evicted it. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/kernels.h"
#include "kv/kv_cache.h"
#include "model/gguf.h"
#include "util/clock.h"
#include "util/q8_0.h"

static uint64_t rng = 88172645463325252ull;
static float rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)(rng >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* best time of runs within a budget: one warm-up, then at least `min_runs` */
typedef void (*bench_fn)(void *ctx);
static double best_time(bench_fn fn, void *ctx, double budget_s, int min_runs) {
    fn(ctx);
    double best = 1e30;
    const double end = cake_now_s() + budget_s;
    for (int r = 0; r < min_runs || cake_now_s() < end; r++) {
        const double t0 = cake_now_s();
        fn(ctx);
        const double dt = cake_now_s() - t0;
        if (dt < best) best = dt;
        if (r > 1000) break;
    }
    return best;
}

/* ===================== matmul ===================== */

typedef struct {
    float *y;
    const float *x;
    const void *w;
    int dtype, T, n_in, n_out;
    cake_threadpool *pool;
    int n_rot;        /* matmuls per timed run, each on W at a different offset */
    size_t rot_bytes; /* bytes between those offsets */
} mm_ctx;

static void run_matmul(void *p) {
    mm_ctx *c = p;
    for (int i = 0; i < c->n_rot; i++)
        if (cake_matmul(c->y, c->x, (const char *)c->w + (size_t)i * c->rot_bytes, c->dtype, c->T,
                        c->n_in, c->n_out, c->pool)) {
            fprintf(stderr, "bench_kernels: cake_matmul failed\n");
            exit(1);
        }
}

static void run_sgemm(void *p) {
    mm_ctx *c = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c->T, c->n_out, c->n_in, 1.0f, c->x,
                c->n_in, (const float *)c->w, c->n_in, 0.0f, c->y, c->n_out);
}

static void bench_matmul(cake_threadpool *pool, int n_threads, int quick) {
    const int shapes[][2] = {{2048, 2048}, {8192, 2048}, {2048, 8192}, {32000, 2048}};
    const int Ts[] = {1, 512, 2048};
    const int n_shapes = quick ? 3 : 4, n_T = quick ? 2 : 3;
    size_t max_w = 0, max_x = 0, max_y = 0;
    for (int s = 0; s < n_shapes; s++) {
        const size_t nw = (size_t)shapes[s][0] * shapes[s][1];
        if (nw > max_w) max_w = nw;
        const size_t nx = (size_t)Ts[n_T - 1] * shapes[s][1],
                     ny = (size_t)Ts[n_T - 1] * shapes[s][0];
        if (nx > max_x) max_x = nx;
        if (ny > max_y) max_y = ny;
    }
    float *x = xmalloc(max_x * 4), *y = xmalloc(max_y * 4), *w32 = xmalloc(max_w * 4);
    cake_f16 *w16 = xmalloc(max_w * 2);
    uint8_t *wq = xmalloc(max_w / CAKE_Q8_0_BLOCK * CAKE_Q8_0_BYTES),
            *wx16 = xmalloc(max_w / CAKE_Q8_0_BLOCK * CAKE_Q8_0_BYTES + 16 * 8192 * 2),
            *wq4 = xmalloc(max_w / 256 * 144);
    /* Q4_K blocks: random levels and 6-bit scales under small d, dmin (the
     * time depends on the shape, not on the values) */
    for (size_t b = 0; b < max_w / 256; b++) {
        const cake_f16 d = cake_f32_to_f16(0.001f), dmin = cake_f32_to_f16(0.004f);
        memcpy(wq4 + b * 144, &d, 2);
        memcpy(wq4 + b * 144 + 2, &dmin, 2);
        for (int i = 4; i < 144; i++) wq4[b * 144 + i] = (uint8_t)(rnd() * 127.0f + 128.0f);
    }
    for (size_t i = 0; i < max_x; i++) x[i] = rnd();
    for (size_t i = 0; i < max_w; i++) {
        w32[i] = rnd() * 0.05f;
        w16[i] = cake_f32_to_f16(w32[i]);
    }
    for (size_t b = 0; b < max_w / CAKE_Q8_0_BLOCK; b++)
        cake_q8_0_quantize_block(w32 + b * CAKE_Q8_0_BLOCK, wq + b * CAKE_Q8_0_BYTES);
    openblas_set_num_threads(n_threads);
    printf("== matmul y(T, n_out) = x(T, n_in) W^T, %d threads ==\n", n_threads);
    printf("%-6s %-12s %5s %10s %9s %9s | %s\n", "W", "n_out x n_in", "T", "ms", "GFLOP/s",
           "W GB/s", "openblas sgemm (f32 W) ms, GFLOP/s");
    const int dtypes[] = {CAKE_DTYPE_Q4_K_X16, CAKE_DTYPE_Q8_0_X16, CAKE_DTYPE_F16, CAKE_DTYPE_F32};
    for (int di = 0; di < 4; di++) {
        const int dtype = dtypes[di];
        for (int s = 0; s < n_shapes; s++) {
            const int n_out = shapes[s][0], n_in = shapes[s][1];
            /* The whole weight buffer as rows of n_in; Q8_0 repacked for it. */
            const size_t rows = max_w / (size_t)n_in;
            const void *w = dtype == CAKE_DTYPE_F16 ? (const void *)w16 : (const void *)w32;
            const double es = dtype == CAKE_DTYPE_F32   ? 4
                              : dtype == CAKE_DTYPE_F16 ? 2
                              : dtype == CAKE_DTYPE_Q4_K_X16
                                  ? 4.625 / 8
                                  : (double)CAKE_Q8_0_BYTES / CAKE_Q8_0_BLOCK;
            if (dtype == CAKE_DTYPE_Q8_0_X16) {
                cake_q8_0_pack_x16(wx16, wq, (int)rows, n_in);
                w = wx16;
            } else if (dtype == CAKE_DTYPE_Q4_K_X16) { /* fits: 4.625 bits < Q8_0's 8.5 */
                cake_kquant_pack_x16(CAKE_DTYPE_Q4_K_X16, wx16, wq4, (int)rows, n_in);
                w = wx16;
            }
            for (int ti = 0; ti < n_T; ti++) {
                const int T = Ts[ti];
                mm_ctx c = {y, x, w, dtype, T, n_in, n_out, pool, 1, 0};
                /* decode: 8 matmuls on W at offsets spread over the whole weight
                 * buffer (>= 128 MiB), so W streams from memory as in a model
                 * rather than from the L3 cache (offsets in whole 16-row groups) */
                if (T == 1 && rows > (size_t)n_out) {
                    c.n_rot = 8;
                    c.rot_bytes = (size_t)((double)((rows - n_out) / 7 / 16 * 16) * n_in * es);
                }
                const double flop = 2.0 * T * n_out * n_in;
                const double budget = T == 1 ? 0.5 : 1.0;
                const double t = best_time(run_matmul, &c, budget, 2) / c.n_rot;
                const double wbytes = (double)n_out * n_in * es;
                printf("%-6s %5d x %-5d %5d %10.3f %9.1f %9.1f",
                       dtype == CAKE_DTYPE_F32        ? "f32"
                       : dtype == CAKE_DTYPE_F16      ? "f16"
                       : dtype == CAKE_DTYPE_Q4_K_X16 ? "q4_k"
                                                      : "q8_0",
                       n_out, n_in, T, t * 1e3, flop / t * 1e-9, wbytes / t * 1e-9);
                if (dtype == CAKE_DTYPE_F32) {
                    mm_ctx b = c;
                    b.w = w32;
                    const double tb = best_time(run_sgemm, &b, budget, 2); /* one W: cached */
                    printf(" | %9.3f %7.1f", tb * 1e3, flop / tb * 1e-9);
                }
                printf("\n");
                fflush(stdout);
            }
        }
    }
    free(x);
    free(y);
    free(w32);
    free(w16);
    free(wq);
    free(wq4);
    free(wx16);
}

/* ===================== attention ===================== */

typedef struct {
    cake_attn_args a;
    cake_threadpool *pool;
    int chunk; /* > 0: run the prefill in chunks of this many tokens */
} att_ctx;

static void run_attention(void *p) {
    att_ctx *c = p;
    if (c->chunk <= 0) {
        cake_attention(&c->a, c->pool);
        return;
    }
    const size_t row = (size_t)c->a.n_heads * c->a.head_dim;
    for (int p0 = 0; p0 < c->a.n_tokens; p0 += c->chunk) {
        cake_attn_args b = c->a;
        b.pos0 = c->a.pos0 + p0;
        b.n_tokens = c->a.n_tokens - p0 < c->chunk ? c->a.n_tokens - p0 : c->chunk;
        b.q = c->a.q + (size_t)p0 * row;
        b.out = c->a.out + (size_t)p0 * row;
        cake_attention(&b, c->pool);
    }
}

/* One decode call as it runs in a model, where the weights streamed since
 * the layer's last call have evicted its KV from the caches: best of `runs`
 * calls, each after reading `evict` (larger than the last-level cache). */
static double cold_time(bench_fn fn, void *ctx, const float *evict, size_t n_evict, int runs) {
    double best = 1e30;
    volatile float sink = 0;
    for (int r = 0; r < runs; r++) {
        float acc = 0;
        for (size_t i = 0; i < n_evict; i += 16) acc += evict[i];
        sink += acc;
        const double t0 = cake_now_s();
        fn(ctx);
        const double dt = cake_now_s() - t0;
        if (dt < best) best = dt;
    }
    (void)sink;
    return best;
}

/* An f16 cache, or a Q8_0 one (int8 elements, an f16 scale per 32: the
 * bytes read per element are 34 / 32 instead of 2), or a Q4_0 one (18 / 32). */
static void bench_attention_shape(const char *name, int n_heads, int n_kv_heads, int n_layers,
                                  enum cake_kv_type kv_type, cake_threadpool *pool, int quick) {
    const int hd = 64, n_max = 2048, q8 = kv_type == CAKE_KV_Q8_0, q4 = kv_type == CAKE_KV_Q4_0;
    const size_t nq = (size_t)n_max * n_heads * hd, nkv = (size_t)n_max * n_kv_heads * hd;
    float *q = xmalloc(nq * 4), *out = xmalloc(nq * 4);
    void *k = xmalloc(nkv * 2), *v = xmalloc(nkv * 2);
    cake_f16 *ks = xmalloc(nkv / 32 * 2), *vs = xmalloc(nkv / 32 * 2);
    for (size_t i = 0; i < nq; i++) q[i] = rnd();
    for (size_t i = 0; i < nkv; i++) {
        if (q8 || q4) { /* (Q4_0: any bytes are two values) */
            ((int8_t *)k)[i] = (int8_t)(rnd() * 127);
            ((int8_t *)v)[i] = (int8_t)(rnd() * 127);
        } else {
            ((cake_f16 *)k)[i] = cake_f32_to_f16(rnd());
            ((cake_f16 *)v)[i] = cake_f32_to_f16(rnd());
        }
    }
    for (size_t i = 0; i < nkv / 32; i++) {
        ks[i] = cake_f32_to_f16(1.0f / 127);
        vs[i] = cake_f32_to_f16(1.0f / 127);
    }
    const double kv_bytes = q8 ? 34.0 / 32 : q4 ? 18.0 / 32 : 2.0; /* per element read */
    const size_t n_evict = (size_t)128 << 20 >> 2;                 /* 128 MiB of floats */
    float *evict = xmalloc(n_evict * 4);
    for (size_t i = 0; i < n_evict; i++) evict[i] = (float)(i & 7);
    const int Ns[] = {512, 2048};
    for (int ni = 0; ni < 2; ni++) {
        const int N = Ns[ni];
        att_ctx c = {{.n_tokens = N,
                      .pos0 = 0,
                      .n_heads = n_heads,
                      .n_kv_heads = n_kv_heads,
                      .head_dim = hd,
                      .kv_type = kv_type,
                      .kv_ctx = n_max,
                      .q = q,
                      .k = k,
                      .v = v,
                      .k_scales = q8 || q4 ? ks : NULL,
                      .v_scales = q8 || q4 ? vs : NULL,
                      .out = out},
                     pool,
                     0};
        const double flop = 4.0 * n_heads * hd * ((double)N * (N + 1) / 2);
        double t = best_time(run_attention, &c, quick ? 0.5 : 1.5, 2);
        printf("%-9s prefill %4d tokens, all at once: %8.2f ms/layer %7.1f GFLOP/s  (x%d layers: "
               "%.2f s)\n",
               name, N, t * 1e3, flop / t * 1e-9, n_layers, t * n_layers);
        c.chunk = 512;
        if (N > 512) {
            t = best_time(run_attention, &c, quick ? 0.5 : 1.5, 2);
            printf("%-9s prefill %4d tokens, chunks of 512: %7.2f ms/layer %7.1f GFLOP/s\n", name,
                   N, t * 1e3, flop / t * 1e-9);
        }
        att_ctx d = c;
        d.chunk = 0;
        d.a.n_tokens = 1;
        d.a.pos0 = N - 1;
        d.a.q = q + (size_t)(N - 1) * n_heads * hd;
        t = best_time(run_attention, &d, 0.3, 5);
        printf("%-9s decode at context %4d: %8.1f us/layer, KV read %5.1f GB/s  (x%d layers: %.2f "
               "ms)\n",
               name, N, t * 1e6, 2.0 * N * n_kv_heads * hd * kv_bytes / t * 1e-9, n_layers,
               t * n_layers * 1e3);
        t = cold_time(run_attention, &d, evict, n_evict, 30);
        printf("%-9s decode at context %4d, KV from memory: %6.1f us/layer, KV read %5.1f GB/s\n",
               name, N, t * 1e6, 2.0 * N * n_kv_heads * hd * kv_bytes / t * 1e-9);
        fflush(stdout);
    }
    free(q);
    free(out);
    free(k);
    free(v);
    free(ks);
    free(vs);
    free(evict);
}

/* ===================== misc ===================== */

static void empty_task(void *ctx, int task, int tid) {
    (void)ctx;
    (void)task;
    (void)tid;
}

typedef struct {
    cake_threadpool *pool;
    int n;
} disp_ctx;

static void run_dispatch(void *p) {
    disp_ctx *c = p;
    for (int i = 0; i < c->n; i++) cake_threadpool_run(c->pool, 2, empty_task, NULL);
}

typedef struct {
    float *a, *b, *w;
    int T, dim;
    double rope_freqs[32]; /* head_dim 64, theta 500000 */
} ew_ctx;

static void run_rmsnorm(void *p) {
    ew_ctx *c = p;
    cake_rmsnorm(c->b, c->a, c->w, c->T, c->dim, 1e-5f);
}
static void run_rope(void *p) {
    ew_ctx *c = p;
    cake_rope(c->a, c->T, 32, 64, 1000, c->rope_freqs);
}
static void run_swiglu(void *p) {
    ew_ctx *c = p;
    cake_swiglu(c->b, c->a, c->w, (size_t)c->T * c->dim);
}
static void run_f16(void *p) {
    ew_ctx *c = p;
    cake_f32_to_f16_row(c->a, (cake_f16 *)c->b, (size_t)c->T * c->dim);
    cake_f16_to_f32_row((const cake_f16 *)c->b, c->w, (size_t)c->T * c->dim);
}

static void bench_misc(cake_threadpool *pool) {
    printf("== misc ==\n");
    disp_ctx dc = {pool, 10000};
    double t = best_time(run_dispatch, &dc, 0.5, 3);
    printf("threadpool dispatch (2 empty tasks): %.2f us per run\n", t / dc.n * 1e6);
    const int T = 512, dim = 2048, ffn = 8192;
    float *a = xmalloc((size_t)T * ffn * 4), *b = xmalloc((size_t)T * ffn * 4),
          *w = xmalloc((size_t)T * ffn * 4);
    for (size_t i = 0; i < (size_t)T * ffn; i++) {
        a[i] = rnd();
        w[i] = rnd();
    }
    ew_ctx c = {a, b, w, T, dim, {0}};
    for (int i = 0; i < 32; i++) c.rope_freqs[i] = pow(500000.0, -2.0 * i / 64);
    t = best_time(run_rmsnorm, &c, 0.3, 3);
    printf("rmsnorm %d x %d: %.3f ms\n", T, dim, t * 1e3);
    t = best_time(run_rope, &c, 0.3, 3);
    printf("rope %d tokens x 32 heads x 64: %.3f ms\n", T, t * 1e3);
    c.dim = ffn;
    t = best_time(run_swiglu, &c, 0.3, 3);
    printf("swiglu %d x %d: %.3f ms\n", T, ffn, t * 1e3);
    c.dim = dim;
    t = best_time(run_f16, &c, 0.3, 3);
    printf("f32->f16->f32 rows, %d values: %.3f ms\n", T * dim, t * 1e3);
    free(a);
    free(b);
    free(w);
}

/* ===================== chunk install ===================== */

typedef struct {
    cake_kv_cache kv;
    uint8_t *k, *v; /* position-major rows of every layer, as in a stored chunk */
    int pos0, n;
} install_ctx;

static void run_put(void *p) {
    install_ctx *c = p;
    const size_t layer = (size_t)c->n * c->kv.row_bytes;
    for (int l = 0; l < c->kv.n_layers; l++)
        cake_kv_put(&c->kv, l, c->pos0, c->n, c->k + l * layer, c->v + l * layer);
}

static void run_get(void *p) {
    install_ctx *c = p;
    const size_t layer = (size_t)c->n * c->kv.row_bytes;
    for (int l = 0; l < c->kv.n_layers; l++)
        cake_kv_get(&c->kv, l, c->pos0, c->n, c->k + l * layer, c->v + l * layer);
}

/* A loaded chunk of mha-160m (512 tokens, 12 layers x 12 KV heads x 64) into
 * the KV cache (cake_kv_put, what an I/O worker does after a load) and back
 * out (cake_kv_get, a write-back), per KV type; GB/s of the chunk's bytes. */
static void bench_install(void) {
    printf("== chunk install: mha-160m, 512 tokens at position 512, one thread ==\n");
    const enum cake_kv_type types[] = {CAKE_KV_F16, CAKE_KV_Q8_0, CAKE_KV_Q4_0};
    const char *names[] = {"f16", "q8_0", "q4_0"};
    for (int i = 0; i < 3; i++) {
        install_ctx c = {.pos0 = 512, .n = 512};
        char err[256];
        if (cake_kv_cache_init(&c.kv, 12, 2048, 12, 64, types[i], err, sizeof(err))) {
            fprintf(stderr, "bench_kernels: %s\n", err);
            exit(1);
        }
        cake_kv_cache_prefault(&c.kv);
        const size_t bytes = (size_t)c.kv.n_layers * c.n * c.kv.row_bytes;
        c.k = xmalloc(bytes);
        c.v = xmalloc(bytes);
        for (size_t j = 0; j < bytes; j++) { /* any bytes: put and get only move them */
            c.k[j] = (uint8_t)(rng = rng * 6364136223846793005ull + 1, rng >> 59);
            c.v[j] = (uint8_t)(rng >> 51);
        }
        const double put = best_time(run_put, &c, 0.5, 5), get = best_time(run_get, &c, 0.5, 5);
        printf("%-5s %5.1f MB: put %6.2f ms (%5.2f GB/s), get %6.2f ms (%5.2f GB/s)\n", names[i],
               2.0 * bytes / 1e6, put * 1e3, 2.0 * bytes / put / 1e9, get * 1e3,
               2.0 * bytes / get / 1e9);
        free(c.k);
        free(c.v);
        cake_kv_cache_free(&c.kv);
    }
}

int main(int argc, char **argv) {
    int n_threads = 2, quick = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            n_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else {
            fprintf(stderr,
                    "usage: %s [--threads N] [--quick] [--only matmul|attention|misc|install]\n",
                    argv[0]);
            return 2;
        }
    }
    if (n_threads < 1) n_threads = 1;
    cake_threadpool *pool = cake_threadpool_create(n_threads);
    if (!pool) {
        fprintf(stderr, "bench_kernels: cannot start %d threads\n", n_threads);
        return 1;
    }
    if (!only || !strcmp(only, "misc")) bench_misc(pool);
    if (!only || !strcmp(only, "install")) bench_install();
    if (!only || !strcmp(only, "attention")) {
        printf("== attention (f16 KV, head_dim 64, %d threads) ==\n", n_threads);
        bench_attention_shape("llama-1b", 32, 8, 16, CAKE_KV_F16, pool, quick);
        bench_attention_shape("mha-160m", 12, 12, 12, CAKE_KV_F16, pool, quick);
        printf("== attention (q8_0 KV, head_dim 64, %d threads) ==\n", n_threads);
        bench_attention_shape("llama-1b", 32, 8, 16, CAKE_KV_Q8_0, pool, quick);
        bench_attention_shape("mha-160m", 12, 12, 12, CAKE_KV_Q8_0, pool, quick);
        printf("== attention (q4_0 KV, head_dim 64, %d threads) ==\n", n_threads);
        bench_attention_shape("llama-1b", 32, 8, 16, CAKE_KV_Q4_0, pool, quick);
        bench_attention_shape("mha-160m", 12, 12, 12, CAKE_KV_Q4_0, pool, quick);
    }
    if (!only || !strcmp(only, "matmul")) bench_matmul(pool, n_threads, quick);
    cake_threadpool_free(pool);
    return 0;
}
