/* The element-wise kernels (device code): embedding gather, RMSNorm, the RoPE
 * table, RoPE with the KV-cache write, SwiGLU; kernels.cu launches them. They
 * are memory-bound: what matters is bytes in flight. A chunk of 512 rows gives
 * one block per row only half a wave on an H100, so the row kernels load 8 or
 * 16 bytes at a time and issue a row's loads before they use them.
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
            cake_store2(yr + 4 * i, v[k].x * r * g.x, v[k].y * r * g.y);
            cake_store2(yr + 4 * i + 2, v[k].z * r * g.z, v[k].w * r * g.w);
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

/* grid (n, slices), block ROW_THREADS. Row t of qkv is [q (dim) | k (kv_dim) |
 * v (kv_dim)] (f32, or f16/bf16 straight from the GEMM), at position pos0 + t:
 * q16[t] = rope(q + bq), k_cache[pos] = rope(k + bk), v_cache[pos] = v + bv, as
 * f16 (bias: the model's q/k/v biases as one f32 row, or NULL). RoPE turns
 * the pairs (2i, 2i + 1) of each head, or with NEOX the pairs (i, i + half);
 * thread step p takes pair p either way (heads start at multiples of
 * half_hd pairs), and v's elements in pairs as they lie. Block y takes the
 * y-th of `slices` equal parts of the row's pairs: a batch of few rows still
 * gets enough blocks to keep the memory system busy. */
template <typename TIn, bool NEOX>
__global__ void __launch_bounds__(ROW_THREADS)
    rope_kv_kernel(const TIn *__restrict__ qkv, const float *__restrict__ bias,
                   __half *__restrict__ q16, __half *__restrict__ k_cache,
                   __half *__restrict__ v_cache, const float2 *__restrict__ rope_cs, int pos0,
                   int n_heads, int n_kv_heads, int head_dim) {
    const int t = blockIdx.x, half_hd = head_dim / 2, pos = pos0 + t;
    const int q_pairs = n_heads * half_hd, kv_pairs = n_kv_heads * half_hd;
    const float2 *cs = rope_cs + (size_t)pos * (size_t)half_hd;
    const TIn *row = qkv + (size_t)t * 2 * (q_pairs + 2 * kv_pairs);
    __half *qdst = q16 + (size_t)t * 2 * q_pairs;
    __half *kdst = k_cache + (size_t)pos * 2 * kv_pairs;
    __half *vdst = v_cache + (size_t)pos * 2 * kv_pairs;
    const int pairs = q_pairs + 2 * kv_pairs, per = (pairs + gridDim.y - 1) / gridDim.y;
    const int p_end = min(pairs, ((int)blockIdx.y + 1) * per);
#pragma unroll 4
    for (int p = (int)blockIdx.y * per + threadIdx.x; p < p_end; p += ROW_THREADS) {
        const bool rotate = p < q_pairs + kv_pairs;
        /* the pair's two elements in the row */
        const int e0 = NEOX && rotate ? p / half_hd * head_dim + p % half_hd : 2 * p;
        const int e1 = NEOX && rotate ? e0 + half_hd : e0 + 1;
        float2 x = NEOX && rotate ? make_float2(cake_to_f32(row[e0]), cake_to_f32(row[e1]))
                                  : cake_load2(row + 2 * p);
        if (bias) {
            x.x += bias[e0];
            x.y += bias[e1];
        }
        if (!rotate) {
            reinterpret_cast<__half2 *>(vdst)[p - q_pairs - kv_pairs] = __floats2half2_rn(x.x, x.y);
            continue;
        }
        const float2 r = cs[p % half_hd]; /* (cos, sin) */
        const float y0 = x.x * r.x - x.y * r.y, y1 = x.x * r.y + x.y * r.x;
        const bool is_q = p < q_pairs;
        __half *dst = is_q ? qdst : kdst;
        const int first = is_q ? 0 : 2 * q_pairs; /* k's elements follow q's in the row */
        if (NEOX) {
            dst[e0 - first] = __float2half_rn(y0);
            dst[e1 - first] = __float2half_rn(y1);
        } else {
            reinterpret_cast<__half2 *>(dst)[p - first / 2] = __floats2half2_rn(y0, y1);
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

} // namespace cake_rows

#endif
