/* The KV cache of one sequence.
 *
 * Layout, per layer l (0 <= l < n_layers), two arrays K_l and V_l of shape
 *     (n_ctx, n_kv_heads, head_dim)   -- position-major, row stride kv_dim
 * with elements f16 (default) or f32. Position p of layer l lives at
 * K_l + p * kv_dim. A chunk of positions [a, b) of one layer is therefore one
 * contiguous run of (b - a) * kv_dim elements in K_l and one in V_l, which is
 * what lets the chunk store copy a stored chunk straight in.
 *
 * Memory comes from an anonymous mapping, so pages are only committed for the
 * positions actually written. */
#ifndef CAKE_KV_CACHE_H
#define CAKE_KV_CACHE_H

#include <stddef.h>

#include "cake.h"

typedef struct {
    int n_layers, n_ctx, kv_dim;
    enum cake_kv_type type;
    size_t elem_size;   /* 2 or 4 bytes */
    size_t layer_bytes; /* bytes of one K_l (= one V_l) */
    void *base;         /* n_layers * 2 * layer_bytes: K_0, V_0, K_1, V_1, ... */
    size_t map_bytes;
} cake_kv_cache;

int cake_kv_cache_init(cake_kv_cache *kv, int n_layers, int n_ctx, int kv_dim,
                       enum cake_kv_type type, char *err, size_t errlen);
void cake_kv_cache_free(cake_kv_cache *kv);

static inline void *cake_kv_k(const cake_kv_cache *kv, int layer) {
    return (char *)kv->base + (size_t)layer * 2 * kv->layer_bytes;
}
static inline void *cake_kv_v(const cake_kv_cache *kv, int layer) {
    return (char *)kv->base + ((size_t)layer * 2 + 1) * kv->layer_bytes;
}

#endif
