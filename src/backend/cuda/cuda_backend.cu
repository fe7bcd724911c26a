/* The CUDA backend: state, weight upload, the forward pass, KV transfers.
 *
 * Memory on the GPU (T = max_batch):
 *   weights, one element type for all (wtype = the file's layer dtype, F16
 *     for quantized ones; a matrix stored in another dtype is converted on the host
 *     while uploading):
 *     tok_embd (n_vocab, dim); output (n_vocab, dim), the same buffer when tied;
 *     per layer wqkv (q_dim + 2 kv_dim, dim) = [wq; wk; wv] stacked so one
 *     GEMM makes q, k and v (q_dim = n_heads * head_dim, dim but for Qwen3's
 *     wider heads); wo (dim, q_dim); wgu (2 ffn, dim) = [w_gate; w_up];
 *     wdown (dim, ffn); norms as f32.
 *     F16 and BF16 stay as they are. F32 files stay F32 (GEMMs in plain FP32,
 *     no TF32): such files are small test models, and keeping them exact keeps
 *     the GPU within the CPU's tolerance of the llama2.c golden outputs.
 *   KV cache: k_cache, v_cache (n_layers, n_ctx, kv_dim) f16, zeroed at init.
 *   RoPE table: rope_cs (n_ctx, head_dim / 2) (cos, sin) f32, made at init.
 *   scratch: x (T, dim) f32 residual stream; xh (T, max(dim, q_dim, ffn))
 *     wtype, the GEMM input (normed x, then attention output, then
 *     silu(g) * u); qkv (T, q_dim + 2 kv_dim) atype; q16 (T, q_dim) f16 roped
 *     queries; gu (T, 2 ffn)
 *     atype; logits (n_vocab) f32; part, the decode attention's split partials.
 *     atype, the type q/k/v and gate/up leave their GEMMs in, is wtype
 *     (f32 with CAKE_CUDA_GEMM_OUT=f32).
 *
 * One layer: xh = rmsnorm(x); qkv = xh Wqkv^T; (qwen3: q/k head norms);
 * rope + KV write; xh = attn;
 * x += xh Wo^T (cuBLAS beta = 1 does the residual add); xh = rmsnorm(x);
 * gu = xh Wgu^T; xh = silu(g) * u; x += xh Wdown^T.
 *
 * GEMMs are cublasGemmEx with f32 accumulation (tensor cores for f16/bf16);
 * they write f32 into the residual stream and the logits, atype else.
 * Row-major y (T, n_out) = x (T, n_in) W^T is, seen column-major,
 * y^T (n_out, T) = W (n_in, n_out)^T x^T (n_in, T): op(A) = T on W, op(B) = N.
 *
 * The forward pass runs on one stream; cake_cuda_forward synchronises before
 * it returns, so a failed kernel is reported by the call that launched it.
 *
 * KV transfers (cake_cuda_kv_write/read) come from the loader's I/O workers
 * and write-back thread while the compute thread is inside a forward pass, so
 * they must not queue behind it: each call borrows one of a few transfer
 * slots (its own non-blocking stream and two pinned bounce buffers, created on
 * first use) and synchronises only that stream. The bounce buffers make the
 * copies plain DMA that runs beside the kernels and lets several callers copy
 * at once (a pageable cudaMemcpyAsync goes through the driver's own staging);
 * the host copy of one piece overlaps the DMA of the previous one. Ordering
 * needs no events between the streams: the loader lets compute read a chunk's
 * positions only after kv_write returned, and kv_read only reads positions of
 * forward passes that returned (each synchronises its stream). */
#include "backend/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <algorithm>
#include <thread>
#include <vector>

#include "backend/cuda/common.cuh"
#include "model/dequant.h"
#include "model/model.h"
#include "util/err.h"
#include "util/f16.h"

namespace {

struct dev_layer {
    float *attn_norm, *ffn_norm; /* (dim) */
    float *bqkv;                 /* (q_dim + 2 kv_dim) q/k/v biases (0 where absent); NULL: none */
    float *q_norm, *k_norm;      /* (head_dim) qwen3's head norms; NULL: none */
    float *bqk;  /* with head norms: the q/k biases (q_dim + kv_dim) they come after (bqkv's
                    are 0 then); NULL: none */
    void *wqkv;  /* (q_dim + 2 kv_dim, dim) */
    void *wo;    /* (dim, q_dim) */
    void *wgu;   /* (2 ffn, dim) */
    void *wdown; /* (dim, ffn) */
};

/* Profiling (env CAKE_CUDA_PROFILE=1): events at the phase boundaries of each
 * layer of batches of at least PROF_MIN_N tokens; the time between two marks
 * goes to the phase that ends at the second one. */
enum { PH_NORM, PH_QKV, PH_ROPE, PH_ATTN, PH_WO, PH_GU, PH_SWIGLU, PH_DOWN, PH_OTHER, PH_COUNT };
const char *const phase_names[PH_COUNT] = {"norms",   "qkv",    "rope+kv", "attention",   "wo",
                                           "gate+up", "swiglu", "down",    "embed+logits"};
constexpr int PROF_MIN_N = 64;

constexpr size_t STAGE_BYTES = 64u << 20; /* pinned upload buffers, two of them */

/* KV transfer slots: as many as the loader's I/O workers plus the write-back
 * thread (more callers wait for a free slot); 2 x 4 MiB pinned per slot. */
constexpr int XFER_SLOTS = 8;
constexpr size_t XFER_PIECE = 4u << 20;

struct xfer_slot {
    cudaStream_t stream;
    void *pin[2];
    cudaEvent_t ev[2]; /* the last DMA of pin[b] */
    int next;          /* the bounce buffer the next upload piece uses */
    bool ready, busy;
};

} // namespace

struct cake_cuda_state {
    cake_hparams hp;
    int n_ctx, max_batch;
    int q_dim, kv_dim, qkv_dim, xh_cols;
    int wtype;    /* cake_dtype of every matrix on the GPU */
    size_t welem; /* its size in bytes */
    int atype;    /* cake_dtype of qkv and gu, the GEMM outputs the row kernels read */
    int attn_path;
    cudaStream_t stream;
    cublasHandle_t blas;

    void *tok_embd, *output;
    float *output_norm;
    dev_layer *layers;
    __half *k_cache, *v_cache; /* (n_layers, n_ctx, kv_dim) */
    float2 *rope_cs;           /* (n_ctx, head_dim / 2) (cos, sin) */
    int32_t *tokens;           /* (T) */
    float *x, *logits, *part;
    void *xh, *qkv, *gu;
    __half *q16;
    int split_len, n_splits_max; /* decode's key ranges */
    size_t part_floats;
    int *counters; /* the split attention's arrival counters, zero between launches */
    size_t counter_ints;
    int n_sm; /* multiprocessors */

    void **allocs; /* every cudaMalloc, freed together */
    int n_allocs, cap_allocs;

    void *stage[2]; /* pinned, only during init */
    cudaEvent_t stage_ev[2];
    int stage_next;

    pthread_mutex_t xfer_mu; /* guards the slots' ready and busy flags */
    pthread_cond_t xfer_cv;  /* a slot was released */
    bool xfer_init;
    xfer_slot xfer[XFER_SLOTS];

    int prof;                 /* profiling on */
    cudaEvent_t *prof_ev;     /* marks of one forward pass */
    int n_prof_ev, prof_used; /* capacity, used in this pass */
    int prof_phase[1024];     /* phase ending at mark i */
};

namespace {

int cuda_fail(char *err, size_t errlen, const char *what, cudaError_t e) {
    return cake_err(err, errlen, "cuda: %s failed: %s (%s)", what, cudaGetErrorString(e),
                    cudaGetErrorName(e));
}

#define CK(call, what)                                                                             \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return cuda_fail(err, errlen, what, e_);                            \
    } while (0)

size_t dtype_size(int t) {
    return t == CAKE_DTYPE_F32 ? 4 : 2;
}

const char *dtype_label(int t) {
    return t == CAKE_DTYPE_F32 ? "F32" : t == CAKE_DTYPE_F16 ? "F16" : "BF16";
}

double gib(size_t b) {
    return (double)b / (1024.0 * 1024.0 * 1024.0);
}

int dev_alloc(cake_cuda_state *s, void **p, size_t bytes, const char *what, char *err,
              size_t errlen) {
    *p = NULL;
    if (s->n_allocs == s->cap_allocs) {
        int cap = s->cap_allocs ? 2 * s->cap_allocs : 64;
        void **a = (void **)realloc(s->allocs, (size_t)cap * sizeof(void *));
        if (!a) return cake_err(err, errlen, "out of host memory");
        s->allocs = a;
        s->cap_allocs = cap;
    }
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        *p = NULL;
        return cake_err(err, errlen, "cuda: cannot allocate %.3f GiB of GPU memory for %s: %s",
                        gib(bytes), what, cudaGetErrorString(e));
    }
    s->allocs[s->n_allocs++] = *p;
    return 0;
}

/* ---- host-side conversion for the upload ---- */

/* A matrix as the upload reads it: row-major elements of dtype F32, F16,
 * BF16 or a quantized type, as in the file (the CPU's repacked Q8_0 copies
 * are not made for a GPU run: cake_model_prepare_cpu). */
struct src_matrix {
    const void *data;
    int dtype;
};

void store_as(void *dst, int dt, size_t i, float v) {
    if (dt == CAKE_DTYPE_F32)
        ((float *)dst)[i] = v;
    else if (dt == CAKE_DTYPE_F16)
        ((cake_f16 *)dst)[i] = cake_f32_to_f16(v);
    else
        ((cake_bf16 *)dst)[i] = cake_f32_to_bf16(v);
}

/* dst[0..n) (dtype dt) = elements first..first+n of src. */
void convert_range(void *dst, int dt, src_matrix src, size_t first, size_t n) {
    const int st = src.dtype;
    if (cake_dequant_supported(st)) {
        float buf[256];
        for (size_t i = 0; i < n; i += 256) {
            const size_t cnt = n - i < 256 ? n - i : 256;
            cake_dequant_to_f32(st, src.data, first + i, buf, cnt);
            for (size_t j = 0; j < cnt; j++) store_as(dst, dt, i + j, buf[j]);
        }
        return;
    }
    const char *from = (const char *)src.data + first * dtype_size(st);
    if (dt == st) {
        memcpy(dst, from, n * dtype_size(dt));
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float v;
        if (st == CAKE_DTYPE_F32)
            v = ((const float *)from)[i];
        else if (st == CAKE_DTYPE_F16)
            v = cake_f16_to_f32(((const cake_f16 *)from)[i]);
        else
            v = cake_bf16_to_f32(((const cake_bf16 *)from)[i]);
        store_as(dst, dt, i, v);
    }
}

/* The same over a few threads: reading the mapped file (page faults) and
 * converting is the slow side of the upload, the DMA is faster. */
void convert_parallel(void *dst, int dt, src_matrix src, size_t first, size_t n) {
    constexpr int MAX_THREADS = 8;
    unsigned hw = std::thread::hardware_concurrency();
    size_t nt = hw < 1 ? 1 : hw > MAX_THREADS ? MAX_THREADS : hw;
    const size_t min_per_thread = (size_t)1 << 20;
    if (n / min_per_thread < nt) nt = n / min_per_thread;
    if (nt < 1) nt = 1;
    std::thread th[MAX_THREADS];
    bool started[MAX_THREADS] = {false};
    const size_t per = (n + nt - 1) / nt;
    const size_t ds = dtype_size(dt);
    for (size_t k = 1; k < nt; k++) {
        const size_t b = k * per, e = b + per < n ? b + per : n;
        if (b >= e) break;
        try {
            th[k] = std::thread(convert_range, (char *)dst + b * ds, dt, src, first + b, e - b);
            started[k] = true;
        } catch (...) {
            convert_range((char *)dst + b * ds, dt, src, first + b, e - b);
        }
    }
    convert_range(dst, dt, src, first, per < n ? per : n);
    for (size_t k = 1; k < nt; k++)
        if (started[k]) th[k].join();
}

/* Copies the n elements of src (host) to dst (device, wtype), through the
 * two pinned buffers so that conversion and DMA overlap. */
int upload(cake_cuda_state *s, void *dst, src_matrix src, size_t n, const char *what, char *err,
           size_t errlen) {
    const size_t piece = STAGE_BYTES / s->welem;
    for (size_t off = 0; off < n; off += piece) {
        const size_t cnt = n - off < piece ? n - off : piece;
        const int b = s->stage_next;
        s->stage_next ^= 1;
        CK(cudaEventSynchronize(s->stage_ev[b]), what); /* its previous copy is done */
        convert_parallel(s->stage[b], s->wtype, src, off, cnt);
        CK(cudaMemcpyAsync((char *)dst + off * s->welem, s->stage[b], cnt * s->welem,
                           cudaMemcpyHostToDevice, s->stream),
           what);
        CK(cudaEventRecord(s->stage_ev[b], s->stream), what);
    }
    return 0;
}

int upload_weight(cake_cuda_state *s, void *dst, const cake_weight *w, const char *name, int layer,
                  char *err, size_t errlen) {
    char what[96];
    if (layer >= 0)
        snprintf(what, sizeof(what), "uploading layer %d %s", layer, name);
    else
        snprintf(what, sizeof(what), "uploading %s", name);
    const src_matrix src = {w->data, w->dtype};
    return upload(s, dst, src, (size_t)w->n_in * (size_t)w->n_out, what, err, errlen);
}

int upload_f32(cake_cuda_state *s, float **dst, const float *src, size_t n, const char *what,
               char *err, size_t errlen) {
    if (dev_alloc(s, (void **)dst, n * sizeof(float), what, err, errlen)) return -1;
    /* Small (norm vectors): a plain synchronous copy. */
    CK(cudaMemcpy(*dst, src, n * sizeof(float), cudaMemcpyHostToDevice), what);
    return 0;
}

/* ---- forward helpers ---- */

/* A layer's q, k and v biases as the one f32 row the RoPE/KV kernel adds to
 * its [q | k | v] row, zeros for an absent one. With head norms the q and k
 * biases come before the norms: they go to bqk, for the norm kernel, and
 * are zeros in bqkv (adding 0 changes no value). */
int upload_biases(cake_cuda_state *s, dev_layer *dl, const cake_layer *ml, char *err,
                  size_t errlen) {
    const int qd = s->q_dim, kv = s->kv_dim;
    std::vector<float> row;
    try {
        row.assign((size_t)qd + 2 * (size_t)kv, 0.0f);
    } catch (...) {
        return cake_err(err, errlen, "out of host memory");
    }
    if (ml->bq) memcpy(row.data(), ml->bq, (size_t)qd * sizeof(float));
    if (ml->bk) memcpy(row.data() + qd, ml->bk, (size_t)kv * sizeof(float));
    if (ml->bv) memcpy(row.data() + qd + kv, ml->bv, (size_t)kv * sizeof(float));
    if (ml->q_norm && (ml->bq || ml->bk)) {
        if (upload_f32(s, &dl->bqk, row.data(), (size_t)qd + kv, "uploading the q/k biases", err,
                       errlen))
            return -1;
        std::fill(row.begin(), row.begin() + qd + kv, 0.0f);
    }
    return upload_f32(s, &dl->bqkv, row.data(), row.size(), "uploading the q/k/v biases", err,
                      errlen);
}

cudaDataType_t blas_type(int dtype) {
    return dtype == CAKE_DTYPE_F32   ? CUDA_R_32F
           : dtype == CAKE_DTYPE_F16 ? CUDA_R_16F
                                     : CUDA_R_16BF;
}

/* y (n, n_out) of ytype = x (n, n_in) W^T + beta y, accumulated in f32. */
int gemm(cake_cuda_state *s, const void *w, const void *x, void *y, int ytype, int n, int n_in,
         int n_out, float beta, const char *what, int layer, char *err, size_t errlen) {
    const float alpha = 1.0f;
    const cudaDataType_t t = blas_type(s->wtype);
    cublasStatus_t st = cublasGemmEx(s->blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n, n_in, &alpha, w,
                                     t, n_in, x, t, n_in, &beta, y, blas_type(ytype), n_out,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return cake_err(err, errlen,
                        "cuda: cublasGemmEx for %s of layer %d (%d tokens, %d -> %d, %s) failed: "
                        "%s",
                        what, layer, n, n_in, n_out, dtype_label(s->wtype),
                        cublasGetStatusString(st));
    return 0;
}

int kernel_check(cudaError_t e, const char *what, int layer, char *err, size_t errlen) {
    if (e == cudaSuccess) return 0;
    return cake_err(err, errlen, "cuda: launching %s (layer %d) failed: %s (%s)", what, layer,
                    cudaGetErrorString(e), cudaGetErrorName(e));
}

void prof_mark(cake_cuda_state *s, int on, int phase) {
    if (!on || s->prof_used >= s->n_prof_ev) return;
    s->prof_phase[s->prof_used] = phase;
    cudaEventRecord(s->prof_ev[s->prof_used++], s->stream);
}

void prof_report(cake_cuda_state *s, int n, int pos0) {
    float t[PH_COUNT] = {0}, total = 0;
    for (int i = 1; i < s->prof_used; i++) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, s->prof_ev[i - 1], s->prof_ev[i]) != cudaSuccess) return;
        t[s->prof_phase[i]] += ms;
        total += ms;
    }
    fprintf(stderr, "cake cuda profile: %d tokens at %d: %.2f ms =", n, pos0, total);
    for (int p = 0; p < PH_COUNT; p++) fprintf(stderr, " %s %.2f", phase_names[p], t[p]);
    fprintf(stderr, "\n");
}

__global__ void probe_kernel(int *p) {
    if (p) *p = 1;
}

int init_state(cake_cuda_state *s, const cake_model *m, int n_ctx, int max_batch, char *err,
               size_t errlen) {
    const cake_hparams *hp = &m->hp;
    s->hp = *hp;
    s->n_ctx = n_ctx;
    s->max_batch = max_batch;
    const int dim = hp->dim, ffn = hp->ffn_dim, hd = hp->head_dim, L = hp->n_layers;
    const int qd = hp->q_dim;
    s->q_dim = qd;
    s->kv_dim = hp->n_kv_heads * hd;
    s->qkv_dim = qd + 2 * s->kv_dim;
    s->xh_cols = ffn > dim ? ffn : dim;
    if (qd > s->xh_cols) s->xh_cols = qd;
    /* Quantized weights go up as f16 (each value rounded once, to 11 bits):
     * the GEMMs then run on tensor cores as for an F16 file, in more memory
     * than the blocks (Q8_0: twice, Q4_K: 3.6 times). */
    s->wtype = cake_dequant_supported(hp->weight_dtype) ? CAKE_DTYPE_F16 : hp->weight_dtype;
    if (s->wtype != CAKE_DTYPE_F32 && s->wtype != CAKE_DTYPE_F16 && s->wtype != CAKE_DTYPE_BF16)
        return cake_err(err, errlen, "cuda: weight dtype %d is not supported", s->wtype);
    s->welem = dtype_size(s->wtype);
    /* q/k/v and gate/up leave their GEMMs in the weights' type, as PyTorch's
     * bf16 layers do: the row kernels after them then read half the bytes
     * (13B shape, 16K tokens: 2.8 GB less written and read per layer).
     * CAKE_CUDA_GEMM_OUT=f32 keeps them f32, to measure the two side by side. */
    const char *gemm_out = getenv("CAKE_CUDA_GEMM_OUT");
    s->atype = gemm_out && !strcmp(gemm_out, "f32") ? CAKE_DTYPE_F32 : s->wtype;
    if (n_ctx < 1 || max_batch < 1)
        return cake_err(err, errlen, "cuda: bad context size %d or batch %d", n_ctx, max_batch);

    const char *path = getenv("CAKE_CUDA_ATTN");
    s->attn_path = CAKE_ATTN_AUTO;
    if (path && *path && strcmp(path, "auto")) {
        if (!strcmp(path, "mma"))
            s->attn_path = CAKE_ATTN_MMA;
        else if (!strcmp(path, "simt"))
            s->attn_path = CAKE_ATTN_SIMT;
        else if (!strcmp(path, "split"))
            s->attn_path = CAKE_ATTN_SPLIT;
        else if (!strcmp(path, "wgmma"))
            s->attn_path = CAKE_ATTN_WGMMA;
        else
            return cake_err(err, errlen,
                            "cuda: CAKE_CUDA_ATTN='%s' (auto, wgmma, mma, simt or split expected)",
                            path);
    }
    if (!cake_cuda_attention_supported(s->attn_path, hd))
        return cake_err(
            err, errlen,
            "cuda: head dimension %d is not supported by attention path %s (the "
            "plain kernel takes even sizes up to 256, the tensor-core one 64 and 128, wgmma 128 "
            "in an sm_90a build on an H100)",
            hd, path ? path : "auto");
    if (s->attn_path == CAKE_ATTN_SPLIT && max_batch > CAKE_ATTN_SPLIT_MAX_N)
        return cake_err(err, errlen, "cuda: CAKE_CUDA_ATTN=split takes batches of at most %d",
                        CAKE_ATTN_SPLIT_MAX_N);

    /* Decode splits: 256 keys each, more for huge contexts so that there are
     * never more than 256 splits. */
    int dev = 0;
    CK(cudaGetDevice(&dev), "finding the device");
    CK(cudaDeviceGetAttribute(&s->n_sm, cudaDevAttrMultiProcessorCount, dev), "counting its SMs");
    s->split_len = 256 * ((n_ctx + 256 * 256 - 1) / (256 * 256));
    s->n_splits_max = (n_ctx + s->split_len - 1) / s->split_len;

    /* The whole plan first, so that a model that does not fit says so at once. */
    const size_t T = (size_t)max_batch, V = (size_t)hp->n_vocab;
    const size_t w_layer =
        ((size_t)s->qkv_dim * dim + (size_t)dim * qd + 2 * (size_t)ffn * dim + (size_t)dim * ffn) *
        s->welem;
    const size_t w_bytes = (size_t)L * w_layer + (hp->tied_output ? 1 : 2) * V * dim * s->welem +
                           (size_t)(2 * L + 1) * dim * sizeof(float) +
                           (hp->qk_norm ? 2 * (size_t)L * hd * sizeof(float) : 0);
    /* The KV cache, and the RoPE table of as many positions. */
    const size_t kv_bytes = 2 * (size_t)L * (size_t)n_ctx * (size_t)s->kv_dim * sizeof(__half) +
                            (size_t)n_ctx * (size_t)(hd / 2) * sizeof(float2);
    /* Split partials: decode's ranges, or those of a prefill batch (attention.cu
     * splits only small ones: big ones fill the GPU). */
    const size_t part_elems = cake_attn_part_floats(max_batch, s->n_splits_max, hp->n_heads, hd);
    s->part_floats = part_elems;
    s->counter_ints = cake_attn_counter_ints(max_batch, hp->n_heads);
    const size_t scratch_bytes = T * dim * sizeof(float) + T * s->xh_cols * s->welem +
                                 T * s->qkv_dim * dtype_size(s->atype) + T * qd * sizeof(__half) +
                                 T * 2 * ffn * dtype_size(s->atype) + V * sizeof(float) +
                                 part_elems * sizeof(float) + s->counter_ints * sizeof(int) +
                                 T * sizeof(int32_t) + CAKE_CUDA_BLAS_WS_BYTES;
    size_t free_b = 0, total_b = 0;
    CK(cudaMemGetInfo(&free_b, &total_b), "querying GPU memory");
    const size_t need = w_bytes + kv_bytes + scratch_bytes;
    const size_t margin = (size_t)512 << 20; /* cuBLAS and the CUDA context allocate too */
    if (need + margin > free_b)
        return cake_err(err, errlen,
                        "cuda: the model needs %.2f GiB of GPU memory (weights %.2f, KV cache of "
                        "%d positions %.2f, scratch for batches of %d tokens %.2f) but only "
                        "%.2f GiB are free",
                        gib(need), gib(w_bytes), n_ctx, gib(kv_bytes), max_batch,
                        gib(scratch_bytes), gib(free_b));

    CK(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking), "creating a stream");
    cublasStatus_t bst = cublasCreate(&s->blas);
    if (bst != CUBLAS_STATUS_SUCCESS) {
        s->blas = NULL;
        return cake_err(err, errlen, "cuda: cublasCreate failed: %s", cublasGetStatusString(bst));
    }
    void *ws;
    if (dev_alloc(s, &ws, CAKE_CUDA_BLAS_WS_BYTES, "the cuBLAS workspace", err, errlen)) return -1;
    if ((bst = cublasSetStream(s->blas, s->stream)) != CUBLAS_STATUS_SUCCESS ||
        (bst = cublasSetWorkspace(s->blas, ws, CAKE_CUDA_BLAS_WS_BYTES)) != CUBLAS_STATUS_SUCCESS)
        return cake_err(err, errlen, "cuda: setting up cuBLAS failed: %s",
                        cublasGetStatusString(bst));
    CK(cake_cuda_attention_setup(), "setting the attention kernels' shared memory");

    /* ---- weights ---- */
    for (int b = 0; b < 2; b++) {
        CK(cudaHostAlloc(&s->stage[b], STAGE_BYTES, cudaHostAllocDefault),
           "allocating pinned upload buffers");
        CK(cudaEventCreateWithFlags(&s->stage_ev[b], cudaEventDisableTiming),
           "creating upload events");
    }
    const size_t VD = V * (size_t)dim;
    if (dev_alloc(s, &s->tok_embd, VD * s->welem, "token_embd", err, errlen) ||
        upload_weight(s, s->tok_embd, &m->tok_embd, "token_embd", -1, err, errlen))
        return -1;
    if (hp->tied_output) {
        s->output = s->tok_embd;
    } else if (dev_alloc(s, &s->output, VD * s->welem, "output", err, errlen) ||
               upload_weight(s, s->output, &m->output, "output", -1, err, errlen)) {
        return -1;
    }
    if (upload_f32(s, &s->output_norm, m->output_norm, (size_t)dim, "uploading output_norm", err,
                   errlen))
        return -1;
    s->layers = (dev_layer *)calloc((size_t)L, sizeof(dev_layer));
    if (!s->layers) return cake_err(err, errlen, "out of host memory");
    for (int l = 0; l < L; l++) {
        const cake_layer *ml = &m->layers[l];
        dev_layer *dl = &s->layers[l];
        const size_t qd_w = (size_t)qd * dim, kd = (size_t)s->kv_dim * dim, fd = (size_t)ffn * dim;
        char *wqkv, *wgu;
        if (upload_f32(s, &dl->attn_norm, ml->attn_norm, (size_t)dim, "uploading attn_norm", err,
                       errlen) ||
            upload_f32(s, &dl->ffn_norm, ml->ffn_norm, (size_t)dim, "uploading ffn_norm", err,
                       errlen) ||
            dev_alloc(s, &dl->wqkv, (qd_w + 2 * kd) * s->welem, "attn_qkv", err, errlen) ||
            dev_alloc(s, &dl->wo, qd_w * s->welem, "attn_output", err, errlen) ||
            dev_alloc(s, &dl->wgu, 2 * fd * s->welem, "ffn_gate_up", err, errlen) ||
            dev_alloc(s, &dl->wdown, fd * s->welem, "ffn_down", err, errlen))
            return -1;
        if ((ml->bq || ml->bk || ml->bv) && upload_biases(s, dl, ml, err, errlen)) return -1;
        if (ml->q_norm && (upload_f32(s, &dl->q_norm, ml->q_norm, (size_t)hd,
                                      "uploading attn_q_norm", err, errlen) ||
                           upload_f32(s, &dl->k_norm, ml->k_norm, (size_t)hd,
                                      "uploading attn_k_norm", err, errlen)))
            return -1;
        wqkv = (char *)dl->wqkv;
        wgu = (char *)dl->wgu;
        if (upload_weight(s, wqkv, &ml->wq, "attn_q", l, err, errlen) ||
            upload_weight(s, wqkv + qd_w * s->welem, &ml->wk, "attn_k", l, err, errlen) ||
            upload_weight(s, wqkv + (qd_w + kd) * s->welem, &ml->wv, "attn_v", l, err, errlen) ||
            upload_weight(s, dl->wo, &ml->wo, "attn_output", l, err, errlen) ||
            upload_weight(s, wgu, &ml->w_gate, "ffn_gate", l, err, errlen) ||
            upload_weight(s, wgu + fd * s->welem, &ml->w_up, "ffn_up", l, err, errlen) ||
            upload_weight(s, dl->wdown, &ml->w_down, "ffn_down", l, err, errlen))
            return -1;
    }
    CK(cudaStreamSynchronize(s->stream), "uploading the weights");
    for (int b = 0; b < 2; b++) {
        cudaEventDestroy(s->stage_ev[b]);
        cudaFreeHost(s->stage[b]);
        s->stage_ev[b] = NULL;
        s->stage[b] = NULL;
    }

    /* ---- KV cache and scratch ---- */
    const size_t kv_half = kv_bytes / 2;
    if (dev_alloc(s, (void **)&s->k_cache, kv_half, "the K cache", err, errlen) ||
        dev_alloc(s, (void **)&s->v_cache, kv_half, "the V cache", err, errlen))
        return -1;
    /* Zeroed so that reading positions nobody wrote gives zeros, never NaN. */
    CK(cudaMemsetAsync(s->k_cache, 0, kv_half, s->stream), "clearing the K cache");
    CK(cudaMemsetAsync(s->v_cache, 0, kv_half, s->stream), "clearing the V cache");
    if (dev_alloc(s, (void **)&s->x, T * dim * sizeof(float), "scratch x", err, errlen) ||
        dev_alloc(s, &s->xh, T * s->xh_cols * s->welem, "scratch xh", err, errlen) ||
        dev_alloc(s, &s->qkv, T * s->qkv_dim * dtype_size(s->atype), "scratch qkv", err, errlen) ||
        dev_alloc(s, (void **)&s->q16, T * qd * sizeof(__half), "scratch q16", err, errlen) ||
        dev_alloc(s, &s->gu, T * 2 * ffn * dtype_size(s->atype), "scratch gate/up", err, errlen) ||
        dev_alloc(s, (void **)&s->logits, V * sizeof(float), "logits", err, errlen) ||
        dev_alloc(s, (void **)&s->part, part_elems * sizeof(float), "attention partials", err,
                  errlen) ||
        dev_alloc(s, (void **)&s->counters, s->counter_ints * sizeof(int), "attention counters",
                  err, errlen) ||
        dev_alloc(s, (void **)&s->tokens, T * sizeof(int32_t), "token ids", err, errlen))
        return -1;
    CK(cudaMemsetAsync(s->counters, 0, s->counter_ints * sizeof(int), s->stream),
       "clearing the attention counters");

    /* RoPE: the model's frequencies (double, as the CPU backend's), and from
     * them the (cos, sin) table of every position of the context. */
    double *inv_dev;
    if (dev_alloc(s, (void **)&s->rope_cs, (size_t)n_ctx * (size_t)(hd / 2) * sizeof(float2),
                  "the RoPE table", err, errlen) ||
        dev_alloc(s, (void **)&inv_dev, (size_t)(hd / 2) * sizeof(double), "RoPE frequencies", err,
                  errlen))
        return -1;
    CK(cudaMemcpy(inv_dev, m->rope_freqs, (size_t)(hd / 2) * sizeof(double),
                  cudaMemcpyHostToDevice),
       "uploading the RoPE frequencies");
    CK(cake_cuda_rope_table(s->rope_cs, inv_dev, n_ctx, hd / 2, s->stream),
       "making the RoPE table");
    CK(cudaStreamSynchronize(s->stream), "making the RoPE table");

    const char *prof = getenv("CAKE_CUDA_PROFILE");
    if (prof && *prof && strcmp(prof, "0")) {
        s->n_prof_ev = 9 * L + 8;
        if (s->n_prof_ev > 1024) s->n_prof_ev = 1024;
        s->prof_ev = (cudaEvent_t *)calloc((size_t)s->n_prof_ev, sizeof(cudaEvent_t));
        if (!s->prof_ev) return cake_err(err, errlen, "out of host memory");
        for (int i = 0; i < s->n_prof_ev; i++)
            CK(cudaEventCreate(&s->prof_ev[i]), "creating profiling events");
        s->prof = 1;
    }
    CK(cudaStreamSynchronize(s->stream), "initialising the CUDA backend");
    return 0;
}

} // namespace

/* ---- KV transfers on their own streams (see the top of this file) ---- */

namespace {

void xfer_slot_release_resources(xfer_slot *x) {
    if (x->stream) {
        cudaStreamSynchronize(x->stream);
        cudaStreamDestroy(x->stream);
    }
    for (int b = 0; b < 2; b++) {
        if (x->ev[b]) cudaEventDestroy(x->ev[b]);
        if (x->pin[b]) cudaFreeHost(x->pin[b]);
    }
    memset(x, 0, sizeof(*x));
}

/* Creates a slot's stream, events and bounce buffers (outside the mutex: the
 * slot is marked busy, so nobody else touches it). */
int xfer_slot_setup(xfer_slot *x, char *err, size_t errlen) {
    cudaError_t e = cudaStreamCreateWithFlags(&x->stream, cudaStreamNonBlocking);
    for (int b = 0; b < 2 && e == cudaSuccess; b++) {
        e = cudaEventCreateWithFlags(&x->ev[b], cudaEventDisableTiming);
        if (e == cudaSuccess) e = cudaHostAlloc(&x->pin[b], XFER_PIECE, cudaHostAllocDefault);
    }
    if (e != cudaSuccess) {
        xfer_slot_release_resources(x); /* clears busy too: the caller resets it anyway */
        return cuda_fail(err, errlen, "creating a KV transfer stream and its pinned buffers", e);
    }
    x->next = 0;
    x->ready = true;
    return 0;
}

/* A free slot, ready ones first; waits while all are busy. -1 with err when
 * a new slot cannot be set up. */
int xfer_acquire(cake_cuda_state *s, char *err, size_t errlen) {
    pthread_mutex_lock(&s->xfer_mu);
    int i;
    for (;;) {
        int fresh = -1;
        for (i = 0; i < XFER_SLOTS; i++) {
            if (s->xfer[i].busy) continue;
            if (s->xfer[i].ready) break;
            if (fresh < 0) fresh = i;
        }
        if (i == XFER_SLOTS) i = fresh;
        if (i >= 0) break;
        pthread_cond_wait(&s->xfer_cv, &s->xfer_mu);
    }
    s->xfer[i].busy = true;
    const bool ready = s->xfer[i].ready;
    pthread_mutex_unlock(&s->xfer_mu);
    if (!ready && xfer_slot_setup(&s->xfer[i], err, errlen)) {
        pthread_mutex_lock(&s->xfer_mu);
        s->xfer[i].busy = false;
        pthread_cond_signal(&s->xfer_cv);
        pthread_mutex_unlock(&s->xfer_mu);
        return -1;
    }
    return i;
}

void xfer_release(cake_cuda_state *s, int i) {
    pthread_mutex_lock(&s->xfer_mu);
    s->xfer[i].busy = false;
    pthread_cond_signal(&s->xfer_cv);
    pthread_mutex_unlock(&s->xfer_mu);
}

struct xfer_seg {
    __half *dev;
    char *host;
    size_t bytes;
};

/* One piece of a segment, at most XFER_PIECE bytes. */
struct xfer_piece {
    char *dev, *host;
    size_t bytes;
};

/* Host -> GPU: each piece is copied into a bounce buffer (once that buffer's
 * previous DMA is done) and its DMA queued; the host copy of the next piece
 * overlaps that DMA. */
int xfer_h2d(xfer_slot *x, const std::vector<xfer_piece> &pc, char *err, size_t errlen) {
    for (const xfer_piece &p : pc) {
        const int b = x->next;
        x->next ^= 1;
        CK(cudaEventSynchronize(x->ev[b]), "waiting for a KV upload buffer");
        memcpy(x->pin[b], p.host, p.bytes);
        CK(cudaMemcpyAsync(p.dev, x->pin[b], p.bytes, cudaMemcpyHostToDevice, x->stream),
           "copying KV to the GPU");
        CK(cudaEventRecord(x->ev[b], x->stream), "recording a KV upload");
    }
    CK(cudaStreamSynchronize(x->stream), "the KV write");
    return 0;
}

/* GPU -> host: the DMA of piece k + 1 runs while piece k is copied out. */
int xfer_d2h(xfer_slot *x, const std::vector<xfer_piece> &pc, char *err, size_t errlen) {
    const size_t n = pc.size();
    for (size_t j = 0; j < n && j < 2; j++) {
        CK(cudaMemcpyAsync(x->pin[j], pc[j].dev, pc[j].bytes, cudaMemcpyDeviceToHost, x->stream),
           "copying KV from the GPU");
        CK(cudaEventRecord(x->ev[j], x->stream), "recording a KV download");
    }
    for (size_t k = 0; k < n; k++) {
        const int b = (int)(k & 1);
        CK(cudaEventSynchronize(x->ev[b]), "the KV read");
        memcpy(pc[k].host, x->pin[b], pc[k].bytes);
        if (k + 2 < n) { /* buffer b is free again: queue piece k + 2 into it */
            CK(cudaMemcpyAsync(x->pin[b], pc[k + 2].dev, pc[k + 2].bytes, cudaMemcpyDeviceToHost,
                               x->stream),
               "copying KV from the GPU");
            CK(cudaEventRecord(x->ev[b], x->stream), "recording a KV download");
        }
    }
    return 0;
}

bool host_is_pinned(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError(); /* not sticky: clear it */
        return false;
    }
    return a.type == cudaMemoryTypeHost;
}

/* Host -> GPU from pinned memory (the loader's staging buffers): plain DMA on
 * the slot's stream, no bounce buffers. */
int xfer_h2d_pinned(xfer_slot *x, const xfer_seg *seg, int n_seg, char *err, size_t errlen) {
    for (int i = 0; i < n_seg; i++)
        CK(cudaMemcpyAsync(seg[i].dev, seg[i].host, seg[i].bytes, cudaMemcpyHostToDevice,
                           x->stream),
           "copying KV to the GPU");
    CK(cudaStreamSynchronize(x->stream), "the KV write");
    return 0;
}

int kv_transfer(cake_cuda_state *s, const xfer_seg *seg, int n_seg, bool to_gpu, char *err,
                size_t errlen) {
    bool pinned = to_gpu;
    for (int i = 0; i < n_seg && pinned; i++) pinned = host_is_pinned(seg[i].host);
    if (pinned) {
        const int i = xfer_acquire(s, err, errlen);
        if (i < 0) return -1;
        xfer_slot *x = &s->xfer[i];
        int rc = xfer_h2d_pinned(x, seg, n_seg, err, errlen);
        if (rc) cudaStreamSynchronize(x->stream);
        xfer_release(s, i);
        return rc;
    }
    std::vector<xfer_piece> pc;
    try {
        for (int i = 0; i < n_seg; i++)
            for (size_t o = 0; o < seg[i].bytes; o += XFER_PIECE)
                pc.push_back({(char *)seg[i].dev + o, seg[i].host + o,
                              seg[i].bytes - o < XFER_PIECE ? seg[i].bytes - o : XFER_PIECE});
    } catch (...) {
        return cake_err(err, errlen, "out of host memory");
    }
    const int i = xfer_acquire(s, err, errlen);
    if (i < 0) return -1;
    xfer_slot *x = &s->xfer[i];
    int rc = to_gpu ? xfer_h2d(x, pc, err, errlen) : xfer_d2h(x, pc, err, errlen);
    /* After a failure, copies may still be queued on the bounce buffers: let
     * them finish before someone else reuses the slot. */
    if (rc) cudaStreamSynchronize(x->stream);
    xfer_release(s, i);
    return rc;
}

} // namespace

static int cuda_available(char *err, size_t errlen) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        cuda_fail(err, errlen, "looking for a GPU", e);
        return 0;
    }
    if (count < 1) {
        cake_err(err, errlen, "cuda: no CUDA device");
        return 0;
    }
    int dev = 0;
    cudaDeviceProp prop;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, dev)) != cudaSuccess) {
        cuda_fail(err, errlen, "reading the device properties", e);
        return 0;
    }
    if (prop.major < 8) {
        cake_err(err, errlen, "cuda: %s (compute capability %d.%d) is too old: 8.0 or newer needed",
                 prop.name, prop.major, prop.minor);
        return 0;
    }
    /* The kernels were compiled for the architectures CMake named (sm_90 by
     * default): make sure this device can run them. */
    cudaFuncAttributes fa;
    if ((e = cudaFuncGetAttributes(&fa, probe_kernel)) != cudaSuccess) {
        cake_err(err, errlen,
                 "cuda: this build has no kernels for %s (compute capability %d.%d): %s", prop.name,
                 prop.major, prop.minor, cudaGetErrorString(e));
        return 0;
    }
    return 1;
}

static void cuda_free(cake_cuda_state *s) {
    if (!s) return;
    if (s->stream) cudaStreamSynchronize(s->stream);
    for (int i = 0; i < s->n_allocs; i++) cudaFree(s->allocs[i]);
    free(s->allocs);
    for (int b = 0; b < 2; b++) {
        if (s->stage_ev[b]) cudaEventDestroy(s->stage_ev[b]);
        if (s->stage[b]) cudaFreeHost(s->stage[b]);
    }
    if (s->prof_ev) {
        for (int i = 0; i < s->n_prof_ev; i++)
            if (s->prof_ev[i]) cudaEventDestroy(s->prof_ev[i]);
        free(s->prof_ev);
    }
    for (int i = 0; i < XFER_SLOTS; i++) xfer_slot_release_resources(&s->xfer[i]);
    if (s->xfer_init) {
        pthread_cond_destroy(&s->xfer_cv);
        pthread_mutex_destroy(&s->xfer_mu);
    }
    if (s->blas) cublasDestroy(s->blas);
    if (s->stream) cudaStreamDestroy(s->stream);
    free(s->layers);
    free(s);
}

static int cuda_init(const cake_model *m, int n_ctx, int max_batch, cake_cuda_state **out,
                     char *err, size_t errlen) {
    *out = NULL;
    if (!cuda_available(err, errlen)) return -1;
    cake_cuda_state *s = (cake_cuda_state *)calloc(1, sizeof(*s));
    if (!s) return cake_err(err, errlen, "out of host memory");
    if (pthread_mutex_init(&s->xfer_mu, NULL)) {
        free(s);
        return cake_err(err, errlen, "cuda: cannot create a mutex");
    }
    if (pthread_cond_init(&s->xfer_cv, NULL)) {
        pthread_mutex_destroy(&s->xfer_mu);
        free(s);
        return cake_err(err, errlen, "cuda: cannot create a condition variable");
    }
    s->xfer_init = true;
    if (init_state(s, m, n_ctx, max_batch, err, errlen)) {
        cuda_free(s);
        return -1;
    }
    *out = s;
    return 0;
}

static int cuda_forward(cake_cuda_state *s, const cake_token *tokens, int n, int pos0,
                        float *logits, char *err, size_t errlen) {
    const cake_hparams *hp = &s->hp;
    if (n < 1 || n > s->max_batch)
        return cake_err(err, errlen, "cuda forward: %d tokens (1 to %d per call)", n, s->max_batch);
    if (pos0 < 0 || (long long)pos0 + n > s->n_ctx)
        return cake_err(err, errlen, "cuda forward: positions [%d, %lld) exceed the context of %d",
                        pos0, (long long)pos0 + n, s->n_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab)
            return cake_err(err, errlen,
                            "cuda forward: token id %d at position %d is not in [0, %d)", tokens[i],
                            pos0 + i, hp->n_vocab);
    cudaStream_t st = s->stream;
    const int dim = hp->dim, ffn = hp->ffn_dim;
    const int prof = s->prof && n >= PROF_MIN_N;
    s->prof_used = 0;
    prof_mark(s, prof, PH_OTHER);

    CK(cudaMemcpyAsync(s->tokens, tokens, (size_t)n * sizeof(int32_t), cudaMemcpyHostToDevice, st),
       "copying the token ids to the GPU");
    if (kernel_check(cake_cuda_embed(s->x, s->tok_embd, s->wtype, s->tokens, n, dim, st),
                     "the embedding gather", -1, err, errlen))
        return -1;
    prof_mark(s, prof, PH_OTHER);

    const size_t layer_kv = (size_t)s->n_ctx * (size_t)s->kv_dim;
    for (int l = 0; l < hp->n_layers; l++) {
        const dev_layer *L = &s->layers[l];
        __half *kc = s->k_cache + (size_t)l * layer_kv, *vc = s->v_cache + (size_t)l * layer_kv;

        if (kernel_check(
                cake_cuda_rmsnorm(s->xh, s->wtype, s->x, L->attn_norm, n, dim, hp->rms_eps, st),
                "rmsnorm", l, err, errlen))
            return -1;
        prof_mark(s, prof, PH_NORM);
        if (gemm(s, L->wqkv, s->xh, s->qkv, s->atype, n, dim, s->qkv_dim, 0.0f, "q/k/v", l, err,
                 errlen))
            return -1;
        prof_mark(s, prof, PH_QKV);
        if (L->q_norm && kernel_check(cake_cuda_qk_norm(s->qkv, s->atype, L->bqk, L->q_norm,
                                                        L->k_norm, n, hp->n_heads, hp->n_kv_heads,
                                                        hp->head_dim, hp->rms_eps, st),
                                      "q/k head norms", l, err, errlen))
            return -1;
        if (kernel_check(cake_cuda_rope_kv(s->qkv, s->atype, L->bqkv, hp->rope_neox, s->q16, kc, vc,
                                           s->rope_cs, n, pos0, hp->n_heads, hp->n_kv_heads,
                                           hp->head_dim, st),
                         "rope/kv write", l, err, errlen))
            return -1;
        prof_mark(s, prof, PH_ROPE);

        cake_attn_launch a;
        a.q = s->q16;
        a.k = kc;
        a.v = vc;
        a.out = s->xh;
        a.out_dtype = s->wtype;
        a.n = n;
        a.pos0 = pos0;
        a.n_heads = hp->n_heads;
        a.n_kv_heads = hp->n_kv_heads;
        a.head_dim = hp->head_dim;
        a.part = s->part;
        a.part_floats = s->part_floats;
        a.split_len = s->split_len;
        a.n_sm = s->n_sm;
        a.counters = s->counters;
        a.counter_ints = s->counter_ints;
        if (kernel_check(cake_cuda_attention(&a, s->attn_path, st), "attention", l, err, errlen))
            return -1;
        prof_mark(s, prof, PH_ATTN);
        if (gemm(s, L->wo, s->xh, s->x, CAKE_DTYPE_F32, n, s->q_dim, dim, 1.0f, "attn_output", l,
                 err, errlen))
            return -1;
        prof_mark(s, prof, PH_WO);

        if (kernel_check(
                cake_cuda_rmsnorm(s->xh, s->wtype, s->x, L->ffn_norm, n, dim, hp->rms_eps, st),
                "rmsnorm", l, err, errlen))
            return -1;
        prof_mark(s, prof, PH_NORM);
        if (gemm(s, L->wgu, s->xh, s->gu, s->atype, n, dim, 2 * ffn, 0.0f, "ffn gate/up", l, err,
                 errlen))
            return -1;
        prof_mark(s, prof, PH_GU);
        if (kernel_check(cake_cuda_swiglu(s->xh, s->wtype, s->gu, s->atype, n, ffn, st), "swiglu",
                         l, err, errlen))
            return -1;
        prof_mark(s, prof, PH_SWIGLU);
        if (gemm(s, L->wdown, s->xh, s->x, CAKE_DTYPE_F32, n, ffn, dim, 1.0f, "ffn_down", l, err,
                 errlen))
            return -1;
        prof_mark(s, prof, PH_DOWN);
    }

    if (logits) {
        const float *last = s->x + (size_t)(n - 1) * (size_t)dim;
        if (kernel_check(
                cake_cuda_rmsnorm(s->xh, s->wtype, last, s->output_norm, 1, dim, hp->rms_eps, st),
                "the output rmsnorm", -1, err, errlen) ||
            gemm(s, s->output, s->xh, s->logits, CAKE_DTYPE_F32, 1, dim, hp->n_vocab, 0.0f,
                 "output", -1, err, errlen))
            return -1;
        CK(cudaMemcpyAsync(logits, s->logits, (size_t)hp->n_vocab * sizeof(float),
                           cudaMemcpyDeviceToHost, st),
           "copying the logits back");
    }
    prof_mark(s, prof, PH_OTHER);
    CK(cudaStreamSynchronize(st), "the forward pass");
    if (prof) prof_report(s, n, pos0);
    return 0;
}

static int kv_check(const cake_cuda_state *s, int layer, int pos0, int n, char *err,
                    size_t errlen) {
    if (layer < 0 || layer >= s->hp.n_layers)
        return cake_err(err, errlen, "cuda kv: layer %d is not in [0, %d)", layer, s->hp.n_layers);
    if (pos0 < 0 || n < 0 || (long long)pos0 + n > s->n_ctx)
        return cake_err(err, errlen, "cuda kv: positions [%d, %lld) exceed the context of %d", pos0,
                        (long long)pos0 + n, s->n_ctx);
    return 0;
}

static int cuda_kv_write(cake_cuda_state *s, int layer, int pos0, int n, const void *k_f16,
                         const void *v_f16, char *err, size_t errlen) {
    if (kv_check(s, layer, pos0, n, err, errlen)) return -1;
    if (n == 0) return 0;
    const size_t off = ((size_t)layer * s->n_ctx + (size_t)pos0) * (size_t)s->kv_dim;
    const size_t bytes = (size_t)n * (size_t)s->kv_dim * sizeof(__half);
    const xfer_seg seg[2] = {{s->k_cache + off, (char *)k_f16, bytes},
                             {s->v_cache + off, (char *)v_f16, bytes}};
    return kv_transfer(s, seg, 2, true, err, errlen);
}

static int cuda_kv_read(cake_cuda_state *s, int layer, int pos0, int n, void *k_f16, void *v_f16,
                        char *err, size_t errlen) {
    if (kv_check(s, layer, pos0, n, err, errlen)) return -1;
    if (n == 0) return 0;
    const size_t off = ((size_t)layer * s->n_ctx + (size_t)pos0) * (size_t)s->kv_dim;
    const size_t bytes = (size_t)n * (size_t)s->kv_dim * sizeof(__half);
    const xfer_seg seg[2] = {{s->k_cache + off, (char *)k_f16, bytes},
                             {s->v_cache + off, (char *)v_f16, bytes}};
    return kv_transfer(s, seg, 2, false, err, errlen);
}

static void *cuda_host_alloc(size_t size) {
    void *p = NULL;
    if (cudaHostAlloc(&p, size, cudaHostAllocPortable) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

static int cuda_host_free(void *p) {
    if (!host_is_pinned(p)) return 0;
    cudaFreeHost(p);
    return 1;
}

/* ---- attention check (a test hook, see cuda_backend.h) ---- */

namespace {

struct check_bufs {
    __half *hq, *hk, *hv; /* host */
    float *hout, *hout2;
    __half *q, *k, *v; /* device */
    float *out, *part;
    int *counters;
};

void check_bufs_free(check_bufs *b) {
    free(b->hq);
    free(b->hk);
    free(b->hv);
    free(b->hout);
    free(b->hout2);
    cudaFree(b->q);
    cudaFree(b->k);
    cudaFree(b->v);
    cudaFree(b->out);
    cudaFree(b->part);
    cudaFree(b->counters);
}

float rand_unit(uint64_t *x) { /* uniform in [-1, 1) */
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(*x >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

int check_run(check_bufs *b, int path, int head_dim, int n_heads, int n_kv_heads, int pos0, int n,
              float q_scale, double *max_err, char *err, size_t errlen) {
    const int n_ctx = pos0 + n, split_len = 64, n_splits_max = (n_ctx + split_len - 1) / split_len;
    const size_t nq = (size_t)n * n_heads * head_dim, nkv = (size_t)n_ctx * n_kv_heads * head_dim;
    const size_t n_part = cake_attn_part_floats(n, n_splits_max, n_heads, head_dim);
    int dev = 0, n_sm = 0;
    CK(cudaGetDevice(&dev), "finding the device");
    CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev), "counting its SMs");
    b->hq = (__half *)malloc(nq * sizeof(__half));
    b->hk = (__half *)malloc(nkv * sizeof(__half));
    b->hv = (__half *)malloc(nkv * sizeof(__half));
    b->hout = (float *)malloc(nq * sizeof(float));
    b->hout2 = (float *)malloc(nq * sizeof(float));
    if (!b->hq || !b->hk || !b->hv || !b->hout || !b->hout2)
        return cake_err(err, errlen, "out of host memory");
    uint64_t x = 0x5eed ^ ((uint64_t)head_dim << 32) ^ ((uint64_t)pos0 << 8) ^ (uint64_t)n;
    for (size_t i = 0; i < nq; i++) b->hq[i] = __float2half(q_scale * rand_unit(&x));
    for (size_t i = 0; i < nkv; i++) b->hk[i] = __float2half(rand_unit(&x));
    for (size_t i = 0; i < nkv; i++) b->hv[i] = __float2half(rand_unit(&x));

    CK(cudaMalloc((void **)&b->q, nq * sizeof(__half)), "allocating the check's queries");
    CK(cudaMalloc((void **)&b->k, nkv * sizeof(__half)), "allocating the check's keys");
    CK(cudaMalloc((void **)&b->v, nkv * sizeof(__half)), "allocating the check's values");
    CK(cudaMalloc((void **)&b->out, nq * sizeof(float)), "allocating the check's output");
    CK(cudaMalloc((void **)&b->part, n_part * sizeof(float)), "allocating the check's partials");
    const size_t n_counters = cake_attn_counter_ints(n, n_heads);
    CK(cudaMalloc((void **)&b->counters, n_counters * sizeof(int)), "allocating counters");
    CK(cudaMemset(b->counters, 0, n_counters * sizeof(int)), "clearing the counters");
    CK(cudaMemcpy(b->q, b->hq, nq * sizeof(__half), cudaMemcpyHostToDevice), "uploading queries");
    CK(cudaMemcpy(b->k, b->hk, nkv * sizeof(__half), cudaMemcpyHostToDevice), "uploading keys");
    CK(cudaMemcpy(b->v, b->hv, nkv * sizeof(__half), cudaMemcpyHostToDevice), "uploading values");
    CK(cake_cuda_attention_setup(), "setting the attention kernels' shared memory");

    cake_attn_launch a;
    a.q = b->q;
    a.k = b->k;
    a.v = b->v;
    a.out = b->out;
    a.out_dtype = CAKE_DTYPE_F32;
    a.n = n;
    a.pos0 = pos0;
    a.n_heads = n_heads;
    a.n_kv_heads = n_kv_heads;
    a.head_dim = head_dim;
    a.part = b->part;
    a.part_floats = n_part;
    a.split_len = split_len;
    a.n_sm = n_sm;
    a.counter_ints = n_counters;

    /* Three runs, the output NaN where unwritten: the first, checked against
     * the reference below; where the kernel merged its own key ranges, again
     * (which needs the counters left at zero), then with the combine kernel
     * instead. Both must give the first run's result (the same operations in
     * the same order), but for the stream schedule, which needs the counters:
     * without, its batches run as a grid of key ranges, whose sums are cut
     * elsewhere. */
    const float grid_tol =
        path != CAKE_ATTN_MMA && cake_cuda_attention_stream() ? 1e-5f : 1e-6f; /* WGMMA, AUTO */
    for (int run = 0; run < 3; run++) {
        float *host = run ? b->hout2 : b->hout;
        a.counters = run == 2 ? NULL : b->counters;
        CK(cudaMemset(b->out, 0xff, nq * sizeof(float)), "clearing the output");
        CK(cake_cuda_attention(&a, path, 0), "launching the attention kernel");
        CK(cudaDeviceSynchronize(), "running the attention kernel");
        CK(cudaMemcpy(host, b->out, nq * sizeof(float), cudaMemcpyDeviceToHost),
           "copying the attention output back");
        for (size_t i = 0; run && i < nq; i++) {
            const float d = fabsf(b->hout2[i] - b->hout[i]);
            if (!(d <= (run == 2 ? grid_tol : 1e-6f)))
                return cake_err(
                    err, errlen, "attention check: %s gives %g at output %zu, the first run %g",
                    run == 2 ? "the combine kernel" : "a second run", b->hout2[i], i, b->hout[i]);
        }
    }

    /* Reference in double on the same f16 inputs. */
    double worst = 0.0;
    double *w = (double *)malloc((size_t)n_ctx * sizeof(double));
    if (!w) return cake_err(err, errlen, "out of host memory");
    const int group = n_heads / n_kv_heads;
    for (int t = 0; t < n; t++) {
        for (int h = 0; h < n_heads; h++) {
            const __half *qr = b->hq + ((size_t)t * n_heads + h) * head_dim;
            const int kvh = h / group, p = pos0 + t;
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j <= p; j++) {
                const __half *kr = b->hk + ((size_t)j * n_kv_heads + kvh) * head_dim;
                double d = 0.0;
                for (int i = 0; i < head_dim; i++)
                    d += (double)__half2float(qr[i]) * (double)__half2float(kr[i]);
                w[j] = d / sqrt((double)head_dim);
                if (w[j] > mx) mx = w[j];
            }
            for (int j = 0; j <= p; j++) sum += (w[j] = exp(w[j] - mx));
            for (int i = 0; i < head_dim; i++) {
                double o = 0.0;
                for (int j = 0; j <= p; j++)
                    o += w[j] *
                         (double)__half2float(b->hv[((size_t)j * n_kv_heads + kvh) * head_dim + i]);
                const double got = b->hout[((size_t)t * n_heads + h) * head_dim + i];
                double e = fabs(got - o / sum);
                if (e != e) e = INFINITY; /* NaN: an unwritten or poisoned output */
                if (e > worst) worst = e;
            }
        }
    }
    free(w);
    *max_err = worst;
    return 0;
}

} // namespace

static int cuda_attention_check(int path, int head_dim, int n_heads, int n_kv_heads, int pos0,
                                int n, float q_scale, double *max_err, char *err, size_t errlen) {
    *max_err = 0.0;
    if (!cuda_available(err, errlen)) return -1;
    if (n < 1 || pos0 < 0 || n_heads < 1 || n_kv_heads < 1 || n_heads % n_kv_heads)
        return cake_err(err, errlen, "attention check: bad shape (n %d, pos0 %d, heads %d/%d)", n,
                        pos0, n_heads, n_kv_heads);
    if (!cake_cuda_attention_supported(path, head_dim))
        return cake_err(err, errlen, "attention check: path %d does not take head_dim %d", path,
                        head_dim);
    if (path == CAKE_ATTN_SPLIT && n > CAKE_ATTN_SPLIT_MAX_N)
        return cake_err(err, errlen, "attention check: the split path takes at most %d queries",
                        CAKE_ATTN_SPLIT_MAX_N);
    check_bufs b;
    memset(&b, 0, sizeof(b));
    int rc =
        check_run(&b, path, head_dim, n_heads, n_kv_heads, pos0, n, q_scale, max_err, err, errlen);
    check_bufs_free(&b);
    return rc;
}

/* The module's one exported symbol: the table the core's cuda/module.c looks
 * up after dlopen (everything else in the module has hidden visibility). */
extern "C" __attribute__((visibility("default")))
const cake_cuda_ops cake_cuda_module_ops = {CAKE_CUDA_MODULE_VERSION,
                                            cuda_available,
                                            cuda_init,
                                            cuda_free,
                                            cuda_forward,
                                            cuda_kv_write,
                                            cuda_kv_read,
                                            cuda_attention_check,
                                            cuda_host_alloc,
                                            cuda_host_free};
