/* redis://HOST:PORT[/DB]: chunks as Redis strings under "cake:<32 hex>", so
 * that several servers share one cache (Redis does the serving, replication
 * and eviction: set its maxmemory and an LRU policy for a bounded cache).
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
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "store/store_impl.h"
#include "util/err.h"

#define POOL_MAX         16
#define RETRY_MS         500
#define KEY_LEN          37             /* "cake:" + 32 hex */
#define BATCH            256            /* commands per pipelined round trip */
#define DEFAULT_MAX_BULK (512ull << 20) /* Redis's default proto-max-bulk-len */

typedef struct {
    char host[256];
    int port, db;
    struct timeval conn_tv, io_tv;
    uint64_t io_ns;
    pthread_mutex_t mu;
    redisContext *idle[POOL_MAX];
    int n_idle;
    uint64_t down_until; /* monotonic ns; under mu */
    uint64_t max_bulk;   /* the server's proto-max-bulk-len, 0 = not asked yet; under mu */
    char down_reason[160];
    cake_store_atomic_counters *ctr;
} redis_store;

static void key_name(const cake_chunk_key *k, char out[KEY_LEN + 1]) {
    char hex[33];
    memcpy(out, "cake:", 5);
    memcpy(out + 5, cake_key_hex(k, hex), 33);
}

/* Marks the server down and drops the idle connections (they are most likely
 * dead too). Under r->mu. */
static void mark_down(redis_store *r, const char *why) {
    r->down_until = cake_store_now_ns() + RETRY_MS * 1000000ull;
    snprintf(r->down_reason, sizeof(r->down_reason), "%s", why);
    for (int i = 0; i < r->n_idle; i++) redisFree(r->idle[i]);
    r->n_idle = 0;
}

/* The server's proto-max-bulk-len. A server that refuses CONFIG (renamed,
 * ACLs, a managed service) is taken to have the default. 0: the connection
 * broke. */
static uint64_t ask_max_bulk(redisContext *c) {
    redisReply *rep = redisCommand(c, "CONFIG GET proto-max-bulk-len");
    if (!rep) return 0;
    uint64_t v = DEFAULT_MAX_BULK;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
        rep->element[1]->type == REDIS_REPLY_STRING) {
        char *end;
        unsigned long long x = strtoull(rep->element[1]->str, &end, 10);
        if (end != rep->element[1]->str && !*end && x > 0) v = x;
    }
    freeReplyObject(rep);
    return v;
}

static redisContext *connect_new(redis_store *r, char *err, size_t errlen) {
    pthread_mutex_lock(&r->mu);
    uint64_t now = cake_store_now_ns();
    if (now < r->down_until) {
        cake_err(err, errlen, "redis %s:%d unreachable (%s); next try in %llu ms", r->host, r->port,
                 r->down_reason, (unsigned long long)((r->down_until - now) / 1000000 + 1));
        pthread_mutex_unlock(&r->mu);
        return NULL;
    }
    pthread_mutex_unlock(&r->mu);

    char why[160] = "";
    redisContext *c = redisConnectWithTimeout(r->host, r->port, r->conn_tv);
    if (!c || c->err) {
        snprintf(why, sizeof(why), "connect: %s", c ? c->errstr : "out of memory");
    } else if (redisSetTimeout(c, r->io_tv) != REDIS_OK) {
        snprintf(why, sizeof(why), "set timeout: %s", c->errstr);
    } else if (r->db) {
        redisReply *rep = redisCommand(c, "SELECT %d", r->db);
        if (!rep || rep->type == REDIS_REPLY_ERROR)
            snprintf(why, sizeof(why), "SELECT %d: %s", r->db, rep ? rep->str : c->errstr);
        if (rep) freeReplyObject(rep);
    }
    if (!why[0]) {
        pthread_mutex_lock(&r->mu);
        const int known = r->max_bulk != 0;
        pthread_mutex_unlock(&r->mu);
        const uint64_t max_bulk = known ? 0 : ask_max_bulk(c);
        if (!known && !max_bulk) {
            snprintf(why, sizeof(why), "CONFIG GET: %s", c->errstr);
        } else {
            if (!known) {
                pthread_mutex_lock(&r->mu);
                r->max_bulk = max_bulk;
                pthread_mutex_unlock(&r->mu);
            }
            c->reader->maxbuf = 0; /* keep the read buffer: chunks are megabytes, every time */
            return c;
        }
    }
    if (c) redisFree(c);
    pthread_mutex_lock(&r->mu);
    mark_down(r, why);
    pthread_mutex_unlock(&r->mu);
    cake_err(err, errlen, "redis %s:%d: %s", r->host, r->port, why);
    return NULL;
}

/* A connection for one command; *reused says whether it came from the pool. */
static redisContext *conn_take(redis_store *r, int *reused, char *err, size_t errlen) {
    pthread_mutex_lock(&r->mu);
    redisContext *c = r->n_idle ? r->idle[--r->n_idle] : NULL;
    pthread_mutex_unlock(&r->mu);
    *reused = c != NULL;
    return c ? c : connect_new(r, err, errlen);
}

static void conn_give(redis_store *r, redisContext *c) {
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
static void conn_broken(redis_store *r, redisContext *c, const char *what, char *err,
                        size_t errlen) {
    cake_err(err, errlen, "redis %s:%d: %s: %s", r->host, r->port, what,
             c->errstr[0] ? c->errstr : "connection lost");
    redisFree(c);
}

/* Runs cmd (which appends its commands to c and reads every reply; returns 0
 * ok, 1 transport failure, -1 other failure with err) on a pooled connection,
 * retrying once on a fresh connection when a reused one turns out dead. */
typedef int (*redis_cmd_fn)(redisContext *c, void *ctx, char *err, size_t errlen);

static int run_cmd(redis_store *r, const char *what, redis_cmd_fn fn, void *ctx, char *err,
                   size_t errlen) {
    char e[256] = "";
    int rc = 1;
    for (int attempt = 0; attempt < 2; attempt++) {
        int reused;
        redisContext *c = conn_take(r, &reused, e, sizeof(e));
        if (!c) break;
        uint64_t t0 = cake_store_now_ns();
        rc = fn(c, ctx, e, sizeof(e));
        if (rc != 1) {
            conn_give(r, c);
            break;
        }
        conn_broken(r, c, what, e, sizeof(e));
        /* A dead idle connection fails at once (EOF, reset): worth one retry.
         * A slow failure is a timeout: retrying would double the wait. */
        int fast = cake_store_now_ns() - t0 < r->io_ns / 2;
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

typedef struct {
    const cake_chunk_key *key;
    void *buf;
    size_t cap, *len;
    int found;
} get_ctx;

static int cmd_get(redisContext *c, void *ctx_, char *err, size_t errlen) {
    get_ctx *g = ctx_;
    char key[KEY_LEN + 1];
    key_name(g->key, key);
    redisReply *rep = redisCommand(c, "GET %b", key, (size_t)KEY_LEN);
    if (!rep) return 1;
    int rc = 0;
    if (rep->type == REDIS_REPLY_NIL) {
        g->found = 0;
    } else if (rep->type == REDIS_REPLY_STRING) {
        if (rep->len > g->cap) {
            rc = cake_err(err, errlen, "redis: %s is %zu bytes, buffer has %zu", key, rep->len,
                          g->cap);
            g->found = -1;
        } else {
            memcpy(g->buf, rep->str, rep->len);
            *g->len = rep->len;
            g->found = 1;
        }
    } else {
        rc = cake_err(err, errlen, "redis: GET %s: %s", key,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    }
    freeReplyObject(rep);
    return rc;
}

static int redis_get(void *st, const cake_chunk_key *k, void *buf, size_t cap, size_t *len,
                     cake_payload_hash *hash, char *err, size_t errlen) {
    (void)hash; /* a reply arrives whole */
    get_ctx g = {k, buf, cap, len, 0};
    int rc = run_cmd(st, "GET", cmd_get, &g, err, errlen);
    if (g.found < 0) return -1;                /* does not fit */
    if (rc != 0) return CAKE_STORE_GET_FAILED; /* down, lost, or a server error */
    return g.found ? 0 : 1;
}

/* ---- GET, pipelined ---- */

typedef struct {
    const cake_chunk_key *keys;
    size_t n;
    void *const *bufs;
    size_t cap, *lens;
    int *rc;
} get_many_ctx;

static int cmd_get_many(redisContext *c, void *ctx_, char *err, size_t errlen) {
    get_many_ctx *g = ctx_;
    for (size_t i = 0; i < g->n; i++) g->rc[i] = CAKE_STORE_GET_FAILED;
    enum { GET_BATCH = 16 }; /* replies are megabytes: bound what is in flight */
    for (size_t i0 = 0; i0 < g->n; i0 += GET_BATCH) {
        size_t m = g->n - i0 < GET_BATCH ? g->n - i0 : GET_BATCH;
        for (size_t i = 0; i < m; i++) {
            char key[KEY_LEN + 1];
            key_name(&g->keys[i0 + i], key);
            redisAppendCommand(c, "GET %b", key, (size_t)KEY_LEN);
        }
        for (size_t i = 0; i < m; i++) {
            size_t k = i0 + i;
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
    get_many_ctx g = {keys, n, bufs, cap, lens, rc};
    for (size_t i = 0; i < n; i++) rc[i] = CAKE_STORE_GET_FAILED; /* if it never runs */
    return run_cmd(st, "GET", cmd_get_many, &g, err, errlen) ? -1 : 0;
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
    int rc = run_cmd(st, "GETRANGE", cmd_head, &h, err, errlen);
    if (rc) return -1;
    return *total ? 0 : 1; /* a missing key has length 0; no chunk is empty */
}

/* ---- SET ---- */

typedef struct {
    redis_store *r;
    const cake_chunk_key *key;
    const void *blob;
    size_t len;
} put_ctx;

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
    redisReply *rep = redisCommand(c, "SET %b %b", key, (size_t)KEY_LEN, p->blob, p->len);
    if (!rep) return 1;
    int rc = 0;
    if (rep->type != REDIS_REPLY_STATUS)
        rc = cake_err(err, errlen, "redis: SET %s: %s", key,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply type");
    freeReplyObject(rep);
    return rc;
}

static int redis_put(void *st, const cake_chunk_key *k, const void *blob, size_t len, char *err,
                     size_t errlen) {
    put_ctx p = {st, k, blob, len};
    return run_cmd(st, "SET", cmd_put, &p, err, errlen) ? -1 : 0;
}

/* ---- EXISTS, pipelined ---- */

typedef struct {
    const cake_chunk_key *keys;
    size_t n;
    uint8_t *present;
} exists_ctx;

static int cmd_exists(redisContext *c, void *ctx_, char *err, size_t errlen) {
    exists_ctx *e = ctx_;
    for (size_t i0 = 0; i0 < e->n; i0 += BATCH) {
        size_t m = e->n - i0 < BATCH ? e->n - i0 : BATCH;
        for (size_t i = 0; i < m; i++) {
            char key[KEY_LEN + 1];
            key_name(&e->keys[i0 + i], key);
            redisAppendCommand(c, "EXISTS %b", key, (size_t)KEY_LEN);
        }
        int rc = 0;
        for (size_t i = 0; i < m; i++) {
            redisReply *rep;
            if (redisGetReply(c, (void **)&rep) != REDIS_OK) return 1;
            if (rep->type == REDIS_REPLY_INTEGER)
                e->present[i0 + i] = rep->integer > 0;
            else if (!rc)
                rc = cake_err(err, errlen, "redis: EXISTS: %s",
                              rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
            freeReplyObject(rep);
        }
        if (rc) return rc;
    }
    return 0;
}

static int redis_exists(void *st, const cake_chunk_key *keys, size_t n, uint8_t *present, char *err,
                        size_t errlen) {
    exists_ctx e = {keys, n, present};
    return run_cmd(st, "EXISTS", cmd_exists, &e, err, errlen) ? -1 : 0;
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
    if (run_cmd(st, "DEL", cmd_del, &d, err, errlen)) return -1;
    return d.removed > 0 ? 0 : 1;
}

/* ---- SCAN ---- */

typedef struct {
    cake_store_iter_fn fn;
    void *ctx;
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
        if (stop) return 0;
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

static int redis_iterate(void *st, cake_store_iter_fn fn, void *ctx, char *err, size_t errlen) {
    scan_ctx s = {fn, ctx};
    return run_cmd(st, "SCAN", cmd_scan, &s, err, errlen) ? -1 : 0;
}

static int sum_sizes(const cake_store_entry *e, void *ctx) {
    uint64_t *u = ctx;
    u[0]++;
    u[1] += e->size;
    return 0;
}

static int redis_usage(void *st, cake_store_usage *u, char *err, size_t errlen) {
    uint64_t sums[2] = {0, 0};
    if (redis_iterate(st, sum_sizes, sums, err, errlen)) return -1;
    u->n_chunks = sums[0];
    u->bytes = sums[1];
    u->capacity = 0; /* Redis's own maxmemory governs */
    return 0;
}

typedef struct {
    cake_store_entry *e;
    size_t n, cap;
    uint64_t bytes;
    int oom;
} entry_list;

static int collect(const cake_store_entry *e, void *ctx) {
    entry_list *l = ctx;
    if (l->n == l->cap) {
        size_t nc = l->cap ? 2 * l->cap : 1024;
        cake_store_entry *ne = realloc(l->e, nc * sizeof(*ne));
        if (!ne) {
            l->oom = 1;
            return 1;
        }
        l->e = ne;
        l->cap = nc;
    }
    l->e[l->n++] = *e;
    l->bytes += e->size;
    return 0;
}

static int by_last_use(const void *a, const void *b) {
    const cake_store_entry *x = a, *y = b;
    if (x->last_used != y->last_used) return x->last_used < y->last_used ? -1 : 1;
    return memcmp(x->key.b, y->key.b, 16);
}

static int redis_gc(void *st, uint64_t target, uint64_t *n_evicted, uint64_t *bytes_freed,
                    char *err, size_t errlen) {
    if (target == UINT64_MAX) return 0;
    entry_list l = {0};
    if (redis_iterate(st, collect, &l, err, errlen)) {
        free(l.e);
        return -1;
    }
    if (l.oom) {
        free(l.e);
        return cake_err(err, errlen, "redis: out of memory listing chunks");
    }
    if (l.n) qsort(l.e, l.n, sizeof(*l.e), by_last_use);
    int rc = 0;
    for (size_t i = 0; i < l.n && l.bytes > target; i++) {
        int d = redis_del(st, &l.e[i].key, err, errlen);
        if (d < 0) {
            rc = -1;
            break;
        }
        if (d == 0) {
            (*n_evicted)++;
            *bytes_freed += l.e[i].size;
        }
        l.bytes -= l.e[i].size;
    }
    free(l.e);
    return rc;
}

static void redis_close(void *st) {
    redis_store *r = st;
    if (!r) return;
    for (int i = 0; i < r->n_idle; i++) redisFree(r->idle[i]);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

int cake_store_redis_open(const cake_store_params *p, cake_store_atomic_counters *ctr, void **out,
                          char *err, size_t errlen) {
    redis_store *r = calloc(1, sizeof(*r));
    if (!r) return cake_err(err, errlen, "redis store: out of memory");
    snprintf(r->host, sizeof(r->host), "%s", p->host);
    r->port = p->port;
    r->db = p->db;
    int conn_ms = p->timeout_ms < 200 ? p->timeout_ms : 200;
    r->conn_tv = (struct timeval){conn_ms / 1000, (conn_ms % 1000) * 1000};
    r->io_tv = (struct timeval){p->timeout_ms / 1000, (p->timeout_ms % 1000) * 1000};
    r->io_ns = (uint64_t)p->timeout_ms * 1000000ull;
    r->ctr = ctr;
    pthread_mutex_init(&r->mu, NULL);
    /* Connect now so the first lookup is warm; a server that is down is not
     * an error here: lookups miss until it is back. */
    char e2[256];
    redisContext *c = connect_new(r, e2, sizeof(e2));
    if (c) conn_give(r, c);
    *out = r;
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
};
