/* Launchers of the CUDA backend's element-wise kernels (row_kernels.cuh):
 * embedding gather, RMSNorm, qwen3's q/k head norms, RoPE with the KV-cache
 * write, SwiGLU. The maths is the CPU backend's (src/backend/cpu/kernels.h). */
#include "backend/cuda/row_kernels.cuh"

#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "model/gguf.h"

namespace {

using namespace cake_rows;

unsigned grid_for(size_t total, int threads) {
    size_t blocks = (total + (size_t)threads - 1) / (size_t)threads;
    const size_t cap = 132 * 32; /* enough to fill an H100; the loops stride the rest */
    return (unsigned)(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
}

/* CAKE_CUDA_ROWS=plain: the plain RMSNorm, RoPE/KV and SwiGLU kernels (one
 * or two elements a thread) for every row, to measure the wide ones against
 * them in one run (read once; the forward pass is one thread). */
bool rows_plain() {
    static int plain = -1;
    if (plain < 0) {
        const char *e = getenv("CAKE_CUDA_ROWS");
        plain = e && !strcmp(e, "plain");
    }
    return plain;
}

template <typename T>
void launch_rmsnorm(T *y, const float *x, const float *w, int n, int dim, float eps,
                    cudaStream_t st) {
    if (rmsnorm_vec_fits(dim) && !rows_plain())
        rmsnorm_vec_kernel<<<n, ROW_THREADS, 0, st>>>(y, x, w, dim, eps);
    else
        rmsnorm_kernel<<<n, ROW_THREADS, 0, st>>>(y, x, w, dim, eps);
}

template <typename T, typename TIn>
void launch_swiglu(T *h, const TIn *gu, int n, int ffn, cudaStream_t st) {
    if constexpr (sizeof(T) == 2 && std::is_same_v<T, TIn>) {
        if (ffn % 8 == 0 && !rows_plain()) {
            const size_t groups = (size_t)n * (size_t)(ffn / 8);
            swiglu_vec_kernel<<<(unsigned)((groups + ROW_THREADS - 1) / ROW_THREADS), ROW_THREADS,
                                0, st>>>(h, gu, n, ffn);
            return;
        }
    }
    const dim3 grid((unsigned)((ffn + ROW_THREADS - 1) / ROW_THREADS),
                    (unsigned)(n < SWIGLU_MAX_Y ? n : SWIGLU_MAX_Y));
    swiglu_kernel<<<grid, ROW_THREADS, 0, st>>>(h, gu, n, ffn);
}

template <typename TIn, bool NEOX>
void launch_rope_kv(const TIn *qkv, const float *bias, __half *q16, __half *k_cache,
                    __half *v_cache, const float2 *rope_cs, int n, int pos0, int n_heads,
                    int n_kv_heads, int head_dim, cudaStream_t st) {
    /* Row slices so that a batch has ~2048 blocks (8 per SM of an H100) where
     * its rows allow: a chunk of 512 rows is 4 slices, decode's 1 row all of
     * its thread steps; a long batch is one block per row. */
    bool wide = false;
    if constexpr (sizeof(TIn) == 2) wide = rope_kv_wide_fits(head_dim) && !rows_plain();
    const int pairs = (n_heads + 2 * n_kv_heads) * (head_dim / 2);
    const int steps = (pairs / (wide ? 4 : 1) + ROW_THREADS - 1) / ROW_THREADS;
    const int want = (2048 + n - 1) / n;
    const dim3 grid((unsigned)n, (unsigned)(want < steps ? want : steps));
    if constexpr (sizeof(TIn) == 2) {
        if (wide) {
            rope_kv_kernel<TIn, NEOX, 4><<<grid, ROW_THREADS, 0, st>>>(
                qkv, bias, q16, k_cache, v_cache, rope_cs, pos0, n_heads, n_kv_heads, head_dim);
            return;
        }
    }
    rope_kv_kernel<TIn, NEOX, 1><<<grid, ROW_THREADS, 0, st>>>(
        qkv, bias, q16, k_cache, v_cache, rope_cs, pos0, n_heads, n_kv_heads, head_dim);
}

/* Calls f(T()) with T the element type of `dtype` (f32, f16 or bf16), then
 * returns the launch's error; cudaErrorInvalidValue for any other dtype. */
template <typename F> cudaError_t with_dtype(int dtype, F &&f) {
    switch (dtype) {
    case CAKE_DTYPE_F32:
        f(float());
        break;
    case CAKE_DTYPE_F16:
        f(__half());
        break;
    case CAKE_DTYPE_BF16:
        f(__nv_bfloat16());
        break;
    default:
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

} // namespace

cudaError_t cake_cuda_embed(float *x, const void *embd, int dtype, const int32_t *tokens, int n,
                            int dim, cudaStream_t st) {
    return with_dtype(dtype, [&](auto t) {
        embed_kernel<<<n, ROW_THREADS, 0, st>>>(x, (const decltype(t) *)embd, tokens, dim);
    });
}

cudaError_t cake_cuda_rmsnorm(void *y, int dtype, const float *x, const float *w, int n, int dim,
                              float eps, cudaStream_t st) {
    return with_dtype(dtype,
                      [&](auto t) { launch_rmsnorm((decltype(t) *)y, x, w, n, dim, eps, st); });
}

cudaError_t cake_cuda_rope_table(float2 *cs, const double *inv_freq, int n_pos, int half_hd,
                                 cudaStream_t st) {
    rope_table_kernel<<<grid_for((size_t)n_pos * (size_t)half_hd, ROW_THREADS), ROW_THREADS, 0,
                        st>>>(cs, inv_freq, n_pos, half_hd);
    return cudaGetLastError();
}

cudaError_t cake_cuda_qk_norm(void *qkv, int qkv_dtype, const float *bias, const float *q_norm,
                              const float *k_norm, int n, int n_heads, int n_kv_heads, int head_dim,
                              float eps, cudaStream_t st) {
    return with_dtype(qkv_dtype, [&](auto t) {
        qk_norm_kernel<<<n, ROW_THREADS, 0, st>>>((decltype(t) *)qkv, bias, q_norm, k_norm, n_heads,
                                                  n_kv_heads, head_dim, eps);
    });
}

cudaError_t cake_cuda_rope_kv(const void *qkv, int qkv_dtype, const float *bias, bool neox,
                              __half *q16, __half *k_cache, __half *v_cache, const float2 *rope_cs,
                              int n, int pos0, int n_heads, int n_kv_heads, int head_dim,
                              cudaStream_t st) {
    return with_dtype(qkv_dtype, [&](auto t) {
        using T = decltype(t);
        if (neox)
            launch_rope_kv<T, true>((const T *)qkv, bias, q16, k_cache, v_cache, rope_cs, n, pos0,
                                    n_heads, n_kv_heads, head_dim, st);
        else
            launch_rope_kv<T, false>((const T *)qkv, bias, q16, k_cache, v_cache, rope_cs, n, pos0,
                                     n_heads, n_kv_heads, head_dim, st);
    });
}

/* gu is f32, or of h's own type (the GEMM wrote it so). */
cudaError_t cake_cuda_swiglu(void *h, int dtype, const void *gu, int gu_dtype, int n, int ffn,
                             cudaStream_t st) {
    if (gu_dtype != CAKE_DTYPE_F32 && gu_dtype != dtype) return cudaErrorInvalidValue;
    return with_dtype(dtype, [&](auto t) {
        using T = decltype(t);
        if (gu_dtype == CAKE_DTYPE_F32)
            launch_swiglu((T *)h, (const float *)gu, n, ffn, st);
        else
            launch_swiglu((T *)h, (const T *)gu, n, ffn, st);
    });
}
