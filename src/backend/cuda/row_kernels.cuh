/* The element-wise kernels (device code): embedding gather, RMSNorm, the RoPE
 * table, qwen3's q/k head norms, RoPE with the KV-cache write, SwiGLU; kernels.cu launches them.
 * They are memory-bound: what matters is bytes in flight. A chunk of 512 rows gives one block per
 * row only half a wave on an H100, so the row kernels load 8 or 16 bytes at a time and issue a
 * row's loads before they use them.
 *
 * A host build that defines CAKE_CUDA_EMULATE runs them on the CPU with
 * emulated blocks (tests/test_row_kernels_emulated.cpp). */
#ifndef CAKE_CUDA_ROW_KERNELS_CUH
#define CAKE_CUDA_ROW_KERNELS_CUH

#include "backend/cuda/common.cuh"

namespace cake_rows {

constexpr int ROW_THREADS = 256;
/* rmsnorm_vec_kernel holds its row in registers: RMS_VEC float4 per thread. */
constexpr int RMS_VEC = 8;

/* Whether rmsnorm_vec_kernel takes rows of dim floats (else rmsnorm_kernel). */
__host__ __device__ constexpr bool rmsnorm_vec_fits(int dim) {
    return dim % 4 == 0 && dim <= 4 * ROW_THREADS * RMS_VEC;
}

/* grid n, block ROW_THREADS: x[t, :] = embd[tokens[t], :] as f32. */
template <typename T>
__global__ void embed_kernel(float *__restrict__ x, const T *__restrict__ embd,
                             const int32_t *__restrict__ tokens, int dim) {
    const int t = blockIdx.x;
    const T *src = embd + (size_t)tokens[t] * (size_t)dim;
    float *dst = x + (size_t)t * (size_t)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = cake_to_f32(src[i]);
}

/* grid n, block ROW_THREADS, any dim: x is read twice (the second time from L2). */
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

/* grid n, block ROW_THREADS, rmsnorm_vec_fits(dim): the row is read once, in
 * float4 loads that all go out before the reduction. Same maths as
 * rmsnorm_kernel; only the order of the sum of squares differs (fixed, and per
 * row, so a row's bits do not depend on the batch). */
template <typename T>
__global__ void __launch_bounds__(ROW_THREADS)
    rmsnorm_vec_kernel(T *__restrict__ y, const float *__restrict__ x, const float *__restrict__ w,
                       int dim, float eps) {
    __shared__ float scratch[32];
    const int n4 = dim / 4;
    const float4 *xr = reinterpret_cast<const float4 *>(x + (size_t)blockIdx.x * (size_t)dim);
    float4 v[RMS_VEC];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < RMS_VEC; k++) {
        const int i = (int)threadIdx.x + k * ROW_THREADS;
        if (i < n4) {
            v[k] = xr[i];
            ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
    }
    const float r = rsqrtf(cake_block_sum(ss, scratch) / (float)dim + eps);
    const float4 *w4 = reinterpret_cast<const float4 *>(w);
    T *yr = y + (size_t)blockIdx.x * (size_t)dim;
#pragma unroll
    for (int k = 0; k < RMS_VEC; k++) {
        const int i = (int)threadIdx.x + k * ROW_THREADS;
        if (i < n4) {
            const float4 g = w4[i];
            const float o[4] = {v[k].x * r * g.x, v[k].y * r * g.y, v[k].z * r * g.z,
                                v[k].w * r * g.w};
            if constexpr (sizeof(T) == 2) {
                cake_store_n<4>(yr + 4 * i, o); /* one 8-byte store */
            } else {
                cake_store2(yr + 4 * i, o[0], o[1]);
                cake_store2(yr + 4 * i + 2, o[2], o[3]);
            }
        }
    }
}

/* Grid-stride over n_pos * half_hd: cs[p * half_hd + i] = (cos, sin) of
 * p * inv_freq[i], computed in double and rounded to f32: at positions in the
 * tens of thousands an f32 angle (or the fast-math __sinf) would be off by
 * more than the f16 rounding of the result. Run once, for the whole context. */
__global__ void rope_table_kernel(float2 *__restrict__ cs, const double *__restrict__ inv_freq,
                                  int n_pos, int half_hd) {
    const size_t total = (size_t)n_pos * (size_t)half_hd;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        double s, c;
        sincos((double)(idx / (size_t)half_hd) * inv_freq[idx % (size_t)half_hd], &s, &c);
        cs[idx] = make_float2((float)c, (float)s);
    }
}

/* N consecutive elements of a row (p aligned to N elements) as f32, and N
 * floats out as f16: one element, a pair, or (2-byte types) 4 or 8 in one
 * 8- or 16-byte access. */
template <int N, typename T> __device__ __forceinline__ void load_run(const T *p, float *f) {
    if constexpr (N == 1) {
        f[0] = cake_to_f32(p[0]);
    } else if constexpr (N == 2) {
        const float2 v = cake_load2(p);
        f[0] = v.x;
        f[1] = v.y;
    } else {
        cake_load_n<N>(p, f);
    }
}
template <int N> __device__ __forceinline__ void store_run(__half *p, const float *f) {
    if constexpr (N == 1)
        p[0] = __float2half_rn(f[0]);
    else if constexpr (N == 2)
        cake_store2(p, f[0], f[1]);
    else
        cake_store_n<N>(p, f);
}

/* grid n, block ROW_THREADS: qwen3's per-head RMSNorm of q and k, in place
 * in row t of qkv ([q (n_heads heads) | k (n_kv_heads heads) | v], of
 * head_dim each) before rope_kv_kernel turns them: head x becomes
 * (x + b) * r * w, r = 1 / sqrt(mean((x + b)^2) + eps), w = q_norm for q
 * heads and k_norm for k heads, b the head's part of `bias` (the q and k
 * biases as one row, or NULL), as the CPU backend does. One warp a head,
 * every warp through the same number of rounds (the shuffles need whole
 * warps). The result is rounded to T once more than on the CPU. */
template <typename T>
__global__ void __launch_bounds__(ROW_THREADS)
    qk_norm_kernel(T *__restrict__ qkv, const float *__restrict__ bias,
                   const float *__restrict__ q_norm, const float *__restrict__ k_norm, int n_heads,
                   int n_kv_heads, int head_dim, float eps) {
    constexpr int WARPS = ROW_THREADS / 32;
    const int lane = (int)threadIdx.x % 32, heads = n_heads + n_kv_heads;
    T *row = qkv + (size_t)blockIdx.x * (size_t)(heads + n_kv_heads) * (size_t)head_dim;
    for (int h0 = 0; h0 < heads; h0 += WARPS) {
        const int h = h0 + (int)threadIdx.x / 32;
        const bool active = h < heads;
        T *x = row + (size_t)h * (size_t)head_dim;
        const float *b = bias ? bias + (size_t)h * (size_t)head_dim : nullptr;
        float ss = 0.0f;
        if (active)
            for (int i = lane; i < head_dim; i += 32) {
                const float v = cake_to_f32(x[i]) + (b ? b[i] : 0.0f);
                ss += v * v;
            }
        ss = cake_warp_sum(ss);
        if (!active) continue;
        const float r = rsqrtf(ss / (float)head_dim + eps);
        const float *w = h < n_heads ? q_norm : k_norm;
        for (int i = lane; i < head_dim; i += 32)
            x[i] = cake_from_f32<T>((cake_to_f32(x[i]) + (b ? b[i] : 0.0f)) * r * w[i]);
    }
}

/* Whether rope_kv_kernel can take S = 4 pairs a thread step (with 2-byte
 * inputs): head_dim / 2 a multiple of 4, so that a step's pairs never
 * straddle a head, or q, k and v. */
__host__ __device__ constexpr bool rope_kv_wide_fits(int head_dim) {
    return head_dim % 8 == 0;
}

/* grid (n, slices), block ROW_THREADS. Row t of qkv is [q (dim) | k (kv_dim) |
 * v (kv_dim)] (f32, or f16/bf16 straight from the GEMM), at position pos0 + t:
 * q16[t] = rope(q + bq), k_cache[pos] = rope(k + bk), v_cache[pos] = v + bv, as
 * f16 (bias: the model's q/k/v biases as one f32 row, or NULL). RoPE turns
 * the pairs (2i, 2i + 1) of each head, or with NEOX the pairs (i, i + half).
 * A thread step takes S pairs: S = 1, or S = 4 for 2-byte inputs where
 * rope_kv_wide_fits (8 elements in one 16-byte load; with NEOX two 8-byte
 * loads, i..i+3 and i + half..), stored as wide. One pair a step, 4-byte
 * loads, kept an H100 at ~60% of its memory bandwidth (13B shape: 21.9 ms of
 * rope+kv for 16K tokens against ~13 for the bytes moved). Block y takes the
 * y-th of `slices` equal parts of the row's steps: a batch of few rows still
 * gets enough blocks to keep the memory system busy. */
template <typename TIn, bool NEOX, int S>
__global__ void __launch_bounds__(ROW_THREADS)
    rope_kv_kernel(const TIn *__restrict__ qkv, const float *__restrict__ bias,
                   __half *__restrict__ q16, __half *__restrict__ k_cache,
                   __half *__restrict__ v_cache, const float2 *__restrict__ rope_cs, int pos0,
                   int n_heads, int n_kv_heads, int head_dim) {
    static_assert(S == 1 || (S == 4 && sizeof(TIn) == 2), "wide steps for 16-bit inputs only");
    const int t = blockIdx.x, half_hd = head_dim / 2, pos = pos0 + t;
    const int q_pairs = n_heads * half_hd, kv_pairs = n_kv_heads * half_hd;
    const float2 *cs = rope_cs + (size_t)pos * (size_t)half_hd;
    const TIn *row = qkv + (size_t)t * 2 * (q_pairs + 2 * kv_pairs);
    __half *qdst = q16 + (size_t)t * 2 * q_pairs;
    __half *kdst = k_cache + (size_t)pos * 2 * kv_pairs;
    __half *vdst = v_cache + (size_t)pos * 2 * kv_pairs;
    const int steps = (q_pairs + 2 * kv_pairs) / S, per = (steps + gridDim.y - 1) / gridDim.y;
    const int g_end = min(steps, ((int)blockIdx.y + 1) * per);
#pragma unroll(S == 1 ? 4 : 2)
    for (int g = (int)blockIdx.y * per + threadIdx.x; g < g_end; g += ROW_THREADS) {
        const int p = S * g; /* the step's first pair */
        const bool rotate = p < q_pairs + kv_pairs;
        /* a[k], b[k]: the two elements of pair p + k; e0, e1: where a[0], b[0] lie */
        float a[S], b[S];
        int e0 = 2 * p, e1 = e0 + 1;
        if (NEOX && rotate) {
            e0 = p / half_hd * head_dim + p % half_hd;
            e1 = e0 + half_hd;
            load_run<S>(row + e0, a);
            load_run<S>(row + e1, b);
            if (bias) {
#pragma unroll
                for (int k = 0; k < S; k++) {
                    a[k] += bias[e0 + k];
                    b[k] += bias[e1 + k];
                }
            }
        } else {
            float x[2 * S];
            load_run<2 * S>(row + e0, x);
#pragma unroll
            for (int k = 0; k < S; k++) {
                a[k] = x[2 * k] + (bias ? bias[e0 + 2 * k] : 0.0f);
                b[k] = x[2 * k + 1] + (bias ? bias[e0 + 2 * k + 1] : 0.0f);
            }
        }
        if (rotate) {
            const int i = p % half_hd;
#pragma unroll
            for (int k = 0; k < S; k++) {
                const float2 r = cs[i + k]; /* (cos, sin) */
                const float y0 = a[k] * r.x - b[k] * r.y, y1 = a[k] * r.y + b[k] * r.x;
                a[k] = y0;
                b[k] = y1;
            }
        }
        const bool is_q = p < q_pairs;
        /* the destination row, and where its part of the qkv row starts */
        __half *dst = !rotate ? vdst : is_q ? qdst : kdst;
        const int first = !rotate ? 2 * (q_pairs + kv_pairs) : is_q ? 0 : 2 * q_pairs;
        if (NEOX && rotate) {
            store_run<S>(dst + e0 - first, a);
            store_run<S>(dst + e1 - first, b);
        } else {
            float y[2 * S];
#pragma unroll
            for (int k = 0; k < S; k++) {
                y[2 * k] = a[k];
                y[2 * k + 1] = b[k];
            }
            store_run<2 * S>(dst + e0 - first, y);
        }
    }
}

/* Most rows one swiglu launch covers in its y dimension (a grid limit). */
constexpr int SWIGLU_MAX_Y = 65535;

/* grid (ceil(ffn / ROW_THREADS), min(n, SWIGLU_MAX_Y)), block ROW_THREADS:
 * h[t, i] = silu(gu[t, i]) * gu[t, ffn + i], one element per thread and row. */
template <typename T, typename TIn>
__global__ void swiglu_kernel(T *__restrict__ h, const TIn *__restrict__ gu, int n, int ffn) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    for (int t = blockIdx.y; t < n; t += gridDim.y) {
        const TIn *g = gu + (size_t)t * 2 * (size_t)ffn;
        const float gv = cake_to_f32(g[i]), u = cake_to_f32(g[ffn + i]);
        h[(size_t)t * ffn + i] = cake_from_f32<T>(gv / (1.0f + __expf(-gv)) * u);
    }
}

/* grid ceil(n * ffn / 8 / ROW_THREADS), block ROW_THREADS, T a 2-byte type
 * (gate/up straight from the GEMM), ffn % 8 == 0: swiglu_kernel's maths, 8
 * elements a thread in 16-byte loads and stores, so that enough bytes are in
 * flight (one 2-byte element a thread ran an H100 at ~1.45 TB/s). Same bits. */
template <typename T>
__global__ void __launch_bounds__(ROW_THREADS)
    swiglu_vec_kernel(T *__restrict__ h, const T *__restrict__ gu, int n, int ffn) {
    static_assert(sizeof(T) == 2, "16-bit types only");
    const size_t row_groups = (size_t)(ffn / 8), groups = (size_t)n * row_groups;
    const size_t idx = (size_t)blockIdx.x * ROW_THREADS + threadIdx.x;
    if (idx >= groups) return;
    /* Offsets as multiples of 8 elements: an offset of t * ffn elements made
     * nvcc split the 16-byte store into four (it could not see the alignment). */
    const size_t t = idx / row_groups;
    float gv[8], u[8], y[8];
    cake_load_n<8>(gu + 8 * (idx + t * row_groups), gv);
    cake_load_n<8>(gu + 8 * (idx + (t + 1) * row_groups), u);
#pragma unroll
    for (int k = 0; k < 8; k++) y[k] = gv[k] / (1.0f + __expf(-gv[k])) * u[k];
    cake_store_n<8>(h + 8 * idx, y);
}

} // namespace cake_rows

#endif
