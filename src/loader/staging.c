#include "loader/staging.h"

#include <pthread.h>
#include <stdlib.h>

#include "store/store.h"

typedef struct {
    void *buf;
    size_t size;
} kept_buffer;

struct cake_staging {
    cake_staging_allocator a;
    pthread_mutex_t mu;
    int n_kept, max_kept;
    kept_buffer *kept;
};

cake_staging *cake_staging_new(const cake_staging_allocator *a, int max_kept) {
    cake_staging *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->kept = calloc((size_t)(max_kept > 0 ? max_kept : 1), sizeof(*s->kept));
    if (!s->kept) {
        free(s);
        return NULL;
    }
    s->max_kept = max_kept;
    s->a = a && a->alloc
               ? *a
               : (cake_staging_allocator){cake_store_alloc_buffer, cake_store_free_buffer};
    pthread_mutex_init(&s->mu, NULL);
    return s;
}

void cake_staging_free(cake_staging *s) {
    if (!s) return;
    for (int i = 0; i < s->n_kept; i++) s->a.release(s->kept[i].buf);
    pthread_mutex_destroy(&s->mu);
    free(s->kept);
    free(s);
}

void *cake_staging_take(cake_staging *s, size_t size) {
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_kept; i++)
        if (s->kept[i].size == size) {
            void *buf = s->kept[i].buf;
            s->kept[i] = s->kept[--s->n_kept];
            pthread_mutex_unlock(&s->mu);
            return buf;
        }
    /* None of this size: the kept ones are of a size requests no longer use
     * (another chunk size). They go; memory is better spent on this one. */
    for (int i = 0; i < s->n_kept; i++) s->a.release(s->kept[i].buf);
    s->n_kept = 0;
    pthread_mutex_unlock(&s->mu);
    return s->a.alloc(size);
}

void cake_staging_give(cake_staging *s, void *buf, size_t size) {
    if (!buf) return;
    pthread_mutex_lock(&s->mu);
    const int keep = s->n_kept < s->max_kept;
    if (keep) s->kept[s->n_kept++] = (kept_buffer){buf, size};
    pthread_mutex_unlock(&s->mu);
    if (!keep) s->a.release(buf);
}
