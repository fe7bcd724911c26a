/* cake serve's HTTP side (libmicrohttpd, a thread per connection): an
 * OpenAI-compatible API over the engine pool, plus /health and Prometheus
 * /metrics.
 *
 *   POST /v1/completions        prompt (text or token ids) -> text
 *   POST /v1/chat/completions   messages -> the assistant's answer
 *   GET  /v1/models             the one model served
 *   GET  /health                200 while serving, 503 while shutting down
 *   GET  /metrics               Prometheus text format
 *
 * "stream": true answers with server-sent events as tokens come. Errors are
 * OpenAI-style JSON ({"error":{"message":...}}) with 400 (bad request), 404,
 * 401 (no or a wrong API key), 405, 413 (body over the limit), 503 (queue full,
 * shutting down) or 500. A
 * client that goes away cancels its request at the next token. */
#ifndef CAKE_SERVER_SERVER_H
#define CAKE_SERVER_SERVER_H

#include <stddef.h>

#include "server/openai.h"
#include "server/pool.h"

typedef struct {
    const char *host; /* address to listen on (name or numeric; IPv4 or IPv6) */
    int port;         /* 0: any free port (server_port tells which) */
    size_t max_body;  /* larger request bodies get 413 */
    int max_connections;
    int idle_timeout_s; /* a connection idle this long is closed; streams that
                           wait send a keep-alive comment every quarter of it */
    /* A connection waiting for a request (its first, or the next on a kept
     * alive one) is closed after this long without a byte (at most
     * idle_timeout_s): idle or half-sent requests do not hold the
     * connection limit for the whole idle timeout. */
    int request_timeout_s;
    const char *api_key; /* NULL: none; else /v1/ wants "Authorization: Bearer KEY" */
} http_config;

typedef struct serve_server serve_server;

/* Starts listening. The pool and the model stay the caller's and must outlive
 * the server. 0, or -1 with err. */
int server_start(serve_pool *pool, const api_model *model, const http_config *cfg,
                 serve_server **out, char *err, size_t errlen);
int server_port(const serve_server *s);
/* Answers 503 to new requests from now on, and has waiting requests give up
 * once their jobs end (pool_shutdown ends them). */
void server_begin_shutdown(serve_server *s);
/* Waits (at most 10 s) for the answers being sent, then closes every
 * connection (joining their threads) and frees. Accepts NULL. */
void server_stop(serve_server *s);

/* The Prometheus text of the pool's counters and the HTTP status counts
 * (malloc'd; NULL on out of memory); metrics.c. */
char *server_metrics_text(const pool_counters *pc, const unsigned long long *status_counts);

/* The statuses counted, in the order of status_counts. */
#define SERVER_STATUSES                                                                            \
    { 200, 400, 401, 404, 405, 413, 500, 503 }
#define SERVER_N_STATUSES 8

#endif
