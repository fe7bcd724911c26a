/* The server's engine side: a queue of generation jobs (job.h) and the slots
 * that run them. A slot is one request thread with its own context (KV
 * cache): it runs one request at a time, from the queue's head, and the HTTP
 * side waits on a job's progress (its text so far) and may cancel it. The
 * slots' forward passes all go to one batch scheduler (sched.h), which runs
 * them together, a step at a time, on the engine's threads: continuous
 * batching. Each request's prefill goes through the Cake loader over the
 * server's store: cached chunks of its prompt are loaded from the back while
 * the front is computed, and its newly computed chunks are written back. */
#ifndef CAKE_SERVER_POOL_H
#define CAKE_SERVER_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "cake.h"
#include "loader/loader.h"
#include "server/chat.h"
#include "server/job.h"
#include "server/sched.h"
#include "store/store.h"

typedef struct {
    cake_store *store; /* NULL: compute only (borrowed; outlives the pool) */
    cake_mode mode;
    int chunk, io_depth;
    int n_slots, n_ctx, n_threads; /* n_ctx 0: the model's; n_threads 0: all CPUs */
    int batch;                     /* tokens per engine step (the scheduler's budget) */
    sched_policy policy;
    /* Requests that run together and share a prefix the store lacks each
     * compute it (a benchmark's baseline); by default one computes, the
     * others wait for its chunks and load them (cake_inflight). */
    bool independent_prefills;
    /* A slot reuses its KV cache in whole chunks only, computing the chunk
     * a shared prefix ends in whole (a benchmark's baseline); by default a
     * request starts right after the last position it shares. */
    bool whole_chunk_reuse;
    /* Only prompts' chunks go to the store, not those an answer completes
     * (a benchmark's baseline). */
    bool prompts_only_writeback;
    int queue_max; /* jobs waiting beyond the running ones */
    enum cake_kv_type kv_type;
    enum cake_backend_kind backend;
    /* How the model's chat format writes tool calls (chat_calls; NULL:
     * none): tool requests print its tags that are control tokens as their
     * text, and their grammars read them so (chat_silent_tags). */
    const chat_call_syntax *calls;
} pool_config;

/* A Prometheus histogram of durations: counts at or below each bound. */
#define POOL_N_BUCKETS 10
typedef struct {
    double sum_s;
    uint64_t count;
    uint64_t le[POOL_N_BUCKETS]; /* cumulative */
} pool_histogram;
void pool_histogram_add(pool_histogram *h, const double *bounds, double seconds);

/* The bounds of the request histograms (seconds), and of the gaps between
 * a request's tokens. */
#define POOL_REQUEST_BUCKETS                                                                       \
    { 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120 }
#define POOL_TOKEN_BUCKETS                                                                         \
    { 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5 }

/* Totals since start, for /metrics. */
typedef struct {
    uint64_t jobs_done, jobs_failed, jobs_cancelled, jobs_rejected;
    uint64_t prompt_tokens, generated_tokens;
    uint64_t prompt_tokens_computed; /* the rest were cached or loaded */
    uint64_t chunks_computed, chunks_loaded, chunks_cached, chunks_missing, chunks_corrupt;
    uint64_t chunks_awaited;       /* of the missing: another request computed them meanwhile */
    uint64_t chunks_during_lookup; /* of the computed: while a slow store's lookup ran */
    uint64_t bytes_loaded, store_errors;
    uint64_t ram_hits, prefetched; /* the store's RAM tier (ram=): loads it gave; chunks
                                      brought into it for queued requests */
    uint64_t writeback_written, writeback_dropped, writeback_failed;
    /* From arrival to a slot; from the start on a slot to the first token;
     * from arrival to the answer; between a request's tokens. */
    pool_histogram queue_time, ttft, request_time, token_gap;
    int running, queued;
    int store_up;          /* the store answers now (cake_store_check): 1, 0; -1 without a store */
    double store_lookup_s; /* the store's lookups lately (cake_store_lookup_ns); -1 without one */
    sched_counters steps;
} pool_counters;

typedef struct serve_pool serve_pool;

int pool_create(const cake_model *m, const pool_config *cfg, serve_pool **out, char *err,
                size_t errlen);
/* Queues j (the pool takes its own reference). 0; -1 when the queue is full
 * or the pool is shutting down (j is untouched). */
int pool_submit(serve_pool *p, serve_job *j);
/* The most jobs the pool takes at once: its slots and its queue. */
int pool_capacity(const serve_pool *p);
int pool_n_ctx(const serve_pool *p);
/* The engine: the context whose threads and scratch run every step. */
cake_context *pool_engine(serve_pool *p);

/* The loader's compute-speed memory (loader.h), shared by the slots: a
 * slot's first request starts from what the last request on any slot
 * measured, or from what was set here (the hints of an earlier run). */
void pool_speed_set(serve_pool *p, const cake_compute_speed *speed);
void pool_speed_get(serve_pool *p, cake_compute_speed *out);
void pool_counters_get(serve_pool *p, pool_counters *out);
/* Refuses new jobs from now on, ends the queued ones (with an error) and
 * cancels the running ones (they stop at their next token). Returns at once. */
void pool_shutdown(serve_pool *p);
/* pool_shutdown, then joins the slots (their write-backs drained) and frees.
 * Accepts NULL. */
void pool_free(serve_pool *p);

#endif
