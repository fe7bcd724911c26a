/* The registry of chunks that requests are computing now (loader.h). A
 * server holds a few hundred promises at most (slots times a prompt's
 * chunks), so a flat array searched in order is enough. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "loader/loader.h"

struct cake_inflight {
    pthread_mutex_t mu;
    cake_chunk_key *keys;
    int n, cap;
};

cake_inflight *cake_inflight_create(void) {
    cake_inflight *f = calloc(1, sizeof(*f));
    if (f) pthread_mutex_init(&f->mu, NULL);
    return f;
}

void cake_inflight_free(cake_inflight *f) {
    if (!f) return;
    pthread_mutex_destroy(&f->mu);
    free(f->keys);
    free(f);
}

static int find(const cake_inflight *f, const cake_chunk_key *key) {
    for (int i = 0; i < f->n; i++)
        if (!memcmp(&f->keys[i], key, sizeof(*key))) return i;
    return -1;
}

void cake_inflight_promise(cake_inflight *f, const cake_chunk_key *keys, int n, int8_t *result) {
    pthread_mutex_lock(&f->mu);
    for (int i = 0; i < n; i++) {
        result[i] = 0;
        if (find(f, &keys[i]) >= 0) continue;
        result[i] = -1;
        if (f->n == f->cap) {
            const int cap = f->cap ? 2 * f->cap : 64;
            cake_chunk_key *k = realloc(f->keys, (size_t)cap * sizeof(*k));
            if (k) f->keys = k, f->cap = cap;
        }
        if (f->n < f->cap) f->keys[f->n++] = keys[i], result[i] = 1;
    }
    pthread_mutex_unlock(&f->mu);
}

int cake_inflight_pending(cake_inflight *f, const cake_chunk_key *key) {
    pthread_mutex_lock(&f->mu);
    const int rc = find(f, key) >= 0;
    pthread_mutex_unlock(&f->mu);
    return rc;
}

void cake_inflight_release(cake_inflight *f, const cake_chunk_key *key) {
    pthread_mutex_lock(&f->mu);
    const int i = find(f, key);
    if (i >= 0) f->keys[i] = f->keys[--f->n];
    pthread_mutex_unlock(&f->mu);
}
