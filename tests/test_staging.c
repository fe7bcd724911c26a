/* The loader's staging pool: buffers come back to the next request instead of
 * being allocated again, a change of size frees the stale ones, at most
 * max_kept are kept, and concurrent takers never share a buffer (run under
 * TSan too). Through the loader: test_loader's test_staging_reuse. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "loader/staging.h"
#include "testutil.h"

static void reset_counts(void) {
    atomic_store(&test_counted_allocs, 0);
    atomic_store(&test_counted_releases, 0);
}

static void test_reuse(void **state) {
    (void)state;
    reset_counts();
    cake_staging *s = cake_staging_new(&test_counting_allocator, 2);
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
    assert_int_equal(atomic_load(&test_counted_allocs), 2);
    /* A third given back while two are kept: freed, not kept. */
    void *e = cake_staging_take(s, 8192);
    assert_int_equal(atomic_load(&test_counted_allocs), 3);
    cake_staging_give(s, c, 8192);
    cake_staging_give(s, d, 8192);
    cake_staging_give(s, e, 8192);
    assert_int_equal(atomic_load(&test_counted_releases), 1);
    /* Another size: the kept ones are freed, a new one is made. */
    void *f = cake_staging_take(s, 4096);
    assert_non_null(f);
    assert_int_equal(atomic_load(&test_counted_releases), 3);
    assert_int_equal(atomic_load(&test_counted_allocs), 4);
    cake_staging_give(s, f, 4096);
    cake_staging_give(s, NULL, 4096); /* accepted, nothing happens */
    cake_staging_free(s);
    assert_int_equal(atomic_load(&test_counted_releases), 4); /* everything allocated is freed */
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
    cake_staging *s = cake_staging_new(&test_counting_allocator, THREADS);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) assert_int_equal(pthread_create(&t[i], NULL, churn, s), 0);
    for (int i = 0; i < THREADS; i++) {
        void *r;
        pthread_join(t[i], &r);
        assert_null(r);
    }
    cake_staging_free(s);
    assert_int_equal(atomic_load(&test_counted_allocs), atomic_load(&test_counted_releases));
    assert_true(atomic_load(&test_counted_allocs) <= THREADS * 2); /* reused, not made per round */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reuse),
        cmocka_unit_test(test_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
