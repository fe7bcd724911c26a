/* CPU kernels. Each fast kernel has a plain reference version (suffix _ref)
 * that states the maths; tests/test_kernels.c holds the fast ones equal to them.
 *
 * Threading: kernels that take a `cake_threadpool *` split work across its
 * threads; passing NULL runs on the calling thread. Work is split so that each
 * output element is computed by exactly one thread with a fixed reduction order,
 * so results do not depend on the thread count.
 */
#ifndef CAKE_CPU_KERNELS_H
#define CAKE_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "cake.h"
#include "util/f16.h"
#include "util/q8_0.h"
#include "util/threadpool.h"

/* ---- conversions (row of n values) ---- */
void cake_f16_to_f32_row(const cake_f16 *x, float *y, size_t n);
void cake_f32_to_f16_row(const float *x, cake_f16 *y, size_t n);
void cake_bf16_to_f32_row(const cake_bf16 *x, float *y, size_t n);

/* ---- RMSNorm: y[t, :] = x[t, :] / sqrt(mean(x[t,:]^2) + eps) * w[:] ----
 * x, y: (n_tokens, dim); w: (dim). y may alias x. */
void cake_rmsnorm(float *y, const float *x, const float *w, int n_tokens, int dim, float eps);
void cake_rmsnorm_ref(float *y, const float *x, const float *w, int n_tokens, int dim, float eps);

/* ---- RoPE (llama "normal" style: rotates adjacent pairs (2i, 2i+1)) ----
 * x: (n_tokens, n_heads, head_dim), in place; token t is at position pos0 + t.
 * Pair i turns by position * freqs[i] (freqs: head_dim / 2 values, the
 * model's rope_freqs). */
void cake_rope(float *x, int n_tokens, int n_heads, int head_dim, int pos0, const double *freqs);
void cake_rope_ref(float *x, int n_tokens, int n_heads, int head_dim, int pos0,
                   const double *freqs);
/* The same turning pairs (i, i + n_rot/2) of each head's first n_rot
 * values instead (NeoX style, qwen2; n_rot < head_dim: partial RoPE, as
 * Phi-4-mini's, the rest as they are). freqs: n_rot / 2 of them. */
void cake_rope_neox(float *x, int n_tokens, int n_heads, int head_dim, int n_rot, int pos0,
                    const double *freqs);

/* ---- bias: x[r][i] += b[i] for n_rows rows of n ---- */
void cake_add_bias(float *x, const float *b, int n_rows, int n);

/* ---- SwiGLU: h[i] = silu(g[i]) * u[i], i < n; h may alias g. ---- */
void cake_swiglu(float *h, const float *g, const float *u, size_t n);
void cake_swiglu_ref(float *h, const float *g, const float *u, size_t n);
/* h = gelu(g) * u, GELU's tanh form (Gemma); the same bits in both paths */
void cake_geglu(float *h, const float *g, const float *u, size_t n);
void cake_geglu_ref(float *h, const float *g, const float *u, size_t n);

/* ---- Causal attention over a KV cache ----
 * Queries for positions [pos0, pos0 + n_tokens) against keys/values at
 * positions [0, pos0 + n_tokens): query t attends to keys 0..pos0+t, or
 * with a sliding window W to the last W of them (pos0+t-W+1..pos0+t).
 *   q:   (n_tokens, n_heads, head_dim) f32
 *   k,v: (n_kv_heads, kv_ctx, head_dim), elements of kv_type (f16, f32, or
 *        Q8_0's int8 with k_scales, v_scales): one layer's cache, head-major
 *        (kv/kv_cache.h); kv_ctx >= pos0 + n_tokens
 *   out: (n_tokens, n_heads, head_dim) f32
 * Head h uses KV head h / (n_heads / n_kv_heads) (grouped-query attention).
 * Scores are scaled by 1/sqrt(head_dim); softmax in f32.
 * The result for a query depends only on its position and the KV before it:
 * never on n_tokens, pos0 or the thread count (chunked prefill relies on it). */
typedef struct {
    int n_tokens, pos0;
    int n_heads, n_kv_heads, head_dim;
    enum cake_kv_type kv_type;
    int kv_ctx;    /* positions per KV head in k and v */
    int window;    /* > 0: a query sees the keys of its last `window` positions only */
    float softcap; /* > 0: each score s becomes softcap tanh(s / softcap) (Gemma 2) */
    const float *q;
    const void *k, *v;
    const cake_f16 *k_scales, *v_scales; /* Q8_0: the layer's scales (kv_cache.h) */
    float *out;
} cake_attn_args;

void cake_attention(const cake_attn_args *a, cake_threadpool *pool);
void cake_attention_ref(const cake_attn_args *a);
/* The exact per-query arithmetic of cake_attention, in portable scalar code
 * (also the kernel of builds without AVX-512, or head_dim > 256): 16-lane dot
 * products folded by a fixed tree, online softmax over key blocks of 64 at
 * absolute positions, the exp polynomial of backend/cpu/simd.h. cake_attention
 * gives bit-identical results (attention.c spells out the order). */
void cake_attention_lanes(const cake_attn_args *a);

/* ---- Q8_0 weights, repacked for the matmul (matmul_q8_0.c) ----
 * The matmul takes a Q8_0 matrix (n_out, n_in), n_in a multiple of 32, in
 * its own layout, CAKE_DTYPE_Q8_0_X16 (util/q8_0.h): rows in groups of 16,
 * made once (by the first CPU context) from the file's blocks by cake_q8_0_pack_x16
 * into cake_q8_0_x16_size bytes (the blocks' own size, plus padding rows when
 * n_out % 16 != 0). */
size_t cake_q8_0_x16_size(int n_out, int n_in);
void cake_q8_0_pack_x16(void *dst, const void *q8_0, int n_out, int n_in);
/* n floats (whole blocks of 32) into Q8_0 blocks: the bytes of
 * cake_q8_0_quantize_block (util/q8_0.h) block after block, 16 lanes at a
 * time where AVX-512 is (requantizing other quantized types at repack). */
void cake_q8_0_quantize_row(const float *x, uint8_t *dst, size_t n);

/* ---- Matrix multiply with weights in the file's dtype ----
 * y (n_tokens, n_out) = x (n_tokens, n_in) . W^T, W: (n_out, n_in) row-major,
 * dtype F32, F16 or BF16 (cake_dtype numbering), read in place (converted in
 * registers; nothing is copied), or CAKE_DTYPE_Q8_0_X16 (n_in a multiple of
 * 32; x is quantized to 8 bits per block of 32, as llama.cpp does for Q8_0,
 * and multiplied in integers: matmul_q8_0.c), or one of the k-quant layouts
 * below (n_in a multiple of 256; likewise: matmul_kquant.c).
 * A threaded AVX-512 dot-product kernel for every batch size (matmul.c
 * explains why not sgemm); a token's output row is bit-identical whatever
 * n_tokens and the thread count. Returns 0, or -1 for an unsupported dtype. */
int cake_matmul(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                int n_out, cake_threadpool *pool);
int cake_matmul_ref(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                    int n_out);
/* The exact reduction order cake_matmul uses, in portable scalar code (also the
 * kernel of builds without AVX-512): each output is 16 lanes, lane l an FMA
 * chain over k = l, l+16, ... in increasing k, then the lanes summed by the tree
 * ((l, l+8), then +4, +2, +1). cake_matmul gives bit-identical results for any
 * n_tokens, thread count and build. Returns 0, or -1 for an unsupported dtype. */
int cake_matmul_lanes(float *y, const float *x, const void *w, int w_dtype, int n_tokens, int n_in,
                      int n_out);
/* The integer kernels' activations (Q8_0, the k-quants): each token's row of n_in
 * (a multiple of 32) quantized per block of 32 as llama.cpp's
 * quantize_row_q8_0 does: q (n_tokens, n_in) int8, d (n_tokens, n_in / 32)
 * the blocks' scales, c (likewise) 128 * each block's sum of q. make
 * allocates (0, or -1 when out of memory) and quantizes on the pool, SIMD
 * where there is; the lanes form of one block gives the same bits. */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *c;
} cake_q8_acts;
int cake_q8_acts_make(cake_q8_acts *a, const float *x, int n_tokens, int n_in,
                      cake_threadpool *pool);
void cake_q8_acts_free(cake_q8_acts *a);
void cake_q8_quantize_block_lanes(const float *x, int8_t *q, float *d, int32_t *c);

/* CAKE_DTYPE_Q8_0_X16's three, which the three above call: the kernel, the
 * reference in double (on the same quantized activations), and the scalar
 * twin of the kernel's order (each output an FMA chain over the blocks of
 * isum * (d_w * d_x)). */
void cake_matmul_q8_0(float *y, const float *x, const void *w, int n_tokens, int n_in, int n_out,
                      cake_threadpool *pool);
int cake_matmul_q8_0_ref(float *y, const float *x, const void *w, int n_tokens, int n_in,
                         int n_out);
void cake_matmul_q8_0_lanes(float *y, const float *x, const void *w, int n_tokens, int n_in,
                            int n_out);

/* ---- 3- to 6-bit weights kept at their bits (matmul_kquant.c) ----
 * CAKE_DTYPE_Q4_K_X16, _Q5_K_X16, _Q6_K_X16, _IQ4_XS_X16, _Q4_0_X16,
 * _IQ4_NL_X16 and _Q3_K_X16 (not GGUF types; layouts at the top of
 * matmul_kquant.c): such a matrix (n_out, n_in), n_in a multiple of 256,
 * rows in groups of 16, made once from the file's blocks by
 * cake_kquant_pack_x16 into cake_kquant_x16_size bytes (4.625, 5.625,
 * 6.625, 4.625, 4.5, 4.5 and 4.625 bits a weight). The kernel, the
 * reference and the scalar twin as for Q8_0; the level (0..15, 0..31,
 * 0..63, 1..241, 0..15, 1..241, 0..7), scale and min of row r, column k,
 * for the tests (ns = n_in / 256; value = scale * level - min). */
enum { /* consecutive (matmul.c) */
       CAKE_DTYPE_Q4_K_X16 = 1012,
       CAKE_DTYPE_Q5_K_X16 = 1013,
       CAKE_DTYPE_IQ4_XS_X16 = 1014,
       CAKE_DTYPE_Q6_K_X16 = 1015,
       CAKE_DTYPE_Q4_0_X16 = 1016,
       CAKE_DTYPE_IQ4_NL_X16 = 1017,
       CAKE_DTYPE_Q3_K_X16 = 1018,
};
/* The layout the CPU keeps a matrix of GGUF type `type` in: one of the
 * seven above, or 0 (it goes to Q8_0; so do Q4_0 and IQ4_NL matrices whose
 * rows are not whole blocks of 256: model.c). */
int cake_kquant_x16_for(int type);
size_t cake_kquant_x16_size(int x16_dtype, int n_out, int n_in);
void cake_kquant_pack_x16(int x16_dtype, void *dst, const void *blocks, int n_out, int n_in);
void cake_matmul_kquant(int x16_dtype, float *y, const float *x, const void *w, int n_tokens,
                        int n_in, int n_out, cake_threadpool *pool);
int cake_matmul_kquant_ref(int x16_dtype, float *y, const float *x, const void *w, int n_tokens,
                           int n_in, int n_out);
void cake_matmul_kquant_lanes(int x16_dtype, float *y, const float *x, const void *w, int n_tokens,
                              int n_in, int n_out);
int cake_kquant_x16_level(int x16_dtype, const void *w, size_t ns, size_t r, size_t k);
float cake_kquant_x16_scale(int x16_dtype, const void *w, size_t ns, size_t r, size_t k);
float cake_kquant_x16_min(int x16_dtype, const void *w, size_t ns, size_t r, size_t k);

#endif
