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
 * Memory comes from an anonymous mapping, so pages are only committed for the
 * positions actually written, unless cake_kv_cache_prefault commits them all
 * up front (the CPU backend's contexts, sized to the request). */
#ifndef CAKE_KV_CACHE_H
#define CAKE_KV_CACHE_H

#include <stddef.h>

#include "cake.h"

#define CAKE_KV_KBLOCK 64 /* positions per transposed key block */

typedef struct {
    int n_layers, n_ctx, n_kv_heads, head_dim;
    int kv_dim;   /* n_kv_heads * head_dim: one position's row outside the cache */
    int head_ctx; /* positions per head: n_ctx rounded up to CAKE_KV_KBLOCK */
    enum cake_kv_type type;
    size_t elem_size;   /* 2 or 4 bytes */
    size_t layer_bytes; /* bytes of one K_l (= one V_l) */
    void *base;         /* n_layers * 2 * layer_bytes: K_0, V_0, K_1, V_1, ... */
    size_t map_bytes;
} cake_kv_cache;

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

/* n position-major rows already in the cache's element type (a stored chunk's
 * runs) into layer `layer` at [pos0, pos0 + n), and back out. The caller has
 * checked the range. */
void cake_kv_put(const cake_kv_cache *kv, int layer, int pos0, int n, const void *k, const void *v);
void cake_kv_get(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v);

#endif
