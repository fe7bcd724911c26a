/* Asynchronous write-back of computed chunks: a bounded ring of requests and
 * one thread. The compute side only appends a small entry (never blocks, never
 * copies KV); the thread extracts the chunk from the engine's KV cache into
 * its own buffer and puts it in the store. When the ring is full the chunk is
 * dropped and counted: the next request simply computes it again. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "loader/loader.h"
#include "util/clock.h"
#include "util/err.h"

typedef struct {
    cake_loader_engine e; /* copy; e.self (the engine) must outlive the entry */
    cake_chunk_header h;
    int pos0;
    int known_absent;
    cake_inflight *promise; /* released once the entry is done (NULL: none) */
} wb_entry;

struct cake_writeback {
    cake_store *store;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* work arrived, or stop */
    pthread_cond_t idle_cv; /* the ring became empty and the thread idle */
    wb_entry *ring;
    int cap, head, count;
    int busy; /* the thread is working on an entry */
    int stop;
    pthread_t thread;
    void *buf;
    size_t buf_size;
    cake_writeback_counters ctr;
};

static void *writer_main(void *arg) {
    cake_writeback *w = arg;
    char err[256];
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->count && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        if (!w->count && w->stop) break;
        wb_entry en = w->ring[w->head];
        w->head = (w->head + 1) % w->cap;
        w->count--;
        w->busy = 1;
        pthread_mutex_unlock(&w->mu);

        int outcome = 0; /* 0 written, 1 already present, -1 failed */
        if (!en.known_absent) {
            uint8_t present = 0;
            if (cake_store_exists(w->store, &en.h.key, 1, &present, err, sizeof(err)) == 0 &&
                present)
                outcome = 1;
        }
        if (outcome == 0) {
            size_t need = cake_chunk_blob_size(&en.h);
            if (need > w->buf_size) {
                free(w->buf);
                w->buf = malloc(need);
                w->buf_size = w->buf ? need : 0;
            }
            if (!w->buf)
                outcome = cake_err(err, sizeof(err), "out of memory for a %zu-byte chunk", need);
            else if (en.e.extract(en.e.self, &en.h, en.pos0, w->buf, w->buf_size, err,
                                  sizeof(err)) ||
                     cake_store_put(w->store, &en.h.key, w->buf, need, err, sizeof(err)))
                outcome = -1;
        }

        pthread_mutex_lock(&w->mu);
        if (outcome == 0)
            w->ctr.written++;
        else if (outcome == 1)
            w->ctr.already_present++;
        else if (w->ctr.failed++ == 0)
            cake_chunk_error(w->ctr.first_error, sizeof(w->ctr.first_error), (int)en.h.index, err);
        w->busy = 0;
        if (en.promise) cake_inflight_release(en.promise, &en.h.key);
        if (!w->count) pthread_cond_broadcast(&w->idle_cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

cake_writeback *cake_writeback_create(cake_store *store, int capacity, char *err, size_t errlen) {
    cake_writeback *w = calloc(1, sizeof(*w));
    if (!w) return cake_err(err, errlen, "write-back: out of memory"), NULL;
    w->store = store;
    w->cap = capacity > 0 ? capacity : 64;
    w->ring = calloc((size_t)w->cap, sizeof(*w->ring));
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->idle_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (!w->ring || pthread_create(&w->thread, NULL, writer_main, w)) {
        free(w->ring);
        pthread_cond_destroy(&w->cv);
        pthread_cond_destroy(&w->idle_cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        cake_err(err, errlen, "write-back: cannot start its thread");
        return NULL;
    }
    return w;
}

int cake_writeback_enqueue(cake_writeback *w, const cake_loader_engine *e,
                           const cake_chunk_header *h, int pos0, int known_absent,
                           cake_inflight *promise) {
    pthread_mutex_lock(&w->mu);
    int rc = -1;
    if (w->count < w->cap && !w->stop) {
        w->ring[(w->head + w->count) % w->cap] = (wb_entry){
            .e = *e, .h = *h, .pos0 = pos0, .known_absent = known_absent, .promise = promise};
        w->count++;
        w->ctr.queued++;
        pthread_cond_signal(&w->cv);
        rc = 0;
    } else {
        w->ctr.dropped_full++;
    }
    pthread_mutex_unlock(&w->mu);
    if (rc && promise) cake_inflight_release(promise, &h->key);
    return rc;
}

int cake_writeback_tokens(cake_writeback *w, const cake_loader_engine *e, const cake_token *tokens,
                          int n, int chunk, int first) {
    const int n_full = chunk > 0 ? n / chunk : 0;
    if (!e->batch_invariant || first < 0 || first >= n_full) return 0;
    cake_chunk_key *keys = malloc((size_t)n_full * sizeof(*keys));
    if (!keys) return -1;
    cake_key_chain(e->fingerprint, (uint32_t)chunk, (uint32_t)e->kv_type, tokens, (size_t)n, keys);
    int queued = 0;
    for (int i = first; i < n_full; i++) {
        const cake_chunk_header h = cake_chunk_header_for(e->fingerprint, &keys[i], (uint32_t)i,
                                                          (uint32_t)chunk, e->hp, e->kv_type);
        queued += cake_writeback_enqueue(w, e, &h, i * chunk, 0, NULL) == 0;
    }
    free(keys);
    return queued;
}

int cake_writeback_drain(cake_writeback *w, int timeout_ms) {
    const struct timespec ts =
        cake_deadline_ns((uint64_t)(timeout_ms < 0 ? 0 : timeout_ms) * 1000000ull);
    pthread_mutex_lock(&w->mu);
    while ((w->count || w->busy) && pthread_cond_timedwait(&w->idle_cv, &w->mu, &ts) == 0) {
    }
    int dropped = w->count; /* timed out: give up on what has not started */
    w->ctr.dropped_timeout += (uint64_t)dropped;
    for (; w->count; w->count--, w->head = (w->head + 1) % w->cap)
        if (w->ring[w->head].promise)
            cake_inflight_release(w->ring[w->head].promise, &w->ring[w->head].h.key);
    /* The entry in progress, if any, still reads the engine's KV: wait for it
     * (bounded by the store's own timeouts). */
    while (w->busy) pthread_cond_wait(&w->idle_cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    return dropped;
}

void cake_writeback_counters_get(cake_writeback *w, cake_writeback_counters *out) {
    pthread_mutex_lock(&w->mu);
    *out = w->ctr;
    pthread_mutex_unlock(&w->mu);
}

void cake_writeback_free(cake_writeback *w) {
    if (!w) return;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    free(w->buf);
    free(w->ring);
    pthread_cond_destroy(&w->cv);
    pthread_cond_destroy(&w->idle_cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
