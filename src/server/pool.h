/* The server's engine side: a queue of generation jobs and the slots that run
 * them. A slot is one worker thread with its own context (KV cache), so a
 * slot runs one request at a time, from the queue's head; the HTTP side waits
 * on a job's progress (its text so far) and may cancel it. Each request's
 * prefill goes through the Cake loader over the server's store: cached
 * chunks of its prompt are loaded from the back while the front is computed,
 * and its newly computed chunks are written back. */
#ifndef CAKE_SERVER_POOL_H
#define CAKE_SERVER_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "cake.h"
#include "engine/generate.h"
#include "loader/loader.h"
#include "store/store.h"

#define JOB_MAX_STOP 4

typedef struct serve_job serve_job;
struct serve_job {
    /* The request: set before pool_submit, read-only after. */
    cake_token *prompt; /* owned by the job */
    int n_prompt;
    int max_tokens; /* capped by the pool at the context's end */
    cake_sampler_params sampling;
    char *stop[JOB_MAX_STOP]; /* stop strings (owned), n_stop of them */
    int n_stop;
    cake_token end_of_turn; /* stops like EOS (a chat format's end of turn); -1: none */

    /* Progress, under mu; cv is signalled on every change. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *text; /* the generated text so far */
    size_t len, cap;
    /* text[0..ready) is final: no stop string can start in it and it ends on
     * a whole UTF-8 character. Streams send it; the rest waits. */
    size_t ready;
    cake_token *ids; /* generated ids (max_tokens of room) */
    int n_ids;
    int done;        /* the job ended (finished, failed or cancelled) */
    int stopped;     /* it ended at EOS, the end of turn or a stop string */
    int cancelled;   /* cancel was set before it ended */
    char error[256]; /* why it failed; "" when it did not */
    cake_request_stats stats;
    atomic_int cancel; /* set by the HTTP side: stop at the next token */

    /* Owned by the pool. */
    int refs;
    cake_token prev; /* the last id, for detokenization */
    serve_job *next;
};

/* A new job holding prompt[0..n) (taken over: the job frees it) and one
 * reference, the caller's. NULL on out of memory (the prompt is freed). */
serve_job *job_create(cake_token *prompt, int n);
/* Drops a reference; the last one frees the job. Accepts NULL. */
void job_release(serve_job *j);
/* Copies a stop string into the job. 0, or -1 (too many, out of memory). */
int job_add_stop(serve_job *j, const char *s, size_t len);

typedef struct {
    cake_store *store; /* NULL: compute only (borrowed; outlives the pool) */
    cake_mode mode;
    int chunk, io_depth;
    int n_slots, n_ctx, n_threads; /* n_ctx 0: the model's; n_threads per slot, 0: all / slots */
    int queue_max;                 /* jobs waiting beyond the running ones */
    enum cake_kv_type kv_type;
    enum cake_backend_kind backend;
} pool_config;

/* Totals since start, for /metrics. */
typedef struct {
    uint64_t jobs_done, jobs_failed, jobs_cancelled, jobs_rejected;
    uint64_t prompt_tokens, generated_tokens;
    uint64_t chunks_computed, chunks_loaded, chunks_missing, chunks_corrupt;
    uint64_t bytes_loaded, store_errors;
    uint64_t writeback_written, writeback_dropped, writeback_failed;
    double ttft_sum_s;
    uint64_t ttft_le[10]; /* cumulative counts per POOL_TTFT_BUCKETS bound */
    int running, queued;
} pool_counters;

#define POOL_TTFT_BUCKETS                                                                          \
    { 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120 }

typedef struct serve_pool serve_pool;

int pool_create(const cake_model *m, const pool_config *cfg, serve_pool **out, char *err,
                size_t errlen);
/* Queues j (the pool takes its own reference). 0; -1 when the queue is full
 * or the pool is shutting down (j is untouched). */
int pool_submit(serve_pool *p, serve_job *j);
int pool_n_ctx(const serve_pool *p);
void pool_counters_get(serve_pool *p, pool_counters *out);
/* Refuses new jobs from now on, ends the queued ones (with an error) and
 * cancels the running ones (they stop at their next token). Returns at once. */
void pool_shutdown(serve_pool *p);
/* pool_shutdown, then joins the slots (their write-backs drained) and frees.
 * Accepts NULL. */
void pool_free(serve_pool *p);

#endif
