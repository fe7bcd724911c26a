/* The CUDA backend: the same Llama forward pass as the CPU backend, on one
 * NVIDIA GPU. Weights are uploaded once (F16/BF16 as in the file; F32 files are
 * converted to F16), the KV cache lives in GPU memory (F16), GEMMs run on tensor
 * cores through cuBLAS, and our own kernels do RMSNorm, RoPE, SwiGLU, KV writes
 * and attention (flash-attention style prefill, and decode).
 *
 * Built only when CMake finds nvcc (CAKE_HAVE_CUDA), as a module of its own,
 * libcake_cuda.so, that the core loads with dlopen on the first call of any
 * function below (backend/cuda/module.c). So CPU runs neither need the CUDA
 * libraries nor pay for loading them (cuBLAS alone adds ~0.3 s to process
 * start and ~140 MB to RSS). Without the module or a GPU at run time, the
 * functions fail with a clear message. The functions are C-callable. */
#ifndef CAKE_CUDA_BACKEND_H
#define CAKE_CUDA_BACKEND_H

#include <stddef.h>

#include "cake.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cake_cuda_state cake_cuda_state;

/* The cuBLAS workspace the backend gives its handle (bench_gemm times the
 * same). */
#define CAKE_CUDA_BLAS_WS_BYTES ((size_t)32 << 20)

/* 1 if a CUDA device is usable, else 0 with the reason in err. */
int cake_cuda_available(char *err, size_t errlen);

/* Uploads m's weights and allocates a KV cache of n_ctx positions and scratch
 * for batches of up to max_batch tokens. 0 ok, -1 with err. */
int cake_cuda_init(const cake_model *m, int n_ctx, int max_batch, cake_cuda_state **out, char *err,
                   size_t errlen);
void cake_cuda_free(cake_cuda_state *s); /* accepts NULL */

/* Positions [pos0, pos0 + n) for tokens[0..n), n <= max_batch, given the KV of
 * [0, pos0) in the GPU cache. If logits is not NULL, copies the last token's
 * n_vocab f32 logits to it (host memory). 0 ok, -1 with err. */
int cake_cuda_forward(cake_cuda_state *s, const cake_token *tokens, int n, int pos0, float *logits,
                      char *err, size_t errlen);

/* KV transfer for the chunk store/loader: copies positions [pos0, pos0 + n) of
 * layer l between host memory (f16, (n, n_kv_heads, head_dim) for K and for V)
 * and the GPU cache. Asynchronous variants come with the loader. */
int cake_cuda_kv_write(cake_cuda_state *s, int layer, int pos0, int n, const void *k_f16,
                       const void *v_f16, char *err, size_t errlen);
int cake_cuda_kv_read(cake_cuda_state *s, int layer, int pos0, int n, void *k_f16, void *v_f16,
                      char *err, size_t errlen);

/* Pinned host memory (page-aligned) for the loader's fetch buffers: a KV
 * write from it goes to the GPU by DMA, without the bounce buffers. NULL when
 * the module or the driver cannot give it. */
void *cake_cuda_host_alloc(size_t size);
/* Frees p and returns 1 if it came from cake_cuda_host_alloc; else 0. */
int cake_cuda_host_free(void *p);

/* Test hook for the attention kernels: runs one of them on random f16 data
 * (q uniform in [-q_scale, q_scale], K and V in [-1, 1]) for queries at
 * positions [pos0, pos0 + n) over a cache of pos0 + n positions, with f32
 * output, and compares with a double-precision reference on the host.
 * path: 0 what the forward pass picks, 1 tensor-core flash attention (head_dim
 * 64 or 128; keys split into ranges when the batch has few query blocks and
 * many keys), 2 the plain kernel, 3 the plain kernel split over 64-key ranges
 * (n <= 8). 0 with *max_err = max |out - reference| (inf for NaN), -1 with
 * err. Uses the current device; needs no model. */
int cake_cuda_attention_check(int path, int head_dim, int n_heads, int n_kv_heads, int pos0, int n,
                              float q_scale, double *max_err, char *err, size_t errlen);

/* The module's side: libcake_cuda.so exports one symbol, cake_cuda_module_ops,
 * a table of the implementations of the functions above (same contracts). */
#define CAKE_CUDA_MODULE_VERSION 2
typedef struct {
    int version; /* CAKE_CUDA_MODULE_VERSION: a module from another build is refused */
    int (*available)(char *err, size_t errlen);
    int (*init)(const cake_model *m, int n_ctx, int max_batch, cake_cuda_state **out, char *err,
                size_t errlen);
    void (*free)(cake_cuda_state *s);
    int (*forward)(cake_cuda_state *s, const cake_token *tokens, int n, int pos0, float *logits,
                   char *err, size_t errlen);
    int (*kv_write)(cake_cuda_state *s, int layer, int pos0, int n, const void *k_f16,
                    const void *v_f16, char *err, size_t errlen);
    int (*kv_read)(cake_cuda_state *s, int layer, int pos0, int n, void *k_f16, void *v_f16,
                   char *err, size_t errlen);
    int (*attention_check)(int path, int head_dim, int n_heads, int n_kv_heads, int pos0, int n,
                           float q_scale, double *max_err, char *err, size_t errlen);
    void *(*host_alloc)(size_t size);
    int (*host_free)(void *p);
} cake_cuda_ops;

#ifdef __cplusplus
}
#endif
#endif
