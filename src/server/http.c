#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include "server/server.h"
#include "util/err.h"

struct serve_server {
    struct MHD_Daemon *daemon;
    serve_pool *pool;
    api_model model;
    http_config cfg;
    int port;
    atomic_int stopping;
    atomic_int in_flight; /* completions being answered (streams until their end) */
    atomic_ullong next_id;
    atomic_ullong status_counts[SERVER_N_STATUSES];
};

/* One connection's request: its body as it arrives. */
typedef struct {
    char *body;
    size_t len, cap;
    int too_large; /* a chunked body went over the limit: the rest is dropped */
} request_state;

/* ---- replies ---- */

static void count_status(serve_server *s, unsigned status) {
    static const unsigned statuses[] = SERVER_STATUSES;
    for (int i = 0; i < SERVER_N_STATUSES; i++)
        if (statuses[i] == status) atomic_fetch_add(&s->status_counts[i], 1);
}

/* Closes the connection, in a line of the log (libmicrohttpd's own is
 * left out: log_http). */
static enum MHD_Result out_of_memory(void) {
    fputs("cake serve: http: out of memory, closing a connection\n", stderr);
    return MHD_NO;
}

/* Queues body (malloc'd; taken over) with status and content type (and,
 * for a 405, the methods the path takes). */
static enum MHD_Result reply_allow(serve_server *s, struct MHD_Connection *c, unsigned status,
                                   char *body, const char *type, const char *allow) {
    if (!body) {
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\"}}");
        if (!body) return out_of_memory();
    }
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return out_of_memory();
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == MHD_HTTP_SERVICE_UNAVAILABLE) MHD_add_response_header(r, "Retry-After", "1");
    if (status == MHD_HTTP_UNAUTHORIZED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (allow) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    const enum MHD_Result rc = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    return rc;
}

static enum MHD_Result reply(serve_server *s, struct MHD_Connection *c, unsigned status, char *body,
                             const char *type) {
    return reply_allow(s, c, status, body, type, NULL);
}

static enum MHD_Result reply_json(serve_server *s, struct MHD_Connection *c, unsigned status,
                                  char *json) {
    return reply(s, c, status, json, "application/json");
}

__attribute__((format(printf, 4, 5))) static enum MHD_Result
reply_error(serve_server *s, struct MHD_Connection *c, unsigned status, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return reply_json(s, c, status, api_error((int)status, msg));
}

/* Whether the client closed its end (it sends nothing more while it waits
 * for the answer, so readable means closed, or a pipelined request). */
static int client_gone(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return 0;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) return 1;
    char b;
    return recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* Waits (mu held) for cv, at most ms (< 1000) milliseconds: then the
 * caller looks at its client (and its jobs) again. */
static void timed_wait(pthread_cond_t *cv, pthread_mutex_t *mu, long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += ms * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_cond_timedwait(cv, mu, &ts);
}

/* libmicrohttpd's messages, in the server's log format. Three are left out:
 * they follow cake's own answer to a client that went away (the pool logs
 * the request as cancelled), and would only say that again. */
static void log_http(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
    if (!strcmp(msg, "Application reported internal error, closing connection.") ||
        !strcmp(msg, "Closing connection (application reported error generating data).") ||
        !strcmp(msg, "Closing connection (application error generating response)."))
        return;
    fprintf(stderr, "cake serve: http: %s\n", msg);
}

/* ---- streams: server-sent events ---- */

static double seconds_since(const struct timespec *t) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t->tv_sec) + (double)(now.tv_nsec - t->tv_nsec) * 1e-9;
}

/* Where a stream is in one choice. */
typedef struct {
    size_t sent;     /* bytes of the job's text sent */
    int tokens_sent; /* tokens whose log-probabilities were sent (when asked) */
    int first_sent;  /* a chat's first chunk (the role) */
    int calls_sent;  /* its tool calls, when its answer made some */
    int finished;    /* its last chunk (or its error) went out */
} stream_choice;

typedef struct {
    serve_server *server;
    struct MHD_Connection *conn;
    serve_job *jobs[API_MAX_JOBS]; /* one per choice (of each prompt) */
    stream_choice choice[API_MAX_JOBS];
    int n, turn; /* choices; the one to look at first (round robin) */
    int failed;  /* a choice failed: no usage chunk */
    int ending;  /* after the choices: 0 the usage chunk, 1 [DONE], 2 over */
    api_shape shape;
    job_waker *waker;      /* the choices' (n > 1), a reference */
    unsigned long changes; /* its count when the choices were last looked at */
    char id[40];
    long created;
    struct timespec last; /* when the last event went out */
    char *out;            /* the event being sent */
    size_t out_len, out_off;
} stream_state;

/* Choice i's next event (under its job's lock), or NULL when none is due. */
static char *choice_event(stream_state *st, int i) {
    serve_job *j = st->jobs[i];
    stream_choice *c = &st->choice[i];
    const char *model = st->server->model.name;
    if (c->finished) return NULL;
    if (st->shape.chat && !c->first_sent) {
        c->first_sent = 1;
        return api_stream_event(&st->shape, CHUNK_FIRST, i, "", 0, 0, 0, j, st->id, st->created,
                                model);
    }
    size_t from, to;
    const int piece = api_next_piece(j, c->sent, &from, &to);
    if (piece) {
        const int tokens = api_answer_tokens(j, to);
        char *ev = api_stream_event(&st->shape, piece == 1 ? CHUNK_REASONING : CHUNK_TEXT, i,
                                    j->text + from, to - from, c->tokens_sent, tokens, j, st->id,
                                    st->created, model);
        c->sent = to;
        c->tokens_sent = tokens;
        return ev;
    }
    if (!j->done) return NULL;
    if (j->call_format && api_content_end(j) < j->len && !c->calls_sent && !j->error[0]) {
        c->calls_sent = 1;
        return api_stream_event(&st->shape, CHUNK_CALLS, i, "", 0, 0, 0, j, st->id, st->created,
                                model);
    }
    c->finished = 1;
    if (j->error[0]) {
        st->failed = 1;
        return api_sse_event(api_error(500, j->error));
    }
    return api_stream_event(&st->shape, CHUNK_FINISH, i, "", 0, c->tokens_sent,
                            api_answer_tokens(j, j->len), j, st->id, st->created, model);
}

/* The stream's next event, or NULL when none is due yet: the choices' (in
 * turns, so that none waits behind another), then the usage chunk when
 * asked, then [DONE]. */
static char *next_event(stream_state *st) {
    int all_finished = 1;
    for (int k = 0; k < st->n; k++) {
        const int i = (st->turn + k) % st->n;
        pthread_mutex_lock(&st->jobs[i]->mu);
        char *ev = choice_event(st, i);
        pthread_mutex_unlock(&st->jobs[i]->mu);
        if (ev) {
            st->turn = i + 1;
            return ev;
        }
        all_finished &= st->choice[i].finished;
    }
    if (!all_finished) return NULL;
    switch (st->ending++) {
    case 0:
        if (st->shape.include_usage && !st->failed)
            return api_stream_usage(&st->shape, st->jobs, st->n, st->id, st->created,
                                    st->server->model.name);
        st->ending++;
        /* fall through */
    case 1:
        return strdup("data: [DONE]\n\n");
    default:
        return NULL;
    }
}

/* Waits a little for a choice to change (one: until its job signals; several:
 * until one of their jobs does, through their waker), at most 200 ms. 0, or
 * -1 when the client has gone. */
static int wait_for_choices(stream_state *st) {
    for (int i = 0; i < st->n; i++) {
        if (st->choice[i].finished) continue;
        serve_job *j = st->jobs[i];
        pthread_mutex_lock(&j->mu);
        if (!j->done && client_gone(st->conn)) {
            pthread_mutex_unlock(&j->mu);
            return -1;
        }
        if (!st->waker && j->ready == st->choice[i].sent && !j->done)
            timed_wait(&j->cv, &j->mu, 200);
        pthread_mutex_unlock(&j->mu);
        break;
    }
    if (st->waker) { /* (no change since the choices were looked at: wait for one) */
        pthread_mutex_lock(&st->waker->mu);
        if (st->waker->changes == st->changes) timed_wait(&st->waker->cv, &st->waker->mu, 200);
        st->changes = st->waker->changes;
        pthread_mutex_unlock(&st->waker->mu);
    }
    return 0;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    stream_state *st = cls;
    while (st->out_off == st->out_len) {
        free(st->out);
        st->out = NULL;
        st->out_len = st->out_off = 0;
        if (st->ending > 1) return MHD_CONTENT_READER_END_OF_STREAM;
        char *ev;
        while (!(ev = next_event(st)) && st->ending <= 1) {
            /* A long prefill sends nothing: a comment line (which clients
             * skip) keeps the connection from counting as idle. */
            if (seconds_since(&st->last) * 4 >= st->server->cfg.idle_timeout_s) {
                ev = strdup(": keep-alive\n\n");
                break;
            }
            if (wait_for_choices(st)) return MHD_CONTENT_READER_END_WITH_ERROR; /* (cancelled) */
        }
        clock_gettime(CLOCK_MONOTONIC, &st->last);
        if (!ev) return MHD_CONTENT_READER_END_WITH_ERROR; /* out of memory */
        st->out = ev;
        st->out_len = strlen(ev);
    }
    size_t n = st->out_len - st->out_off;
    if (n > max) n = max;
    memcpy(buf, st->out + st->out_off, n);
    st->out_off += n;
    return (ssize_t)n;
}

/* Cancels the jobs (those still running stop at their next token) and
 * drops them. */
static void cancel_jobs(serve_job *const *jobs, int n) {
    for (int i = 0; i < n; i++) {
        if (!jobs[i]) continue;
        atomic_store(&jobs[i]->cancel, 1);
        job_release(jobs[i]);
    }
}

static void stream_free(void *cls) {
    stream_state *st = cls;
    atomic_fetch_sub(&st->server->in_flight, 1);
    cancel_jobs(st->jobs, st->n); /* the client left early, or the jobs have ended */
    job_waker_release(st->waker);
    free(st->out);
    free(st);
}

/* ---- endpoints ---- */

/* Waits for every job to end. 0, or -1 when the client left first. */
static int wait_jobs(struct MHD_Connection *c, serve_job *const *jobs, int n) {
    for (int i = 0; i < n; i++) {
        serve_job *j = jobs[i];
        pthread_mutex_lock(&j->mu);
        while (!j->done) {
            if (client_gone(c)) {
                pthread_mutex_unlock(&j->mu);
                return -1;
            }
            timed_wait(&j->cv, &j->mu, 200);
        }
        pthread_mutex_unlock(&j->mu);
    }
    return 0;
}

static enum MHD_Result answer(serve_server *s, struct MHD_Connection *c, const request_state *rq,
                              int chat) {
    char err[512];
    serve_job *jobs[API_MAX_JOBS] = {0}, *prompts[API_MAX_JOBS];
    api_shape shape;
    if (api_parse(rq->body ? rq->body : "", rq->len, chat, &s->model, prompts, &shape, err,
                  sizeof(err)))
        return reply_error(s, c, MHD_HTTP_BAD_REQUEST, "%s", err);
    /* choices: one job each, a prompt's together (choice k of prompt p at
     * p n + k, its index in the answer) */
    const int n = shape.n * shape.n_prompts;
    for (int p = 0; p < shape.n_prompts; p++) jobs[p * shape.n] = prompts[p];
    if (n > pool_capacity(s->pool)) { /* (a 503 would say to retry, which never helps) */
        cancel_jobs(jobs, n);
        return reply_error(s, c, MHD_HTTP_BAD_REQUEST,
                           "%d answers (n x prompts) are more than this server takes at once: "
                           "%d (--slots + --queue)",
                           n, pool_capacity(s->pool));
    }
    /* a stream of several choices waits on all their jobs at once */
    job_waker *waker = NULL;
    for (int i = 1; i < n; i++)
        if ((i % shape.n && !(jobs[i] = job_clone(jobs[i - i % shape.n], i % shape.n))) ||
            (shape.stream && !waker && !(waker = job_waker_new()))) {
            job_waker_release(waker);
            cancel_jobs(jobs, n);
            return reply_error(s, c, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        }
    for (int i = 0; waker && i < n; i++) jobs[i]->waker = job_waker_retain(waker);
    for (int i = 0; i < n; i++)
        if (atomic_load(&s->stopping) || pool_submit(s->pool, jobs[i])) {
            job_waker_release(waker);
            cancel_jobs(jobs, n);
            return reply_error(s, c, MHD_HTTP_SERVICE_UNAVAILABLE,
                               atomic_load(&s->stopping) ? "the server is shutting down"
                                                         : "the server is busy: try again");
        }
    char id[40];
    snprintf(id, sizeof(id), "%s-%llx%06llx", chat ? "chatcmpl" : "cmpl",
             (unsigned long long)time(NULL), atomic_fetch_add(&s->next_id, 1) & 0xFFFFFF);
    const long created = (long)time(NULL);

    if (shape.stream) {
        stream_state *st = calloc(1, sizeof(*st));
        struct MHD_Response *r = NULL;
        if (st) {
            *st = (stream_state){
                .server = s, .conn = c, .n = n, .shape = shape, .waker = waker, .created = created};
            memcpy(st->jobs, jobs, sizeof(jobs));
            clock_gettime(CLOCK_MONOTONIC, &st->last);
            memcpy(st->id, id, sizeof(id));
            r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, st,
                                                  stream_free);
            if (r) {
                atomic_fetch_add(&s->in_flight, 1); /* until stream_free */
                waker = NULL;                       /* (the stream's now) */
            }
        }
        if (!r) {
            free(st);
            job_waker_release(waker);
            cancel_jobs(jobs, n);
            return reply_error(s, c, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory");
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        const enum MHD_Result rc = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        count_status(s, MHD_HTTP_OK);
        return rc;
    }

    if (wait_jobs(c, jobs, n)) {
        cancel_jobs(jobs, n);
        return MHD_NO; /* closes the connection */
    }
    const serve_job *failed = NULL; /* the first choice that failed or was cut short */
    for (int i = 0; i < n && !failed; i++)
        if (jobs[i]->error[0] || jobs[i]->cancelled) failed = jobs[i];
    enum MHD_Result rc;
    if (atomic_load(&s->stopping) && failed) /* cut short, or never run */
        rc = reply_error(s, c, MHD_HTTP_SERVICE_UNAVAILABLE, "the server is shutting down");
    else if (failed && failed->error[0])
        rc = reply_error(s, c, MHD_HTTP_INTERNAL_SERVER_ERROR, "%s", failed->error);
    else
        rc = reply_json(s, c, MHD_HTTP_OK,
                        api_response(&shape, jobs, n, id, created, s->model.name));
    cancel_jobs(jobs, n); /* (all ended: only drops them) */
    return rc;
}

/* A completion, counted in flight while it is answered: a shutdown lets the
 * answers of requests it cut short go out before it closes connections. */
static enum MHD_Result completions(serve_server *s, struct MHD_Connection *c,
                                   const request_state *rq, int chat) {
    atomic_fetch_add(&s->in_flight, 1);
    const enum MHD_Result rc = answer(s, c, rq, chat);
    atomic_fetch_sub(&s->in_flight, 1);
    return rc;
}

static enum MHD_Result tokens(serve_server *s, struct MHD_Connection *c, const request_state *rq,
                              int detokenize) {
    char err[512], *json;
    const char *body = rq->body ? rq->body : "";
    if (detokenize ? api_detokenize(body, rq->len, &s->model, &json, err, sizeof(err))
                   : api_tokenize(body, rq->len, &s->model, &json, err, sizeof(err)))
        return reply_error(s, c, MHD_HTTP_BAD_REQUEST, "%s", err);
    return reply_json(s, c, MHD_HTTP_OK, json);
}

static enum MHD_Result models(serve_server *s, struct MHD_Connection *c) {
    return reply_json(s, c, MHD_HTTP_OK, api_models(s->model.name));
}

static enum MHD_Result health(serve_server *s, struct MHD_Connection *c) {
    const int stopping = atomic_load(&s->stopping);
    return reply_json(s, c, stopping ? MHD_HTTP_SERVICE_UNAVAILABLE : MHD_HTTP_OK,
                      strdup(stopping ? "{\"status\":\"shutting down\"}" : "{\"status\":\"ok\"}"));
}

static enum MHD_Result metrics(serve_server *s, struct MHD_Connection *c) {
    pool_counters pc;
    pool_counters_get(s->pool, &pc);
    unsigned long long counts[SERVER_N_STATUSES];
    for (int i = 0; i < SERVER_N_STATUSES; i++) counts[i] = atomic_load(&s->status_counts[i]);
    return reply(s, c, MHD_HTTP_OK, server_metrics_text(&pc, counts), "text/plain; version=0.0.4");
}

/* Whether the request carries the API key (compared in constant time: the
 * time taken tells nothing of how much of a guess was right). */
static int authorized(const serve_server *s, struct MHD_Connection *c) {
    if (!s->cfg.api_key) return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7)) return 0; /* (the scheme in any case: RFC 7235) */
    h += 7;
    const size_t n = strlen(s->cfg.api_key);
    if (strlen(h) != n) return 0;
    unsigned char diff = 0;
    for (size_t i = 0; i < n; i++) diff |= (unsigned char)(h[i] ^ s->cfg.api_key[i]);
    return diff == 0;
}

static enum MHD_Result route(serve_server *s, struct MHD_Connection *c, const char *url,
                             const char *method, const request_state *rq) {
    static const struct {
        const char *path, *method;
    } routes[] = {{"/v1/completions", "POST"}, {"/v1/chat/completions", "POST"},
                  {"/v1/models", "GET"},       {"/tokenize", "POST"},
                  {"/detokenize", "POST"},     {"/health", "GET"},
                  {"/metrics", "GET"}};
    int i = 0;
    const int n = (int)(sizeof(routes) / sizeof(routes[0]));
    while (i < n && strcmp(url, routes[i].path)) i++;
    if (i == n) return reply_error(s, c, MHD_HTTP_NOT_FOUND, "no such endpoint: %.200s", url);
    if (i <= 4 && !authorized(s, c)) /* the API; /health and /metrics stay open */
        return reply_error(s, c, MHD_HTTP_UNAUTHORIZED,
                           "this server wants an API key: Authorization: Bearer KEY");
    const int get = !strcmp(routes[i].method, "GET");
    if (strcmp(method, routes[i].method) && !(get && !strcmp(method, "HEAD"))) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%s wants %s, not %.20s", routes[i].path, routes[i].method,
                 method);
        return reply_allow(s, c, MHD_HTTP_METHOD_NOT_ALLOWED, api_error(405, msg),
                           "application/json", get ? "GET, HEAD" : "POST");
    }
    switch (i) {
    case 0:
    case 1:
        return completions(s, c, rq, i == 1);
    case 2:
        return models(s, c);
    case 3:
    case 4:
        return tokens(s, c, rq, i == 4);
    case 5:
        return health(s, c);
    default:
        return metrics(s, c);
    }
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **state) {
    (void)version;
    serve_server *s = cls;
    request_state *rq = *state;
    if (!rq) { /* the headers are in; the body (if any) follows */
        if (!(rq = calloc(1, sizeof(*rq)))) return out_of_memory();
        *state = rq;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > s->cfg.max_body)
            return reply_error(s, c, MHD_HTTP_CONTENT_TOO_LARGE,
                               "the body is over the limit of %zu bytes", s->cfg.max_body);
        return MHD_YES;
    }
    if (*upload_size) {
        /* A chunked body has no length up front. MHD takes a response only
         * once the whole request is in: drop the rest, then answer 413. */
        if (rq->too_large || rq->len + *upload_size > s->cfg.max_body) {
            rq->too_large = 1;
            *upload_size = 0;
            return MHD_YES;
        }
        if (rq->len + *upload_size + 1 > rq->cap) {
            size_t cap = 2 * (rq->len + *upload_size) + 1;
            char *b = realloc(rq->body, cap);
            if (!b) return out_of_memory();
            rq->body = b;
            rq->cap = cap;
        }
        memcpy(rq->body + rq->len, upload, *upload_size);
        rq->len += *upload_size;
        *upload_size = 0;
        return MHD_YES;
    }
    if (rq->too_large)
        return reply_error(s, c, MHD_HTTP_CONTENT_TOO_LARGE,
                           "the body is over the limit of %zu bytes", s->cfg.max_body);
    /* The request is in: from now the answer's timeout (a stream may wait
     * long for its first token, with keep-alive comments at a quarter of it) */
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, (unsigned)s->cfg.idle_timeout_s);
    return route(s, c, url, method, rq);
}

/* The timeout while a connection waits for a request. */
static void wait_for_request(const serve_server *s, struct MHD_Connection *c) {
    const int t = s->cfg.request_timeout_s;
    if (t > 0 && t < s->cfg.idle_timeout_s)
        MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, (unsigned)t);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **state,
                         enum MHD_RequestTerminationCode toe) {
    (void)toe;
    request_state *rq = *state;
    if (c) wait_for_request(cls, c); /* (kept alive: the next request) */
    if (!rq) return;
    free(rq->body);
    free(rq);
    *state = NULL;
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_state,
                          enum MHD_ConnectionNotificationCode code) {
    (void)socket_state;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) wait_for_request(cls, c);
}

/* ---- the daemon ---- */

int server_start(serve_pool *pool, const api_model *model, const http_config *cfg,
                 serve_server **out, char *err, size_t errlen) {
    *out = NULL;
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE},
                    *ai = NULL;
    char port[16];
    snprintf(port, sizeof(port), "%d", cfg->port);
    const int gai = getaddrinfo(cfg->host, port, &hints, &ai);
    if (gai) return cake_err(err, errlen, "--host %s: %s", cfg->host, gai_strerror(gai));
    serve_server *s = calloc(1, sizeof(*s));
    if (!s) {
        freeaddrinfo(ai);
        return cake_err(err, errlen, "out of memory");
    }
    s->pool = pool;
    s->model = *model;
    s->cfg = *cfg;
    unsigned flags =
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    s->daemon = MHD_start_daemon(
        flags, (uint16_t)cfg->port, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, log_http,
        NULL, /* (first: it covers the other options) */
        MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)cfg->max_connections, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)cfg->idle_timeout_s, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, s, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s->daemon) {
        free(s);
        return cake_err(err, errlen, "cannot listen on %s port %d (in use, or not an address here)",
                        cfg->host, cfg->port);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    *out = s;
    return 0;
}

int server_port(const serve_server *s) {
    return s->port;
}

void server_begin_shutdown(serve_server *s) {
    if (s) atomic_store(&s->stopping, 1);
}

void server_stop(serve_server *s) {
    if (!s) return;
    atomic_store(&s->stopping, 1);
    /* Answers still going out (their jobs end once the pool has shut down)
     * get up to 10 s before their connections close. */
    for (int i = 0; i < 1000 && atomic_load(&s->in_flight) > 0; i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    MHD_stop_daemon(s->daemon);
    free(s);
}
