/* The loader's staging pool: buffers come back to the next request instead of
 * being allocated again, a change of size frees the stale ones, at most
 * max_kept are kept, and concurrent takers never share a buffer (run under
 * TSan too). Through the loader: a second load request allocates nothing. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader/loader.h"
#include "loader/staging.h"
#include "testutil.h"

static atomic_int n_alloc, n_release;

static void *counting_alloc(size_t size) {
    atomic_fetch_add(&n_alloc, 1);
    return cake_store_alloc_buffer(size);
}

static void counting_release(void *p) {
    atomic_fetch_add(&n_release, 1);
    cake_store_free_buffer(p);
}

static const cake_staging_allocator counting = {counting_alloc, counting_release};

static void reset_counts(void) {
    atomic_store(&n_alloc, 0);
    atomic_store(&n_release, 0);
}

static void test_reuse(void **state) {
    (void)state;
    reset_counts();
    cake_staging *s = cake_staging_new(&counting, 2);
    assert_non_null(s);
    void *a = cake_staging_take(s, 8192), *b = cake_staging_take(s, 8192);
    assert_non_null(a);
    assert_non_null(b);
    assert_ptr_not_equal(a, b);
    memset(a, 1, 8192); /* usable memory */
    cake_staging_give(s, a, 8192);
    cake_staging_give(s, b, 8192);
    void *c = cake_staging_take(s, 8192), *d = cake_staging_take(s, 8192);
    assert_true((c == a && d == b) || (c == b && d == a)); /* the same two, no new ones */
    assert_int_equal(atomic_load(&n_alloc), 2);
    /* A third given back while two are kept: freed, not kept. */
    void *e = cake_staging_take(s, 8192);
    assert_int_equal(atomic_load(&n_alloc), 3);
    cake_staging_give(s, c, 8192);
    cake_staging_give(s, d, 8192);
    cake_staging_give(s, e, 8192);
    assert_int_equal(atomic_load(&n_release), 1);
    /* Another size: the kept ones are freed, a new one is made. */
    void *f = cake_staging_take(s, 4096);
    assert_non_null(f);
    assert_int_equal(atomic_load(&n_release), 3);
    assert_int_equal(atomic_load(&n_alloc), 4);
    cake_staging_give(s, f, 4096);
    cake_staging_give(s, NULL, 4096); /* accepted, nothing happens */
    cake_staging_free(s);
    assert_int_equal(atomic_load(&n_release), 4); /* everything allocated is freed */
}

enum { THREADS = 4, ROUNDS = 2000 };

static void *churn(void *arg) {
    cake_staging *s = arg;
    for (int i = 0; i < ROUNDS; i++) {
        unsigned char *b = cake_staging_take(s, 4096);
        if (!b) return (void *)1;
        /* Ours alone while we hold it: what we write stays. */
        memset(b, i & 0xff, 64);
        for (int k = 0; k < 64; k++)
            if (b[k] != (i & 0xff)) return (void *)1;
        cake_staging_give(s, b, 4096);
    }
    return NULL;
}

static void test_concurrent(void **state) {
    (void)state;
    reset_counts();
    cake_staging *s = cake_staging_new(&counting, THREADS);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) assert_int_equal(pthread_create(&t[i], NULL, churn, s), 0);
    for (int i = 0; i < THREADS; i++) {
        void *r;
        pthread_join(t[i], &r);
        assert_null(r);
    }
    cake_staging_free(s);
    assert_int_equal(atomic_load(&n_alloc), atomic_load(&n_release));
    assert_true(atomic_load(&n_alloc) <= THREADS * 2); /* reused, not made per round */
}

/* ---- through the loader, on an engine that only pretends to compute ---- */

static cake_hparams fake_hp = {
    .dim = 64, .n_layers = 2, .n_heads = 2, .n_kv_heads = 2, .head_dim = 32, .ffn_dim = 128};

static int fake_compute(void *self, const cake_token *t, int n, int pos0, float *logits, char *err,
                        size_t errlen) {
    (void)self, (void)t, (void)n, (void)pos0, (void)err, (void)errlen;
    if (logits) logits[0] = 0;
    return 0;
}

static int fake_install(void *self, const void *blob, const cake_chunk_header *h, int pos0,
                        char *err, size_t errlen) {
    (void)self, (void)blob, (void)h, (void)pos0, (void)err, (void)errlen;
    return 0;
}

static int fake_extract(void *self, cake_chunk_header *h, int pos0, void *blob, size_t cap,
                        char *err, size_t errlen) {
    (void)self, (void)pos0, (void)cap;
    memset((char *)blob + CAKE_CHUNK_HEADER_SIZE, 0x33,
           cake_chunk_blob_size(h) - CAKE_CHUNK_HEADER_SIZE);
    return cake_chunk_seal(h, blob, err, errlen);
}

static cake_prefill_stats prefill(const cake_loader_engine *e, const cake_token *p, int n,
                                  cake_store *s, cake_writeback *wb, cake_mode mode) {
    cake_prefill_params lp = {.store = s, .writeback = wb, .mode = mode, .chunk = 8, .io_depth = 3};
    cake_prefill_stats st;
    cake_prefill_job *job = NULL;
    float logit;
    char err[256];
    int rc = cake_prefill(e, p, n, &lp, &logit, &st, &job, err, sizeof(err));
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    cake_prefill_finish(job);
    return st;
}

static void test_loader_reuses(void **state) {
    (void)state;
    reset_counts();
    cake_staging *s = cake_staging_new(&counting, 8);
    cake_loader_engine e = {.compute = fake_compute,
                            .install = fake_install,
                            .extract = fake_extract,
                            .hp = &fake_hp,
                            .kv_type = CAKE_KV_F16,
                            .staging = s};
    memset(e.fingerprint, 0x5e, sizeof(e.fingerprint));
    cake_token p[8 * 6 + 1];
    for (int i = 0; i < (int)(sizeof(p) / sizeof(p[0])); i++) p[i] = 3 + i;
    const int n = 8 * 6 + 1; /* 6 loadable chunks and a 1-token tail */
    char err[256];
    cake_store *store = NULL;
    assert_int_equal(cake_store_open("mem:", &store, err, sizeof(err)), 0);
    cake_writeback *wb = cake_writeback_create(store, 8, err, sizeof(err));
    prefill(&e, p, n, store, wb, CAKE_MODE_COMPUTE);
    assert_int_equal(cake_writeback_drain(wb, 30000), 0);
    cake_writeback_free(wb);
    assert_int_equal(atomic_load(&n_alloc), 0); /* compute mode fetches nothing */

    cake_prefill_stats st = prefill(&e, p, n, store, NULL, CAKE_MODE_LOAD);
    assert_int_equal(st.chunks_loaded, 6);
    const int first = atomic_load(&n_alloc);
    assert_true(first >= 1 && first <= 3); /* one per I/O worker */
    st = prefill(&e, p, n, store, NULL, CAKE_MODE_LOAD);
    assert_int_equal(st.chunks_loaded, 6);
    assert_int_equal(atomic_load(&n_alloc), first); /* the second request took the kept ones */
    assert_int_equal(atomic_load(&n_release), 0);
    cake_store_close(store);
    cake_staging_free(s);
    assert_int_equal(atomic_load(&n_release), first);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reuse),
        cmocka_unit_test(test_concurrent),
        cmocka_unit_test(test_loader_reuses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
