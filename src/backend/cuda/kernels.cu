/* The CUDA backend's element-wise kernels: embedding gather, RMSNorm, RoPE with
 * the KV-cache write, SwiGLU. They are memory-bound and simple on purpose: one
 * block per token row where a row-wide reduction is needed, grid-stride loops
 * otherwise. The maths is the CPU backend's (src/backend/cpu/kernels.h). */
#include "backend/cuda/common.cuh"

#include "model/gguf.h"

namespace {

constexpr int ROW_THREADS = 256;

template <typename T>
__global__ void embed_kernel(float *__restrict__ x, const T *__restrict__ embd,
                             const int32_t *__restrict__ tokens, int dim) {
    const int t = blockIdx.x;
    const T *src = embd + (size_t)tokens[t] * (size_t)dim;
    float *dst = x + (size_t)t * (size_t)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = cake_to_f32(src[i]);
}

template <typename T>
__global__ void rmsnorm_kernel(T *__restrict__ y, const float *__restrict__ x,
                               const float *__restrict__ w, int dim, float eps) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * (size_t)dim;
    const float *xr = x + row;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = cake_block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        y[row + i] = cake_from_f32<T>(xr[i] * r * w[i]);
}

/* One block per token. The angles are computed in double: at positions in the
 * tens of thousands an f32 angle (or the fast-math __sinf) would be off by more
 * than the f16 rounding of the result. */
__global__ void rope_kv_kernel(const float *__restrict__ qkv, __half *__restrict__ q16,
                               __half *__restrict__ k_cache, __half *__restrict__ v_cache,
                               const double *__restrict__ inv_freq, int pos0, int n_heads,
                               int n_kv_heads, int head_dim) {
    extern __shared__ float cs[]; /* cos[head_dim / 2], then sin[head_dim / 2] */
    const int t = blockIdx.x, half_hd = head_dim / 2;
    const int pos = pos0 + t;
    for (int i = threadIdx.x; i < half_hd; i += blockDim.x) {
        double s, c;
        sincos((double)pos * inv_freq[i], &s, &c);
        cs[i] = (float)c;
        cs[half_hd + i] = (float)s;
    }
    __syncthreads();
    const int dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const float *row = qkv + (size_t)t * (size_t)(dim + 2 * kv_dim);
    __half *qdst = q16 + (size_t)t * (size_t)dim;
    for (int p = threadIdx.x; p < dim / 2; p += blockDim.x) {
        const int i = p % half_hd;
        const float x0 = row[2 * p], x1 = row[2 * p + 1], c = cs[i], s = cs[half_hd + i];
        qdst[2 * p] = __float2half_rn(x0 * c - x1 * s);
        qdst[2 * p + 1] = __float2half_rn(x0 * s + x1 * c);
    }
    const float *krow = row + dim, *vrow = row + dim + kv_dim;
    __half *kdst = k_cache + (size_t)pos * (size_t)kv_dim;
    __half *vdst = v_cache + (size_t)pos * (size_t)kv_dim;
    for (int p = threadIdx.x; p < kv_dim / 2; p += blockDim.x) {
        const int i = p % half_hd;
        const float x0 = krow[2 * p], x1 = krow[2 * p + 1], c = cs[i], s = cs[half_hd + i];
        kdst[2 * p] = __float2half_rn(x0 * c - x1 * s);
        kdst[2 * p + 1] = __float2half_rn(x0 * s + x1 * c);
    }
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) vdst[i] = __float2half_rn(vrow[i]);
}

template <typename T>
__global__ void swiglu_kernel(T *__restrict__ h, const float *__restrict__ gu, int ffn,
                              size_t total) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const size_t t = idx / (size_t)ffn, i = idx % (size_t)ffn;
        const float g = gu[t * 2 * (size_t)ffn + i], u = gu[t * 2 * (size_t)ffn + (size_t)ffn + i];
        h[idx] = cake_from_f32<T>(g / (1.0f + __expf(-g)) * u);
    }
}

unsigned grid_for(size_t total, int threads) {
    size_t blocks = (total + (size_t)threads - 1) / (size_t)threads;
    const size_t cap = 132 * 32; /* enough to fill an H100; the loops stride the rest */
    return (unsigned)(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
}

} // namespace

cudaError_t cake_cuda_embed(float *x, const void *embd, int dtype, const int32_t *tokens, int n,
                            int dim, cudaStream_t st) {
    switch (dtype) {
    case CAKE_DTYPE_F32:
        embed_kernel<<<n, ROW_THREADS, 0, st>>>(x, (const float *)embd, tokens, dim);
        break;
    case CAKE_DTYPE_F16:
        embed_kernel<<<n, ROW_THREADS, 0, st>>>(x, (const __half *)embd, tokens, dim);
        break;
    case CAKE_DTYPE_BF16:
        embed_kernel<<<n, ROW_THREADS, 0, st>>>(x, (const __nv_bfloat16 *)embd, tokens, dim);
        break;
    default:
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

cudaError_t cake_cuda_rmsnorm(void *y, int dtype, const float *x, const float *w, int n, int dim,
                              float eps, cudaStream_t st) {
    switch (dtype) {
    case CAKE_DTYPE_F32:
        rmsnorm_kernel<<<n, ROW_THREADS, 0, st>>>((float *)y, x, w, dim, eps);
        break;
    case CAKE_DTYPE_F16:
        rmsnorm_kernel<<<n, ROW_THREADS, 0, st>>>((__half *)y, x, w, dim, eps);
        break;
    case CAKE_DTYPE_BF16:
        rmsnorm_kernel<<<n, ROW_THREADS, 0, st>>>((__nv_bfloat16 *)y, x, w, dim, eps);
        break;
    default:
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

cudaError_t cake_cuda_rope_kv(const float *qkv, __half *q16, __half *k_cache, __half *v_cache,
                              const double *inv_freq, int n, int pos0, int n_heads, int n_kv_heads,
                              int head_dim, cudaStream_t st) {
    const size_t smem = (size_t)head_dim * sizeof(float);
    rope_kv_kernel<<<n, ROW_THREADS, smem, st>>>(qkv, q16, k_cache, v_cache, inv_freq, pos0,
                                                 n_heads, n_kv_heads, head_dim);
    return cudaGetLastError();
}

cudaError_t cake_cuda_swiglu(void *h, int dtype, const float *gu, int n, int ffn, cudaStream_t st) {
    const size_t total = (size_t)n * (size_t)ffn;
    const unsigned blocks = grid_for(total, ROW_THREADS);
    switch (dtype) {
    case CAKE_DTYPE_F32:
        swiglu_kernel<<<blocks, ROW_THREADS, 0, st>>>((float *)h, gu, ffn, total);
        break;
    case CAKE_DTYPE_F16:
        swiglu_kernel<<<blocks, ROW_THREADS, 0, st>>>((__half *)h, gu, ffn, total);
        break;
    case CAKE_DTYPE_BF16:
        swiglu_kernel<<<blocks, ROW_THREADS, 0, st>>>((__nv_bfloat16 *)h, gu, ffn, total);
        break;
    default:
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}
