#include "kv/kv_cache.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "util/err.h"

int cake_kv_cache_init(cake_kv_cache *kv, int n_layers, int n_ctx, int kv_dim,
                       enum cake_kv_type type, char *err, size_t errlen) {
    memset(kv, 0, sizeof(*kv));
    if (n_layers <= 0 || n_ctx <= 0 || kv_dim <= 0)
        return cake_err(err, errlen, "KV cache: invalid shape (%d layers, %d positions, %d)",
                        n_layers, n_ctx, kv_dim);
    kv->n_layers = n_layers;
    kv->n_ctx = n_ctx;
    kv->kv_dim = kv_dim;
    kv->type = type;
    kv->elem_size = type == CAKE_KV_F32 ? 4 : 2;
    kv->layer_bytes = (size_t)n_ctx * (size_t)kv_dim * kv->elem_size;
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
