/* The KV cache of one sequence.
 *
 * Layout, per layer l (0 <= l < n_layers), two arrays K_l and V_l, head-major:
 * each KV head has head_ctx positions (n_ctx rounded up to a whole key block
 * of CAKE_KV_KBLOCK), elements f16 (default) or f32.
 *   V_l: (n_kv_heads, head_ctx, head_dim): head h's values at positions 0, 1,
 *        2, ... are one contiguous run.
 *   K_l: (n_kv_heads, head_ctx / 64, head_dim, 64): the same runs, cut in
 *        blocks of 64 positions, each block stored transposed (dim-major), so
 *        64 positions of one dim are 64 consecutive elements.
 * Why: decode reads each head's keys and values from position 0 on, its heads
 * split over the threads. Head-major, every thread reads one sequential
 * stream; position-major, each thread read a slice of every position's row,
 * which memory serves at ~60% of the rate of whole runs (docs/ENGINE.md).
 * And decode scores 64 keys at a time with the keys in vector lanes (one
 * chain of FMAs per key, over d): transposed blocks are what that reads, so
 * no transpose is left in decode (it was up to half of the kernel).
 *
 * Outside the cache (new rows from the forward pass, stored chunks) KV rows
 * are position-major, (n, n_kv_heads * head_dim): cake_kv_put and
 * cake_kv_get (and the CPU forward pass's store of new rows) convert.
 *
 * Q8_0 (CAKE_KV_Q8_0; head_dim a multiple of 32): the elements are int8 at
 * the same indices, and each 32 dims of a position (a group g = d / 32) have
 * an f16 scale; the value is int8 * scale. K_l and V_l each hold their int8
 * elements, then, from scales_offset bytes on, their scales:
 *   K scales: (n_kv_heads, head_ctx / 64, head_dim / 32, 64): a key block's
 *        64 positions' scales of one group are consecutive, as its keys are,
 *        so 16 keys and their 16 scales are one vector each;
 *   V scales: (n_kv_heads, head_ctx, head_dim / 32).
 * Rows outside the cache are ggml's block_q8_0 runs: per position, kv_dim /
 * 32 blocks of (f16 scale, 32 int8), a head's blocks one after another.
 *
 * Q4_0 (CAKE_KV_Q4_0): 4-bit values q (the value is (q - 8) * scale), two to
 * a byte, and the scales as Q8_0's. A byte holds two dims of one position
 * (so positions never share a byte: chunks are installed side by side):
 *   K: the f16 layout with head_dim / 2 "dims" of one byte: byte
 *      cake_kv_k_index(head_ctx, head_dim / 2, h, p, d / 2), dim d in its
 *      low (d even) or high nibble;
 *   V: each position's run of head_dim / 2 bytes is its groups' 16 bytes as
 *      ggml's block_q4_0 keeps them: dim 32 g + i in byte 16 g + i % 16,
 *      low nibble for i < 16, high for i >= 16.
 * Rows outside the cache are block_q4_0 runs (f16 scale, 16 bytes).
 *
 * Memory comes from an anonymous mapping, so pages are only committed for the
 * positions actually written, unless cake_kv_cache_prefault commits them all
 * up front (the CPU backend's contexts, sized to the request). */
#ifndef CAKE_KV_CACHE_H
#define CAKE_KV_CACHE_H

#include <stddef.h>

#include "cake.h"
#include "util/f16.h"

#define CAKE_KV_KBLOCK 64 /* positions per transposed key block */

typedef struct {
    int n_layers, n_ctx, n_kv_heads, head_dim;
    int kv_dim;   /* n_kv_heads * head_dim: one position's row outside the cache */
    int head_ctx; /* positions per head: n_ctx rounded up to CAKE_KV_KBLOCK */
    enum cake_kv_type type;
    size_t elem_size;     /* 2 or 4 bytes; 1 (the int8) for Q8_0; 0 for Q4_0 */
    size_t row_bytes;     /* one position's K (= V) row outside the cache */
    size_t scales_offset; /* Q8_0: where the scales start in K_l and V_l; else 0 */
    size_t layer_bytes;   /* bytes of one K_l (= one V_l) */
    void *base;           /* n_layers * 2 * layer_bytes: K_0, V_0, K_1, V_1, ... */
    size_t map_bytes;
} cake_kv_cache;

/* Bytes of one position's K (= V) row of kv_dim elements outside the cache
 * (a chunk's runs), 0 for a type or a head_dim (Q8_0: a multiple of 32) that
 * cannot be. */
size_t cake_kv_row_bytes(enum cake_kv_type type, int head_dim, int kv_dim);

int cake_kv_cache_init(cake_kv_cache *kv, int n_layers, int n_ctx, int n_kv_heads, int head_dim,
                       enum cake_kv_type type, char *err, size_t errlen);
/* Commits every page of the cache now (for a cache that will be filled:
 * each first touch later, by a computed row or an installed chunk, would
 * otherwise be a page fault inside the request). */
void cake_kv_cache_prefault(const cake_kv_cache *kv);
void cake_kv_cache_free(cake_kv_cache *kv);

static inline void *cake_kv_k(const cake_kv_cache *kv, int layer) {
    return (char *)kv->base + (size_t)layer * 2 * kv->layer_bytes;
}
static inline void *cake_kv_v(const cake_kv_cache *kv, int layer) {
    return (char *)kv->base + ((size_t)layer * 2 + 1) * kv->layer_bytes;
}

/* Element offsets of (head h, position p, dim d) in a layer's K and V, for
 * head_ctx positions per head (the attention kernel reads the same layout). */
static inline size_t cake_kv_k_index(int head_ctx, int head_dim, int h, int p, int d) {
    const int j = p % CAKE_KV_KBLOCK;
    return ((size_t)h * (size_t)head_ctx + (size_t)(p - j)) * (size_t)head_dim +
           (size_t)d * CAKE_KV_KBLOCK + (size_t)j;
}
static inline size_t cake_kv_v_index(int head_ctx, int head_dim, int h, int p, int d) {
    return ((size_t)h * (size_t)head_ctx + (size_t)p) * (size_t)head_dim + (size_t)d;
}

static inline int cake_kv_quantized(enum cake_kv_type t) {
    return t == CAKE_KV_Q8_0 || t == CAKE_KV_Q4_0;
}

/* Q8_0 and Q4_0: a layer's key and value scales, and the index of (head h,
 * position p, group g) in them. */
static inline cake_f16 *cake_kv_k_scales(const cake_kv_cache *kv, int layer) {
    return (cake_f16 *)((char *)cake_kv_k(kv, layer) + kv->scales_offset);
}
static inline cake_f16 *cake_kv_v_scales(const cake_kv_cache *kv, int layer) {
    return (cake_f16 *)((char *)cake_kv_v(kv, layer) + kv->scales_offset);
}
static inline size_t cake_kv_k_scale_index(int head_ctx, int head_dim, int h, int p, int g) {
    const int j = p % CAKE_KV_KBLOCK;
    return ((size_t)h * (size_t)head_ctx + (size_t)(p - j)) * (size_t)(head_dim / 32) +
           (size_t)g * CAKE_KV_KBLOCK + (size_t)j;
}
static inline size_t cake_kv_v_scale_index(int head_ctx, int head_dim, int h, int p, int g) {
    return ((size_t)h * (size_t)head_ctx + (size_t)p) * (size_t)(head_dim / 32) + (size_t)g;
}

/* Q4_0: the byte of (head h, position p, dim d) in a layer's K and V, and
 * the nibble's shift (0 low, 4 high). */
static inline size_t cake_kv_k4_byte(int head_ctx, int head_dim, int h, int p, int d) {
    return cake_kv_k_index(head_ctx, head_dim / 2, h, p, d / 2);
}
static inline int cake_kv_k4_shift(int d) {
    return d % 2 * 4;
}
static inline size_t cake_kv_v4_byte(int head_ctx, int head_dim, int h, int p, int d) {
    return cake_kv_v_index(head_ctx, head_dim / 2, h, p, 0) + (size_t)(d / 32 * 16 + d % 16);
}
static inline int cake_kv_v4_shift(int d) {
    return d % 32 / 16 * 4;
}

/* n position-major rows already in the cache's element type (a stored chunk's
 * runs) into layer `layer` at [pos0, pos0 + n), and back out. The caller has
 * checked the range. */
void cake_kv_put(const cake_kv_cache *kv, int layer, int pos0, int n, const void *k, const void *v);
void cake_kv_get(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v);
/* Q8_0 or Q4_0: n position-major f32 rows, each block quantized as
 * llama.cpp's quantize_row_q8_0_ref / quantize_row_q4_0_ref do, into the
 * cache. */
void cake_kv_quantize_put(const cake_kv_cache *kv, int layer, int pos0, int n, const float *k,
                          const float *v);

#endif
