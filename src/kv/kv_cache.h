/* The KV cache of one sequence.
 *
 * Layout, per layer l (0 <= l < n_layers), two arrays K_l and V_l of shape
 *     (n_kv_heads, n_ctx, head_dim)   -- head-major
 * with elements f16 (default) or f32: head h's keys at positions 0, 1, 2, ...
 * are one contiguous run, K_l + (h * n_ctx + p) * head_dim. Why head-major:
 * decode reads each head's keys from position 0 on, its heads split over the
 * threads; in a position-major cache each thread reads a slice of every
 * position's row, which memory serves at ~60% of the rate of whole runs
 * (two threads on the Xeon VM; decode 1.25x faster head-major: docs/ENGINE.md).
 *
 * Outside the cache (new rows from the forward pass, stored chunks) KV rows
 * are position-major, (n, n_kv_heads * head_dim): cake_kv_put and
 * cake_kv_get (and the CPU forward pass's store of new rows) convert.
 *
 * Memory comes from an anonymous mapping, so pages are only committed for the
 * positions actually written. */
#ifndef CAKE_KV_CACHE_H
#define CAKE_KV_CACHE_H

#include <stddef.h>

#include "cake.h"

typedef struct {
    int n_layers, n_ctx, n_kv_heads, head_dim;
    int kv_dim; /* n_kv_heads * head_dim: one position's row outside the cache */
    enum cake_kv_type type;
    size_t elem_size;   /* 2 or 4 bytes */
    size_t layer_bytes; /* bytes of one K_l (= one V_l) */
    void *base;         /* n_layers * 2 * layer_bytes: K_0, V_0, K_1, V_1, ... */
    size_t map_bytes;
} cake_kv_cache;

int cake_kv_cache_init(cake_kv_cache *kv, int n_layers, int n_ctx, int n_kv_heads, int head_dim,
                       enum cake_kv_type type, char *err, size_t errlen);
void cake_kv_cache_free(cake_kv_cache *kv);

static inline void *cake_kv_k(const cake_kv_cache *kv, int layer) {
    return (char *)kv->base + (size_t)layer * 2 * kv->layer_bytes;
}
static inline void *cake_kv_v(const cake_kv_cache *kv, int layer) {
    return (char *)kv->base + ((size_t)layer * 2 + 1) * kv->layer_bytes;
}

/* Element offset of head h at position p within a layer's K or V. */
static inline size_t cake_kv_at(const cake_kv_cache *kv, int h, int p) {
    return ((size_t)h * (size_t)kv->n_ctx + (size_t)p) * (size_t)kv->head_dim;
}

/* n position-major rows already in the cache's element type (a stored chunk's
 * runs) into layer `layer` at [pos0, pos0 + n), and back out. The caller has
 * checked the range. */
void cake_kv_put(const cake_kv_cache *kv, int layer, int pos0, int n, const void *k, const void *v);
void cake_kv_get(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v);

#endif
