/* Store URIs (every form and parameter, and the errors) and the emulated link
 * (bw=, lat=): a lone transfer takes size/bw, N concurrent ones share the link
 * (each about bw/N, the aggregate about bw), and lat adds per request. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "store/store_impl.h"
#include "test_store_common.h"

static void test_parse_rate(void **state) {
    (void)state;
    struct {
        const char *s;
        double bytes;
    } ok[] = {
        {"25Gbit", 25e9 / 8}, {"500Mbit", 500e6 / 8}, {"1.6GB", 1.6e9},   {"100000", 12500},
        {"7Gbps", 7e9 / 8},   {"56gbit/s", 7e9},      {"800MB/s", 800e6}, {"1GiB", 1073741824.0},
        {"10Kbit", 1250},     {"3kB", 3000},          {"2G", 2e9 / 8},    {"1e9", 1.25e8},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        double b = 0;
        if (cake_parse_rate(ok[i].s, &b)) fail_msg("rate '%s' refused", ok[i].s);
        if (fabs(b - ok[i].bytes) > 1e-9 * ok[i].bytes)
            fail_msg("rate '%s': %g bytes/s, want %g", ok[i].s, b, ok[i].bytes);
    }
    const char *bad[] = {"", "abc", "-1", "0", "10Xbit", "Gbit", "5 Gbit", "1.6Gb/h", "nan"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        double b;
        if (!cake_parse_rate(bad[i], &b)) fail_msg("rate '%s' accepted", bad[i]);
    }
}

static void test_parse_size(void **state) {
    (void)state;
    struct {
        const char *s;
        uint64_t b;
    } ok[] = {{"1000", 1000},
              {"10G", 10000000000ull},
              {"512MiB", 536870912ull},
              {"1.5K", 1500},
              {"2GB", 2000000000ull},
              {"1TiB", 1099511627776ull},
              {"64kib", 65536},
              {"0", 0},
              {"7B", 7}};
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        uint64_t b = 1;
        if (cake_parse_size(ok[i].s, &b) || b != ok[i].b)
            fail_msg("size '%s': got %llu, want %llu", ok[i].s, (unsigned long long)b,
                     (unsigned long long)ok[i].b);
    }
    const char *bad[] = {"", "x", "-5", "10Q", "1e30"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t b;
        if (!cake_parse_size(bad[i], &b)) fail_msg("size '%s' accepted", bad[i]);
    }
}

static void test_parse_uri(void **state) {
    (void)state;
    cake_store_params p;
    char err[512];
    assert_int_equal(cake_store_parse_uri("file:/data/kv", &p, err, sizeof(err)), 0);
    assert_string_equal(p.kind, "file");
    assert_string_equal(p.path, "/data/kv");
    assert_int_equal(p.direct, 1);
    assert_int_equal(p.cache, 1);
    assert_int_equal(p.fsync, 0);
    assert_int_equal(p.readers, 0);
    assert_true(p.bw == 0 && p.lat_ms == 0 && p.capacity == 0);
    assert_int_equal(cake_store_parse_uri("file:///abs/x", &p, err, sizeof(err)), 0);
    assert_string_equal(p.path, "/abs/x");
    assert_int_equal(cake_store_parse_uri("file:rel/dir?direct=0&fsync=1&capacity=2GiB&bw=1.6GB"
                                          "&lat=0.25&readers=3&cache=0",
                                          &p, err, sizeof(err)),
                     0);
    assert_string_equal(p.path, "rel/dir");
    assert_int_equal(p.direct, 0);
    assert_int_equal(p.cache, 0);
    assert_int_equal(p.fsync, 1);
    assert_int_equal(p.readers, 3);
    assert_int_equal(p.capacity, 2147483648ull);
    assert_true(fabs(p.bw - 1.6e9) < 1);
    assert_true(fabs(p.lat_ms - 0.25) < 1e-12);
    /* file: alone: the XDG cache, else ~/.cache */
    char *old_xdg = getenv("XDG_CACHE_HOME") ? strdup(getenv("XDG_CACHE_HOME")) : NULL;
    char *old_home = getenv("HOME") ? strdup(getenv("HOME")) : NULL;
    setenv("XDG_CACHE_HOME", "/xdg", 1);
    assert_int_equal(cake_store_parse_uri("file:", &p, err, sizeof(err)), 0);
    assert_string_equal(p.path, "/xdg/cake");
    unsetenv("XDG_CACHE_HOME");
    setenv("HOME", "/home/u", 1);
    assert_int_equal(cake_store_parse_uri("file:?bw=1Gbit", &p, err, sizeof(err)), 0);
    assert_string_equal(p.path, "/home/u/.cache/cake");
    if (old_xdg) setenv("XDG_CACHE_HOME", old_xdg, 1);
    if (old_home) setenv("HOME", old_home, 1);
    free(old_xdg);
    free(old_home);

    assert_int_equal(
        cake_store_parse_uri("redis://10.0.0.5:6380/3?timeout=250&bw=25Gbit", &p, err, sizeof(err)),
        0);
    assert_string_equal(p.kind, "redis");
    assert_string_equal(p.host[0], "10.0.0.5");
    assert_int_equal(p.port[0], 6380);
    assert_int_equal(p.db, 3);
    assert_int_equal(p.timeout_ms, 250);
    assert_int_equal(cake_store_parse_uri("redis://cachehost", &p, err, sizeof(err)), 0);
    assert_string_equal(p.host[0], "cachehost");
    assert_int_equal(p.port[0], 6379);
    assert_int_equal(p.db, 0);
    assert_int_equal(cake_store_parse_uri("mem:?capacity=1G&lat=2", &p, err, sizeof(err)), 0);
    assert_string_equal(p.kind, "mem");
    assert_int_equal(p.capacity, 1000000000ull);

    /* Redis users and passwords, percent-decoded; unix sockets; IPv6 */
    unsetenv("CAKE_REDIS_PASSWORD");
    assert_int_equal(cake_store_parse_uri("redis://al%69ce:s%40cr%2Ft%20x@10.0.0.5:6380/2", &p, err,
                                          sizeof(err)),
                     0);
    assert_string_equal(p.user, "alice");
    assert_string_equal(p.password, "s@cr/t x");
    assert_string_equal(p.host[0], "10.0.0.5");
    assert_int_equal(p.port[0], 6380);
    assert_int_equal(p.db, 2);
    /* unescaped '@' and '/' in a password: the userinfo ends at the last '@' */
    assert_int_equal(cake_store_parse_uri("redis://:p@ss/w@h:1/4", &p, err, sizeof(err)), 0);
    assert_string_equal(p.user, "");
    assert_string_equal(p.password, "p@ss/w");
    assert_string_equal(p.host[0], "h");
    assert_int_equal(p.port[0], 1);
    assert_int_equal(p.db, 4);
    assert_int_equal(cake_store_parse_uri("redis://[::1]:6390?db=5", &p, err, sizeof(err)), 0);
    assert_string_equal(p.host[0], "::1");
    assert_int_equal(p.port[0], 6390);
    assert_int_equal(p.db, 5);
    assert_string_equal(p.password, "");
    assert_int_equal(cake_store_parse_uri("redis://[fe80::2]", &p, err, sizeof(err)), 0);
    assert_string_equal(p.host[0], "fe80::2");
    assert_int_equal(p.port[0], 6379);
    assert_int_equal(
        cake_store_parse_uri("redis+unix://:pw@/run/redis/redis.sock?db=3", &p, err, sizeof(err)),
        0);
    assert_string_equal(p.kind, "redis");
    assert_string_equal(p.socket, "/run/redis/redis.sock");
    assert_string_equal(p.password, "pw");
    assert_int_equal(p.db, 3);
    /* several servers */
    assert_int_equal(
        cake_store_parse_uri("redis://:pw@a:1,[::1]:2,b/3?timeout=9", &p, err, sizeof(err)), 0);
    assert_int_equal(p.n_servers, 3);
    assert_string_equal(p.host[0], "a");
    assert_string_equal(p.host[1], "::1");
    assert_string_equal(p.host[2], "b");
    assert_int_equal(p.port[0], 1);
    assert_int_equal(p.port[1], 2);
    assert_int_equal(p.port[2], 6379);
    assert_int_equal(p.db, 3);
    assert_string_equal(p.password, "pw");
    /* a password from the environment, unless the URI has one */
    setenv("CAKE_REDIS_PASSWORD", "from env", 1);
    assert_int_equal(cake_store_parse_uri("redis://cake@h", &p, err, sizeof(err)), 0);
    assert_string_equal(p.user, "cake");
    assert_string_equal(p.password, "from env");
    assert_int_equal(cake_store_parse_uri("redis://:mine@h", &p, err, sizeof(err)), 0);
    assert_string_equal(p.password, "mine");
    unsetenv("CAKE_REDIS_PASSWORD");
    /* what messages show */
    char shown[256];
    assert_string_equal(
        cake_store_redact_uri("redis://alice:s3cret@h:1/2?timeout=5", shown, sizeof(shown)),
        "redis://alice:***@h:1/2?timeout=5");
    assert_string_equal(cake_store_redact_uri("redis://:p@ss/w@h", shown, sizeof(shown)),
                        "redis://:***@h");
    assert_string_equal(cake_store_redact_uri("redis+unix://:pw@/run/r.sock", shown, sizeof(shown)),
                        "redis+unix://:***@/run/r.sock");
    assert_string_equal(cake_store_redact_uri("redis://h:1?bw=1Gbit", shown, sizeof(shown)),
                        "redis://h:1?bw=1Gbit");
    assert_string_equal(cake_store_redact_uri("file:/a:b@c", shown, sizeof(shown)), "file:/a:b@c");
    assert_string_equal(cake_store_redact_uri("file:///a:b@c", shown, sizeof(shown)),
                        "file:///a:b@c");
    assert_string_equal(cake_store_redact_uri("rediss://u:pw@h", shown, sizeof(shown)),
                        "rediss://u:***@h");

    struct {
        const char *uri, *want;
    } bad[] = {
        {"/just/a/path", "unknown kind"},
        {"s3://bucket", "unknown kind"},
        {"mem:x", "unknown kind"},
        {"file:/x?color=blue", "unknown parameter 'color'"},
        {"file://tmp/x", "names a host"},
        {"mem:?bw=1Gbit&bw=2Gbit", "bw= is given twice"},
        {"mem:?bw=0.0000001bit", "at least 1Kbit"},
        {"file:/x?bw", "NAME=VALUE"},
        {"file:/x?bw=fast", "bw=fast"},
        {"file:/x?lat=-1", "lat=-1"},
        {"file:/x?capacity=0", "capacity=0"},
        {"file:/x?direct=2", "direct=2"},
        {"file:/x?timeout=5", "only for redis"},
        {"mem:?direct=1", "only for file"},
        {"redis://h:6379?capacity=1G", "maxmemory"},
        {"redis://h:0", "bad port"},
        {"redis://h:99999", "bad port"},
        {"redis://h:12x", "bad port"},
        {"redis://:6379", "HOST[:PORT]"},
        {"redis://alice@h", "without a password"},
        {"redis://:bad%zzsecret@h", "bad password"},
        {"redis://:secret@h:99999", "redis://:***@h:99999: bad port"},
        {"redis://:secret@h?db=x", "redis://:***@h?db=x: bad db=x"},
        {"redis://[::1:6379", "IPv6"},
        {"redis://[::1]x", "IPv6"},
        {"redis://a:1,a:1", "a:1 listed twice"},
        {"redis://a,,b", "at ''"},
        {"redis://a,", "at ''"},
        {"redis://a,b:0", "bad port in 'b:0'"},
        {"rediss://:secret@h", "unknown kind"},
        {"redis://h1,h2,h3,h4,h5,h6,h7,h8,h9,h10,h11,h12,h13,h14,h15,h16,h17", "more than 16"},
        {"redis+unix://h/x.sock", "redis+unix:///PATH"},
        {"redis+unix://", "redis+unix:///PATH"},
        {"file:/x?db=1", "only for redis"},
        {"redis://h:6379/x", "database"},
        {"redis://h:6379?timeout=0", "timeout=0"},
        {"file:/x?readers=0", "readers=0"},
        {"file:/x?readers=17", "readers=17"},
        {"mem:?readers=2", "only for file"},
        {"file:/x?cache=on", "cache=on"},
        {"redis://h?cache=0", "only for file"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        if (cake_store_parse_uri(bad[i].uri, &p, err, sizeof(err)) == 0)
            fail_msg("URI '%s' accepted", bad[i].uri);
        if (!strstr(err, bad[i].want))
            fail_msg("URI '%s': error should mention '%s': %s", bad[i].uri, bad[i].want, err);
        if (strstr(err, "secret"))
            fail_msg("URI '%s': the password in the error: %s", bad[i].uri, err);
    }
    cake_store *s;
    assert_int_equal(cake_store_open("file:/x?zap=1", &s, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "zap"));
}

/* ---- the link ---- */

#define BLOB (200 * 1000) /* bytes per transfer */

typedef struct {
    cake_store *s;
    cake_chunk_key key;
    int n_gets;
    double t_start, elapsed;  /* when its first get began; how long its gets took */
    pthread_barrier_t *start; /* NULL: start at once */
} getter;

static void *do_gets(void *arg) {
    getter *g = arg;
    void *buf = malloc(BLOB);
    if (g->start) pthread_barrier_wait(g->start);
    char err[256];
    size_t len;
    g->t_start = t_now();
    for (int i = 0; i < g->n_gets; i++)
        if (cake_store_get(g->s, &g->key, buf, BLOB, &len, err, sizeof(err)) != 0 || len != BLOB)
            abort();
    g->elapsed = t_now() - g->t_start;
    free(buf);
    return NULL;
}

static cake_store *open_with_blob(const char *uri, cake_chunk_key *key) {
    cake_store *s;
    char err[256];
    if (cake_store_open(uri, &s, err, sizeof(err))) fail_msg("%s", err);
    memset(key, 0x5a, sizeof(*key));
    void *blob = calloc(1, BLOB);
    if (cake_store_put(s, key, blob, BLOB, err, sizeof(err))) fail_msg("%s", err);
    free(blob);
    return s;
}

/* Timing bounds: never faster than the link allows (small slack for clock
 * granularity): that must hold on every run. Slower only by scheduling noise:
 * a loaded machine makes some runs slow, never fast, so the upper bound (loose)
 * must hold on one of up to 3 runs. bench_store measures the precision. */
static int check_time(const char *what, double got, double want) {
    print_message("%-34s %7.1f ms (link model: %.1f ms)\n", what, got * 1e3, want * 1e3);
    if (got < want * 0.97)
        fail_msg("%s took %.1f ms, faster than the link model's %.1f ms", what, got * 1e3,
                 want * 1e3);
    return got <= want * 1.35 + 0.010;
}

#define TIMED(what, want, ...)                                                                     \
    do {                                                                                           \
        for (int attempt_ = 0;; attempt_++) {                                                      \
            double got_;                                                                           \
            __VA_ARGS__;                                                                           \
            if (check_time(what, got_, want)) break;                                               \
            if (attempt_ == 2) fail_msg("%s: slower than the link model in 3 runs", what);         \
        }                                                                                          \
    } while (0)

static void test_bw_alone(void **state) {
    (void)state;
    /* 64 Mbit/s = 8 MB/s: 25 ms per 200 kB transfer */
    cake_chunk_key key;
    cake_store *s = open_with_blob("mem:?bw=64Mbit", &key);
    TIMED("6 sequential gets", 6 * 0.025, {
        getter g = {s, key, 6, 0, 0, NULL};
        do_gets(&g);
        got_ = g.elapsed;
    });
    cake_store_counters c;
    cake_store_counters_get(s, &c);
    assert_true(c.read_ns >= 6 * 25000000ull * 97 / 100);
    cake_store_close(s);
}

/* 4 threads x 3 gets at once; returns the aggregate time (first get's start
 * to last get's end, as the getters clock them: this thread may wake from
 * the barrier after they have begun), per-stream times in each[]. */
static double shared_run(cake_store *s, const cake_chunk_key *key, double each[4]) {
    enum { N = 4, GETS = 3 };
    getter g[N];
    pthread_t th[N];
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, N + 1);
    for (int i = 0; i < N; i++) {
        g[i] = (getter){s, *key, GETS, 0, 0, &start};
        pthread_create(&th[i], NULL, do_gets, &g[i]);
    }
    pthread_barrier_wait(&start);
    double first = 0, last = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        each[i] = g[i].elapsed;
        if (!i || g[i].t_start < first) first = g[i].t_start;
        if (!i || g[i].t_start + g[i].elapsed > last) last = g[i].t_start + g[i].elapsed;
    }
    pthread_barrier_destroy(&start);
    return last - first;
}

static void test_bw_shared(void **state) {
    (void)state;
    cake_chunk_key key;
    cake_store *s = open_with_blob("mem:?bw=64Mbit", &key);
    double each[4];
    /* 12 transfers over one 8 MB/s link: 300 ms in all, never less. */
    TIMED("4 streams x 3 gets, aggregate", 12 * 0.025, got_ = shared_run(s, &key, each));
    /* Each stream, sharing with 3 others, gets about a quarter of the link
     * (loosely: a stream the scheduler starts late shares less). */
    for (int i = 0; i < 4; i++) {
        print_message("  one stream: %.1f ms\n", each[i] * 1e3);
        assert_true(each[i] > 0.8 * 12 * 0.025);
    }
    cake_store_close(s);
}

static void test_bw_get_many(void **state) {
    (void)state;
    /* 4 chunks in one call share the link: 100 ms at 8 MB/s, plus one lat */
    cake_store *s;
    char err[256];
    assert_int_equal(cake_store_open("mem:?bw=64Mbit&lat=5", &s, err, sizeof(err)), 0);
    cake_chunk_header h[4];
    void *bufs[4];
    size_t lens[4], len = 0;
    int rc[4];
    cake_kv_cache kv;
    char e2[256];
    /* chunks of 200 kB: 50 layers x 2 x 16 tokens x 64 x f16 = 204800 bytes */
    assert_int_equal(cake_kv_cache_init(&kv, 50, 64, 4, 16, CAKE_KV_F16, e2, sizeof(e2)), 0);
    t_fill_kv(&kv, 1);
    for (int i = 0; i < 4; i++) {
        h[i] = t_header((uint32_t)i, 4, CAKE_KV_F16);
        h[i].n_layers = 50;
        h[i].n_kv_heads = 4;
        h[i].head_dim = 16;
        void *b = t_blob(&h[i], &kv, 0, &len);
        assert_int_equal(cake_store_put(s, &h[i].key, b, len, err, sizeof(err)), 0);
        cake_store_free_buffer(b);
        bufs[i] = cake_store_alloc_buffer(len);
    }
    TIMED("get_many of 4 chunks", 0.005 + 4 * len / 8e6, {
        double t0 = t_now();
        assert_int_equal(
            cake_store_get_many_verified(s, h, 4, bufs, len, lens, rc, err, sizeof(err)), 4);
        got_ = t_now() - t0;
    });
    for (int i = 0; i < 4; i++) cake_store_free_buffer(bufs[i]);
    cake_kv_cache_free(&kv);
    cake_store_close(s);
}

static void test_lat(void **state) {
    (void)state;
    cake_chunk_key key;
    cake_store *s = open_with_blob("mem:?lat=20", &key);
    TIMED("3 gets with lat=20", 3 * 0.020, {
        getter g = {s, key, 3, 0, 0, NULL};
        do_gets(&g);
        got_ = g.elapsed;
    });
    cake_store_close(s);
    /* lat + bw: the latency does not occupy the link */
    s = open_with_blob("mem:?lat=10&bw=64Mbit", &key);
    TIMED("2 gets with lat=10, bw=64Mbit", 2 * 0.035, {
        getter g = {s, key, 2, 0, 0, NULL};
        do_gets(&g);
        got_ = g.elapsed;
    });
    /* a miss pays the latency but no transfer */
    char err[256];
    size_t len;
    void *buf = malloc(BLOB);
    cake_chunk_key other;
    memset(&other, 1, sizeof(other));
    TIMED("a miss with lat=10", 0.010, {
        double t0 = t_now();
        assert_int_equal(cake_store_get(s, &other, buf, BLOB, &len, err, sizeof(err)), 1);
        got_ = t_now() - t0;
    });
    free(buf);
    cake_store_close(s);
}

static void *give_up_soon(void *flag) {
    usleep(50000);
    atomic_store((atomic_int *)flag, 1);
    return NULL;
}

/* A get whose caller gives up (the loader's, for a chunk compute overtook,
 * at the request's end) leaves the emulated latency and link at once, as a
 * miss: 2 s of lat= and a 1.6 s transfer end 50 ms in. */
static void test_give_up(void **state) {
    (void)state;
    static const char *const uris[] = {"mem:?lat=2000", "mem:?bw=1Mbit"};
    for (int u = 0; u < 2; u++) {
        cake_chunk_key key;
        cake_store *s = open_with_blob(uris[u], &key);
        cake_chunk_header h = {.key = key,
                               .n_tokens = 1,
                               .n_layers = 1,
                               .n_kv_heads = 1,
                               .head_dim = 64,
                               .dtype = CAKE_KV_F16};
        void *buf = malloc(2 * BLOB);
        atomic_int give_up = 0;
        pthread_t t;
        pthread_create(&t, NULL, give_up_soon, &give_up);
        char err[256];
        size_t len = 1;
        const double t0 = t_now();
        const int rc =
            cake_store_get_verified_until(s, &h, buf, 2 * BLOB, &len, &give_up, err, sizeof(err));
        const double took = t_now() - t0;
        pthread_join(t, NULL);
        print_message("%s: given up after %.0f ms\n", uris[u], took * 1e3);
        assert_int_equal(rc, 1);
        assert_int_equal(len, 0);
        assert_true(took >= 0.045 && took < 1.0);
        free(buf);
        cake_store_close(s);
    }
}

static void test_bw_put(void **state) {
    (void)state;
    cake_store *s;
    char err[256];
    assert_int_equal(cake_store_open("mem:?bw=64Mbit", &s, err, sizeof(err)), 0);
    void *blob = calloc(1, BLOB);
    cake_chunk_key key;
    memset(&key, 3, sizeof(key));
    TIMED("3 puts", 3 * 0.025, {
        double t0 = t_now();
        for (int i = 0; i < 3; i++)
            assert_int_equal(cake_store_put(s, &key, blob, BLOB, err, sizeof(err)), 0);
        got_ = t_now() - t0;
    });
    free(blob);
    cake_store_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_rate), cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_parse_uri),  cmocka_unit_test(test_bw_alone),
        cmocka_unit_test(test_bw_shared),  cmocka_unit_test(test_lat),
        cmocka_unit_test(test_bw_put),     cmocka_unit_test(test_bw_get_many),
        cmocka_unit_test(test_give_up),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
