#include "kv/kv_cache.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "util/err.h"

int cake_kv_cache_init(cake_kv_cache *kv, int n_layers, int n_ctx, int n_kv_heads, int head_dim,
                       enum cake_kv_type type, char *err, size_t errlen) {
    memset(kv, 0, sizeof(*kv));
    if (n_layers <= 0 || n_ctx <= 0 || n_kv_heads <= 0 || head_dim <= 0)
        return cake_err(err, errlen,
                        "KV cache: invalid shape (%d layers, %d positions, %d heads of %d)",
                        n_layers, n_ctx, n_kv_heads, head_dim);
    kv->n_layers = n_layers;
    kv->n_ctx = n_ctx;
    kv->n_kv_heads = n_kv_heads;
    kv->head_dim = head_dim;
    kv->kv_dim = n_kv_heads * head_dim;
    kv->type = type;
    kv->elem_size = type == CAKE_KV_F32 ? 4 : 2;
    kv->layer_bytes = (size_t)n_ctx * (size_t)kv->kv_dim * kv->elem_size;
    kv->map_bytes = kv->layer_bytes * 2 * (size_t)n_layers;
    kv->base =
        mmap(NULL, kv->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (kv->base == MAP_FAILED) {
        kv->base = NULL;
        return cake_err(err, errlen, "KV cache: cannot allocate %zu bytes: %s", kv->map_bytes,
                        strerror(errno));
    }
    return 0;
}

void cake_kv_cache_free(cake_kv_cache *kv) {
    if (kv && kv->base) munmap(kv->base, kv->map_bytes);
    if (kv) kv->base = NULL;
}

/* Byte offset of (head h, position p) in a layer's K or V. */
static size_t head_pos(const cake_kv_cache *kv, int h, int p) {
    return cake_kv_at(kv, h, p) * kv->elem_size;
}

void cake_kv_put(const cake_kv_cache *kv, int layer, int pos0, int n, const void *k,
                 const void *v) {
    char *kc = cake_kv_k(kv, layer), *vc = cake_kv_v(kv, layer);
    const size_t piece = (size_t)kv->head_dim * kv->elem_size, row = piece * kv->n_kv_heads;
    /* reads the rows in order, writes one run per head */
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            const size_t src = (size_t)t * row + (size_t)h * piece, dst = head_pos(kv, h, pos0 + t);
            memcpy(kc + dst, (const char *)k + src, piece);
            memcpy(vc + dst, (const char *)v + src, piece);
        }
}

void cake_kv_get(const cake_kv_cache *kv, int layer, int pos0, int n, void *k, void *v) {
    const char *kc = cake_kv_k(kv, layer), *vc = cake_kv_v(kv, layer);
    const size_t piece = (size_t)kv->head_dim * kv->elem_size, row = piece * kv->n_kv_heads;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            const size_t dst = (size_t)t * row + (size_t)h * piece, src = head_pos(kv, h, pos0 + t);
            memcpy((char *)k + dst, kc + src, piece);
            memcpy((char *)v + dst, vc + src, piece);
        }
}
