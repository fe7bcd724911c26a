/* Private helpers of the CUDA backend: element types, conversions, block
 * reductions, and the launch wrappers of our kernels (kernels.cu, attention.cu).
 *
 * Element types: every matrix on the GPU has one type per model (f32, f16 or
 * bf16, the type of the file's layer weights), named by a cake_dtype value. The
 * residual stream, GEMM outputs and softmax are f32; GEMM inputs are in the
 * weight type; Q, K and V for attention are f16.
 *
 * Determinism: every reduction below runs in a fixed order (warp butterflies,
 * then the warps' partials summed in index order), no float atomics anywhere,
 * so the same launch gives bit-identical results run to run. */
#ifndef CAKE_CUDA_COMMON_CUH
#define CAKE_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

/* ---- element conversions ---- */

__device__ __forceinline__ float cake_to_f32(float v) {
    return v;
}
__device__ __forceinline__ float cake_to_f32(__half v) {
    return __half2float(v);
}
__device__ __forceinline__ float cake_to_f32(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T cake_from_f32(float v);
template <> __device__ __forceinline__ float cake_from_f32<float>(float v) {
    return v;
}
template <> __device__ __forceinline__ __half cake_from_f32<__half>(float v) {
    return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 cake_from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

/* Loads two adjacent elements p[0], p[1] (p is 2-element aligned) as f32. */
__device__ __forceinline__ float2 cake_load2(const float *p) {
    return *reinterpret_cast<const float2 *>(p);
}
__device__ __forceinline__ float2 cake_load2(const __half *p) {
    return __half22float2(*reinterpret_cast<const __half2 *>(p));
}
__device__ __forceinline__ float2 cake_load2(const __nv_bfloat16 *p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(p));
}

/* Stores two adjacent elements p[0], p[1] (p is 2-element aligned). */
__device__ __forceinline__ void cake_store2(float *p, float a, float b) {
    *reinterpret_cast<float2 *>(p) = make_float2(a, b);
}
__device__ __forceinline__ void cake_store2(__half *p, float a, float b) {
    *reinterpret_cast<__half2 *>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void cake_store2(__nv_bfloat16 *p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(a, b);
}

/* A 2-byte element from its bits and back (by value: the host build of the
 * emulated tests would break type punning through pointers, strict aliasing). */
template <typename T> __device__ __forceinline__ float cake_bits_to_f32(uint32_t b);
template <> __device__ __forceinline__ float cake_bits_to_f32<__half>(uint32_t b) {
    return __half2float(__ushort_as_half((unsigned short)b));
}
template <> __device__ __forceinline__ float cake_bits_to_f32<__nv_bfloat16>(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)b));
}
template <typename T> __device__ __forceinline__ uint32_t cake_f32_to_bits(float v) {
    return __half_as_ushort(__float2half_rn(v));
}
template <> __device__ __forceinline__ uint32_t cake_f32_to_bits<__nv_bfloat16>(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

/* N (4 or 8) consecutive 2-byte elements in one 8- or 16-byte access (p
 * aligned to it), as f32 and back: the row kernels' wide loads. Element 2k is
 * the low half of 32-bit word k (little-endian, as the GPU stores them). */
template <int N> struct cake_wide;
template <> struct cake_wide<4> {
    using type = uint2;
    static __device__ __forceinline__ uint32_t get(const uint2 &w, int k) {
        return k ? w.y : w.x;
    }
    static __device__ __forceinline__ uint2 make(const uint32_t *v) {
        return make_uint2(v[0], v[1]);
    }
};
template <> struct cake_wide<8> {
    using type = uint4;
    static __device__ __forceinline__ uint32_t get(const uint4 &w, int k) {
        return k == 0 ? w.x : k == 1 ? w.y : k == 2 ? w.z : w.w;
    }
    static __device__ __forceinline__ uint4 make(const uint32_t *v) {
        return make_uint4(v[0], v[1], v[2], v[3]);
    }
};

template <int N, typename T> __device__ __forceinline__ void cake_load_n(const T *p, float *f) {
    static_assert(sizeof(T) == 2, "16-bit types only");
    using W = cake_wide<N>;
    const typename W::type w = *reinterpret_cast<const typename W::type *>(p);
#pragma unroll
    for (int k = 0; k < N / 2; k++) {
        f[2 * k] = cake_bits_to_f32<T>(W::get(w, k) & 0xffffu);
        f[2 * k + 1] = cake_bits_to_f32<T>(W::get(w, k) >> 16);
    }
}

template <int N, typename T> __device__ __forceinline__ void cake_store_n(T *p, const float *f) {
    static_assert(sizeof(T) == 2, "16-bit types only");
    using W = cake_wide<N>;
    uint32_t w[N / 2];
#pragma unroll
    for (int k = 0; k < N / 2; k++)
        w[k] = cake_f32_to_bits<T>(f[2 * k]) | cake_f32_to_bits<T>(f[2 * k + 1]) << 16;
    *reinterpret_cast<typename W::type *>(p) = W::make(w);
}

/* ---- block reductions (fixed order; every thread gets the same value) ----
 * scratch: at least 32 floats of shared memory, not in use by another
 * reduction until a __syncthreads() after this one returns. */

__device__ __forceinline__ float cake_warp_sum(float v) {
    /* Butterfly: lanes i and i^k add the same two numbers (commutative), so all
     * lanes end with bitwise the same sum. */
    for (int k = 16; k > 0; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
    return v;
}

__device__ __forceinline__ float cake_warp_max(float v) {
    for (int k = 16; k > 0; k >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, k));
    return v;
}

__device__ __forceinline__ float cake_block_sum(float v, float *scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    v = cake_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < n_warps; w++) s += scratch[w];
    return s;
}

__device__ __forceinline__ float cake_block_max(float v, float *scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    v = cake_warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int w = 0; w < n_warps; w++) m = fmaxf(m, scratch[w]);
    return m;
}

/* ---- launch wrappers (return the launch's error, cudaSuccess if none) ----
 * `dtype` arguments are cake_dtype values (0 F32, 1 F16, 30 BF16) naming the
 * element type of the untyped pointer next to them. */

/* x[t, :] = embd[tokens[t], :] as f32. x: (n, dim); embd: (n_vocab, dim). */
cudaError_t cake_cuda_embed(float *x, const void *embd, int dtype, const int32_t *tokens, int n,
                            int dim, cudaStream_t st);

/* y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w, written as `dtype`. */
cudaError_t cake_cuda_rmsnorm(void *y, int dtype, const float *x, const float *w, int n, int dim,
                              float eps, cudaStream_t st);

/* The RoPE table: cs (n_pos, half_hd) = (cos, sin) of p * inv_freq[i], for
 * inv_freq (half_hd doubles) = theta^(-2i/head_dim) * freq_scale. */
cudaError_t cake_cuda_rope_table(float2 *cs, const double *inv_freq, int n_pos, int half_hd,
                                 cudaStream_t st);

/* qwen3: each q and k head of the rows of qkv (n, q_dim + 2 kv_dim; qkv_dtype
 * f32, f16 or bf16), plus its part of bias (q and k biases as one f32 row, or
 * NULL), RMS-normed in place with weights q_norm / k_norm (head_dim f32 each). */
cudaError_t cake_cuda_qk_norm(void *qkv, int qkv_dtype, const float *bias, const float *q_norm,
                              const float *k_norm, int n, int n_heads, int n_kv_heads, int head_dim,
                              float eps, cudaStream_t st);

/* From qkv (n, q_dim + 2 kv_dim) rows [q | k | v] (qkv_dtype: f32, f16 or
 * bf16; q_dim = n_heads * head_dim) of tokens at positions pos0 + t, plus
 * bias (one f32 row of the q, k and v biases, or NULL): q16 (n, q_dim) =
 * rope(q) as f16; k_cache[pos0 + t] =
 * rope(k) and v_cache[pos0 + t] = v as f16 (rows of kv_dim). RoPE turns pairs
 * (2i, 2i + 1) of each head, or (i, i + head_dim / 2) when neox. rope_cs: the
 * RoPE table (cake_cuda_rope_table) of at least pos0 + n positions. */
cudaError_t cake_cuda_rope_kv(const void *qkv, int qkv_dtype, const float *bias, bool neox,
                              __half *q16, __half *k_cache, __half *v_cache, const float2 *rope_cs,
                              int n, int pos0, int n_heads, int n_kv_heads, int head_dim,
                              cudaStream_t st);

/* h[t, i] = silu(gu[t, i]) * gu[t, ffn + i] as `dtype`. gu: (n, 2 ffn) f32 or
 * `dtype`; h: (n, ffn). */
cudaError_t cake_cuda_swiglu(void *h, int dtype, const void *gu, int gu_dtype, int n, int ffn,
                             cudaStream_t st);

/* ---- attention (attention.cu) ---- */

enum cake_attn_path {
    CAKE_ATTN_AUTO = 0,  /* what the forward pass uses */
    CAKE_ATTN_MMA = 1,   /* tensor-core flash attention (head_dim 64 or 128) */
    CAKE_ATTN_SIMT = 2,  /* plain kernel, one block per (query, head) */
    CAKE_ATTN_SPLIT = 3, /* plain kernel split over keys + combine (decode) */
    CAKE_ATTN_WGMMA = 4, /* warpgroup-MMA flash attention (head_dim 128, sm_90a builds, H100) */
};

typedef struct {
    const __half *q;     /* (n, n_heads, head_dim) */
    const __half *k, *v; /* one layer's cache: (n_ctx, n_kv_heads, head_dim) */
    void *out;           /* (n, n_heads, head_dim) of out_dtype */
    int out_dtype;       /* cake_dtype */
    int n, pos0;         /* queries at positions [pos0, pos0 + n); keys [0, pos0 + n) */
    int n_heads, n_kv_heads, head_dim;
    float *part;        /* partials of split ranges: (n, n_heads, ranges, head_dim + 2) */
    size_t part_floats; /* part's capacity; NULL part: the MMA path does not split */
    int split_len;      /* keys per range (split path) */
    int n_sm;           /* the GPU's multiprocessors (when the MMA path splits) */
    /* Zeroed ints with which the tensor-core kernels merge their own key
     * ranges; NULL, or too few for a batch: a combine kernel merges them. */
    int *counters;
    size_t counter_ints;
} cake_attn_launch;

/* Most queries per call that take the split (decode) path in AUTO mode, and
 * the capacity that `part` must have in queries. */
#define CAKE_ATTN_SPLIT_MAX_N 8

/* The MMA path splits the keys of batches of up to CAKE_ATTN_MMA_SPLIT_MAX_N
 * queries into at most CAKE_ATTN_MMA_MAX_SPLITS ranges, as `part` has room. */
#define CAKE_ATTN_MMA_SPLIT_MAX_N 1024
#define CAKE_ATTN_MMA_MAX_SPLITS  8

/* The floats `part` needs for batches of up to max_n queries: the decode
 * path's n_splits_max ranges or the MMA path's, whichever is more. */
static inline size_t cake_attn_part_floats(int max_n, int n_splits_max, int n_heads, int head_dim) {
    const size_t decode = (size_t)CAKE_ATTN_SPLIT_MAX_N * (size_t)n_splits_max;
    const size_t mma =
        (size_t)(max_n < CAKE_ATTN_MMA_SPLIT_MAX_N ? max_n : CAKE_ATTN_MMA_SPLIT_MAX_N) *
        CAKE_ATTN_MMA_MAX_SPLITS;
    return (decode > mma ? decode : mma) * (size_t)n_heads * (size_t)(head_dim + 2);
}

/* The ints `counters` needs for batches of up to max_n queries: one per
 * (query block, head) of a batch the MMA paths split (blocks of >= 64 queries). */
static inline size_t cake_attn_counter_ints(int max_n, int n_heads) {
    const int n = max_n < CAKE_ATTN_MMA_SPLIT_MAX_N ? max_n : CAKE_ATTN_MMA_SPLIT_MAX_N;
    return (size_t)((n + 63) / 64) * (size_t)n_heads;
}

/* Sets up the kernels' shared-memory limits; call once per device. */
cudaError_t cake_cuda_attention_setup(void);
/* 1 if `path` can run head_dim hd with out_dtype. */
int cake_cuda_attention_supported(int path, int head_dim);
cudaError_t cake_cuda_attention(const cake_attn_launch *a, int path, cudaStream_t st);
/* 1 if split WGMMA launches take the stream schedule (CAKE_CUDA_ATTN_SCHED=stream). */
int cake_cuda_attention_stream(void);

#endif
