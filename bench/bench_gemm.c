/* cuBLAS GEMM speed on the forward pass's shapes: what the CUDA backend calls
 * (cublasGemmEx, CUBLAS_GEMM_DEFAULT) against each algorithm cublasLt's
 * heuristic offers for the same product, at the batch sizes of a chunk and of
 * a one-shot prefill. It answers whether the chunks' GEMMs (M = 512 tokens,
 * 8-24% slower per FLOP than one-shot's on an H100) have a better algorithm
 * than the one cuBLAS picks, before the backend is changed to ask for it.
 *
 *   bench_gemm [--shape NAME (a `cake mkmodel` shape; default longalpaca-13b)]
 *              [--tokens 512,16384] [--algos 16] [--reps 20] [--out f16|f32|both]
 *
 * Per GEMM of a layer (q/k/v, attention output, gate/up, down) and batch: the
 * default's time per call, then each heuristic algorithm's time, its config
 * (tile, and stages, split-K, swizzle, cluster shape as cublasLt.h numbers them),
 * the heuristic's wavesCount, and its largest difference from the default's
 * output over the first 4M outputs (relative to their largest magnitude). Needs a GPU; weights
 * and inputs are random f16. */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_backend.h"
#include "model/shapes.h"
#include "util/f16.h"

#define DIFF_ELEMS ((size_t)1 << 22) /* outputs compared between algorithms (the first) */

static int cuda_ok(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return 1;
    fprintf(stderr, "bench_gemm: %s: %s\n", what, cudaGetErrorString(e));
    return 0;
}

static int blas_ok(cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return 1;
    fprintf(stderr, "bench_gemm: %s: %s\n", what, cublasGetStatusString(s));
    return 0;
}

/* Random f16 in [-scale, scale] on the device. */
static void *random_f16(size_t n, float scale, unsigned *seed) {
    cake_f16 *h = (cake_f16 *)malloc(n * sizeof(cake_f16));
    void *d = NULL;
    if (!h) return NULL;
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        h[i] = cake_f32_to_f16(scale * ((float)(*seed >> 8) / 8388608.0f - 1.0f));
    }
    if (!cuda_ok(cudaMalloc(&d, n * sizeof(cake_f16)), "cudaMalloc") ||
        !cuda_ok(cudaMemcpy(d, h, n * sizeof(cake_f16), cudaMemcpyHostToDevice), "upload")) {
        cudaFree(d);
        d = NULL;
    }
    free(h);
    return d;
}

/* The output as f32 on the host, for comparing algorithms. */
static int fetch(float *dst, const void *y, size_t n, int f16_out) {
    if (!f16_out) return cuda_ok(cudaMemcpy(dst, y, n * 4, cudaMemcpyDeviceToHost), "download");
    cake_f16 *h = (cake_f16 *)malloc(n * sizeof(cake_f16));
    if (!h || !cuda_ok(cudaMemcpy(h, y, n * 2, cudaMemcpyDeviceToHost), "download")) {
        free(h);
        return 0;
    }
    for (size_t i = 0; i < n; i++) dst[i] = cake_f16_to_f32(h[i]);
    free(h);
    return 1;
}

static double max_rel_diff(const float *a, const float *b, size_t n) {
    double mx = 0, d = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)a[i]));
        d = fmax(d, fabs((double)a[i] - (double)b[i]));
    }
    return mx > 0 ? d / mx : d;
}

typedef struct {
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    cudaStream_t st;
    cudaEvent_t ev[2];
    void *ws;
    int reps;
} bench;

/* Mean time per call of fn over reps calls, after 3 warm-up calls; < 0 on error. */
typedef int (*gemm_fn)(bench *b, void *ctx);
static double time_calls(bench *b, gemm_fn fn, void *ctx) {
    for (int i = 0; i < 3; i++)
        if (!fn(b, ctx)) return -1;
    cudaEventRecord(b->ev[0], b->st);
    for (int i = 0; i < b->reps; i++)
        if (!fn(b, ctx)) return -1;
    cudaEventRecord(b->ev[1], b->st);
    float ms = 0;
    if (!cuda_ok(cudaEventSynchronize(b->ev[1]), "running the GEMMs") ||
        !cuda_ok(cudaEventElapsedTime(&ms, b->ev[0], b->ev[1]), "timing"))
        return -1;
    return ms / b->reps;
}

typedef struct {
    const void *w, *x;
    void *y;
    int m, n_out, n_in, f16_out;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    const cublasLtMatmulAlgo_t *algo;
} gemm_ctx;

/* y (m, n_out) = x (m, n_in) W^T as the backend calls it (column-major y^T =
 * W x^T with W stored (n_out, n_in) row-major). */
static int run_default(bench *b, void *p) {
    const gemm_ctx *g = (const gemm_ctx *)p;
    const float alpha = 1, beta = 0;
    return blas_ok(cublasGemmEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, g->n_out, g->m, g->n_in, &alpha,
                                g->w, CUDA_R_16F, g->n_in, g->x, CUDA_R_16F, g->n_in, &beta, g->y,
                                g->f16_out ? CUDA_R_16F : CUDA_R_32F, g->n_out, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx");
}

static int run_lt(bench *b, void *p) {
    const gemm_ctx *g = (const gemm_ctx *)p;
    const float alpha = 1, beta = 0;
    return blas_ok(cublasLtMatmul(b->lt, g->op, &alpha, g->w, g->la, g->x, g->lb, &beta, g->y,
                                  g->lc, g->y, g->lc, g->algo, b->ws, CAKE_CUDA_BLAS_WS_BYTES,
                                  b->st),
                   "cublasLtMatmul");
}

/* A config attribute of 4 bytes (or 2: the cluster shape), -1 if unreadable. */
static int algo_attr(const cublasLtMatmulAlgo_t *a, cublasLtMatmulAlgoConfigAttributes_t attr) {
    uint32_t v = 0;
    uint16_t v16 = 0;
    size_t got = 0;
    const int small = attr == CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID;
    if (cublasLtMatmulAlgoConfigGetAttribute(a, attr, small ? (void *)&v16 : (void *)&v,
                                             small ? sizeof(v16) : sizeof(v),
                                             &got) != CUBLAS_STATUS_SUCCESS)
        return -1;
    return small ? (int)v16 : (int)v;
}

/* The common tiles' names (cublasLtMatmulTile_t has hundreds); else the id. */
static const char *tile_name(int id, char *buf, size_t len) {
#define TILE(m, n)                                                                                 \
    { CUBLASLT_MATMUL_TILE_##m##x##n, #m "x" #n }
    static const struct {
        int id;
        const char *name;
    } tiles[] = {TILE(64, 64),  TILE(64, 128),  TILE(128, 64),  TILE(64, 256),  TILE(128, 128),
                 TILE(256, 64), TILE(128, 256), TILE(256, 128), TILE(64, 96),   TILE(96, 64),
                 TILE(96, 128), TILE(128, 160), TILE(160, 128), TILE(192, 128), TILE(128, 192),
                 TILE(128, 96), TILE(32, 256),  TILE(256, 32)};
#undef TILE
    for (size_t i = 0; i < sizeof(tiles) / sizeof(tiles[0]); i++)
        if (tiles[i].id == id) return tiles[i].name;
    snprintf(buf, len, "#%d", id);
    return buf;
}

static void bench_one(bench *b, const char *name, int m, int n_out, int n_in, int f16_out,
                      int n_algos, unsigned *seed) {
    gemm_ctx g;
    memset(&g, 0, sizeof(g));
    g.m = m;
    g.n_out = n_out;
    g.n_in = n_in;
    g.f16_out = f16_out;
    const size_t ysize = (size_t)m * n_out * (f16_out ? 2 : 4);
    const size_t ny = (size_t)m * n_out < DIFF_ELEMS ? (size_t)m * n_out : DIFF_ELEMS;
    float *ref = (float *)malloc(ny * sizeof(float)), *got = (float *)malloc(ny * sizeof(float));
    g.w = random_f16((size_t)n_out * n_in, 0.05f, seed);
    g.x = random_f16((size_t)m * n_in, 1.0f, seed);
    if (!ref || !got || !g.w || !g.x || !cuda_ok(cudaMalloc(&g.y, ysize), "cudaMalloc")) goto out;

    const double flop = 2.0 * m * (double)n_out * n_in;
    double t0 = time_calls(b, run_default, &g);
    if (t0 < 0 || !fetch(ref, g.y, ny, f16_out)) goto out;
    printf("%-12s M %-6d %5d -> %-5d %s out: cublasGemmEx default %8.1f us %6.0f TFLOP/s\n", name,
           m, n_in, n_out, f16_out ? "f16" : "f32", t0 * 1e3, flop / (t0 * 1e-3) / 1e12);

    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const cudaDataType_t yt = f16_out ? CUDA_R_16F : CUDA_R_32F;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res[64];
    int found = 0;
    if (n_algos > 64) n_algos = 64;
    if (!blas_ok(cublasLtMatmulDescCreate(&g.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc") ||
        !blas_ok(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)),
                 "transa") ||
        !blas_ok(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)),
                 "transb") ||
        !blas_ok(cublasLtMatrixLayoutCreate(&g.la, CUDA_R_16F, n_in, n_out, n_in), "layout W") ||
        !blas_ok(cublasLtMatrixLayoutCreate(&g.lb, CUDA_R_16F, n_in, m, n_in), "layout x") ||
        !blas_ok(cublasLtMatrixLayoutCreate(&g.lc, yt, n_out, m, n_out), "layout y") ||
        !blas_ok(cublasLtMatmulPreferenceCreate(&pref), "preference"))
        goto lt_out;
    size_t ws = CAKE_CUDA_BLAS_WS_BYTES;
    if (!blas_ok(cublasLtMatmulPreferenceSetAttribute(
                     pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
                 "workspace") ||
        !blas_ok(cublasLtMatmulAlgoGetHeuristic(b->lt, g.op, g.la, g.lb, g.lc, g.lc, pref, n_algos,
                                                res, &found),
                 "heuristic"))
        goto lt_out;
    double best = 1e30;
    int best_i = -1;
    for (int i = 0; i < found; i++) {
        if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
        g.algo = &res[i].algo;
        const double t = time_calls(b, run_lt, &g);
        if (t < 0 || !fetch(got, g.y, ny, f16_out)) continue;
        const cublasLtMatmulAlgo_t *a = &res[i].algo;
        char tile_buf[16];
        printf("    lt #%-2d %8.1f us %5.2fx  algo %d tile %s stages %d splitK %d swizzle %d "
               "cluster %d waves %.2f  diff %.1e\n",
               i, t * 1e3, t0 / t, algo_attr(a, CUBLASLT_ALGO_CONFIG_ID),
               tile_name(algo_attr(a, CUBLASLT_ALGO_CONFIG_TILE_ID), tile_buf, sizeof(tile_buf)),
               algo_attr(a, CUBLASLT_ALGO_CONFIG_STAGES_ID),
               algo_attr(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
               algo_attr(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
               algo_attr(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID), res[i].wavesCount,
               max_rel_diff(ref, got, ny));
        if (t < best) {
            best = t;
            best_i = i;
        }
    }
    if (best_i >= 0)
        printf("    best: lt #%d, %.1f us (%.2fx the default)\n", best_i, best * 1e3, t0 / best);
lt_out:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (g.lc) cublasLtMatrixLayoutDestroy(g.lc);
    if (g.lb) cublasLtMatrixLayoutDestroy(g.lb);
    if (g.la) cublasLtMatrixLayoutDestroy(g.la);
    if (g.op) cublasLtMatmulDescDestroy(g.op);
out:
    cudaFree((void *)g.w);
    cudaFree((void *)g.x);
    cudaFree(g.y);
    free(ref);
    free(got);
}

static void usage(void) {
    fprintf(stderr, "usage: bench_gemm [--shape NAME] [--tokens 512,16384] [--algos 16] "
                    "[--reps 20] [--out f16|f32|both]\n");
}

int main(int argc, char **argv) {
    const char *shape_name = "longalpaca-13b", *tokens = "512,16384", *outs = "f16";
    int n_algos = 16, reps = 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "--shape"))
            shape_name = v;
        else if (!strcmp(a, "--tokens"))
            tokens = v;
        else if (!strcmp(a, "--algos"))
            n_algos = atoi(v);
        else if (!strcmp(a, "--reps"))
            reps = atoi(v);
        else if (!strcmp(a, "--out"))
            outs = v;
        else {
            usage();
            return 2;
        }
        i++;
    }
    const cake_shape *sh = cake_shape_find(shape_name);
    if (!sh || n_algos < 1 || reps < 1 ||
        (strcmp(outs, "f16") && strcmp(outs, "f32") && strcmp(outs, "both"))) {
        fprintf(stderr, "bench_gemm: bad --shape, --algos, --reps or --out\n");
        return 2;
    }
    bench b;
    memset(&b, 0, sizeof(b));
    b.reps = reps;
    if (!cuda_ok(cudaStreamCreate(&b.st), "a stream (is there a GPU?)") ||
        !cuda_ok(cudaEventCreate(&b.ev[0]), "events") ||
        !cuda_ok(cudaEventCreate(&b.ev[1]), "events") ||
        !cuda_ok(cudaMalloc(&b.ws, CAKE_CUDA_BLAS_WS_BYTES), "the workspace") ||
        !blas_ok(cublasCreate(&b.blas), "cublasCreate") ||
        !blas_ok(cublasSetStream(b.blas, b.st), "cublasSetStream") ||
        !blas_ok(cublasSetWorkspace(b.blas, b.ws, CAKE_CUDA_BLAS_WS_BYTES), "cublasSetWorkspace") ||
        !blas_ok(cublasLtCreate(&b.lt), "cublasLtCreate"))
        return 1;
    const int dim = sh->dim, kv_dim = sh->dim / sh->n_heads * sh->n_kv_heads, ffn = sh->ffn_dim;
    const struct {
        const char *name;
        int n_out, n_in;
    } gemms[] = {{"q/k/v", dim + 2 * kv_dim, dim},
                 {"attn_output", dim, dim},
                 {"gate/up", 2 * ffn, dim},
                 {"down", dim, ffn}};
    printf("bench_gemm: shape %s, f16 weights and inputs, f32 accumulation, %d calls each\n",
           sh->name, reps);
    unsigned seed = 12345;
    for (const char *t = tokens; *t;) {
        const int m = atoi(t);
        if (m < 1) {
            fprintf(stderr, "bench_gemm: bad --tokens %s\n", tokens);
            return 2;
        }
        for (int o = 0; o < 2; o++) {
            if ((o == 0 && !strcmp(outs, "f32")) || (o == 1 && !strcmp(outs, "f16"))) continue;
            for (size_t k = 0; k < sizeof(gemms) / sizeof(gemms[0]); k++)
                bench_one(&b, gemms[k].name, m, gemms[k].n_out, gemms[k].n_in, o == 0, n_algos,
                          &seed);
        }
        t = strchr(t, ',');
        if (!t) break;
        t++;
    }
    cublasLtDestroy(b.lt);
    cublasDestroy(b.blas);
    cudaFree(b.ws);
    return 0;
}
