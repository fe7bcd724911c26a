/* /metrics: the server's counters in Prometheus's text format (0.0.4). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "server/server.h"

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} text;

__attribute__((format(printf, 2, 3))) static void put(text *t, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        const int n = t->failed ? 0 : vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (t->failed || n < 0) {
            t->failed = 1;
            return;
        }
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        char *b = realloc(t->buf, 2 * t->cap + (size_t)n);
        if (!b) {
            t->failed = 1;
            return;
        }
        t->buf = b;
        t->cap = 2 * t->cap + (size_t)n;
    }
}

static void counter(text *t, const char *name, const char *help, unsigned long long v) {
    put(t, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name, v);
}

static void histogram(text *t, const char *name, const char *help, const pool_histogram *h,
                      const double *bounds) {
    put(t, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    for (int b = 0; b < POOL_N_BUCKETS; b++)
        put(t, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[b], (unsigned long long)h->le[b]);
    put(t, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
        (unsigned long long)h->count, name, h->sum_s, name, (unsigned long long)h->count);
}

static void gauge(text *t, const char *name, const char *help, long long v) {
    put(t, "# HELP %s %s\n# TYPE %s gauge\n%s %lld\n", name, help, name, name, v);
}

char *server_metrics_text(const pool_counters *pc, const unsigned long long *status_counts) {
    text t = {.buf = malloc(4096), .cap = 4096};
    if (!t.buf) return NULL;
    static const unsigned statuses[] = SERVER_STATUSES;
    put(&t, "# HELP cake_http_responses_total HTTP responses by status code.\n"
            "# TYPE cake_http_responses_total counter\n");
    for (int i = 0; i < SERVER_N_STATUSES; i++)
        put(&t, "cake_http_responses_total{code=\"%u\"} %llu\n", statuses[i], status_counts[i]);
    gauge(&t, "cake_requests_running", "Requests being computed.", pc->running);
    gauge(&t, "cake_requests_queued", "Requests waiting for a slot.", pc->queued);
    counter(&t, "cake_requests_finished_total",
            "Requests that ran to their end or were cancelled (at any point).",
            (unsigned long long)pc->jobs_done);
    counter(&t, "cake_requests_cancelled_total", "Requests whose client went away.",
            (unsigned long long)pc->jobs_cancelled);
    counter(&t, "cake_requests_failed_total", "Requests the engine failed.",
            (unsigned long long)pc->jobs_failed);
    counter(&t, "cake_requests_rejected_total", "Requests refused with a full queue.",
            (unsigned long long)pc->jobs_rejected);
    counter(&t, "cake_prompt_tokens_total", "Prompt tokens prefilled.",
            (unsigned long long)pc->prompt_tokens);
    counter(&t, "cake_prompt_tokens_cached_total",
            "Prompt tokens not computed: the slot's KV cache held them, or the store.",
            (unsigned long long)(pc->prompt_tokens - pc->prompt_tokens_computed));
    counter(&t, "cake_generation_tokens_total", "Tokens generated.",
            (unsigned long long)pc->generated_tokens);

    static const double request_bounds[] = POOL_REQUEST_BUCKETS,
                        token_bounds[] = POOL_TOKEN_BUCKETS;
    histogram(&t, "cake_time_to_first_token_seconds",
              "From the request's start on its slot to its first token.", &pc->ttft,
              request_bounds);
    histogram(&t, "cake_request_queue_seconds",
              "From the request's arrival to its start on a slot.", &pc->queue_time,
              request_bounds);
    histogram(&t, "cake_request_seconds", "From the request's arrival to its last token.",
              &pc->request_time, request_bounds);
    histogram(&t, "cake_inter_token_seconds", "Between two tokens of a request.", &pc->token_gap,
              token_bounds);

    put(&t,
        "# HELP cake_prefill_chunks_total Prompt chunks by where their KV came from (cached: "
        "the slot's KV cache held them from its request before).\n"
        "# TYPE cake_prefill_chunks_total counter\n"
        "cake_prefill_chunks_total{source=\"computed\"} %llu\n"
        "cake_prefill_chunks_total{source=\"loaded\"} %llu\n"
        "cake_prefill_chunks_total{source=\"cached\"} %llu\n",
        (unsigned long long)pc->chunks_computed, (unsigned long long)pc->chunks_loaded,
        (unsigned long long)pc->chunks_cached);
    counter(&t, "cake_store_chunks_missing_total", "Loadable chunks the store did not have.",
            (unsigned long long)pc->chunks_missing);
    counter(&t, "cake_store_chunks_corrupt_total",
            "Chunks that failed to load (corrupt, vanished, store down); computed instead.",
            (unsigned long long)pc->chunks_corrupt);
    counter(&t, "cake_store_chunks_awaited_total",
            "Missing chunks another request was computing: waited for and found in the store.",
            (unsigned long long)pc->chunks_awaited);
    counter(&t, "cake_prefill_chunks_during_lookup_total",
            "Chunks computed while a slow store's lookup ran (counted as computed too).",
            (unsigned long long)pc->chunks_during_lookup);
    counter(&t, "cake_store_ram_hits_total",
            "Chunk loads the store's RAM tier (ram=) gave, outside the link.",
            (unsigned long long)pc->ram_hits);
    counter(&t, "cake_store_chunks_prefetched_total",
            "Chunks brought into the RAM tier while their request waited for a slot.",
            (unsigned long long)pc->prefetched);
    counter(&t, "cake_store_bytes_loaded_total", "KV bytes loaded from the store.",
            (unsigned long long)pc->bytes_loaded);
    counter(&t, "cake_store_request_errors_total", "Requests during which the store failed.",
            (unsigned long long)pc->store_errors);
    put(&t,
        "# HELP cake_store_writeback_chunks_total Computed chunks written back, by result.\n"
        "# TYPE cake_store_writeback_chunks_total counter\n"
        "cake_store_writeback_chunks_total{result=\"written\"} %llu\n"
        "cake_store_writeback_chunks_total{result=\"dropped\"} %llu\n"
        "cake_store_writeback_chunks_total{result=\"failed\"} %llu\n",
        (unsigned long long)pc->writeback_written, (unsigned long long)pc->writeback_dropped,
        (unsigned long long)pc->writeback_failed);
    if (pc->store_lookup_s >= 0)
        put(&t,
            "# HELP cake_store_lookup_seconds How long the store's lookups took lately (a "
            "running mean; Cake computes during those longer than a chunk's compute).\n"
            "# TYPE cake_store_lookup_seconds gauge\ncake_store_lookup_seconds %.6f\n",
            pc->store_lookup_s);
    if (pc->store_up >= 0)
        gauge(&t, "cake_store_up",
              "1 when the KV store answers (every Redis server: a PING), 0 when it does not "
              "(requests compute meanwhile).",
              pc->store_up);
    const sched_counters *st = &pc->steps;
    counter(&t, "cake_engine_steps_total", "Batched forward passes the engine ran.",
            (unsigned long long)st->steps);
    counter(&t, "cake_engine_shared_steps_total",
            "Steps that carried more than one request's tokens.",
            (unsigned long long)st->shared_steps);
    gauge(&t, "cake_engine_max_sequences", "The most requests one step has carried.",
          st->max_sequences);
    put(&t,
        "# HELP cake_engine_tokens_total Tokens the steps computed, by priority class.\n"
        "# TYPE cake_engine_tokens_total counter\n"
        "cake_engine_tokens_total{kind=\"decode\"} %llu\n"
        "cake_engine_tokens_total{kind=\"prefill\"} %llu\n"
        "cake_engine_tokens_total{kind=\"cake\"} %llu\n",
        (unsigned long long)st->tokens[CAKE_PASS_DECODE],
        (unsigned long long)st->tokens[CAKE_PASS_PREFILL],
        (unsigned long long)st->tokens[CAKE_PASS_CAKE]);
    if (t.failed) {
        free(t.buf);
        return NULL;
    }
    return t.buf;
}
