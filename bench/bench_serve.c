/* The server's batch scheduler (src/server/sched.c), measured in process
 * through its pool (no HTTP), each comparison side by side in one run:
 *
 *  1. Alone: one request's TTFT through the scheduler against
 *     cake_request_run on a context of its own (the scheduler's cost).
 *  2. Decode throughput: N requests at once on N slots (one batched step
 *     for all their tokens) against the same N on one slot, one at a time.
 *  3. The Cake paper's mixed burst: one long request whose prefix the store
 *     holds, behind an emulated link, and M short ones without a cache hit,
 *     all at once, under the priority schedule and under FCFS: the time
 *     until all are answered, the long one's TTFT and the short ones' mean.
 *  4. A shared prefix: S requests at once whose prompts share a long
 *     prefix that the store (RAM, no link limit) does not hold yet, each
 *     with its own ending: one computes the prefix and the others load it
 *     as it is written (the default), against each computing it.
 *  5. Step size: C requests decoding while a long prompt arrives, in steps
 *     of 512 tokens and of 128: the decoders' longest wait between two
 *     tokens while the prompt prefills, and the prompt's TTFT.
 *  6. A chat's next turn: a long prompt, its answer, then the prompt with
 *     the answer and a new message, on the slot that holds the first turn's
 *     KV: the next turn's TTFT when it starts right after what it shares,
 *     against starting at the chunk where that ends (the store holds the
 *     first prompt's chunks in both). Then with a longer answer, the slot
 *     taken by other prompts in between: the next turn's TTFT when the
 *     store holds the chunks the answer completed, against only the
 *     prompt's.
 *  7. Prefetch: a cached prompt that waits for the one slot while another
 *     request decodes (64 tokens: part of its prefix can come in; 160: all
 *     of it), its chunks in a file store behind the emulated link: with a
 *     RAM tier (ram=) the server brings them into RAM while the prompt
 *     waits; its time from arrival to the first token, against the same
 *     store without one.
 *
 * usage: bench_serve MODEL.gguf [--threads N] [--clients 8] [--decode 64]
 *                    [--long 2048] [--short 16] [--bw 300Mbit] [--shared 4]
 *                    [--rounds 2]
 * Prompts are random token ids (speed depends on shapes, not values). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cake.h"
#include "engine/generate.h"
#include "server/pool.h"
#include "store/store.h"
#include "util/clock.h"

static uint64_t rng = 42;

/* n random token ids after BOS, into a new array (ids 3.. n_vocab-1). */
static cake_token *random_prompt(int n, int n_vocab) {
    cake_token *p = malloc((size_t)n * sizeof(*p));
    if (!p) exit(1);
    p[0] = 1;
    for (int i = 1; i < n; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = 3 + (cake_token)((rng >> 33) % (uint64_t)(n_vocab - 3));
    }
    return p;
}

typedef struct {
    const cake_token *prompt;
    int n_prompt, max_tokens;
} request;

typedef struct {
    double makespan_s;        /* from the submits to the last answer */
    double ttft_ms[64];       /* per request, from its start on a slot */
    cake_prefill_stats first; /* the first request's prefill */
    cake_compute_speed speed; /* the pool's compute speed at the end */
} burst_result;

/* The store at uri; exits when it does not open. */
static cake_store *open_store(const char *uri) {
    char err[256];
    cake_store *s;
    if (cake_store_open(uri, &s, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        exit(1);
    }
    return s;
}

/* Submits a job for rq (a copy of its prompt); NULL when the pool refuses it. */
static serve_job *submit(serve_pool *pool, const request *rq) {
    cake_token *copy = malloc((size_t)rq->n_prompt * sizeof(*copy));
    if (!copy) return NULL;
    memcpy(copy, rq->prompt, (size_t)rq->n_prompt * sizeof(*copy));
    serve_job *j = job_create(copy, rq->n_prompt);
    if (!j) return NULL;
    j->max_tokens = rq->max_tokens;
    j->ignore_eos = 1;
    j->end_of_turn = -1;
    if (pool_submit(pool, j)) {
        job_release(j);
        return NULL;
    }
    return j;
}

/* Waits for j's answer; its error (or NULL). */
static const char *wait_answer(serve_job *j) {
    pthread_mutex_lock(&j->mu);
    while (!j->done) pthread_cond_wait(&j->cv, &j->mu);
    pthread_mutex_unlock(&j->mu);
    return j->error[0] ? j->error : NULL;
}

/* Submits every request at once to a new pool and waits for all answers. */
static int run_burst(const cake_model *m, const pool_config *cfg, const request *rq, int n,
                     burst_result *out) {
    char err[256];
    serve_pool *pool;
    if (pool_create(m, cfg, &pool, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        return -1;
    }
    serve_job *jobs[64] = {0};
    const double t0 = cake_now_s();
    for (int i = 0; i < n; i++)
        if (!(jobs[i] = submit(pool, &rq[i]))) {
            fprintf(stderr, "bench_serve: the pool refused a request\n");
            return -1;
        }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        const char *why = wait_answer(jobs[i]);
        if (why) {
            fprintf(stderr, "bench_serve: %s\n", why);
            rc = -1;
        }
        out->ttft_ms[i] = jobs[i]->stats.ttft_ms;
    }
    out->makespan_s = cake_now_s() - t0;
    out->first = jobs[0]->stats.prefill;
    pool_speed_get(pool, &out->speed);
    for (int i = 0; i < n; i++) job_release(jobs[i]);
    pool_free(pool);
    return rc;
}

/* Watches a decoding job: the longest time between two of its tokens from
 * `from` (a time in seconds) on. */
typedef struct {
    serve_job *j;
    double from, longest_gap_s;
    pthread_t thread;
} watcher;

static void *watch_main(void *arg) {
    watcher *w = arg;
    pthread_mutex_lock(&w->j->mu);
    int seen = w->j->n_ids;
    double last = cake_now_s();
    while (!w->j->done) {
        pthread_cond_wait(&w->j->cv, &w->j->mu);
        if (w->j->n_ids == seen) continue;
        const double t = cake_now_s();
        if (last >= w->from && t - last > w->longest_gap_s) w->longest_gap_s = t - last;
        seen = w->j->n_ids;
        last = t;
    }
    pthread_mutex_unlock(&w->j->mu);
    return NULL;
}

/* D decoders, then (once each has a few tokens) the long request: the
 * decoders' longest gap while it prefills, and its TTFT. */
static int run_gaps(const cake_model *m, const pool_config *cfg, const request *dec, int n_dec,
                    const request *long_rq, double *gap_ms, double *ttft_ms) {
    char err[256];
    serve_pool *pool;
    if (pool_create(m, cfg, &pool, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        return -1;
    }
    watcher w[64] = {0};
    for (int i = 0; i < n_dec; i++) {
        if (!(w[i].j = submit(pool, &dec[i]))) return -1;
        w[i].from = 1e300;
    }
    for (int i = 0; i < n_dec; i++) { /* every decoder under way */
        pthread_mutex_lock(&w[i].j->mu);
        while (w[i].j->n_ids < 4 && !w[i].j->done) pthread_cond_wait(&w[i].j->cv, &w[i].j->mu);
        pthread_mutex_unlock(&w[i].j->mu);
    }
    const double t0 = cake_now_s();
    for (int i = 0; i < n_dec; i++) {
        w[i].from = t0;
        pthread_create(&w[i].thread, NULL, watch_main, &w[i]);
    }
    serve_job *lj = submit(pool, long_rq);
    if (!lj) return -1;
    wait_answer(lj);
    *ttft_ms = lj->stats.ttft_ms;
    *gap_ms = 0;
    for (int i = 0; i < n_dec; i++) atomic_store(&w[i].j->cancel, 1); /* enough seen */
    for (int i = 0; i < n_dec; i++) {
        pthread_join(w[i].thread, NULL);
        if (w[i].longest_gap_s * 1e3 > *gap_ms) *gap_ms = w[i].longest_gap_s * 1e3;
        job_release(w[i].j);
    }
    job_release(lj);
    pool_free(pool);
    return 0;
}

/* Answers rq and drops the answer; 0 or -1. */
static int answer_one(serve_pool *pool, const request *rq) {
    serve_job *j = submit(pool, rq);
    const char *why = j ? wait_answer(j) : "refused";
    if (why) fprintf(stderr, "bench_serve: %s\n", why);
    if (j) job_release(j);
    return why ? -1 : 0;
}

/* A chat of two turns on one slot: first (n_answer tokens answered), then
 * first + the answer + n_new more tokens. With `taken`, other prompts take
 * the slot in between (one of them twice, loaded the second time: the
 * loader knows the store's rate then). The second turn's TTFT and the
 * prompt tokens it computed. */
static int run_turns(const cake_model *m, const pool_config *cfg, const request *first,
                     int n_answer, int n_new, int taken, double *ttft_ms, int *computed) {
    char err[256];
    serve_pool *pool;
    if (pool_create(m, cfg, &pool, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        return -1;
    }
    request rq = *first;
    rq.max_tokens = n_answer;
    serve_job *j1 = submit(pool, &rq), *j2 = NULL;
    const char *why = j1 ? wait_answer(j1) : "refused";
    cake_token *next = NULL;
    if (!why && taken) {
        const int n_vocab = cake_model_hparams(m)->n_vocab;
        cake_token *other = random_prompt(512, n_vocab), *hi = random_prompt(16, n_vocab);
        const request a = {other, 512, 1}, b = {hi, 16, 1};
        if (answer_one(pool, &a) || answer_one(pool, &b) || answer_one(pool, &a))
            why = "the other prompts failed";
        free(other);
        free(hi);
    }
    if (!why) {
        const int n = first->n_prompt + j1->n_ids + n_new;
        next = random_prompt(n, cake_model_hparams(m)->n_vocab);
        memcpy(next, first->prompt, (size_t)first->n_prompt * sizeof(*next));
        memcpy(next + first->n_prompt, j1->ids, (size_t)j1->n_ids * sizeof(*next));
        rq = (request){next, n, 1};
        j2 = submit(pool, &rq);
        why = j2 ? wait_answer(j2) : "refused";
    }
    if (!why) {
        *ttft_ms = j2->stats.ttft_ms;
        *computed = j2->stats.prefill.tokens_computed;
    } else {
        fprintf(stderr, "bench_serve: %s\n", why);
    }
    if (j1) job_release(j1);
    if (j2) job_release(j2);
    free(next);
    pool_free(pool);
    return why ? -1 : 0;
}

/* A request decoding `busy` tokens, then (once it is under way) cached,
 * which waits for the one slot: cached's time from arrival to its first
 * token, ms. */
static int run_queued(const cake_model *m, const pool_config *cfg, const cake_compute_speed *speed,
                      const request *busy, const request *cached, double *first_token_ms) {
    char err[256];
    serve_pool *pool;
    if (pool_create(m, cfg, &pool, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        return -1;
    }
    pool_speed_set(pool, speed); /* a server that has run before */
    serve_job *b = submit(pool, busy), *c = NULL;
    if (b) {
        pthread_mutex_lock(&b->mu);
        while (b->n_ids < 1 && !b->done) pthread_cond_wait(&b->cv, &b->mu);
        pthread_mutex_unlock(&b->mu);
        c = submit(pool, cached);
    }
    const char *why = !b || !c ? "refused" : wait_answer(c);
    if (!why) why = wait_answer(b);
    if (!why)
        *first_token_ms = (double)(c->t_started - c->t_arrived) / 1e6 + c->stats.ttft_ms;
    else
        fprintf(stderr, "bench_serve: %s\n", why);
    job_release(b);
    job_release(c);
    pool_free(pool);
    return why ? -1 : 0;
}

/* TTFT of prompt on a context of its own, compute only (the reference). */
static double direct_ttft_ms(const cake_model *m, int threads, int n_ctx, const cake_token *prompt,
                             int n) {
    cake_context_params cp = cake_context_default_params();
    cp.n_threads = threads;
    cp.n_ctx = n_ctx;
    cake_context *c;
    char err[256];
    if (cake_context_init(m, cp, &c, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        exit(1);
    }
    cake_sampler *s = cake_sampler_init((cake_sampler_params){0});
    cake_token out[1];
    cake_request_stats st;
    cake_request r = {
        .prompt = prompt, .n_prompt = n, .n_predict = 1, .chunk = 256, .eos = -1, .sampler = s};
    if (cake_request_run(c, &r, out, &st, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        exit(1);
    }
    cake_sampler_free(s);
    cake_context_free(c);
    return st.ttft_ms;
}

static double mean(const double *v, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return n ? s / n : 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr,
                "usage: %s MODEL.gguf [--threads N] [--clients 8] [--decode 64] [--long 2048] "
                "[--short 16] [--bw 300Mbit] [--shared 4] [--rounds 2]\n",
                argv[0]);
        return 2;
    }
    int threads = 2, clients = 8, n_decode = 64, n_long = 2048, n_short = 16, rounds = 2;
    int n_shared = 4;
    const char *bw = "300Mbit";
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--clients"))
            clients = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--decode"))
            n_decode = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--long"))
            n_long = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--short"))
            n_short = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--bw"))
            bw = argv[i + 1];
        else if (!strcmp(argv[i], "--shared"))
            n_shared = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--rounds"))
            rounds = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench_serve: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (clients < 1 || clients > 63 || n_short < 0 || n_short > 63 || n_shared < 0 ||
        n_shared > 63 || n_decode < 1 || n_long < 512 || threads < 1 || rounds < 1) {
        fprintf(stderr, "bench_serve: --clients, --short and --shared up to 63, --long at least "
                        "512\n");
        return 2;
    }
    cake_model *m;
    char err[256];
    if (cake_model_load(argv[1], &m, err, sizeof(err))) {
        fprintf(stderr, "bench_serve: %s\n", err);
        return 1;
    }
    const int n_vocab = cake_model_hparams(m)->n_vocab;
    const int n_ctx = n_long + 64 + n_decode;
    pool_config base = {.mode = CAKE_MODE_CAKE,
                        .chunk = 256,
                        .n_ctx = n_ctx,
                        .n_threads = threads,
                        .queue_max = 64,
                        .kv_type = CAKE_KV_F16,
                        .batch = 512};
    printf("bench_serve: %s, %d threads, %d round(s)\n", argv[1], threads, rounds);

    /* 1. alone */
    cake_token *one = random_prompt(512, n_vocab);
    request alone = {one, 512, 1};
    (void)direct_ttft_ms(m, threads, n_ctx, one, 512); /* warm-up: the weights' first touch */
    for (int r = 0; r < rounds; r++) {
        burst_result b;
        pool_config c = base;
        c.n_slots = 1;
        /* taking turns at going first */
        double direct = r % 2 ? direct_ttft_ms(m, threads, n_ctx, one, 512) : 0;
        if (run_burst(m, &c, &alone, 1, &b)) return 1;
        if (r % 2 == 0) direct = direct_ttft_ms(m, threads, n_ctx, one, 512);
        printf("alone, 512-token prompt: TTFT through the scheduler %.1f ms, direct %.1f ms: "
               "ratio %.3f\n",
               b.ttft_ms[0], direct, b.ttft_ms[0] / direct);
    }

    /* 2. decode throughput */
    request rq[64];
    for (int i = 0; i < clients; i++) rq[i] = (request){random_prompt(32, n_vocab), 32, n_decode};
    for (int r = 0; r < rounds; r++) {
        burst_result one_slot, batched;
        pool_config c = base;
        c.n_slots = 1;
        if (run_burst(m, &c, rq, clients, &one_slot)) return 1;
        c.n_slots = clients;
        if (run_burst(m, &c, rq, clients, &batched)) return 1;
        const double tokens = (double)clients * n_decode;
        printf("%d requests of 32 + %d tokens: one slot %.1f tok/s, %d slots batched %.1f tok/s: "
               "%.2fx\n",
               clients, n_decode, tokens / one_slot.makespan_s, clients,
               tokens / batched.makespan_s, one_slot.makespan_s / batched.makespan_s);
    }

    /* 3. the mixed burst: the long prompt's first n_long tokens stored first */
    char uri[128];
    snprintf(uri, sizeof(uri), "mem:?capacity=4GiB&bw=%s", bw);
    cake_store *store = open_store(uri);
    cake_token *long_prompt = random_prompt(n_long + 32, n_vocab);
    request mixed[64];
    mixed[0] = (request){long_prompt, n_long, 1};
    pool_config c = base;
    c.store = store;
    c.n_slots = 1;
    burst_result b;
    if (run_burst(m, &c, mixed, 1, &b)) return 1; /* computes and stores (pool_free drains) */
    const double compute_only = b.ttft_ms[0];
    c.mode = CAKE_MODE_LOAD;
    if (run_burst(m, &c, mixed, 1, &b)) return 1;
    const double load_only = b.ttft_ms[0];
    printf("mixed burst: a %d-token prompt (%d cached) alone: compute %.0f ms, load at %s %.0f "
           "ms\n",
           n_long + 32, n_long, compute_only, bw, load_only);
    mixed[0] = (request){long_prompt, n_long + 32, 16};
    for (int i = 1; i <= n_short; i++) mixed[i] = (request){random_prompt(128, n_vocab), 128, 32};
    c.mode = CAKE_MODE_CAKE;
    c.n_slots = 1 + n_short;
    for (int r = 0; r < rounds; r++) {
        burst_result by[2];
        for (int k = 0; k < 2; k++) {
            c.policy = k ? SCHED_FCFS : SCHED_PRIORITY;
            if (run_burst(m, &c, mixed, 1 + n_short, &by[k])) return 1;
        }
        printf("  with %d short requests (128 + 32 tokens), all at once: priority %.2f s (long "
               "TTFT %.0f ms, short %.0f ms), fcfs %.2f s (long %.0f ms, short %.0f ms): "
               "throughput %.2fx fcfs's\n",
               n_short, by[0].makespan_s, by[0].ttft_ms[0], mean(by[0].ttft_ms + 1, n_short),
               by[1].makespan_s, by[1].ttft_ms[0], mean(by[1].ttft_ms + 1, n_short),
               by[1].makespan_s / by[0].makespan_s);
        for (int k = 0; k < 2; k++) {
            const cake_prefill_stats *p = &by[k].first;
            printf("    %s: the long one's chunks %d computed, %d loaded (meet %d), loads %.0f ms, "
                   "waits for loads %.0f ms, for turns %.0f ms, tail %.0f ms\n",
                   k ? "fcfs" : "priority", p->chunks_computed, p->chunks_loaded, p->meet_chunk,
                   p->load_ms, p->compute_wait_ms, p->turn_wait_ms, p->tail_ms);
        }
    }
    const double link_rate = cake_store_rate_hint(store); /* (section 7's servers know it) */
    cake_store_close(store);

    /* 4. a shared prefix, new to the store in every run */
    request shared[64];
    for (int i = 0; i < n_shared; i++) {
        cake_token *p = random_prompt(n_long + 32, n_vocab);
        memcpy(p, long_prompt, (size_t)n_long * sizeof(*p));
        shared[i] = (request){p, n_long + 32, 1};
    }
    c = base;
    c.n_slots = n_shared;
    for (int r = 0; r < rounds && n_shared > 0; r++) {
        burst_result by[2];
        for (int k = 0; k < 2; k++) {
            c.independent_prefills = k;
            c.store = open_store("mem:?capacity=4GiB");
            if (run_burst(m, &c, shared, n_shared, &by[k])) return 1;
            cake_store_close(c.store);
        }
        printf("shared prefix: %d requests of %d tokens at once, the first %d shared and not "
               "stored: one computes, the others load %.2f s (mean TTFT %.0f ms), each computes "
               "%.2f s (%.0f ms): %.2fx\n",
               n_shared, n_long + 32, n_long, by[0].makespan_s, mean(by[0].ttft_ms, n_shared),
               by[1].makespan_s, mean(by[1].ttft_ms, n_shared),
               by[1].makespan_s / by[0].makespan_s);
    }
    for (int i = 0; i < n_shared; i++) free((void *)shared[i].prompt);

    /* 5. step size: the decoders' longest gap while a prompt prefills */
    cake_token *gap_prompt = random_prompt(n_long, n_vocab);
    const request gap_long = {gap_prompt, n_long, 1};
    for (int i = 0; i < clients; i++) rq[i].max_tokens = 1000000; /* (cancelled when seen) */
    c = base;
    c.n_slots = clients + 1;
    c.n_ctx = n_ctx + 1024; /* room for the decoders' tokens */
    for (int r = 0; r < rounds; r++) {
        double gap[2], ttft[2];
        for (int k = 0; k < 2; k++) {
            c.batch = k ? 128 : 512;
            if (run_gaps(m, &c, rq, clients, &gap_long, &gap[k], &ttft[k])) return 1;
        }
        printf("step size: %d requests decoding while a %d-token prompt arrives: steps of 512 "
               "longest gap %.0f ms, TTFT %.0f ms; steps of 128 %.0f ms, %.0f ms: gap %.2fx "
               "shorter, TTFT %.2fx\n",
               clients, n_long, gap[0], ttft[0], gap[1], ttft[1], gap[0] / gap[1],
               ttft[1] / ttft[0]);
    }
    free(gap_prompt);

    /* 6. a chat's next turn */
    enum { ANSWER = 128, NEW = 32 };
    const request turn1 = {long_prompt, n_long, 1};
    c = base;
    c.n_slots = 1;
    c.n_ctx = n_long + ANSWER + NEW + 8;
    for (int r = 0; r < rounds; r++) {
        double ttft[2];
        int computed[2];
        for (int k = 0; k < 2; k++) {
            const int whole = (k + r) % 2; /* taking turns at going first */
            c.whole_chunk_reuse = whole;
            c.store = open_store("mem:?capacity=4GiB");
            if (run_turns(m, &c, &turn1, ANSWER, NEW, 0, &ttft[whole], &computed[whole])) return 1;
            cake_store_close(c.store);
        }
        printf("next turn: %d prompt tokens, %d answered, then %d more: TTFT starting after what "
               "the slot holds %.0f ms (%d tokens computed), at the chunk it ends in %.0f ms (%d): "
               "%.2fx\n",
               n_long, ANSWER, NEW, ttft[0], computed[0], ttft[1], computed[1], ttft[1] / ttft[0]);
    }
    /* ... and on a slot taken meanwhile: the answer's chunks stored or not */
    enum { LONG_ANSWER = 300 };
    c.whole_chunk_reuse = 0;
    c.n_ctx = n_long + LONG_ANSWER + NEW + 8;
    for (int r = 0; r < rounds; r++) {
        double ttft[2];
        int computed[2];
        for (int k = 0; k < 2; k++) {
            const int prompts_only = (k + r) % 2;
            c.prompts_only_writeback = prompts_only;
            c.store = open_store("mem:?capacity=4GiB");
            if (run_turns(m, &c, &turn1, LONG_ANSWER, NEW, 1, &ttft[prompts_only],
                          &computed[prompts_only]))
                return 1;
            cake_store_close(c.store);
        }
        printf("next turn, its slot taken meanwhile: %d prompt tokens, %d answered, then %d more: "
               "TTFT with the answer's chunks stored %.0f ms (%d tokens computed), only the "
               "prompt's %.0f ms (%d): %.2fx\n",
               n_long, LONG_ANSWER, NEW, ttft[0], computed[0], ttft[1], computed[1],
               ttft[1] / ttft[0]);
    }
    /* 7. prefetch while a request waits for a slot */
    char dir[] = "/tmp/bench-serve-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("bench_serve: mkdtemp");
        return 1;
    }
    c = base;
    c.n_slots = 1;
    snprintf(uri, sizeof(uri), "file:%s", dir);
    c.store = open_store(uri);
    if (run_burst(m, &c, mixed, 1, &b)) return 1; /* the long prompt, stored */
    cake_store_close(c.store);
    const cake_compute_speed speed = b.speed;
    const request cached = {long_prompt, n_long + 32, 1};
    for (int r = 0; r < 2 * rounds; r++) {
        /* a short wait (part of the prefix comes in), then a long one (all of it) */
        const request busy = {one, 16, r % 2 ? 160 : 64};
        double first[2];
        for (int k = 0; k < 2; k++) {
            const int ram = (k + r / 2) % 2;
            snprintf(uri, sizeof(uri), "file:%s?bw=%s%s", dir, bw, ram ? "&ram=4GiB" : "");
            c.store = open_store(uri);
            cake_store_set_rate_hint(c.store, link_rate);
            if (run_queued(m, &c, &speed, &busy, &cached, &first[ram])) return 1;
            cake_store_close(c.store);
        }
        printf("prefetch: a %d-token prompt (%d cached, at %s) waits while a request decodes %d "
               "tokens: arrival to first token with a RAM tier %.0f ms, without %.0f ms: %.2fx\n",
               n_long + 32, n_long, bw, busy.max_tokens, first[1], first[0], first[0] / first[1]);
    }
    snprintf(uri, sizeof(uri), "rm -rf %s", dir);
    if (system(uri)) fprintf(stderr, "bench_serve: could not remove %s\n", dir);

    for (int i = 0; i < clients; i++) free((void *)rq[i].prompt);
    for (int i = 1; i <= n_short; i++) free((void *)mixed[i].prompt);
    free(long_prompt);
    free(one);
    cake_model_free(m);
    return 0;
}
