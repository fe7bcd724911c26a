/* The mem store: round trip, verification, capacity + LRU, and concurrent
 * readers and writers (evictions while a get is copying). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>

#include "test_store_common.h"

typedef struct {
    cake_kv_cache kv;
    cake_chunk_header h[8];
    void *blob[8];
    size_t len, cap;
    void *buf;
} fx;

static int setup(void **state) {
    fx *f = calloc(1, sizeof(*f));
    if (t_kv_init(&f->kv, CAKE_KV_F32)) return -1;
    t_fill_kv(&f->kv, 4);
    for (int i = 0; i < 8; i++) {
        f->h[i] = t_header((uint32_t)i, 2, CAKE_KV_F32);
        f->blob[i] = t_blob(&f->h[i], &f->kv, i * T_CHUNK, &f->len);
    }
    f->cap = cake_store_buffer_size(f->len);
    f->buf = cake_store_alloc_buffer(f->cap);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    for (int i = 0; i < 8; i++) cake_store_free_buffer(f->blob[i]);
    cake_store_free_buffer(f->buf);
    cake_kv_cache_free(&f->kv);
    free(f);
    return 0;
}

static int get(fx *f, cake_store *s, int i) {
    char err[256];
    size_t len;
    int rc = cake_store_get_verified(s, &f->h[i], f->buf, f->cap, &len, err, sizeof(err));
    if (rc == 0) assert_memory_equal(f->buf, f->blob[i], f->len);
    return rc;
}

static void test_mem_roundtrip(void **state) {
    fx *f = *state;
    cake_store *s;
    char err[256];
    assert_int_equal(cake_store_open("mem:", &s, err, sizeof(err)), 0);
    assert_string_equal(cake_store_kind(s), "mem");
    assert_int_equal(get(f, s, 0), 1);
    for (int i = 0; i < 8; i++)
        assert_int_equal(cake_store_put(s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err)), 0);
    for (int i = 0; i < 8; i++) assert_int_equal(get(f, s, i), 0);
    cake_chunk_key keys[8];
    uint8_t present[8];
    for (int i = 0; i < 8; i++) keys[i] = f->h[i].key;
    assert_int_equal(cake_store_del(s, &keys[3], err, sizeof(err)), 0);
    assert_int_equal(cake_store_exists(s, keys, 8, present, err, sizeof(err)), 0);
    for (int i = 0; i < 8; i++) assert_int_equal(present[i], i != 3);
    /* a corrupt blob is a miss, counted, and removed */
    uint8_t *bad = malloc(f->len);
    memcpy(bad, f->blob[5], f->len);
    bad[200] ^= 1;
    assert_int_equal(cake_store_put(s, &keys[5], bad, f->len, err, sizeof(err)), 0);
    assert_int_equal(
        cake_store_get_verified(s, &f->h[5], f->buf, f->cap, &(size_t){0}, err, sizeof(err)), 1);
    assert_non_null(strstr(err, "checksum"));
    assert_int_equal(cake_store_exists(s, &keys[5], 1, present, err, sizeof(err)), 0);
    assert_int_equal(present[0], 0);
    free(bad);
    /* load */
    cake_kv_cache out;
    assert_int_equal(t_kv_init(&out, CAKE_KV_F32), 0);
    assert_int_equal(
        cake_store_load(s, &f->h[6], f->buf, f->cap, &out, 6 * T_CHUNK, err, sizeof(err)), 0);
    assert_int_equal(t_kv_cmp_range(&f->kv, 6 * T_CHUNK, &out, 6 * T_CHUNK, T_CHUNK), 0);
    /* a chunk that does not fit the cache is the caller's error, not corrupt */
    assert_int_equal(
        cake_store_load(s, &f->h[6], f->buf, f->cap, &out, T_CTX - 1, err, sizeof(err)), -1);
    assert_int_equal(get(f, s, 6), 0);
    cake_kv_cache_free(&out);
    /* several at once (the generic path: one get after the other) */
    void *bufs[8];
    size_t lens[8];
    int rcs[8];
    for (int i = 0; i < 8; i++) bufs[i] = cake_store_alloc_buffer(f->cap);
    assert_int_equal(
        cake_store_get_many_verified(s, f->h, 8, bufs, f->cap, lens, rcs, err, sizeof(err)), 6);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(rcs[i], i == 3 || i == 5);
        if (!rcs[i]) assert_memory_equal(bufs[i], f->blob[i], f->len);
    }
    for (int i = 0; i < 8; i++) cake_store_free_buffer(bufs[i]);
    cake_store_counters c;
    cake_store_counters_get(s, &c);
    assert_int_equal(c.corrupt, 1);
    assert_int_equal(c.puts, 9);
    cake_store_close(s);
}

static void test_mem_capacity(void **state) {
    fx *f = *state;
    cake_store *s;
    char err[256], uri[64];
    snprintf(uri, sizeof(uri), "mem:?capacity=%zu", 3 * f->len);
    assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(cake_store_put(s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err)), 0);
    assert_int_equal(get(f, s, 0), 0); /* 1 is now the least recently used */
    assert_int_equal(cake_store_put(s, &f->h[3].key, f->blob[3], f->len, err, sizeof(err)), 0);
    assert_int_equal(get(f, s, 1), 1);
    assert_int_equal(get(f, s, 0), 0);
    assert_int_equal(get(f, s, 2), 0);
    assert_int_equal(get(f, s, 3), 0);
    cake_store_usage u;
    assert_int_equal(cake_store_usage_get(s, &u, err, sizeof(err)), 0);
    assert_int_equal(u.n_chunks, 3);
    assert_int_equal(u.capacity, 3 * f->len);
    uint64_t n, b;
    assert_int_equal(cake_store_gc(s, f->len, &n, &b, err, sizeof(err)), 0);
    assert_int_equal(n, 2);
    assert_int_equal(get(f, s, 3), 0); /* the most recent stays */
    cake_store_counters c;
    cake_store_counters_get(s, &c);
    assert_int_equal(c.evictions, 3);
    /* bigger than the capacity */
    cake_store_close(s);
    assert_int_equal(cake_store_open("mem:?capacity=100", &s, err, sizeof(err)), 0);
    assert_int_equal(cake_store_put(s, &f->h[0].key, f->blob[0], f->len, err, sizeof(err)), -1);
    cake_store_close(s);
}

typedef struct {
    fx *f;
    cake_store *s;
    int id, bad;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    fx *f = w->f;
    char err[256];
    size_t len;
    void *buf = cake_store_alloc_buffer(f->cap);
    for (int it = 0; it < 400; it++) {
        int i = (it * 5 + w->id) % 8;
        if (it % 4 == 0) {
            i = (it / 4 + w->id * 2) % 8;
            if (cake_store_put(w->s, &f->h[i].key, f->blob[i], f->len, err, sizeof(err))) w->bad++;
        } else {
            int rc = cake_store_get_verified(w->s, &f->h[i], buf, f->cap, &len, err, sizeof(err));
            if (rc < 0 || (rc == 0 && memcmp(buf, f->blob[i], f->len))) w->bad++;
        }
    }
    cake_store_free_buffer(buf);
    return NULL;
}

static void test_mem_threads(void **state) {
    fx *f = *state;
    cake_store *s;
    char err[256], uri[64];
    snprintf(uri, sizeof(uri), "mem:?capacity=%zu", 3 * f->len); /* constant eviction */
    assert_int_equal(cake_store_open(uri, &s, err, sizeof(err)), 0);
    pthread_t th[4];
    worker w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (worker){f, s, i, 0};
        pthread_create(&th[i], NULL, work, &w[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(w[i].bad, 0);
    }
    cake_store_counters c;
    cake_store_counters_get(s, &c);
    assert_int_equal(c.corrupt, 0);
    assert_true(c.evictions > 0);
    assert_int_equal(c.hits + c.misses, 4 * 300);
    cake_store_close(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_mem_roundtrip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mem_capacity, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mem_threads, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
