/* The Redis store against a real redis-server that this test starts on a free
 * loopback port (and kills at the end): round trips, pipelined EXISTS, SCAN
 * listings, databases, concurrent threads, and the failures: Redis killed
 * between exists and get, Redis down from the start, Redis hung (SIGSTOP),
 * Redis restarted (the store reconnects), a chunk over the server's size
 * limit, a big chunk read straight into the buffer, whole or corrupt,
 * passwords and the unix socket, chunks spread over two servers. A failure is a miss within
 * the timeout, never a hang, a crash or wrong data. Skipped (with a message) when redis-server is
 * not installed. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <poll.h>
#include <stdatomic.h>
#include <pthread.h>

#include "test_store_common.h"

static t_redis g_redis; /* killed by the group teardown and at exit */
/* The servers of tests that start their own: killed at exit too (a failing
 * test jumps out before it stops them). */
static t_redis g_auth_redis, g_two_redis[2];

static void kill_redis_at_exit(void) {
    t_redis_stop(&g_redis);
    t_redis_stop(&g_auth_redis);
    t_redis_stop(&g_two_redis[0]);
    t_redis_stop(&g_two_redis[1]);
}

static int group_setup(void **state) {
    (void)state;
    if (!t_redis_available()) return 0;
    atexit(kill_redis_at_exit);
    if (t_redis_start(&g_redis, 0)) {
        fprintf(stderr, "cannot start redis-server\n");
        return -1;
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    t_redis_stop(&g_redis);
    return 0;
}

typedef struct {
    cake_store *s;
    cake_kv_cache kv;
    cake_chunk_header h[8];
    void *blob[8];
    size_t len, cap;
    void *buf;
} fx;

static int setup(void **state) {
    if (!t_redis_available()) return 0;
    if (!g_redis.pid && t_redis_start(&g_redis, 0)) return -1; /* a test killed it */
    fx *f = calloc(1, sizeof(*f));
    char err[512], uri[256];
    snprintf(uri, sizeof(uri), "%s?timeout=500", g_redis.uri);
    if (cake_store_open(uri, &f->s, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    if (t_kv_init(&f->kv, CAKE_KV_F16)) return -1;
    t_fill_kv(&f->kv, 21);
    for (int i = 0; i < 8; i++) {
        f->h[i] = t_header((uint32_t)i, 3, CAKE_KV_F16);
        f->blob[i] = t_blob(&f->h[i], &f->kv, i * T_CHUNK, &f->len);
    }
    f->cap = cake_store_buffer_size(f->len);
    f->buf = cake_store_alloc_buffer(f->cap);
    /* start empty */
    for (int i = 0; i < 8; i++) cake_store_del(f->s, &f->h[i].key, err, sizeof(err));
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    if (!f) return 0;
    cake_store_close(f->s);
    for (int i = 0; i < 8; i++) cake_store_free_buffer(f->blob[i]);
    cake_store_free_buffer(f->buf);
    cake_kv_cache_free(&f->kv);
    free(f);
    return 0;
}

#define NEED_REDIS()                                                                               \
    do {                                                                                           \
        if (!t_redis_available()) {                                                                \
            print_message("skip: redis-server not installed\n");                                   \
            skip();                                                                                \
        }                                                                                          \
    } while (0)

static void put_ok(fx *f, int i) {
    char err[512];
    if (cake_store_put(f->s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err)))
        fail_msg("put %d: %s", i, err);
}

static int get(fx *f, int i, char *err, size_t errlen) {
    size_t len = 0;
    int rc = cake_store_get_verified(f->s, &f->h[i], f->buf, f->cap, &len, err, errlen);
    if (rc == 0) {
        assert_int_equal(len, f->len);
        assert_memory_equal(f->buf, f->blob[i], f->len);
    }
    return rc;
}

/* get(), from another store than the fixture's. */
static int get_from(cake_store *s, fx *f, int i, char *err, size_t errlen) {
    size_t len = 0;
    int rc = cake_store_get_verified(s, &f->h[i], f->buf, f->cap, &len, err, errlen);
    if (rc == 0) {
        assert_int_equal(len, f->len);
        assert_memory_equal(f->buf, f->blob[i], f->len);
    }
    return rc;
}

static void test_redis_roundtrip(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char err[512];
    assert_string_equal(cake_store_kind(f->s), "redis");
    assert_int_equal(get(f, 0, err, sizeof(err)), 1);
    assert_string_equal(err, "");
    for (int i = 0; i < 5; i++) put_ok(f, i);
    for (int i = 0; i < 5; i++) assert_int_equal(get(f, i, err, sizeof(err)), 0);

    /* pipelined EXISTS over many keys, more than one batch */
    enum { N = 700 };
    cake_chunk_key *keys = malloc(N * sizeof(*keys));
    uint8_t *present = malloc(N);
    for (int i = 0; i < N; i++)
        memset(&keys[i], i & 0xff, sizeof(keys[i])), keys[i].b[0] = 0xee,
                                                     keys[i].b[1] = (uint8_t)(i >> 8);
    for (int i = 0; i < 5; i++) keys[i * 100 + 7] = f->h[i].key;
    assert_int_equal(cake_store_exists(f->s, keys, N, present, err, sizeof(err)), 0);
    for (int i = 0; i < N; i++) assert_int_equal(present[i], i % 100 == 7 && i < 500);
    free(keys);
    free(present);

    /* load into a cache */
    cake_kv_cache out;
    assert_int_equal(t_kv_init(&out, CAKE_KV_F16), 0);
    assert_int_equal(
        cake_store_load(f->s, &f->h[4], f->buf, f->cap, &out, 4 * T_CHUNK, err, sizeof(err)), 0);
    assert_int_equal(t_kv_cmp_range(&f->kv, 4 * T_CHUNK, &out, 4 * T_CHUNK, T_CHUNK), 0);
    cake_kv_cache_free(&out);

    /* header reads and listings */
    uint8_t hdr[CAKE_CHUNK_HEADER_SIZE];
    size_t len;
    uint64_t total;
    assert_int_equal(
        cake_store_head(f->s, &f->h[2].key, hdr, sizeof(hdr), &len, &total, err, sizeof(err)), 0);
    assert_int_equal(len, sizeof(hdr));
    assert_int_equal(total, f->len);
    assert_int_equal(
        cake_store_head(f->s, &f->h[7].key, hdr, sizeof(hdr), &len, &total, err, sizeof(err)), 1);
    cake_store_usage u;
    assert_int_equal(cake_store_usage_get(f->s, &u, err, sizeof(err)), 0);
    assert_int_equal(u.n_chunks, 5);
    assert_int_equal(u.bytes, 5 * f->len);

    /* del, and a corrupt value: a miss, counted, removed */
    assert_int_equal(cake_store_del(f->s, &f->h[0].key, err, sizeof(err)), 0);
    assert_int_equal(cake_store_del(f->s, &f->h[0].key, err, sizeof(err)), 1);
    uint8_t *bad = malloc(f->len);
    memcpy(bad, f->blob[1], f->len);
    bad[60] ^= 2; /* a header field */
    assert_int_equal(cake_store_put(f->s, &f->h[1].key, bad, f->len, err, sizeof(err)), 0);
    assert_int_equal(get(f, 1, err, sizeof(err)), 1);
    assert_non_null(strstr(err, "checksum"));
    assert_int_equal(get(f, 1, err, sizeof(err)), 1);
    assert_string_equal(err, ""); /* removed: now simply absent */
    free(bad);

    /* gc to a size: least recently used first */
    usleep(1100000); /* OBJECT IDLETIME has 1 s resolution: make 4 the most recent */
    assert_int_equal(get(f, 4, err, sizeof(err)), 0);
    uint64_t n, b;
    assert_int_equal(cake_store_gc(f->s, f->len, &n, &b, err, sizeof(err)), 0);
    assert_int_equal(n, 2);
    assert_int_equal(get(f, 4, err, sizeof(err)), 0);

    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 1);
    assert_int_equal(c.errors, 0);
    assert_int_equal(c.evictions, 2);
}

static void test_redis_get_many(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char err[512];
    for (int i = 0; i < 6; i++) put_ok(f, i);
    uint8_t *bad = malloc(f->len);
    memcpy(bad, f->blob[2], f->len);
    bad[f->len - 1] ^= 1;
    assert_int_equal(cake_store_put(f->s, &f->h[2].key, bad, f->len, err, sizeof(err)), 0);
    free(bad);
    void *bufs[8];
    size_t lens[8];
    int rc[8];
    for (int i = 0; i < 8; i++) bufs[i] = cake_store_alloc_buffer(f->cap);
    /* chunks 0..7: 6 and 7 absent, 2 corrupt */
    assert_int_equal(
        cake_store_get_many_verified(f->s, f->h, 8, bufs, f->cap, lens, rc, err, sizeof(err)), 5);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(rc[i], i == 2 || i >= 6);
        if (rc[i] == 0) {
            assert_int_equal(lens[i], f->len);
            assert_memory_equal(bufs[i], f->blob[i], f->len);
        }
    }
    assert_non_null(strstr(err, "checksum"));
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.hits, 5);
    assert_int_equal(c.misses, 3);
    assert_int_equal(c.corrupt, 1);
    /* too small a buffer: nothing fetched */
    assert_int_equal(
        cake_store_get_many_verified(f->s, f->h, 8, bufs, f->len - 1, lens, rc, err, sizeof(err)),
        -1);
    /* Redis gone: all misses, quickly */
    int port = g_redis.port;
    t_redis_stop(&g_redis);
    double t0 = t_now();
    assert_int_equal(
        cake_store_get_many_verified(f->s, f->h, 8, bufs, f->cap, lens, rc, err, sizeof(err)), 0);
    for (int i = 0; i < 8; i++) assert_int_equal(rc[i], 1);
    assert_true(t_now() - t0 < 0.6);
    assert_non_null(strstr(err, "redis"));
    for (int i = 0; i < 8; i++) cake_store_free_buffer(bufs[i]);
    assert_int_equal(t_redis_start(&g_redis, port), 0);
}

static void test_redis_db(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char err[512], uri[256];
    cake_store *s2;
    snprintf(uri, sizeof(uri), "%s/2", g_redis.uri);
    assert_int_equal(cake_store_open(uri, &s2, err, sizeof(err)), 0);
    put_ok(f, 6);
    uint8_t present = 9;
    assert_int_equal(cake_store_exists(s2, &f->h[6].key, 1, &present, err, sizeof(err)), 0);
    assert_int_equal(present, 0);
    assert_int_equal(cake_store_put(s2, &f->h[6].key, f->blob[6], f->len, err, sizeof(err)), 0);
    assert_int_equal(cake_store_exists(s2, &f->h[6].key, 1, &present, err, sizeof(err)), 0);
    assert_int_equal(present, 1);
    assert_int_equal(cake_store_del(s2, &f->h[6].key, err, sizeof(err)), 0);
    cake_store_close(s2);
    assert_int_equal(get(f, 6, err, sizeof(err)), 0);
}

typedef struct {
    fx *f;
    int id, bad;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    fx *f = w->f;
    char err[512];
    size_t len;
    void *buf = cake_store_alloc_buffer(f->cap);
    for (int it = 0; it < 100; it++) {
        int i = (it * 3 + w->id) % 8;
        if (it % 4 == w->id % 4) {
            if (cake_store_put(f->s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err))) w->bad++;
        } else {
            int rc = cake_store_get_verified(f->s, &f->h[i], buf, f->cap, &len, err, sizeof(err));
            if (rc < 0 || (rc == 0 && memcmp(buf, f->blob[i], f->len))) w->bad++;
        }
    }
    cake_store_free_buffer(buf);
    return NULL;
}

static void test_redis_threads(void **state) {
    NEED_REDIS();
    fx *f = *state;
    pthread_t th[4];
    worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker){f, i, 0};
        pthread_create(&th[i], NULL, work, &w[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(w[i].bad, 0);
    }
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.errors, 0);
    assert_int_equal(c.corrupt, 0);
}

static void test_redis_killed_between_exists_and_get(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char err[512];
    put_ok(f, 3);
    uint8_t present;
    assert_int_equal(cake_store_exists(f->s, &f->h[3].key, 1, &present, err, sizeof(err)), 0);
    assert_int_equal(present, 1);
    int port = g_redis.port;
    t_redis_stop(&g_redis);
    double t0 = t_now();
    assert_int_equal(get(f, 3, err, sizeof(err)), 1);
    double dt = t_now() - t0;
    print_message("get with Redis just killed: miss in %.1f ms: %s\n", dt * 1e3, err);
    assert_true(dt < 0.6);
    assert_true(strlen(err) > 0);
    /* while down: misses, fast; puts fail; exists says absent */
    t0 = t_now();
    for (int i = 0; i < 20; i++) assert_int_equal(get(f, i % 8, err, sizeof(err)), 1);
    assert_int_equal(cake_store_exists(f->s, &f->h[3].key, 1, &present, err, sizeof(err)), -1);
    assert_int_equal(present, 0);
    assert_int_equal(cake_store_put(f->s, &f->h[2].key, f->blob[2], f->len, err, sizeof(err)), -1);
    dt = t_now() - t0;
    print_message("20 gets + exists + put with Redis down: %.1f ms\n", dt * 1e3);
    assert_true(dt < 1.0);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_true(c.errors >= 22);
    assert_int_equal(c.corrupt, 0);

    /* Redis comes back (empty: no persistence): the store reconnects */
    assert_int_equal(t_redis_start(&g_redis, port), 0);
    int ok = 0;
    for (int i = 0; i < 40 && !ok; i++) { /* within the retry interval (500 ms) */
        ok = cake_store_put(f->s, &f->h[2].key, f->blob[2], f->len, err, sizeof(err)) == 0;
        if (!ok) usleep(50000);
    }
    assert_true(ok);
    assert_int_equal(get(f, 2, err, sizeof(err)), 0);
    assert_int_equal(get(f, 3, err, sizeof(err)), 1); /* gone with the restart */
}

/* ram=: the chunks this process wrote or read stay in its RAM; while Redis
 * is down they still load, and a lookup of them alone does not ask Redis. */
static void test_redis_ram_tier(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char err[512], uri[300];
    cake_store_close(f->s);
    snprintf(uri, sizeof(uri), "%s?timeout=500&ram=16MiB", g_redis.uri);
    assert_int_equal(cake_store_open(uri, &f->s, err, sizeof(err)), 0);
    put_ok(f, 0);
    put_ok(f, 1);
    const int port = g_redis.port;
    t_redis_stop(&g_redis);
    for (int i = 0; i < 2; i++) assert_int_equal(get(f, i, err, sizeof(err)), 0);
    assert_int_equal(get(f, 2, err, sizeof(err)), 1); /* never here */
    uint8_t present[2];
    cake_chunk_key keys[2] = {f->h[0].key, f->h[1].key};
    assert_int_equal(cake_store_exists(f->s, keys, 2, present, err, sizeof(err)), 0);
    assert_true(present[0] && present[1]);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.ram_hits, 2);
    /* A put Redis did not take is not kept in RAM either: once Redis is
     * back, the chunk is missing there, and is put again. */
    assert_int_not_equal(cake_store_put(f->s, &f->h[2].key, f->blob[2], f->len, err, sizeof(err)),
                         0);
    assert_int_equal(get(f, 2, err, sizeof(err)), 1);
    assert_int_equal(t_redis_start(&g_redis, port), 0);
    usleep(600 * 1000); /* the store tries Redis again 500 ms after it failed */
    uint8_t there = 1;
    assert_int_equal(cake_store_exists(f->s, &f->h[2].key, 1, &there, err, sizeof(err)), 0);
    assert_false(there);
    put_ok(f, 2);
    assert_int_equal(get(f, 2, err, sizeof(err)), 0);
}

static void test_redis_down_from_start(void **state) {
    NEED_REDIS();
    (void)state;
    int port = t_free_port(); /* nothing listens there */
    char uri[128], err[512];
    snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d?timeout=300", port);
    cake_store *s;
    double t0 = t_now();
    assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), 0);
    cake_chunk_header h = t_header(0, 1, CAKE_KV_F16);
    size_t len = cake_chunk_blob_size(&h);
    void *buf = cake_store_alloc_buffer(len);
    for (int i = 0; i < 10; i++) {
        size_t got;
        assert_int_equal(cake_store_get_verified(s, &h, buf, len, &got, err, sizeof(err)), 1);
        assert_non_null(strstr(err, "redis"));
    }
    uint8_t present = 7;
    assert_int_equal(cake_store_exists(s, &h.key, 1, &present, err, sizeof(err)), -1);
    assert_int_equal(present, 0);
    cake_store_usage u;
    assert_int_equal(cake_store_usage_get(s, &u, err, sizeof(err)), -1);
    double dt = t_now() - t0;
    print_message("Redis down: open + 10 gets + exists: %.1f ms (%s)\n", dt * 1e3, err);
    assert_true(dt < 1.0);
    cake_store_counters c;
    cake_store_counters_get(s, &c);
    assert_int_equal(c.misses, 10);
    assert_int_equal(c.hits, 0);
    cake_store_free_buffer(buf);
    cake_store_close(s);

    /* an address that does not answer at all: the connect timeout bounds it */
    assert_int_equal(cake_store_open("redis://10.255.255.1:6379?timeout=150", &s, err, sizeof(err)),
                     0);
    t0 = t_now();
    size_t got;
    void *b2 = cake_store_alloc_buffer(len);
    assert_int_equal(cake_store_get_verified(s, &h, b2, len, &got, err, sizeof(err)), 1);
    dt = t_now() - t0;
    print_message("unroutable Redis: miss in %.1f ms (%s)\n", dt * 1e3, err);
    assert_true(dt < 1.0);
    cake_store_free_buffer(b2);
    cake_store_close(s);
}

static void test_redis_hung(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char err[512];
    put_ok(f, 5);
    kill(g_redis.pid, SIGSTOP);
    double t0 = t_now();
    int rc = get(f, 5, err, sizeof(err));
    double dt = t_now() - t0;
    kill(g_redis.pid, SIGCONT);
    print_message("get from a stopped Redis (timeout=500): %d in %.1f ms: %s\n", rc, dt * 1e3, err);
    assert_int_equal(rc, 1);
    assert_true(dt >= 0.4 && dt < 1.5);
    /* it answers again: after the retry interval the store is back */
    int ok = 0;
    for (int i = 0; i < 40 && !ok; i++) {
        ok = get(f, 5, err, sizeof(err)) == 0;
        if (!ok) usleep(50000);
    }
    assert_true(ok);
}

/* A chunk over the server's proto-max-bulk-len (here lowered to 1 MiB):
 * Redis would drop the connection of a client that sends it; the store
 * refuses the put with an error that names the limit, and the next calls
 * work at once (the store is not marked down). */
static void test_redis_chunk_over_max_bulk(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char cmd[256], err[512] = "";
    snprintf(cmd, sizeof(cmd), "redis-cli -p %d CONFIG SET proto-max-bulk-len 1mb >/dev/null 2>&1",
             g_redis.port);
    if (system(cmd) != 0) skip(); /* no redis-cli */
    cake_store *s;
    assert_int_equal(cake_store_open(g_redis.uri, &s, err, sizeof(err)), 0);
    const size_t big = 2u << 20;
    void *blob = calloc(1, big);
    assert_int_equal(cake_store_put(s, &f->h[0].key, blob, big, err, sizeof(err)), -1);
    if (!strstr(err, "proto-max-bulk-len")) fail_msg("the error should name the limit: %s", err);
    assert_int_equal(cake_store_put(s, &f->h[1].key, f->blob[1], f->len, err, sizeof(err)), 0);
    size_t len;
    assert_int_equal(cake_store_get_verified(s, &f->h[1], f->buf, f->cap, &len, err, sizeof(err)),
                     0);
    cake_store_counters c;
    cake_store_counters_get(s, &c);
    assert_int_equal(c.errors, 1);
    free(blob);
    cake_store_close(s);
    snprintf(cmd, sizeof(cmd),
             "redis-cli -p %d CONFIG SET proto-max-bulk-len 512mb >/dev/null 2>&1", g_redis.port);
    assert_int_equal(system(cmd), 0);
}

/* A chunk of 25 MiB, read from the socket straight into the caller's buffer
 * over many reads, its payload hashed as it arrives: whole, with a byte
 * flipped early, in the middle or at the end, cut short by one byte, and
 * too long (trailing bytes, or too big for the buffer: left unread, that
 * connection dropped, the next get works at once). */
static void test_redis_big_chunk(void **state) {
    NEED_REDIS();
    fx *f = *state;
    cake_chunk_header h = f->h[0];
    size_t len;
    uint8_t *blob = t_big_blob(&h, 256, 12, 8192, &len); /* room for too-long values */
    assert_non_null(blob);
    assert_true(len > (24u << 20));
    const size_t cap = cake_store_buffer_size(len);
    uint8_t *buf = cake_store_alloc_buffer(cap);
    assert_non_null(buf);
    char err[512];
    size_t got = 0;
    assert_int_equal(cake_store_put(f->s, &h.key, blob, len, err, sizeof(err)), 0);
    if (cake_store_get_verified(f->s, &h, buf, cap, &got, err, sizeof(err)) != 0)
        fail_msg("get: %s", err);
    assert_int_equal(got, len);
    assert_memory_equal(buf, blob, len);

    const size_t flips[] = {CAKE_CHUNK_HEADER_SIZE + 3, len / 2 + 1, len - 1};
    for (size_t b = 0; b < sizeof(flips) / sizeof(flips[0]); b++) {
        blob[flips[b]] ^= 0x40;
        assert_int_equal(cake_store_put(f->s, &h.key, blob, len, err, sizeof(err)), 0);
        blob[flips[b]] ^= 0x40;
        assert_int_equal(cake_store_get_verified(f->s, &h, buf, cap, &got, err, sizeof(err)), 1);
        if (!strstr(err, "payload checksum")) fail_msg("flip at %zu: %s", flips[b], err);
    }
    const struct {
        size_t n;
        const char *why;
    } bad[] = {{len - 1, "truncated"},
               {len + 5, cap >= len + 5 ? "trailing bytes" : "buffer has"},
               {cap + 8192, "buffer has"}};
    for (size_t b = 0; b < sizeof(bad) / sizeof(bad[0]); b++) {
        assert_int_equal(cake_store_put(f->s, &h.key, blob, bad[b].n, err, sizeof(err)), 0);
        assert_int_equal(cake_store_get_verified(f->s, &h, buf, cap, &got, err, sizeof(err)), 1);
        if (!strstr(err, bad[b].why)) fail_msg("%zu bytes: %s", bad[b].n, err);
    }
    assert_int_equal(cake_store_put(f->s, &h.key, blob, len, err, sizeof(err)), 0);
    memset(buf, 0, cap);
    if (cake_store_get_verified(f->s, &h, buf, cap, &got, err, sizeof(err)) != 0)
        fail_msg("get after the bad ones: %s", err);
    assert_memory_equal(buf, blob, len);
    cake_store_counters c;
    cake_store_counters_get(f->s, &c);
    assert_int_equal(c.corrupt, 6);
    assert_int_equal(c.errors, 0);
    cake_store_free_buffer(blob);
    cake_store_free_buffer(buf);
}

/* ---- a scripted server: what a real Redis never sends ---- */

/* A loopback server that speaks just enough RESP for the store (CONFIG GET,
 * DEL) and answers every GET with `reply` (reply_len bytes), then closes the
 * connection or, with stall, keeps it open and silent. */
typedef struct {
    int listen_fd, port;
    atomic_int stop;
    const char *reply;
    size_t reply_len;
    int stall; /* after the reply: 1 = stay silent, 0 = close */
    pthread_t thread;
} fake_redis;

/* Reads one RESP command (an array of bulk strings) into buf; its name, or
 * NULL when the client closed. */
static const char *fake_read_command(int fd, char *buf, size_t cap) {
    size_t got = 0;
    for (;;) {
        /* complete when it has 1 + 2 * N lines, N from the "*N" line */
        int lines = 0;
        for (size_t i = 0; i + 1 < got; i++) lines += buf[i] == '\r' && buf[i + 1] == '\n';
        if (got && buf[0] == '*' && lines >= 1 + 2 * atoi(buf + 1)) break;
        ssize_t k = read(fd, buf + got, cap - 1 - got);
        if (k <= 0) return NULL;
        got += (size_t)k;
    }
    buf[got] = '\0';
    char *name = strstr(buf, "\r\n$"); /* the first argument's line */
    name = name ? strstr(name + 3, "\r\n") : NULL;
    return name ? name + 2 : NULL;
}

static void *fake_redis_main(void *arg) {
    fake_redis *f = arg;
    char buf[4096];
    while (!f->stop) {
        struct pollfd p = {.fd = f->listen_fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) continue;
        const int c = accept(f->listen_fd, NULL, NULL);
        if (c < 0) continue;
        const char *cmd;
        while ((cmd = fake_read_command(c, buf, sizeof(buf)))) {
            if (!strncmp(cmd, "CONFIG", 6)) {
                const char *r = "*2\r\n$18\r\nproto-max-bulk-len\r\n$9\r\n536870912\r\n";
                (void)!write(c, r, strlen(r));
            } else if (!strncmp(cmd, "DEL", 3)) {
                (void)!write(c, ":1\r\n", 4);
            } else if (!strncmp(cmd, "GET", 3)) {
                (void)!write(c, f->reply, f->reply_len);
                if (!f->stall) break; /* else silent until the client gives up */
            } else {
                (void)!write(c, "-ERR unknown\r\n", 14);
            }
        }
        close(c);
    }
    return NULL;
}

static int fake_redis_start(fake_redis *f) {
    f->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t n = sizeof(a);
    if (f->listen_fd < 0 || bind(f->listen_fd, (struct sockaddr *)&a, sizeof(a)) ||
        listen(f->listen_fd, 8) || getsockname(f->listen_fd, (struct sockaddr *)&a, &n))
        return -1;
    f->port = ntohs(a.sin_port);
    return pthread_create(&f->thread, NULL, fake_redis_main, f);
}

static void fake_redis_stop(fake_redis *f) {
    f->stop = 1;
    pthread_join(f->thread, NULL);
    close(f->listen_fd);
}

/* Replies a real Redis never sends, or sends cut short: each is a miss within
 * the timeout (counted as an error, or as a corrupt chunk when the bytes
 * arrived whole but are not the chunk), never a hang, a crash or wrong data. */
static void test_redis_bad_replies(void **state) {
    fx *f = *state;
    (void)f;
    static char value[100 + 2];
    memset(value, 'x', 100);
    memcpy(value + 100, "\r\n", 2);
    char whole[200], cut[200], bad_crlf[200], stall[200];
    int nw = snprintf(whole, sizeof(whole), "$100\r\n%.*s\r\n", 100, value);
    int nc = snprintf(cut, sizeof(cut), "$100\r\n%.*s", 50, value);
    int nb = snprintf(bad_crlf, sizeof(bad_crlf), "$100\r\n%.*sXY", 100, value);
    int ns = snprintf(stall, sizeof(stall), "$100\r\n%.*s", 10, value);
    const struct {
        const char *what, *reply;
        int len, stall;
        int errors, corrupt; /* counters after the get */
    } cases[] = {
        {"a value that is not a chunk", whole, nw, 0, 0, 1},
        {"a value cut short, then EOF", cut, nc, 0, 1, 0},
        {"a value not followed by CRLF", bad_crlf, nb, 0, 1, 0},
        {"a value cut short, then silence", stall, ns, 1, 1, 0},
        {"nil", "$-1\r\n", 5, 0, 0, 0},
        {"an error reply", "-ERR out of luck\r\n", 18, 0, 1, 0},
        {"a malformed length", "$12x\r\n", 6, 0, 1, 0},
        {"an unexpected type", ":42\r\n", 5, 0, 1, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        fake_redis fr = {
            .reply = cases[i].reply, .reply_len = (size_t)cases[i].len, .stall = cases[i].stall};
        assert_int_equal(fake_redis_start(&fr), 0);
        char uri[128], err[512] = "";
        snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d?timeout=300", fr.port);
        cake_store *s;
        assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), 0);
        cake_chunk_header h = t_header(0, 1, CAKE_KV_F16);
        const size_t cap = cake_store_buffer_size(cake_chunk_blob_size(&h));
        void *buf = cake_store_alloc_buffer(cap);
        size_t len = 1;
        const double t0 = t_now();
        const int rc = cake_store_get_verified(s, &h, buf, cap, &len, err, sizeof(err));
        const double dt = t_now() - t0;
        cake_store_counters c;
        cake_store_counters_get(s, &c);
        print_message("%s: miss in %.0f ms (%s)\n", cases[i].what, dt * 1e3, err);
        if (rc != 1 || len != 0 || dt > 2.0 || (int)c.errors != cases[i].errors ||
            (int)c.corrupt != cases[i].corrupt)
            fail_msg("%s: rc %d, len %zu, %.3f s, errors %d, corrupt %d", cases[i].what, rc, len,
                     dt, (int)c.errors, (int)c.corrupt);
        cake_store_free_buffer(buf);
        cake_store_close(s);
        fake_redis_stop(&fr);
    }
}

/* Put chunk i, read it back whole, count it, delete it: 0, or -1 with err. */
static int auth_roundtrip(cake_store *s, fx *f, int i, char *err, size_t errlen) {
    size_t len = 0;
    cake_store_usage u;
    if (cake_store_put(s, &f->h[i].key, f->blob[i], f->len, err, errlen) ||
        cake_store_get_verified(s, &f->h[i], f->buf, f->cap, &len, err, errlen) ||
        cake_store_usage_get(s, &u, err, errlen))
        return -1;
    if (len != f->len || memcmp(f->buf, f->blob[i], len) || u.n_chunks != 1) {
        snprintf(err, errlen, "read back %zu bytes, listed %llu chunks", len,
                 (unsigned long long)u.n_chunks);
        return -1;
    }
    return cake_store_del(s, &f->h[i].key, err, errlen) == 0 ? 0 : -1;
}

/* A Redis that wants passwords: the default user's (requirepass, with a
 * space) and an ACL user's with '@' and '/' (percent-escaped in the URIs),
 * who may only touch cake:* keys with the store's commands (no CONFIG: the
 * size limit is then taken as Redis's default). The right passwords work
 * over TCP and the unix socket, in a database, and from
 * $CAKE_REDIS_PASSWORD; a wrong or missing one fails the check, makes every
 * call a quick miss or failure that says why, and is never shown. */
static void test_redis_auth(void **state) {
    NEED_REDIS();
    fx *f = *state;
    char sock[64], err[512], uri[512];
    snprintf(sock, sizeof(sock), "/tmp/cake-test-redis-%d.sock", (int)getpid());
    const char *extra[] = {"--requirepass",
                           "pw one",
                           "--unixsocket",
                           sock,
                           "--unixsocketperm",
                           "700",
                           "--user",
                           "cake",
                           "on",
                           ">c@ke/pw",
                           "~cake:*",
                           "+get",
                           "+set",
                           "+exists",
                           "+del",
                           "+scan",
                           "+strlen",
                           "+getrange",
                           "+object|idletime",
                           "+select",
                           NULL};
    t_redis *const r = &g_auth_redis;
    if (t_redis_start_with(r, 0, extra)) fail_msg("cannot start redis-server with passwords");
    for (int i = 0; i < 4; i++) {
        if (i == 0) snprintf(uri, sizeof(uri), "redis://:pw%%20one@127.0.0.1:%d", r->port);
        if (i == 1)
            snprintf(uri, sizeof(uri), "redis://cake:c%%40ke%%2Fpw@127.0.0.1:%d/1", r->port);
        if (i == 2) snprintf(uri, sizeof(uri), "redis+unix://:pw%%20one@%s", sock);
        if (i == 3) snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d", r->port);
        if (i == 3) setenv("CAKE_REDIS_PASSWORD", "pw one", 1);
        cake_store *s;
        err[0] = '\0';
        const int rc = cake_store_open(uri, &s, err, sizeof(err));
        unsetenv("CAKE_REDIS_PASSWORD");
        if (rc) fail_msg("%s: %s", uri, err);
        if (cake_store_check(s, err, sizeof(err)) || auth_roundtrip(s, f, i, err, sizeof(err)))
            fail_msg("%s: %s", uri, err);
        if (strstr(cake_store_uri(s), "pw") || (i < 3 && !strstr(cake_store_uri(s), ":***@")))
            fail_msg("%s shown as %s", uri, cake_store_uri(s));
        cake_store_close(s);
    }

    struct {
        const char *userinfo, *why;
    } bad[] = {{":wrong-pw@", "WRONGPASS"}, {"cake:wrong-pw@", "WRONGPASS"}, {"", "NOAUTH"}};
    for (int i = 0; i < 3; i++) {
        snprintf(uri, sizeof(uri), "redis://%s127.0.0.1:%d?timeout=300", bad[i].userinfo, r->port);
        cake_store *s;
        assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), 0);
        if (!cake_store_check(s, err, sizeof(err)) || !strstr(err, bad[i].why))
            fail_msg("%s: check: '%s', want %s", uri, err, bad[i].why);
        if (i == 2 && !strstr(err, "CAKE_REDIS_PASSWORD"))
            fail_msg("%s: the NOAUTH message does not say how to give a password: %s", uri, err);
        size_t len = 0;
        const double t0 = t_now();
        assert_int_equal(cake_store_put(s, &f->h[0].key, f->blob[0], f->len, err, sizeof(err)), -1);
        assert_int_equal(
            cake_store_get_verified(s, &f->h[0], f->buf, f->cap, &len, err, sizeof(err)), 1);
        if (t_now() - t0 > 2.0) fail_msg("%s: %.1f s to fail", uri, t_now() - t0);
        if (strstr(err, "wrong-pw") || strstr(cake_store_uri(s), "wrong-pw"))
            fail_msg("%s: the password shown: %s / %s", uri, err, cake_store_uri(s));
        cake_store_close(s);
    }
    t_redis_stop(r);
    unlink(sock);
}

/* A store of server r alone. */
static cake_store *open_one(const t_redis *r) {
    char uri[128], err[256];
    snprintf(uri, sizeof(uri), "redis://127.0.0.1:%d?timeout=300", r->port);
    cake_store *s = NULL;
    if (cake_store_open(uri, &s, err, sizeof(err))) fail_msg("%s: %s", uri, err);
    return s;
}

/* A store over two Redis servers: 72 chunks (the 8 of the fixture and 64
 * more keys) spread over both, none twice; every get, pipelined get and
 * lookup finds them, and so does a store that lists the servers the other
 * way round (rendezvous hashing: the order does not matter). With one
 * server dead, its chunks are holes and the other's still load: the lookup
 * finds exactly the live server's (and fails, naming the dead one), gets of
 * the dead one's miss quickly. */
static void test_redis_servers(void **state) {
    NEED_REDIS();
    fx *f = *state;
    t_redis *const r = g_two_redis;
    assert_int_equal(t_redis_start(&r[0], 0), 0);
    assert_int_equal(t_redis_start(&r[1], 0), 0);
    char uri[2][160], err[512];
    for (int o = 0; o < 2; o++)
        snprintf(uri[o], sizeof(uri[o]), "redis://127.0.0.1:%d,127.0.0.1:%d?timeout=300", r[o].port,
                 r[1 - o].port);
    enum { MORE = 64 };
    cake_chunk_key keys[8 + MORE];
    for (int i = 0; i < 8 + MORE; i++) {
        keys[i] = f->h[i < 8 ? i : 0].key;
        if (i >= 8) keys[i].b[15] ^= (uint8_t)i, keys[i].b[14] ^= 0x5a;
    }
    cake_store *s;
    assert_int_equal(cake_store_open(uri[0], &s, err, sizeof(err)), 0);
    assert_int_equal(cake_store_check(s, err, sizeof(err)), 0);
    for (int i = 0; i < 8 + MORE; i++)
        if (cake_store_put(s, &keys[i], f->blob[i < 8 ? i : 0], f->len, err, sizeof(err)))
            fail_msg("put %d: %s", i, err);
    cake_store_usage u, u0, u1;
    cake_store *one[2] = {open_one(&r[0]), open_one(&r[1])};
    assert_int_equal(cake_store_usage_get(s, &u, err, sizeof(err)), 0);
    assert_int_equal(cake_store_usage_get(one[0], &u0, err, sizeof(err)), 0);
    assert_int_equal(cake_store_usage_get(one[1], &u1, err, sizeof(err)), 0);
    print_message("%d chunks over two servers: %d and %d\n", 8 + MORE, (int)u0.n_chunks,
                  (int)u1.n_chunks);
    assert_int_equal(u.n_chunks, 8 + MORE);
    assert_true(u0.n_chunks > 0 && u1.n_chunks > 0 && u0.n_chunks + u1.n_chunks == 8 + MORE);
    uint8_t on0[8], present[8];
    assert_int_equal(cake_store_exists(one[0], keys, 8, on0, err, sizeof(err)), 0);
    cake_store_close(one[0]);
    cake_store_close(one[1]);
    cake_store_close(s);

    void *bufs[8];
    size_t lens[8];
    int rc[8], n_on0 = 0;
    for (int i = 0; i < 8; i++) bufs[i] = cake_store_alloc_buffer(f->cap), n_on0 += on0[i];
    for (int o = 0; o < 2; o++) { /* either order */
        assert_int_equal(cake_store_open(uri[o], &s, err, sizeof(err)), 0);
        assert_int_equal(cake_store_exists(s, keys, 8, present, err, sizeof(err)), 0);
        for (int i = 0; i < 8; i++) assert_int_equal(present[i], 1);
        for (int i = 0; i < 8; i++) assert_int_equal(get_from(s, f, i, err, sizeof(err)), 0);
        assert_int_equal(
            cake_store_get_many_verified(s, f->h, 8, bufs, f->cap, lens, rc, err, sizeof(err)), 8);
        for (int i = 0; i < 8; i++) assert_memory_equal(bufs[i], f->blob[i], f->len);
        cake_store_close(s);
    }

    /* the second server dies: its chunks are holes */
    t_redis_stop(&r[1]);
    for (int i = 0; i < 8; i++) memset(bufs[i], 0, f->cap);
    assert_int_equal(cake_store_open(uri[0], &s, err, sizeof(err)), 0);
    assert_int_equal(cake_store_check(s, err, sizeof(err)), -1);
    char dead[64];
    snprintf(dead, sizeof(dead), "127.0.0.1:%d", r[1].port);
    assert_non_null(strstr(err, dead));
    const double t0 = t_now();
    assert_int_equal(cake_store_exists(s, keys, 8, present, err, sizeof(err)), -1);
    assert_int_equal(
        cake_store_get_many_verified(s, f->h, 8, bufs, f->cap, lens, rc, err, sizeof(err)), n_on0);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(present[i], on0[i]);
        assert_int_equal(rc[i] == 0, on0[i]);
        assert_int_equal(get_from(s, f, i, err, sizeof(err)) == 0, on0[i]);
    }
    const double dt = t_now() - t0;
    print_message("one of two servers dead: %d of 8 chunks present and loaded, in %.0f ms\n", n_on0,
                  dt * 1e3);
    assert_true(dt < 2.0);
    cake_store_close(s);
    for (int i = 0; i < 8; i++) cake_store_free_buffer(bufs[i]);
    t_redis_stop(&r[0]);
}

int main(void) {
    if (!t_redis_available()) fprintf(stderr, "skip: redis-server not installed\n");
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_redis_roundtrip),
        T(test_redis_get_many),
        T(test_redis_db),
        T(test_redis_threads),
        T(test_redis_killed_between_exists_and_get),
        T(test_redis_ram_tier),
        T(test_redis_down_from_start),
        T(test_redis_hung),
        T(test_redis_chunk_over_max_bulk),
        T(test_redis_big_chunk),
        T(test_redis_bad_replies),
        T(test_redis_auth),
        T(test_redis_servers),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
