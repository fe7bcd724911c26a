/* The Cake loader: prefill of one prompt by computing chunks from the front
 * while I/O workers load cached chunks from the back (see loader.c for the
 * design). Also the two baselines: compute-only and load-only (LMCache-style). */
#ifndef CAKE_LOADER_H
#define CAKE_LOADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cake.h"
#include "loader/staging.h"
#include "store/store.h"

typedef enum { CAKE_MODE_COMPUTE = 0, CAKE_MODE_LOAD = 1, CAKE_MODE_CAKE = 2 } cake_mode;

static inline const char *cake_mode_name(cake_mode m) {
    return m == CAKE_MODE_LOAD ? "load" : m == CAKE_MODE_CAKE ? "cake" : "compute";
}
int cake_mode_parse(const char *s, cake_mode *out); /* 0 ok, -1 unknown */

/* Compute speed, in ns per FLOP of cake_chunk_flops, of the last
 * CAKE_SPEED_SAMPLES chunks computed; their median is the estimate (one
 * chunk's time on a shared machine is too noisy to go by alone). */
#define CAKE_SPEED_SAMPLES 5
typedef struct cake_compute_speed {
    double ns_per_flop[CAKE_SPEED_SAMPLES];
    unsigned count;
} cake_compute_speed;

/* What the loader needs from an engine, so that any backend can use it:
 * compute positions [pos0, pos0 + n) (logits of the last one when asked),
 * install a verified chunk blob into the KV cache at pos0, and extract
 * positions [pos0, pos0 + h->n_tokens) of the KV cache into a blob. */
typedef struct {
    void *self;
    int (*compute)(void *self, const cake_token *tokens, int n, int pos0, float *logits, char *err,
                   size_t errlen);
    int (*install)(void *self, const void *blob, const cake_chunk_header *h, int pos0, char *err,
                   size_t errlen);
    int (*extract)(void *self, cake_chunk_header *h, int pos0, void *blob, size_t cap, char *err,
                   size_t errlen);
    /* Optional: waits at most timeout_ns until the engine could compute n
     * tokens now; 1 when it could, 0 on the timeout. An engine shared by
     * several requests (a server's scheduler) runs a chunk of the compute
     * side only when it has the room; the compute side waits for that
     * before it claims the chunk, so that the I/O side may still load it
     * meanwhile. NULL: the engine is always ready. */
    int (*wait_turn)(void *self, int n, uint64_t timeout_ns);
    const cake_hparams *hp;
    enum cake_kv_type kv_type;
    uint8_t fingerprint[16];
    /* The compute speed of the engine's last chunks, kept across requests:
     * the first meet of a request uses it (may be NULL). */
    cake_compute_speed *speed;
    /* A token's results (KV, logits) do not depend on how many tokens share
     * its compute call. Then a prompt's last chunk, when computed, gives the
     * logits itself; otherwise a prompt that ends on a chunk boundary has
     * its last token computed again, alone, in every mode (loader.c). */
    bool batch_invariant;
    /* Where the I/O workers' fetch buffers come from and go back to, kept
     * across requests (NULL: allocated per request). */
    cake_staging *staging;
} cake_loader_engine;

/* The engine ops of a context (CPU or CUDA backend). with_fingerprint: fill
 * in the model fingerprint, needed for store keys (the first call hashes
 * every weight; later calls reuse it). */
void cake_context_loader_engine(cake_context *c, int with_fingerprint, cake_loader_engine *out);
/* e's fingerprint salted (cake_key_salted_fingerprint) when salt is not
 * NULL: the keys and headers of that salt's chunks. */
void cake_loader_engine_salt(cake_loader_engine *e, const char *salt);

typedef struct cake_writeback cake_writeback;

/* ---- chunks other requests are computing now ----
 * Requests that run at the same time (a server's slots) and share a prompt
 * prefix the store lacks would each compute it. Instead, the first to look
 * a chunk up promises it here; the others find the promise, wait for the
 * chunk to reach the store (the promiser's write-back), and load it: one
 * computes, the rest load. A promise ends when its chunk was written (or
 * failed, or was dropped), or when its request ends without computing it. */
typedef struct cake_inflight cake_inflight;
cake_inflight *cake_inflight_create(void); /* NULL: out of memory */
void cake_inflight_free(cake_inflight *f); /* accepts NULL */
/* For each of the n keys, result 1: the caller now holds its promise and
 * must release it; 0: another holds it; -1: out of memory (nobody does).
 * Under one lock, so that requests looking up the same prefix at the same
 * time do not split it between them (and wait for each other in turns). */
void cake_inflight_promise(cake_inflight *f, const cake_chunk_key *keys, int n, int8_t *result);
int cake_inflight_pending(cake_inflight *f, const cake_chunk_key *key); /* 1: promised */
void cake_inflight_release(cake_inflight *f, const cake_chunk_key *key);

typedef struct {
    cake_store *store;         /* NULL: nothing is cached; compute only */
    cake_writeback *writeback; /* NULL: computed chunks are not stored */
    /* Shared by requests that run at the same time (NULL: none): in cake
     * mode with a write-back, chunks another request is computing are
     * waited for and loaded, not computed again. */
    cake_inflight *inflight;
    cake_mode mode;         /* ignored (compute) when store is NULL */
    int chunk;              /* tokens per chunk (the store's chunk size) */
    int io_depth;           /* loads in flight (I/O workers); 0 = default */
    const char *trace_path; /* optional Chrome trace-event JSON of the prefill */
    /* Positions [0, n_cached) of the engine's KV cache already hold this
     * prompt's KV (an earlier request on the same context shared the
     * prefix): they are neither computed nor loaded (on a batch-variant
     * engine: the full chunks among them), but for the prompt's last token. */
    int n_cached;
    /* NULL or a request's cache salt (key.h): only requests with the same
     * salt share chunks; cake_request_run salts the engine's fingerprint. */
    const char *cache_salt;
} cake_prefill_params;

#define CAKE_DEFAULT_IO_DEPTH 4

typedef struct {
    cake_mode mode;
    int chunk, io_depth;
    int chunks_total;    /* ceil(n_prompt / chunk) */
    int chunks_computed; /* including the partial tail (not a last token computed again) */
    int chunks_loaded;
    int chunks_cached;        /* already in the KV cache (n_cached), neither computed nor loaded */
    int tokens_computed;      /* prompt positions computed (n_prompt - tokens_computed were cached
                                 or loaded) */
    int chunks_found;         /* loadable chunks the lookup found in the store (known before
                                 the first compute call) */
    int chunks_during_lookup; /* computed while the lookup ran (a slow store's: 0 or 1) */
    int chunks_missing;       /* loadable chunks the store did not have */
    int chunks_corrupt;   /* present at lookup but failed to load (corrupt, vanished, store down) */
    int chunks_discarded; /* loads finished or cancelled after compute had taken the chunk */
    int chunks_awaited;   /* of the missing: another request was computing them; waited for
                             and found in the store (then loaded, or computed by the meet rule) */
    int meet_chunk; /* first chunk index of the loaded region where compute stopped; -1: none */
    uint64_t bytes_loaded;
    double lookup_ms;       /* key hashing + exists (with chunks computed meanwhile: until
                               the plan, or the last of them when it was not waited for) */
    double compute_ms;      /* time in forward passes */
    double tail_ms;         /* of them, the pass after the loadable chunks (0: none) */
    double compute_wait_ms; /* time the compute side waited for loads */
    double turn_wait_ms;    /* time it waited for a busy engine's turn (wait_turn) */
    double await_ms;        /* time it waited for chunks other requests were computing */
    double load_ms;         /* first claim to last load done */
    double load_gbit_s;     /* bytes_loaded over load_ms */
    int writeback_queued, writeback_dropped;
    /* The request began with a compute-speed estimate, and (when it had
     * chunks to load) a load rate: from earlier requests, or hints. Without
     * them the first decisions fall back to the plain rules (loader.c). */
    bool knew_speed, knew_rate;
    /* The request's first store failure (the lookup, or a load: a store
     * that is down, a corrupt chunk); "" when there was none. The chunks it
     * kept from loading were computed instead. */
    char store_error[320];
} cake_prefill_stats;

typedef struct prefill_job cake_prefill_job;

/* FLOPs of a forward pass over positions [pos0, pos0 + n), without the output
 * head: the matmuls, and attention that grows with the position. The loader
 * scales one chunk's measured compute time to another's with it. */
double cake_chunk_flops(const cake_hparams *hp, int pos0, int n);

/* How many of a prompt's chunks may come from the store: the full chunks
 * before its last token, or, for a prompt that ends on a chunk boundary, all
 * of them (see loader.c). */
int cake_prefill_loadable_chunks(int n_prompt, int chunk);

/* Prefill of prompt[0..n_prompt) into e's KV cache; writes the last position's
 * logits. Any chunk that fails to load is computed instead: the result never
 * depends on the store. 0 ok; -1 with err only for engine failures.
 * I/O workers may still be finishing transfers that compute overtook (they
 * no longer touch the KV cache): with pending == NULL they are joined before
 * returning; otherwise *pending gets the job, and the caller calls
 * cake_prefill_finish(*pending) later, once its tokens are out (st, e and
 * p->store must stay valid until then; st's load_ms, load_gbit_s and
 * chunks_discarded are final only after it). The finish ends the emulated
 * link's waits of those transfers at once. */
int cake_prefill(const cake_loader_engine *e, const cake_token *prompt, int n_prompt,
                 const cake_prefill_params *p, float *logits, cake_prefill_stats *st,
                 cake_prefill_job **pending, char *err, size_t errlen);
void cake_prefill_finish(cake_prefill_job *job); /* accepts NULL */

/* ---- asynchronous write-back of computed chunks ----
 * A bounded queue served by one thread: cake_prefill enqueues (never blocks;
 * when the queue is full, the chunk is dropped and counted), the thread
 * extracts the chunk from the engine's KV cache and puts it in the store.
 * The engine's KV positions of queued chunks must stay unchanged until
 * cake_writeback_drain returns. */
cake_writeback *cake_writeback_create(cake_store *store, int capacity, char *err, size_t errlen);
/* Queues the full chunks of tokens[0..n) from chunk `first` on, whose KV
 * the engine holds at their positions (a request's answer: the tokens it
 * generated and fed back, so that a chat's next turn finds its history in
 * the store). Only for a batch-invariant engine: another's decode KV is not
 * the bits a prefill of those tokens would give. The writer checks the store
 * first. Returns how many were queued; -1 out of memory. */
int cake_writeback_tokens(cake_writeback *w, const cake_loader_engine *e, const cake_token *tokens,
                          int n, int chunk, int first);
/* Waits until the queue is empty (at most timeout_ms; then the rest is
 * dropped). Returns the number of chunks dropped by the timeout. */
int cake_writeback_drain(cake_writeback *w, int timeout_ms);
void cake_writeback_free(cake_writeback *w); /* drains without a limit; accepts NULL */

typedef struct {
    uint64_t queued, written, dropped_full, dropped_timeout, already_present, failed;
    char first_error[320]; /* why the first failed chunk failed; "" when none did */
} cake_writeback_counters;
void cake_writeback_counters_get(cake_writeback *w, cake_writeback_counters *out);

/* Internal to the loader: "chunk I: why" into out, or why alone where it
 * names the chunk already (the store's verification does); "gone since the
 * lookup" for a chunk a get missed without a reason (evicted, deleted). */
void cake_chunk_error(char *out, size_t n, int index, const char *why);

/* Internal to the loader: queue a chunk. known_absent = 1: known absent from
 * the store; 0: unknown (the writer checks first). promise: the registry in
 * which the caller holds the chunk's promise (NULL: none); the write-back
 * releases it once the chunk is written, failed or dropped. Returns 0
 * queued, -1 dropped. */
int cake_writeback_enqueue(cake_writeback *w, const cake_loader_engine *e,
                           const cake_chunk_header *h, int pos0, int known_absent,
                           cake_inflight *promise);

#endif
