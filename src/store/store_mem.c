/* mem: chunks in this process's RAM, with an optional capacity and LRU
 * eviction. One mutex guards the index; blobs are reference counted so that a
 * get copies outside the lock (concurrent gets of large chunks do not
 * serialize on the memcpy) and an eviction during that copy is safe. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "store/lru.h"
#include "store/store_impl.h"
#include "util/err.h"

typedef struct {
    _Atomic int refs;
    size_t len;
    unsigned char data[];
} mem_blob;

typedef struct {
    pthread_mutex_t mu;
    cake_lru lru; /* node->data = mem_blob */
    uint64_t capacity;
    cake_store_atomic_counters *ctr;
} mem_store;

static void blob_unref(void *p) {
    mem_blob *b = p;
    if (b && atomic_fetch_sub(&b->refs, 1) == 1) free(b);
}

/* Finds and references the blob of k (most recent now). */
static mem_blob *acquire(mem_store *m, const cake_chunk_key *k) {
    pthread_mutex_lock(&m->mu);
    cake_lru_node *n = cake_lru_find(&m->lru, k);
    mem_blob *b = NULL;
    if (n) {
        cake_lru_touch(&m->lru, n);
        n->stamp = (int64_t)time(NULL);
        b = n->data;
        atomic_fetch_add(&b->refs, 1);
    }
    pthread_mutex_unlock(&m->mu);
    return b;
}

static int mem_get(void *st, const cake_chunk_key *k, void *buf, size_t cap, size_t *len,
                   cake_payload_hash *hash, char *err, size_t errlen) {
    (void)hash; /* one memcpy: nothing to overlap */
    mem_blob *b = acquire(st, k);
    if (!b) return 1;
    int rc = 0;
    if (b->len > cap) {
        char hex[33];
        rc = cake_err(err, errlen, "mem store: chunk %s is %zu bytes, buffer has %zu",
                      cake_key_hex(k, hex), b->len, cap);
    } else {
        memcpy(buf, b->data, b->len);
        *len = b->len;
    }
    blob_unref(b);
    return rc;
}

static int mem_head(void *st, const cake_chunk_key *k, void *buf, size_t n, size_t *len,
                    uint64_t *total, char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    mem_blob *b = acquire(st, k);
    if (!b) return 1;
    *len = b->len < n ? b->len : n;
    *total = b->len;
    memcpy(buf, b->data, *len);
    blob_unref(b);
    return 0;
}

static int mem_put(void *st, const cake_chunk_key *k, const void *blob, size_t len, char *err,
                   size_t errlen) {
    mem_store *m = st;
    char hex[33];
    if (m->capacity && len > m->capacity)
        return cake_err(err, errlen, "mem store: chunk %s (%zu bytes) exceeds the capacity (%llu)",
                        cake_key_hex(k, hex), len, (unsigned long long)m->capacity);
    mem_blob *b = malloc(sizeof(*b) + len);
    if (!b)
        return cake_err(err, errlen, "mem store: out of memory for chunk %s (%zu bytes)",
                        cake_key_hex(k, hex), len);
    atomic_init(&b->refs, 1);
    b->len = len;
    memcpy(b->data, blob, len);
    int rc = 0;
    pthread_mutex_lock(&m->mu);
    cake_lru_node *old = cake_lru_find(&m->lru, k);
    if (old) {
        blob_unref(old->data);
        cake_lru_remove(&m->lru, old);
    }
    while (m->capacity && m->lru.bytes + len > m->capacity) {
        cake_lru_node *v = cake_lru_oldest(&m->lru);
        blob_unref(v->data);
        cake_lru_remove(&m->lru, v);
        atomic_fetch_add(&m->ctr->evictions, 1);
    }
    if (!cake_lru_insert(&m->lru, k, len, (int64_t)time(NULL), b)) {
        blob_unref(b);
        rc = cake_err(err, errlen, "mem store: out of memory");
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static int mem_exists(void *st, const cake_chunk_key *keys, size_t n, uint8_t *present, char *err,
                      size_t errlen) {
    (void)err;
    (void)errlen;
    mem_store *m = st;
    pthread_mutex_lock(&m->mu);
    for (size_t i = 0; i < n; i++) present[i] = cake_lru_find(&m->lru, &keys[i]) != NULL;
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int mem_del(void *st, const cake_chunk_key *k, char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    mem_store *m = st;
    pthread_mutex_lock(&m->mu);
    cake_lru_node *n = cake_lru_find(&m->lru, k);
    if (n) {
        blob_unref(n->data);
        cake_lru_remove(&m->lru, n);
    }
    pthread_mutex_unlock(&m->mu);
    return n ? 0 : 1;
}

/* Snapshot of the entries, oldest first, so callbacks run without the lock. */
static cake_store_entry *snapshot(mem_store *m, size_t *n) {
    pthread_mutex_lock(&m->mu);
    cake_store_entry *e = malloc((m->lru.n ? m->lru.n : 1) * sizeof(*e));
    size_t i = 0;
    if (e)
        for (cake_lru_node *x = m->lru.head.prev; x != &m->lru.head; x = x->prev, i++)
            e[i] = (cake_store_entry){x->key, x->size, x->stamp};
    pthread_mutex_unlock(&m->mu);
    *n = i;
    return e;
}

static int mem_iterate(void *st, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen) {
    size_t n;
    cake_store_entry *e = snapshot(st, &n);
    if (!e) return cake_err(err, errlen, "mem store: out of memory");
    for (size_t i = 0; i < n; i++)
        if (fn(&e[i], ctx)) break;
    free(e);
    return 0;
}

static int mem_usage(void *st, cake_store_usage *u, char *err, size_t errlen) {
    (void)err;
    (void)errlen;
    mem_store *m = st;
    pthread_mutex_lock(&m->mu);
    u->n_chunks = m->lru.n;
    u->bytes = m->lru.bytes;
    u->capacity = m->capacity;
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static int mem_gc(void *st, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed, char *err,
                  size_t errlen) {
    (void)err;
    (void)errlen;
    mem_store *m = st;
    pthread_mutex_lock(&m->mu);
    while (m->lru.bytes > target) {
        cake_lru_node *v = cake_lru_oldest(&m->lru);
        (*n_evicted)++;
        *bytes_freed += v->size;
        blob_unref(v->data);
        cake_lru_remove(&m->lru, v);
    }
    pthread_mutex_unlock(&m->mu);
    return 0;
}

static void mem_close(void *st) {
    mem_store *m = st;
    if (!m) return;
    cake_lru_free(&m->lru, blob_unref);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

int cake_store_mem_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                        char *err, size_t errlen) {
    mem_store *m = calloc(1, sizeof(*m));
    if (!m || cake_lru_init(&m->lru)) {
        free(m);
        return cake_err(err, errlen, "mem store: out of memory");
    }
    pthread_mutex_init(&m->mu, NULL);
    m->capacity = p->capacity;
    m->ctr = ctr;
    *out = m;
    return 0;
}

const cake_store_ops cake_store_mem_ops = {
    .kind = "mem",
    .get = mem_get,
    .head = mem_head,
    .put = mem_put,
    .exists = mem_exists,
    .del = mem_del,
    .iterate = mem_iterate,
    .usage = mem_usage,
    .gc = mem_gc,
    .close = mem_close,
};
