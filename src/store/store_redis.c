/* redis://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/DB] or
 * redis+unix://.../PATH: chunks as Redis strings under "cake:<32 hex>", so
 * that several servers share one cache (Redis does the serving, replication
 * and eviction: set its maxmemory and an LRU policy for a bounded cache).
 *
 * Several Redis servers: each chunk lives on one, chosen by rendezvous
 * hashing of its key (server_of), so their bandwidth and memory add up.
 * Each server has its own connections and its own down state: a dead one
 * costs only its chunks (holes, which the loader computes), and a lookup
 * over many keys asks each server for its own in one round trip.
 *
 * Connections: a small pool. A caller takes an idle connection (or opens a new
 * one), owns it for the whole command, and gives it back; so concurrent loader
 * threads each have their own socket and never wait on each other's replies.
 *
 * Failure: any transport error (refused, reset, EOF, a timeout because Redis is
 * hung) drops the connection; a command that failed on a reused idle
 * connection is retried once on a fresh one (Redis may just have restarted).
 * When a connect fails, the store is marked down for RETRY_MS: meanwhile every
 * call fails at once (a lookup is a miss) instead of paying a connect timeout
 * each; after that the next call tries again. Reads and writes time out after
 * timeout= ms (default 1000), connects after min(200, timeout) ms. So a dead
 * or hung Redis costs at most about one timeout, never a hang.
 *
 * Size: Redis drops the connection of a client that sends a value over its
 * proto-max-bulk-len (512 MB unless raised; a 13B model's chunk of 1024
 * tokens is 838 MB). The first connection asks for it, and a put of a bigger
 * chunk fails with an error that says so, without touching the connection. */
#include <errno.h>
#include <hiredis/hiredis.h>
#include <xxhash.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "store/store_impl.h"
#include "util/clock.h"
#include "util/err.h"

#define POOL_MAX         16
#define RETRY_MS         500
#define KEY_LEN          37             /* "cake:" + 32 hex */
#define BATCH            256            /* commands per pipelined round trip */
#define DEFAULT_MAX_BULK (512ull << 20) /* Redis's default proto-max-bulk-len */

/* One Redis server: its address, connections and state. */
typedef struct {
    char name[320]; /* HOST:PORT or the socket's path, for messages */
    char host[256], socket[108], user[128], password[512];
    int port, db;
    struct timeval conn_tv, io_tv;
    uint64_t io_ns;
    pthread_mutex_t mu;
    redisContext *idle[POOL_MAX];
    int n_idle;
    uint64_t down_until; /* monotonic ns; under mu */
    uint64_t max_bulk;   /* the server's proto-max-bulk-len, 0 = not asked yet; under mu */
    char down_reason[256];
    uint64_t seed; /* XXH3 of the name: server_of */
} redis_server;

/* The store: one server, or several that each hold the chunks rendezvous
 * hashing gives them. */
typedef struct {
    int n;
    redis_server *servers;
} redis_store;

/* The server of a chunk: the one whose seed gives the key the highest hash
 * (rendezvous hashing). Every process that lists the same servers, in any
 * order, puts a chunk on the same one; and a server added or removed moves
 * only the chunks it gains or held, not a share of all of them as a modulo
 * would. */
static redis_server *server_of(const redis_store *st, const cake_chunk_key *k) {
    if (st->n == 1) return &st->servers[0];
    int best = 0;
    uint64_t top = 0;
    for (int i = 0; i < st->n; i++) {
        const uint64_t h = XXH3_64bits_withSeed(k->b, sizeof(k->b), st->servers[i].seed);
        if (i == 0 || h > top) best = i, top = h;
    }
    return &st->servers[best];
}

static void key_name(const cake_chunk_key *k, char out[KEY_LEN + 1]) {
    char hex[33];
    memcpy(out, "cake:", 5);
    memcpy(out + 5, cake_key_hex(k, hex), 33);
}

/* Marks the server down and drops the idle connections (they are most likely
 * dead too). Under r->mu. */
static void mark_down(redis_server *r, const char *why) {
    r->down_until = cake_now_ns() + RETRY_MS * 1000000ull;
    snprintf(r->down_reason, sizeof(r->down_reason), "%s", why);
    for (int i = 0; i < r->n_idle; i++) redisFree(r->idle[i]);
    r->n_idle = 0;
}

/* c's transport error in words: hiredis words a timeout as EAGAIN's text. */
static const char *io_error(const redisContext *c) {
    if (!c->errstr[0]) return "connection lost";
    return c->err == REDIS_ERR_IO && !strcmp(c->errstr, strerror(EAGAIN)) ? "timed out" : c->errstr;
}

/* Whether a reply to `what` failed; why says how. Frees the reply. */
static int reply_failed(redisContext *c, redisReply *rep, const char *what, char *why, size_t n) {
    if (!rep) {
        snprintf(why, n, "%s: %s", what, io_error(c));
        return 1;
    }
    const int failed = rep->type == REDIS_REPLY_ERROR;
    if (failed && !strncmp(rep->str, "NOAUTH", 6))
        snprintf(why, n,
                 "%s: %s (give the password: redis://[USER]:PASSWORD@HOST or "
                 "CAKE_REDIS_PASSWORD)",
                 what, rep->str);
    else if (failed)
        snprintf(why, n, "%s: %s", what, rep->str);
    freeReplyObject(rep);
    return failed;
}

/* The server's proto-max-bulk-len, into *v. A server that refuses CONFIG
 * (renamed, ACLs, a managed service) is taken to have the default; but one
 * that wants a password is a failure, as is a broken connection. */
static int ask_max_bulk(redisContext *c, uint64_t *v, char *why, size_t n) {
    redisReply *rep = redisCommand(c, "CONFIG GET proto-max-bulk-len");
    *v = DEFAULT_MAX_BULK;
    if (!rep || (rep->type == REDIS_REPLY_ERROR && !strncmp(rep->str, "NOAUTH", 6)))
        return reply_failed(c, rep, "CONFIG GET", why, n);
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
        rep->element[1]->type == REDIS_REPLY_STRING) {
        char *end;
        unsigned long long x = strtoull(rep->element[1]->str, &end, 10);
        if (end != rep->element[1]->str && !*end && x > 0) *v = x;
    }
    freeReplyObject(rep);
    return 0;
}

/* A new connection's set-up: timeouts, AUTH, SELECT, and on the server's
 * first connection its size limit. 0 ok; else why says what failed. */
static int conn_setup(redis_server *r, redisContext *c, char *why, size_t n) {
    if (redisSetTimeout(c, r->io_tv) != REDIS_OK) {
        snprintf(why, n, "set timeout: %s", c->errstr);
        return -1;
    }
    if (r->password[0] &&
        reply_failed(c,
                     r->user[0] ? redisCommand(c, "AUTH %s %s", r->user, r->password)
                                : redisCommand(c, "AUTH %s", r->password),
                     "AUTH", why, n))
        return -1;
    if (r->db) {
        char what[32];
        snprintf(what, sizeof(what), "SELECT %d", r->db);
        if (reply_failed(c, redisCommand(c, "SELECT %d", r->db), what, why, n)) return -1;
    }
    pthread_mutex_lock(&r->mu);
    const int known = r->max_bulk != 0;
    pthread_mutex_unlock(&r->mu);
    uint64_t max_bulk;
    if (known) return 0;
    if (ask_max_bulk(c, &max_bulk, why, n)) return -1;
    pthread_mutex_lock(&r->mu);
    r->max_bulk = max_bulk;
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static redisContext *connect_new(redis_server *r, char *err, size_t errlen) {
    pthread_mutex_lock(&r->mu);
    uint64_t now = cake_now_ns();
    if (now < r->down_until) {
        cake_err(err, errlen, "redis %s unreachable (%s); next try in %llu ms", r->name,
                 r->down_reason, (unsigned long long)((r->down_until - now) / 1000000 + 1));
        pthread_mutex_unlock(&r->mu);
        return NULL;
    }
    pthread_mutex_unlock(&r->mu);

    char why[256] = "";
    redisContext *c = r->socket[0] ? redisConnectUnixWithTimeout(r->socket, r->conn_tv)
                                   : redisConnectWithTimeout(r->host, r->port, r->conn_tv);
    if (!c || c->err)
        snprintf(why, sizeof(why), "connect: %s", c ? c->errstr : "out of memory");
    else if (!conn_setup(r, c, why, sizeof(why)))
        return c;
    if (c) redisFree(c);
    pthread_mutex_lock(&r->mu);
    mark_down(r, why);
    pthread_mutex_unlock(&r->mu);
    cake_err(err, errlen, "redis %s: %s", r->name, why);
    return NULL;
}

/* A connection for one command; *reused says whether it came from the pool. */
static redisContext *conn_take(redis_server *r, int *reused, char *err, size_t errlen) {
    pthread_mutex_lock(&r->mu);
    redisContext *c = r->n_idle ? r->idle[--r->n_idle] : NULL;
    pthread_mutex_unlock(&r->mu);
    *reused = c != NULL;
    return c ? c : connect_new(r, err, errlen);
}

static void conn_give(redis_server *r, redisContext *c) {
    pthread_mutex_lock(&r->mu);
    if (c->err || r->n_idle == POOL_MAX) {
        pthread_mutex_unlock(&r->mu);
        redisFree(c);
        return;
    }
    r->idle[r->n_idle++] = c;
    pthread_mutex_unlock(&r->mu);
}

/* After a transport error on c: drop it; say so. */
static void conn_broken(redis_server *r, redisContext *c, const char *what, char *err,
                        size_t errlen) {
    cake_err(err, errlen, "redis %s: %s: %s", r->name, what, io_error(c));
    redisFree(c);
}

/* Runs cmd (which appends its commands to c and reads every reply; returns 0
 * ok, 1 transport failure, -1 other failure with err) on a pooled connection,
 * retrying once on a fresh connection when a reused one turns out dead. */
typedef int (*redis_cmd_fn)(redisContext *c, void *ctx, char *err, size_t errlen);

static int run_cmd(redis_server *r, const char *what, redis_cmd_fn fn, void *ctx, char *err,
                   size_t errlen) {
    char e[256] = "";
    int rc = 1;
    for (int attempt = 0; attempt < 2; attempt++) {
        int reused;
        redisContext *c = conn_take(r, &reused, e, sizeof(e));
        if (!c) break;
        uint64_t t0 = cake_now_ns();
        rc = fn(c, ctx, e, sizeof(e));
        if (rc != 1) {
            conn_give(r, c);
            break;
        }
        conn_broken(r, c, what, e, sizeof(e));
        /* A dead idle connection fails at once (EOF, reset): worth one retry.
         * A slow failure is a timeout: retrying would double the wait. */
        int fast = cake_now_ns() - t0 < r->io_ns / 2;
        pthread_mutex_lock(&r->mu);
        if (reused && fast) { /* the others idle since then are likely dead too: start afresh */
            for (int i = 0; i < r->n_idle; i++) redisFree(r->idle[i]);
            r->n_idle = 0;
        } else {
            mark_down(r, e);
            attempt = 2;
        }
        pthread_mutex_unlock(&r->mu);
    }
    if (rc) cake_err(err, errlen, "%s", e);
    return rc;
}

/* ---- GET ---- */

/* A chunk goes from the socket straight into the caller's buffer. hiredis
 * would gather the whole value in its read buffer, copy it into a reply
 * object, and we from there into the buffer: two more copies of up to
 * hundreds of MB, and two allocations of that size, per get. Only a value
 * is read here; any other reply (nil, an error) goes to hiredis's reader with
 * the bytes read so far. A value too big for the buffer is left unread, and
 * its connection dropped.
 * The payload hash is fed as the value arrives, while its bytes are in cache. */

typedef struct {
    const cake_chunk_key *key;
    void *buf;
    size_t cap, *len;
    cake_payload_hash *hash; /* may be NULL */
    int found;
} get_ctx;

/* A transport failure on c, as hiredis reports one (conn_give then drops c). */
static int sock_failed(redisContext *c, int type, const char *why) {
    c->err = type;
    snprintf(c->errstr, sizeof(c->errstr), "%s", why);
    return 1;
}

/* One read from c's socket, whose receive timeout is the store's. The bytes
 * read; 0 with c->err set on EOF, an error or the timeout. */
static size_t sock_read(redisContext *c, void *p, size_t n) {
    for (;;) {
        const ssize_t k = read(c->fd, p, n);
        if (k > 0) return (size_t)k;
        if (k < 0 && errno == EINTR) continue;
        sock_failed(c, k == 0 ? REDIS_ERR_EOF : REDIS_ERR_IO,
                    k == 0                                    ? "server closed the connection"
                    : errno == EAGAIN || errno == EWOULDBLOCK ? "read timed out"
                                                              : strerror(errno));
        return 0;
    }
}

/* The GET reply through hiredis's reader (nil, an error, a value too big). */
static int get_reply(redisContext *c, get_ctx *g, const char *key, char *err, size_t errlen) {
    redisReply *rep;
    if (redisGetReply(c, (void **)&rep) != REDIS_OK) return 1;
    int rc = 0;
    if (rep->type == REDIS_REPLY_NIL) {
        g->found = 0;
    } else if (rep->type == REDIS_REPLY_STRING && rep->len > g->cap) {
        rc = cake_err(err, errlen, "redis: %s is %zu bytes, buffer has %zu", key, rep->len, g->cap);
        g->found = -1;
    } else if (rep->type == REDIS_REPLY_STRING) { /* fits: only when read whole before */
        memcpy(g->buf, rep->str, rep->len);
        *g->len = rep->len;
        g->found = 1;
    } else {
        rc = cake_err(err, errlen, "redis: GET %s: %s", key,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    }
    freeReplyObject(rep);
    return rc;
}

/* Whether head[0..n) starts with the line "$<len>\r\n" of a bulk string;
 * *len and *body (the offset after the line) when it does. */
static int bulk_line(const char *head, size_t n, size_t *len, size_t *body) {
    if (n < 4 || head[0] != '$') return 0;
    size_t v = 0, i = 1;
    for (; i < n && head[i] >= '0' && head[i] <= '9' && i < 20; i++)
        v = v * 10 + (size_t)(head[i] - '0');
    if (i == 1 || i + 1 >= n || head[i] != '\r' || head[i + 1] != '\n') return 0;
    *len = v;
    *body = i + 2;
    return 1;
}

static int cmd_get(redisContext *c, void *ctx_, char *err, size_t errlen) {
    get_ctx *g = ctx_;
    char key[KEY_LEN + 1];
    key_name(g->key, key);
    if (redisAppendCommand(c, "GET %b", key, (size_t)KEY_LEN) != REDIS_OK) return 1;
    if (c->reader->pos < c->reader->len) /* hiredis holds unread bytes: let it read */
        return get_reply(c, g, key, err, errlen);
    for (int done = 0; !done;)
        if (redisBufferWrite(c, &done) != REDIS_OK) return 1;

    /* The reply's first line, and the start of the value that came with it. */
    char head[4096];
    size_t got = 0, n = 0, body = 0;
    while (got < sizeof(head) && !memchr(head, '\n', got)) {
        const size_t k = sock_read(c, head + got, sizeof(head) - got);
        if (!k) return 1;
        got += k;
    }
    if (!bulk_line(head, got, &n, &body)) { /* nil, an error: hiredis reads it */
        if (redisReaderFeed(c->reader, head, got) != REDIS_OK) return 1;
        return get_reply(c, g, key, err, errlen);
    }
    if (n > g->cap) { /* not a chunk of ours: leave it unread, drop the connection */
        g->found = -1;
        sock_failed(c, REDIS_ERR_OTHER, "value too big; left unread");
        return cake_err(err, errlen, "redis: %s is %zu bytes, buffer has %zu", key, n, g->cap);
    }
    /* The value, then its "\r\n": `at` bytes of the two are in. */
    char *const dst = g->buf;
    char crlf[2];
    size_t at = got - body;
    if (at > n + 2) return sock_failed(c, REDIS_ERR_PROTOCOL, "reply longer than its value");
    const size_t in_value = at < n ? at : n;
    memcpy(dst, head + body, in_value);
    memcpy(crlf, head + body + in_value, at - in_value);
    if (g->hash) cake_payload_hash_init(g->hash); /* this try's bytes only */
    while (at < n) {
        if (g->hash) cake_payload_hash_feed(g->hash, dst, g->hash->fed, at);
        const size_t k = sock_read(c, dst + at, n - at);
        if (!k) return 1;
        at += k;
    }
    if (g->hash) cake_payload_hash_feed(g->hash, dst, g->hash->fed, n);
    while (at < n + 2) {
        const size_t k = sock_read(c, crlf + (at - n), n + 2 - at);
        if (!k) return 1;
        at += k;
    }
    if (crlf[0] != '\r' || crlf[1] != '\n')
        return sock_failed(c, REDIS_ERR_PROTOCOL, "value not followed by CRLF");
    *g->len = n;
    g->found = 1;
    return 0;
}

static int redis_get(void *st, const cake_chunk_key *k, void *buf, size_t cap, size_t *len,
                     cake_payload_hash *hash, char *err, size_t errlen) {
    get_ctx g = {k, buf, cap, len, hash, 0};
    int rc = run_cmd(server_of(st, k), "GET", cmd_get, &g, err, errlen);
    if (g.found < 0) return -1;                /* does not fit */
    if (rc != 0) return CAKE_STORE_GET_FAILED; /* down, lost, or a server error */
    return g.found ? 0 : 1;
}

/* ---- commands over many keys ---- */

/* The first member of a many-key command's context: the positions (in the
 * caller's arrays) of the keys one server holds. */
typedef struct {
    const size_t *at;
    size_t n;
} server_keys;

/* The positions in keys[0..n) of server s's keys, into at; how many. */
static size_t keys_of(const redis_store *st, int s, const cake_chunk_key *keys, size_t n,
                      size_t *at) {
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (server_of(st, &keys[i]) == &st->servers[s]) at[m++] = i;
    return m;
}

/* Runs fn on each server that holds some of keys[0..n), with ctx's
 * server_keys set to them: one round trip per server. A server that fails
 * leaves its keys' results as the caller set them (misses, absent); -1 then,
 * the others' results kept. */
static int for_each_server(redis_store *st, const char *what, const cake_chunk_key *keys, size_t n,
                           redis_cmd_fn fn, server_keys *ctx, char *err, size_t errlen) {
    size_t *at = malloc((n ? n : 1) * sizeof(*at));
    if (!at) return cake_err(err, errlen, "redis: out of memory");
    int failed = 0;
    for (int s = 0; s < st->n; s++) {
        *ctx = (server_keys){at, keys_of(st, s, keys, n, at)};
        if (ctx->n && run_cmd(&st->servers[s], what, fn, ctx, err, errlen)) failed = -1;
    }
    free(at);
    return failed;
}

/* ---- GET, pipelined ---- */

typedef struct {
    server_keys sk; /* first */
    const cake_chunk_key *keys;
    void *const *bufs;
    size_t cap, *lens;
    int *rc;
} get_many_ctx;

static int cmd_get_many(redisContext *c, void *ctx_, char *err, size_t errlen) {
    get_many_ctx *g = ctx_;
    const size_t *at = g->sk.at, n = g->sk.n;
    for (size_t i = 0; i < n; i++) g->rc[at[i]] = CAKE_STORE_GET_FAILED; /* (a retry) */
    enum { GET_BATCH = 16 }; /* replies are megabytes: bound what is in flight */
    for (size_t i0 = 0; i0 < n; i0 += GET_BATCH) {
        size_t m = n - i0 < GET_BATCH ? n - i0 : GET_BATCH;
        for (size_t i = 0; i < m; i++) {
            char key[KEY_LEN + 1];
            key_name(&g->keys[at[i0 + i]], key);
            redisAppendCommand(c, "GET %b", key, (size_t)KEY_LEN);
        }
        for (size_t i = 0; i < m; i++) {
            const size_t k = at[i0 + i];
            redisReply *rep;
            if (redisGetReply(c, (void **)&rep) != REDIS_OK) return 1;
            if (rep->type == REDIS_REPLY_NIL) {
                g->rc[k] = 1;
            } else if (rep->type == REDIS_REPLY_STRING && rep->len > g->cap) {
                g->rc[k] = cake_err(err, errlen, "redis: chunk %zu is %zu bytes, buffer has %zu", k,
                                    rep->len, g->cap);
            } else if (rep->type == REDIS_REPLY_STRING) {
                memcpy(g->bufs[k], rep->str, rep->len);
                g->lens[k] = rep->len;
                g->rc[k] = 0;
            } else {
                cake_err(err, errlen, "redis: GET: %s",
                         rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
            }
            freeReplyObject(rep);
        }
    }
    return 0;
}

static int redis_get_many(void *st, const cake_chunk_key *keys, size_t n, void *const *bufs,
                          size_t cap, size_t *lens, int *rc, char *err, size_t errlen) {
    for (size_t i = 0; i < n; i++) rc[i] = CAKE_STORE_GET_FAILED; /* if it never runs */
    get_many_ctx g = {{NULL, 0}, keys, bufs, cap, lens, rc};
    return for_each_server(st, "GET", keys, n, cmd_get_many, &g.sk, err, errlen);
}

/* ---- GETRANGE + STRLEN (headers for listings) ---- */

typedef struct {
    const cake_chunk_key *key;
    void *buf;
    size_t n, *len;
    uint64_t *total;
} head_ctx;

static int cmd_head(redisContext *c, void *ctx_, char *err, size_t errlen) {
    head_ctx *h = ctx_;
    char key[KEY_LEN + 1];
    key_name(h->key, key);
    if (!h->n) h->n = 1;
    redisAppendCommand(c, "STRLEN %b", key, (size_t)KEY_LEN);
    redisAppendCommand(c, "GETRANGE %b 0 %llu", key, (size_t)KEY_LEN,
                       (unsigned long long)(h->n - 1));
    redisReply *a = NULL, *b = NULL;
    if (redisGetReply(c, (void **)&a) != REDIS_OK) return 1;
    if (redisGetReply(c, (void **)&b) != REDIS_OK) {
        freeReplyObject(a);
        return 1;
    }
    int rc = 0;
    if (a->type != REDIS_REPLY_INTEGER || b->type != REDIS_REPLY_STRING) {
        rc = cake_err(err, errlen, "redis: STRLEN/GETRANGE %s: %s", key,
                      a->type == REDIS_REPLY_ERROR   ? a->str
                      : b->type == REDIS_REPLY_ERROR ? b->str
                                                     : "unexpected reply type");
    } else {
        *h->total = (uint64_t)a->integer;
        *h->len = b->len < h->n ? b->len : h->n;
        memcpy(h->buf, b->str, *h->len);
    }
    freeReplyObject(a);
    freeReplyObject(b);
    return rc;
}

static int redis_head(void *st, const cake_chunk_key *k, void *buf, size_t n, size_t *len,
                      uint64_t *total, char *err, size_t errlen) {
    head_ctx h = {k, buf, n, len, total};
    int rc = run_cmd(server_of(st, k), "GETRANGE", cmd_head, &h, err, errlen);
    if (rc) return -1;
    return *total ? 0 : 1; /* a missing key has length 0; no chunk is empty */
}

/* ---- SET ---- */

typedef struct {
    redis_server *r;
    const cake_chunk_key *key;
    const void *blob;
    size_t len;
} put_ctx;

/* Sends all of iov on c's socket, whose send timeout is the store's; 0, or 1
 * with c->err set. MSG_NOSIGNAL: a closed peer is an error, not a SIGPIPE. */
static int sock_write_all(redisContext *c, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        const ssize_t k = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0)
            return sock_failed(c, REDIS_ERR_IO,
                               errno == EAGAIN || errno == EWOULDBLOCK ? "write timed out"
                                                                       : strerror(errno));
        size_t left = (size_t)k;
        for (; n > 0 && left >= iov->iov_len; iov++, n--) left -= iov->iov_len;
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int cmd_put(redisContext *c, void *ctx_, char *err, size_t errlen) {
    put_ctx *p = ctx_;
    char key[KEY_LEN + 1];
    key_name(p->key, key);
    pthread_mutex_lock(&p->r->mu);
    const uint64_t max_bulk = p->r->max_bulk; /* known: c is connected */
    pthread_mutex_unlock(&p->r->mu);
    if (p->len > max_bulk)
        return cake_err(err, errlen,
                        "redis: SET %s: the chunk is %.1f MiB, over the server's "
                        "proto-max-bulk-len of %.1f MiB; raise it (CONFIG SET "
                        "proto-max-bulk-len 2gb) or use smaller chunks",
                        key, p->len / 1048576.0, max_bulk / 1048576.0);
    /* The command goes out from the caller's blob: hiredis would first copy
     * it into its output buffer. */
    if (c->reader->pos < c->reader->len) /* hiredis holds unread bytes: desynced */
        return sock_failed(c, REDIS_ERR_PROTOCOL, "unread reply bytes");
    char head[96];
    const int n = snprintf(head, sizeof(head), "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%zu\r\n", KEY_LEN,
                           key, p->len);
    struct iovec iov[3] = {{head, (size_t)n}, {(void *)p->blob, p->len}, {"\r\n", 2}};
    if (sock_write_all(c, iov, 3)) return 1;
    redisReply *rep;
    if (redisGetReply(c, (void **)&rep) != REDIS_OK) return 1;
    int rc = 0;
    if (rep->type != REDIS_REPLY_STATUS)
        rc = cake_err(err, errlen, "redis: SET %s: %s", key,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    freeReplyObject(rep);
    return rc;
}

static int redis_put(void *st, const cake_chunk_key *k, const void *blob, size_t len, char *err,
                     size_t errlen) {
    put_ctx p = {server_of(st, k), k, blob, len};
    return run_cmd(p.r, "SET", cmd_put, &p, err, errlen) ? -1 : 0;
}

/* ---- EXISTS, pipelined ---- */

typedef struct {
    server_keys sk; /* first */
    const cake_chunk_key *keys;
    uint8_t *present;
} exists_ctx;

static int cmd_exists(redisContext *c, void *ctx_, char *err, size_t errlen) {
    exists_ctx *e = ctx_;
    const size_t *at = e->sk.at, n = e->sk.n;
    for (size_t i0 = 0; i0 < n; i0 += BATCH) {
        size_t m = n - i0 < BATCH ? n - i0 : BATCH;
        for (size_t i = 0; i < m; i++) {
            char key[KEY_LEN + 1];
            key_name(&e->keys[at[i0 + i]], key);
            redisAppendCommand(c, "EXISTS %b", key, (size_t)KEY_LEN);
        }
        int rc = 0;
        for (size_t i = 0; i < m; i++) {
            redisReply *rep;
            if (redisGetReply(c, (void **)&rep) != REDIS_OK) return 1;
            if (rep->type == REDIS_REPLY_INTEGER)
                e->present[at[i0 + i]] = rep->integer > 0;
            else if (!rc)
                rc = cake_err(err, errlen, "redis: EXISTS: %s",
                              rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
            freeReplyObject(rep);
        }
        if (rc) return rc;
    }
    return 0;
}

/* A failing server's keys stay absent (holes, for the loader). */
static int redis_exists(void *st, const cake_chunk_key *keys, size_t n, uint8_t *present, char *err,
                        size_t errlen) {
    exists_ctx e = {{NULL, 0}, keys, present};
    return for_each_server(st, "EXISTS", keys, n, cmd_exists, &e.sk, err, errlen);
}

/* ---- DEL ---- */

typedef struct {
    const cake_chunk_key *key;
    long long removed;
} del_ctx;

static int cmd_del(redisContext *c, void *ctx_, char *err, size_t errlen) {
    del_ctx *d = ctx_;
    char key[KEY_LEN + 1];
    key_name(d->key, key);
    redisReply *rep = redisCommand(c, "DEL %b", key, (size_t)KEY_LEN);
    if (!rep) return 1;
    int rc = 0;
    if (rep->type == REDIS_REPLY_INTEGER)
        d->removed = rep->integer;
    else
        rc = cake_err(err, errlen, "redis: DEL %s: %s", key,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    freeReplyObject(rep);
    return rc;
}

static int redis_del(void *st, const cake_chunk_key *k, char *err, size_t errlen) {
    del_ctx d = {k, 0};
    if (run_cmd(server_of(st, k), "DEL", cmd_del, &d, err, errlen)) return -1;
    return d.removed > 0 ? 0 : 1;
}

/* ---- SCAN ---- */

typedef struct {
    cake_store_iter_fn fn;
    void *ctx;
    int stopped; /* fn asked to stop */
} scan_ctx;

/* One SCAN page plus STRLEN and OBJECT IDLETIME of its keys, pipelined. */
static int cmd_scan(redisContext *c, void *ctx_, char *err, size_t errlen) {
    scan_ctx *s = ctx_;
    char cursor[32] = "0";
    int64_t now = (int64_t)time(NULL);
    do {
        redisReply *rep = redisCommand(c, "SCAN %s MATCH cake:* COUNT 512", cursor);
        if (!rep) return 1;
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
            rep->element[0]->type != REDIS_REPLY_STRING ||
            rep->element[1]->type != REDIS_REPLY_ARRAY) {
            int rc = cake_err(err, errlen, "redis: SCAN: %s",
                              rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
            freeReplyObject(rep);
            return rc;
        }
        snprintf(cursor, sizeof(cursor), "%s", rep->element[0]->str);
        redisReply *keys = rep->element[1];
        size_t m = keys->elements;
        for (size_t i = 0; i < m; i++) {
            redisReply *k = keys->element[i];
            /* IDLETIME first: STRLEN is a read, which resets the idle time. */
            redisAppendCommand(c, "OBJECT IDLETIME %b", k->str, k->len);
            redisAppendCommand(c, "STRLEN %b", k->str, k->len);
        }
        int stop = 0;
        for (size_t i = 0; i < m; i++) {
            redisReply *a = NULL, *b = NULL; /* STRLEN, IDLETIME */
            if (redisGetReply(c, (void **)&b) != REDIS_OK ||
                redisGetReply(c, (void **)&a) != REDIS_OK) {
                if (b) freeReplyObject(b);
                if (a) freeReplyObject(a);
                freeReplyObject(rep);
                return 1;
            }
            redisReply *k = keys->element[i];
            cake_store_entry e;
            if (!stop && k->len == KEY_LEN && !cake_key_parse(k->str + 5, &e.key) &&
                a->type == REDIS_REPLY_INTEGER && a->integer > 0) {
                e.size = (uint64_t)a->integer;
                /* OBJECT IDLETIME fails under an LFU policy: then unknown. */
                e.last_used = b->type == REDIS_REPLY_INTEGER ? now - b->integer : 0;
                stop = s->fn(&e, s->ctx);
            }
            freeReplyObject(a);
            freeReplyObject(b);
        }
        freeReplyObject(rep);
        if (stop) {
            s->stopped = 1;
            return 0;
        }
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

static int redis_iterate(void *st_, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen) {
    redis_store *st = st_;
    scan_ctx s = {fn, ctx, 0};
    for (int i = 0; i < st->n && !s.stopped; i++)
        if (run_cmd(&st->servers[i], "SCAN", cmd_scan, &s, err, errlen)) return -1;
    return 0;
}

static int redis_usage(void *st, cake_store_usage *u, char *err, size_t errlen) {
    u->capacity = 0; /* Redis's own maxmemory governs */
    return cake_store_backend_count(&cake_store_redis_ops, st, u, err, errlen);
}

static int redis_gc(void *st, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed,
                    char *err, size_t errlen) {
    if (target == UINT64_MAX) return 0;
    cake_store_entry *e;
    size_t n;
    uint64_t bytes;
    if (cake_store_backend_by_age(&cake_store_redis_ops, st, &e, &n, &bytes, err, errlen))
        return -1;
    int rc = 0;
    for (size_t i = 0; i < n && bytes > target; i++) {
        int d = redis_del(st, &e[i].key, err, errlen);
        if (d < 0) {
            rc = -1;
            break;
        }
        if (d == 0) {
            (*n_evicted)++;
            *bytes_freed += e[i].size;
        }
        bytes -= e[i].size;
    }
    free(e);
    return rc;
}

/* Any reply will do: an ACL user may not be allowed PING (NOPERM), and a
 * password refused fails earlier, on the connection. */
static int cmd_ping(redisContext *c, void *ctx, char *err, size_t errlen) {
    (void)ctx;
    (void)err;
    (void)errlen;
    redisReply *rep = redisCommand(c, "PING");
    if (!rep) return 1;
    freeReplyObject(rep);
    return 0;
}

/* Whether every server answers a PING (one round trip each; at once while
 * a server is marked down); the first that does not says why. */
static int redis_check(void *st_, char *err, size_t errlen) {
    redis_store *st = st_;
    for (int i = 0; i < st->n; i++)
        if (run_cmd(&st->servers[i], "PING", cmd_ping, NULL, err, errlen)) return -1;
    return 0;
}

static void redis_close(void *st_) {
    redis_store *st = st_;
    if (!st) return;
    for (int s = 0; s < st->n; s++) {
        redis_server *r = &st->servers[s];
        for (int i = 0; i < r->n_idle; i++) redisFree(r->idle[i]);
        pthread_mutex_destroy(&r->mu);
        explicit_bzero(r->password, sizeof(r->password));
    }
    free(st->servers);
    free(st);
}

int cake_store_redis_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                          char *err, size_t errlen) {
    (void)ctr;
    redis_store *st = calloc(1, sizeof(*st));
    const int n = p->socket[0] ? 1 : p->n_servers;
    if (!st || !(st->servers = calloc((size_t)n, sizeof(*st->servers)))) {
        free(st);
        return cake_err(err, errlen, "redis store: out of memory");
    }
    st->n = n;
    const int conn_ms = p->timeout_ms < 200 ? p->timeout_ms : 200;
    for (int i = 0; i < st->n; i++) {
        redis_server *r = &st->servers[i];
        if (p->socket[0]) {
            snprintf(r->socket, sizeof(r->socket), "%s", p->socket);
            snprintf(r->name, sizeof(r->name), "%s", r->socket);
        } else {
            snprintf(r->host, sizeof(r->host), "%s", p->host[i]);
            r->port = p->port[i];
            snprintf(r->name, sizeof(r->name), strchr(r->host, ':') ? "[%s]:%d" : "%s:%d", r->host,
                     r->port); /* IPv6 in brackets */
        }
        r->seed = XXH3_64bits(r->name, strlen(r->name));
        snprintf(r->user, sizeof(r->user), "%s", p->user);
        snprintf(r->password, sizeof(r->password), "%s", p->password);
        r->db = p->db;
        r->conn_tv = (struct timeval){conn_ms / 1000, (conn_ms % 1000) * 1000};
        r->io_tv = (struct timeval){p->timeout_ms / 1000, (p->timeout_ms % 1000) * 1000};
        r->io_ns = (uint64_t)p->timeout_ms * 1000000ull;
        pthread_mutex_init(&r->mu, NULL);
        /* Connect now so the first lookup is warm; a server that is down is
         * not an error here: its lookups miss until it is back. */
        char e2[256];
        redisContext *c = connect_new(r, e2, sizeof(e2));
        if (c) conn_give(r, c);
    }
    *out = st;
    return 0;
}

const cake_store_ops cake_store_redis_ops = {
    .kind = "redis",
    .get = redis_get,
    .get_many = redis_get_many,
    .head = redis_head,
    .put = redis_put,
    .exists = redis_exists,
    .del = redis_del,
    .iterate = redis_iterate,
    .usage = redis_usage,
    .gc = redis_gc,
    .close = redis_close,
    .check = redis_check,
};
