#include "server/pool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/context.h"
#include "engine/json_grammar.h"
#include "model/tokenizer.h"
#include "util/clock.h"
#include "util/err.h"

/* ---- a job's tokens, as the engine chooses them ---- */

typedef struct {
    serve_job *job;
    const cake_tokenizer *tok;
    cake_token eos;
    /* printed as tags[k] (job_printed_tags) */
    cake_token tag_ids[JOB_PRINTED_TAGS];
    const char *tags[JOB_PRINTED_TAGS];
    int n_tags;
    job_logprob next; /* the next token's, when the job asks (on_logits, then on_token) */
    uint64_t last_token_ns;
    pool_histogram gaps; /* between its tokens, for /metrics */
} token_sink;

void pool_histogram_add(pool_histogram *h, const double *bounds, double seconds) {
    h->sum_s += seconds;
    h->count++;
    for (int b = 0; b < POOL_N_BUCKETS; b++) h->le[b] += seconds <= bounds[b];
}

static void histogram_merge(pool_histogram *into, const pool_histogram *h) {
    into->sum_s += h->sum_s;
    into->count += h->count;
    for (int b = 0; b < POOL_N_BUCKETS; b++) into->le[b] += h->le[b];
}

/* Token id's log-probability and the k most likely (k <= 20), from the
 * logits' log softmax (before temperature and top_p, as vLLM's default). */
static void logprob_of(const float *logits, int n_vocab, cake_token id, int k, job_logprob *lp) {
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++) max = logits[i] > max ? logits[i] : max;
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - max);
    const double lse = max + log(sum);
    lp->logprob = (float)(logits[id] - lse);
    lp->rank = 1;
    lp->n_top = 0;
    for (int i = 0; i < n_vocab; i++) { /* insertion into the k best, highest first */
        lp->rank += logits[i] > logits[id];
        int at = lp->n_top;
        while (at > 0 && logits[i] > lp->top_logprob[at - 1]) at--;
        if (at >= k) continue;
        const int last = lp->n_top < k ? lp->n_top++ : k - 1;
        for (int m = last; m > at; m--) {
            lp->top_id[m] = lp->top_id[m - 1];
            lp->top_logprob[m] = lp->top_logprob[m - 1];
        }
        lp->top_id[at] = i;
        lp->top_logprob[at] = logits[i]; /* (made log-probabilities below) */
    }
    for (int m = 0; m < lp->n_top; m++) lp->top_logprob[m] = (float)(lp->top_logprob[m] - lse);
}

static void on_logits(const float *logits, int n_vocab, cake_token id, void *ud) {
    token_sink *s = ud;
    if (s->job->top_logprobs >= 0) logprob_of(logits, n_vocab, id, s->job->top_logprobs, &s->next);
}

/* A scored prompt's rows: row r gives prompt token pos0 + r + 1's. */
static void on_prompt_logits(const float *rows, int n, int pos0, int n_vocab, void *ud) {
    const serve_job *j = ((token_sink *)ud)->job;
    for (int r = 0; r < n && pos0 + r + 1 < j->n_prompt; r++)
        logprob_of(rows + (size_t)r * n_vocab, n_vocab, j->prompt[pos0 + r + 1], j->prompt_top,
                   &j->prompt_logprobs[pos0 + r + 1]);
}

static int on_token(cake_token id, void *ud) {
    token_sink *s = ud;
    serve_job *j = s->job;
    static const double token_bounds[] = POOL_TOKEN_BUCKETS;
    const uint64_t now = cake_now_ns();
    if (s->last_token_ns)
        pool_histogram_add(&s->gaps, token_bounds, (double)(now - s->last_token_ns) / 1e9);
    s->last_token_ns = now;
    pthread_mutex_lock(&j->mu);
    j->n_ids++;
    const size_t start = j->len;
    int stop = 0, n = 0;
    int stop_id = id == s->eos || id == j->end_of_turn;
    for (int k = 0; k < j->n_stop_ids; k++) stop_id |= id == j->stop_ids[k];
    if (!j->ignore_eos && stop_id && j->n_ids > j->min_tokens) {
        j->stopped = 1;
        stop = 1; /* (EOS ends the loop itself; its text is empty) */
    } else {
        char buf[256], *piece = buf;
        const char *tag = NULL;
        for (int k = 0; k < s->n_tags; k++)
            if (id == s->tag_ids[k]) tag = s->tags[k];
        if (tag)
            n = snprintf(buf, sizeof(buf), "%s", tag);
        else
            n = cake_token_to_piece(s->tok, j->prev, id, buf, sizeof(buf));
        if (n > (int)sizeof(buf) && (piece = malloc((size_t)n)))
            cake_token_to_piece(s->tok, j->prev, id, piece, (size_t)n);
        if (n > 0 && piece && job_add_text(j, piece, (size_t)n) == 1) {
            j->stopped = 1;
            stop = 1;
        }
        if (piece != buf) free(piece);
    }
    j->prev = id;
    if (j->logprobs) { /* (where its whole text ends, even past a stop string's cut) */
        s->next.text_end = start + (n > 0 ? (size_t)n : 0);
        j->logprobs[j->n_ids - 1] = s->next;
    }
    job_notify(j);
    pthread_mutex_unlock(&j->mu);
    return stop || atomic_load(&j->cancel);
}

/* ---- the pool ---- */

typedef struct {
    serve_pool *pool;
    cake_context *ctx;
    cake_writeback *wb;
    pthread_t thread;
    int started;
    /* The tokens whose KV the context holds, from position 0 (the last
     * request's prompt and the tokens it fed back): a next prompt that
     * shares a prefix with them starts after it. */
    cake_token *kv_ids;
    int n_kv, kv_cap;
    char *kv_salt; /* the last request's cache salt (owned; NULL: none) */
    /* Under pool->mu: */
    serve_job *current;  /* the job handed to the slot, until it is answered */
    int ready;           /* waiting for a job */
    uint64_t idle_since; /* when it last finished a job, in jobs finished */
    uint64_t order;      /* its job's place in the order of arrival */
    int n_cached;        /* how much of its job's prompt its KV cache holds */
} slot;

struct serve_pool {
    pool_config cfg;
    const cake_model *model;
    int n_ctx;
    slot *slots; /* slot 0's context is the engine: its threads and scratch run every step */
    cake_inflight *inflight;     /* prompt chunks the slots are computing now (with a store) */
    cake_json_vocab *json_vocab; /* the tokens as structured output's mask reads them */
    /* json_vocab with cfg.calls' tags that are control tokens read as the
     * tags: for tool requests, whose answers print them */
    cake_json_vocab *call_vocab;
    cake_compute_speed speed; /* under mu: the last that a slot's request ended with */
    sched *sched;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    serve_job *head, *tail; /* the queue */
    int shutdown;
    pool_counters totals;
    uint64_t n_finished; /* numbers the log's requests */
    uint64_t n_handed;   /* jobs handed to slots: their order of arrival */
    /* Queued jobs' cached chunks brought into the store's RAM tier while
     * they wait for a slot (a store with ram=): the job being prefetched
     * (under mu), and the flag that stops it when it gets a slot. */
    pthread_t prefetcher;
    int prefetcher_started;
    serve_job *prefetching;
    atomic_int prefetch_stop;
    cake_loader_engine keys_of; /* slot 0's, taken at the start: what keys need (the
                                   prefetcher must not read a context a slot uses) */
};

/* How many of j's prompt's first tokens s's KV cache holds already: none
 * for another cache salt than the one it was computed under. */
static int cached_prefix(const slot *s, const serve_job *j) {
    const int same_salt = s->kv_salt && j->cache_salt ? !strcmp(s->kv_salt, j->cache_salt)
                                                      : !s->kv_salt && !j->cache_salt;
    int k = 0;
    while (same_salt && k < s->n_kv && k < j->n_prompt && s->kv_ids[k] == j->prompt[k]) k++;
    return k;
}

/* Hands queued jobs, in order, to ready slots: each to the one whose KV cache
 * holds the longest prefix of its prompt (a chat's next turn finds its
 * history there), else to the one idle longest (whose cache is the least
 * likely to be wanted again). Under p->mu. */
static void dispatch(serve_pool *p) {
    int handed = 0;
    while (p->head) {
        slot *best = NULL;
        int best_len = -1;
        for (int i = 0; i < p->cfg.n_slots; i++) {
            slot *s = &p->slots[i];
            if (!s->ready) continue;
            const int len = cached_prefix(s, p->head);
            if (len > best_len || (len == best_len && s->idle_since < best->idle_since)) {
                best = s;
                best_len = len;
            }
        }
        if (!best) break;
        serve_job *j = p->head;
        if (!(p->head = j->next)) p->tail = NULL;
        best->current = j;
        best->ready = 0;
        best->order = ++p->n_handed;
        best->n_cached = best_len;
        if (j == p->prefetching) atomic_store(&p->prefetch_stop, 1); /* the loader takes over */
        p->totals.queued--;
        p->totals.running++;
        handed = 1;
    }
    if (handed) pthread_cond_broadcast(&p->cv);
}

static void account(serve_pool *p, const serve_job *j) {
    static const double bounds[] = POOL_REQUEST_BUCKETS;
    pool_counters *t = &p->totals;
    const cake_prefill_stats *ps = &j->stats.prefill;
    /* Each job is finished (cancelled ones too, whenever they were) or
     * failed; only answers add to the sums. */
    t->jobs_cancelled += j->cancelled;
    t->jobs_failed += j->error[0] && !j->cancelled;
    t->jobs_done += !j->error[0] || j->cancelled;
    if (j->error[0]) return;
    t->prompt_tokens += (uint64_t)j->n_prompt;
    t->generated_tokens += (uint64_t)j->n_ids;
    t->prompt_tokens_computed += (uint64_t)ps->tokens_computed;
    t->chunks_computed += (uint64_t)ps->chunks_computed;
    t->chunks_loaded += (uint64_t)ps->chunks_loaded;
    t->chunks_cached += (uint64_t)ps->chunks_cached;
    t->chunks_missing += (uint64_t)ps->chunks_missing;
    t->chunks_corrupt += (uint64_t)ps->chunks_corrupt;
    t->chunks_awaited += (uint64_t)ps->chunks_awaited;
    t->chunks_during_lookup += (uint64_t)ps->chunks_during_lookup;
    t->bytes_loaded += ps->bytes_loaded;
    t->store_errors += ps->store_error[0] != 0;
    pool_histogram_add(&t->ttft, bounds, j->stats.ttft_ms / 1e3);
    pool_histogram_add(&t->queue_time, bounds, (double)(j->t_started - j->t_arrived) / 1e9);
    pool_histogram_add(&t->request_time, bounds, (double)(j->t_ended - j->t_arrived) / 1e9);
}

/* One line per request on stderr: what an operator reads first. */
static void log_job(const serve_job *j, uint64_t number) {
    const cake_prefill_stats *ps = &j->stats.prefill;
    if (j->error[0]) {
        fprintf(stderr, "cake serve: request %llu: %d prompt tokens: %s\n",
                (unsigned long long)number, j->n_prompt, j->error);
        return;
    }
    fprintf(stderr,
            "cake serve: request %llu: %d prompt tokens, %d computed (%d chunks: %d computed, "
            "%d loaded, %d cached, %d awaited), "
            "%d generated, ttft %.1f ms, %s%s%s\n",
            (unsigned long long)number, j->n_prompt, ps->tokens_computed, ps->chunks_total,
            ps->chunks_computed, ps->chunks_loaded, ps->chunks_cached, ps->chunks_awaited, j->n_ids,
            j->stats.ttft_ms,
            j->cancelled ? "cancelled"
            : j->stopped ? "stop"
                         : "length",
            ps->store_error[0] ? "; store: " : "", ps->store_error);
}

/* Records what s's KV cache holds after j: its prompt and every generated
 * token but the last (which was chosen, not fed back); nothing after a
 * failure. */
static void remember_kv(slot *s, const serve_job *j) {
    s->n_kv = 0;
    free(s->kv_salt);
    s->kv_salt = NULL;
    if (j->error[0] || (j->cache_salt && !(s->kv_salt = strdup(j->cache_salt)))) return;
    const int fed = j->n_ids > 0 ? j->n_ids - 1 : 0;
    const int n = j->n_prompt + fed;
    if (n > s->kv_cap) {
        cake_token *p = realloc(s->kv_ids, (size_t)n * sizeof(*p));
        if (!p) return;
        s->kv_ids = p;
        s->kv_cap = n;
    }
    memcpy(s->kv_ids, j->prompt, (size_t)j->n_prompt * sizeof(*s->kv_ids));
    memcpy(s->kv_ids + j->n_prompt, j->ids, (size_t)fed * sizeof(*s->kv_ids));
    s->n_kv = n;
}

/* The full chunks that j's answer completed (its prompt's partial tail and
 * the tokens it fed back) go to the store too, as its prompt's did: a
 * chat's next turn, on any slot or server sharing the store, loads its
 * history instead of computing the last answer. */
static void store_answer(slot *s, const serve_job *j) {
    if (!s->wb || !s->n_kv || s->pool->cfg.prompts_only_writeback) return;
    cake_loader_engine e;
    cake_context_loader_engine(s->ctx, 1, &e);
    cake_loader_engine_salt(&e, j->cache_salt);
    const int chunk = s->pool->cfg.chunk;
    cake_writeback_tokens(s->wb, &e, s->kv_ids, s->n_kv, chunk, j->n_prompt / chunk);
}

/* A request's way to the scheduler. */
typedef struct {
    sched *sched;
    uint64_t order;           /* the job's arrival */
    const atomic_int *cancel; /* the job's */
} sched_ticket;

/* A cancelled request's prefill stops at its next pass (its decode, at its
 * next token: on_token), leaving the steps to the others. */
static int scheduled_forward(void *ticket, cake_context *c, cake_pass_kind kind,
                             const cake_token *tokens, int n, cake_pos pos0, float *logits,
                             char *err, size_t errlen) {
    const sched_ticket *t = ticket;
    if (kind != CAKE_PASS_DECODE && atomic_load(t->cancel))
        return cake_err(err, errlen, "cancelled during the prefill");
    return sched_forward(t->sched, c, t->order, kind, tokens, n, pos0, logits, err, errlen);
}

static int scheduled_turn(void *ticket, cake_context *c, int n, uint64_t timeout_ns) {
    const sched_ticket *t = ticket;
    if (atomic_load(t->cancel)) return 1; /* on to the pass, which stops */
    return sched_turn(t->sched, c, t->order, n, timeout_ns);
}

static void run_job(slot *s, serve_job *j) {
    serve_pool *p = s->pool;
    /* The last request's write-backs read the KV cache this one overwrites:
     * they finish first. */
    j->t_started = cake_now_ns();
    if (s->wb) cake_writeback_drain(s->wb, 60000);
    const cake_tokenizer *tok = cake_model_tokenizer(p->model);
    char err[256] = "";
    int max = j->max_tokens;
    if (max > p->n_ctx - j->n_prompt) max = p->n_ctx - j->n_prompt;
    cake_sampler_params sampling = j->sampling;
    sampling.prompt = j->prompt; /* (for the repetition penalty) */
    sampling.n_prompt = j->n_prompt;
    cake_token ends[2 + JOB_STOP_ID_ROOM]; /* what may not come before min_tokens */
    int n_ends = 0;
    if (!j->ignore_eos) { /* (with it nothing of these ends the answer anyway) */
        ends[n_ends++] = cake_tokenizer_eos(tok);
        if (j->end_of_turn >= 0) ends[n_ends++] = j->end_of_turn;
        for (int k = 0; k < j->n_stop_ids; k++) ends[n_ends++] = j->stop_ids[k];
    }
    sampling.min_tokens = j->min_tokens;
    sampling.end_ids = ends;
    sampling.n_end_ids = n_ends;
    /* JSON output; or with tools (auto), each call from its tag on */
    const cake_json_node *root = j->schema ? json_schema_root(j->schema) : NULL;
    const chat_call_syntax *calls = j->call_format ? chat_calls(j->call_format) : NULL;
    const int lazy = !j->json && root && calls;
    const cake_json_vocab *vocab = calls && p->call_vocab ? p->call_vocab : p->json_vocab;
    cake_json_grammar *grammar =
        j->json ? cake_json_grammar_new(vocab, root, cake_tokenizer_eos(tok), j->end_of_turn)
        : lazy  ? cake_json_grammar_new_lazy(vocab, root, calls->open, cake_tokenizer_eos(tok),
                                             j->end_of_turn)
                : NULL;
    if (grammar) cake_json_grammar_constrain(grammar, &sampling);
    cake_sampler *sampler = cake_sampler_init(sampling);
    pthread_mutex_lock(&j->mu);
    j->ids = malloc((size_t)(max > 0 ? max : 1) * sizeof(*j->ids));
    if (j->top_logprobs >= 0)
        j->logprobs = malloc((size_t)(max > 0 ? max : 1) * sizeof(job_logprob));
    const int score = j->prompt_top >= 0;
    if (score) j->prompt_logprobs = calloc((size_t)j->n_prompt, sizeof(job_logprob));
    j->prev = j->prompt[j->n_prompt - 1];
    cake_token *ids = j->ids;
    const int no_logprobs =
        (j->top_logprobs >= 0 && !j->logprobs) || (score && !j->prompt_logprobs);
    pthread_mutex_unlock(&j->mu);
    if (!sampler || !ids || no_logprobs || ((j->json || lazy) && !grammar)) {
        cake_sampler_free(sampler);
        cake_json_grammar_free(grammar);
        job_settle(j, "out of memory");
        s->n_kv = 0;
        return;
    }
    cake_prefill_params lp = {.store = p->cfg.store,
                              .writeback = s->wb,
                              .inflight = p->inflight,
                              .mode = p->cfg.mode,
                              .io_depth = p->cfg.io_depth,
                              .n_cached = p->cfg.whole_chunk_reuse
                                              ? s->n_cached / p->cfg.chunk * p->cfg.chunk
                                              : s->n_cached,
                              .cache_salt = j->cache_salt};
    token_sink sink = {.job = j, .tok = tok, .eos = cake_tokenizer_eos(tok), .n_tags = 0};
    sink.n_tags = job_printed_tags(j, tok, sink.tag_ids, sink.tags);
    sched_ticket ticket = {p->sched, s->order, &j->cancel};
    cake_request req = {
        .prompt = j->prompt,
        .n_prompt = j->n_prompt,
        .n_predict = max,
        .chunk = p->cfg.chunk,
        .loader = &lp,
        .eos = j->ignore_eos ? -1 : sink.eos,
        .sampler = sampler,
        .on_token = on_token,
        .on_logits = on_logits,
        .on_prompt_logits = score ? on_prompt_logits : NULL,
        .ud = &sink,
        .forward = scheduled_forward,
        .forward_ud = &ticket,
        .forward_turn = scheduled_turn,
    };
    cake_request_stats st;
    const int rc = cake_request_run(s->ctx, &req, ids, &st, err, sizeof(err));
    j->t_ended = cake_now_ns();
    sched_release(p->sched, s->ctx);
    pthread_mutex_lock(&p->mu);
    histogram_merge(&p->totals.token_gap, &sink.gaps);
    pthread_mutex_unlock(&p->mu);
    cake_sampler_free(sampler);
    cake_json_grammar_free(grammar);
    pthread_mutex_lock(&j->mu);
    j->stats = st;
    pthread_mutex_unlock(&j->mu);
    job_settle(j, rc ? err : NULL);
    remember_kv(s, j);
    store_answer(s, j);
}

/* The prefetcher: while jobs wait for a slot, it brings the chunks of
 * their prompts that the store holds into the store's RAM tier, the queue's
 * head first and each from its last chunk down (the end the loader loads
 * from), so that their loads come from RAM when they run. Stops at a job's
 * start on a slot. */
static void prefetch_job(serve_pool *p, const serve_job *j) {
    cake_loader_engine e = p->keys_of;
    cake_loader_engine_salt(&e, j->cache_salt);
    const int C = p->cfg.chunk, n = cake_prefill_loadable_chunks(j->n_prompt, C);
    cake_chunk_key *keys = n > 0 ? malloc((size_t)n * sizeof(*keys)) : NULL;
    if (!keys) return;
    cake_key_chain(e.fingerprint, (uint32_t)C, (uint32_t)e.kv_type, j->prompt,
                   (size_t)n * (size_t)C, keys);
    for (int i = 0; i < n / 2; i++) { /* last first */
        const cake_chunk_key k = keys[i];
        keys[i] = keys[n - 1 - i];
        keys[n - 1 - i] = k;
    }
    const cake_chunk_header h =
        cake_chunk_header_for(e.fingerprint, &keys[0], 0, (uint32_t)C, e.hp, e.kv_type);
    uint8_t *present = malloc((size_t)n);
    char err[256];
    if (present) { /* (on a failure, what the store could tell: a dead Redis server's are absent) */
        cake_store_exists(p->cfg.store, keys, (size_t)n, present, err, sizeof(err));
        int m = 0;
        for (int i = 0; i < n; i++)
            if (present[i]) keys[m++] = keys[i];
        cake_store_prefetch(p->cfg.store, keys, (size_t)m, cake_chunk_blob_size(&h),
                            &p->prefetch_stop);
    }
    free(present);
    free(keys);
}

static void *prefetcher_main(void *arg) {
    serve_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        serve_job *j = p->head;
        while (j && j->prefetched) j = j->next;
        if (p->shutdown) break;
        if (!j) {
            pthread_cond_wait(&p->cv, &p->mu);
            continue;
        }
        j->prefetched = 1;
        p->prefetching = j;
        atomic_store(&p->prefetch_stop, 0);
        pthread_mutex_lock(&j->mu);
        j->refs++; /* (the slot may finish it meanwhile) */
        pthread_mutex_unlock(&j->mu);
        pthread_mutex_unlock(&p->mu);
        prefetch_job(p, j);
        pthread_mutex_lock(&p->mu);
        p->prefetching = NULL;
        pthread_cond_broadcast(&p->cv); /* its slot may wait for this (slot_main) */
        pthread_mutex_unlock(&p->mu);
        job_release(j);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void *slot_main(void *arg) {
    slot *s = arg;
    serve_pool *p = s->pool;
    pthread_mutex_lock(&p->mu);
    s->ready = 1;
    dispatch(p);
    for (;;) {
        while (!s->current && !p->shutdown) pthread_cond_wait(&p->cv, &p->mu);
        serve_job *j = s->current;
        if (!j) { /* shut down, and nothing left */
            s->ready = 0;
            break;
        }
        /* A transfer the prefetcher has under way for this job ends first:
         * the loader then finds that chunk in RAM too, and the link idle. */
        while (p->prefetching == j) pthread_cond_wait(&p->cv, &p->mu);
        const int stopping = p->shutdown;
        /* (the slot's own memory is its thread's: no one else touches it) */
        if (!s->ctx->compute_speed.count) s->ctx->compute_speed = p->speed;
        pthread_mutex_unlock(&p->mu);

        if (stopping)
            job_settle(j, "the server is shutting down");
        else if (atomic_load(&j->cancel)) /* its client left while it waited */
            job_settle(j, "cancelled before it ran");
        else
            run_job(s, j);

        /* Counted, and the slot ready for the next job (a chat's next turn
         * finds it), before the answer goes out. */
        pthread_mutex_lock(&p->mu);
        p->totals.running--;
        s->current = NULL;
        if (s->ctx->compute_speed.count) p->speed = s->ctx->compute_speed;
        account(p, j);
        const uint64_t number = ++p->n_finished;
        s->idle_since = number;
        s->ready = 1;
        dispatch(p);
        pthread_mutex_unlock(&p->mu);
        job_finish(j);
        log_job(j, number);
        job_release(j);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int pool_create(const cake_model *m, const pool_config *cfg, serve_pool **out, char *err,
                size_t errlen) {
    *out = NULL;
    if (cfg->n_slots < 1 || cfg->chunk < 1 || cfg->queue_max < 0)
        return cake_err(err, errlen, "pool: bad slots, chunk or queue size");
    if (cfg->backend == CAKE_BACKEND_CUDA && cfg->n_slots > 1) /* (cake_forward_batch) */
        return cake_err(err, errlen, "pool: the CUDA backend serves one slot");
    serve_pool *p = calloc(1, sizeof(*p));
    if (!p || !(p->slots = calloc((size_t)cfg->n_slots, sizeof(*p->slots)))) {
        free(p);
        return cake_err(err, errlen, "out of memory");
    }
    p->cfg = *cfg;
    p->model = m;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    const cake_tokenizer *tok = cake_model_tokenizer(m);
    if (!(p->json_vocab = cake_json_vocab_new(tok))) {
        cake_err(err, errlen, "out of memory");
        goto fail;
    }
    /* (a tag that prints as itself needs neither) */
    cake_token call_tokens[CHAT_CALL_TAGS];
    const char *call_tags[CHAT_CALL_TAGS];
    const int n_call_tags = chat_silent_tags(cfg->calls, tok, call_tokens, call_tags);
    if (n_call_tags &&
        !(p->call_vocab = cake_json_vocab_new_keeping(tok, call_tokens, call_tags, n_call_tags))) {
        cake_err(err, errlen, "out of memory");
        goto fail;
    }
    cake_context_params cp = cake_context_default_params();
    cp.n_ctx = cfg->n_ctx;
    cp.n_threads = cfg->n_threads; /* 0: all CPUs */
    cp.max_batch = cfg->batch;
    cp.kv_type = cfg->kv_type;
    cp.backend = cfg->backend;
    /* Store keys need the model's fingerprint, which reads every weight once:
     * take that time now rather than in the first request's TTFT. */
    if (cfg->store) {
        uint8_t fp[16];
        cake_model_fingerprint(m, fp);
        if (!cfg->independent_prefills && !(p->inflight = cake_inflight_create())) {
            cake_err(err, errlen, "out of memory");
            goto fail;
        }
    }
    for (int i = 0; i < cfg->n_slots; i++) {
        slot *s = &p->slots[i];
        s->pool = p;
        if (cake_context_init(m, cp, &s->ctx, err, errlen)) goto fail;
        /* The other slots' contexts only hold a KV cache: the engine computes. */
        cp.n_threads = 1;
        cp.max_batch = 1;
        if (cfg->store && !(s->wb = cake_writeback_create(cfg->store, 1024, err, errlen)))
            goto fail;
    }
    p->n_ctx = cake_context_n_ctx(p->slots[0].ctx);
    if (sched_create(p->slots[0].ctx, cfg->policy, &p->sched, err, errlen)) goto fail;
    if (cfg->store && cake_store_has_ram(cfg->store) && cfg->mode != CAKE_MODE_COMPUTE) {
        cake_context_loader_engine(p->slots[0].ctx, 1, &p->keys_of);
        if (pthread_create(&p->prefetcher, NULL, prefetcher_main, p)) {
            cake_err(err, errlen, "cannot start the prefetch thread");
            goto fail;
        }
        p->prefetcher_started = 1;
    }
    for (int i = 0; i < cfg->n_slots; i++) {
        if (pthread_create(&p->slots[i].thread, NULL, slot_main, &p->slots[i])) {
            cake_err(err, errlen, "cannot start a slot thread");
            goto fail;
        }
        p->slots[i].started = 1;
    }
    *out = p;
    return 0;
fail:
    pool_free(p);
    return -1;
}

int pool_submit(serve_pool *p, serve_job *j) {
    pthread_mutex_lock(&p->mu);
    /* Each idle slot takes a job at once; beyond them, queue_max may wait. */
    const int idle = p->cfg.n_slots - p->totals.running;
    if (p->shutdown || p->totals.queued >= p->cfg.queue_max + (idle > 0 ? idle : 0)) {
        p->totals.jobs_rejected++;
        pthread_mutex_unlock(&p->mu);
        return -1;
    }
    pthread_mutex_lock(&j->mu);
    j->refs++;
    pthread_mutex_unlock(&j->mu);
    j->t_arrived = cake_now_ns();
    j->next = NULL;
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    p->totals.queued++;
    dispatch(p);
    if (p->head && p->prefetcher_started) pthread_cond_broadcast(&p->cv); /* one waits */
    pthread_mutex_unlock(&p->mu);
    return 0;
}

int pool_capacity(const serve_pool *p) {
    return p->cfg.n_slots + p->cfg.queue_max;
}

int pool_n_ctx(const serve_pool *p) {
    return p->n_ctx;
}

cake_context *pool_engine(serve_pool *p) {
    return p->slots[0].ctx;
}

void pool_speed_set(serve_pool *p, const cake_compute_speed *speed) {
    pthread_mutex_lock(&p->mu);
    p->speed = *speed;
    pthread_mutex_unlock(&p->mu);
}

void pool_speed_get(serve_pool *p, cake_compute_speed *out) {
    pthread_mutex_lock(&p->mu);
    *out = p->speed;
    pthread_mutex_unlock(&p->mu);
}

void pool_counters_get(serve_pool *p, pool_counters *out) {
    pthread_mutex_lock(&p->mu);
    *out = p->totals;
    pthread_mutex_unlock(&p->mu);
    sched_counters_get(p->sched, &out->steps);
    out->store_up = -1;
    out->store_lookup_s = -1;
    if (p->cfg.store) {
        out->store_lookup_s = (double)cake_store_lookup_ns(p->cfg.store) / 1e9;
        char err[256];
        out->store_up = cake_store_check(p->cfg.store, err, sizeof(err)) == 0;
        cake_store_counters sc;
        cake_store_counters_get(p->cfg.store, &sc);
        out->ram_hits = sc.ram_hits;
        out->prefetched = sc.prefetched;
    }
    for (int i = 0; i < p->cfg.n_slots; i++) {
        if (!p->slots[i].wb) continue;
        cake_writeback_counters c;
        cake_writeback_counters_get(p->slots[i].wb, &c);
        out->writeback_written += c.written;
        out->writeback_dropped += c.dropped_full + c.dropped_timeout;
        out->writeback_failed += c.failed;
    }
}

void pool_shutdown(serve_pool *p) {
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    atomic_store(&p->prefetch_stop, 1);
    for (int i = 0; i < p->cfg.n_slots; i++)
        if (p->slots[i].current) atomic_store(&p->slots[i].current->cancel, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void pool_free(serve_pool *p) {
    if (!p) return;
    pool_shutdown(p);
    for (int i = 0; i < p->cfg.n_slots; i++)
        if (p->slots[i].started) pthread_join(p->slots[i].thread, NULL);
    if (p->prefetcher_started) pthread_join(p->prefetcher, NULL);
    sched_free(p->sched); /* no slot is left to wait on it */
    for (int i = 0; i < p->cfg.n_slots; i++) {
        cake_writeback_free(p->slots[i].wb); /* before its context: it reads the KV */
        cake_context_free(p->slots[i].ctx);
        free(p->slots[i].kv_ids);
        free(p->slots[i].kv_salt);
    }
    cake_inflight_free(p->inflight); /* after the write-backs: they release promises */
    cake_json_vocab_free(p->json_vocab);
    cake_json_vocab_free(p->call_vocab);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->slots);
    free(p);
}
