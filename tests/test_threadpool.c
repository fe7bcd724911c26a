/* Thread pool: every task runs exactly once, on a thread of the pool, across
 * many back-to-back jobs (the spin path), jobs separated by idle time (the
 * sleep/wake path), slow workers (the caller's sleep path), nested and
 * concurrent calls (serial fallback), jobs past one job word's 65535 tasks,
 * and more threads than cores (workers that join a job late, or never). Run
 * under TSan too (-DCAKE_TSAN=ON). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/threadpool.h"

enum { MAX_TASKS = 1000 };

typedef struct {
    atomic_int count[MAX_TASKS];
    atomic_int thread_of[MAX_TASKS];
    int n_threads;
} record;

static void record_task(void *ctx, int task, int tid) {
    record *r = ctx;
    atomic_fetch_add(&r->count[task], 1);
    atomic_store(&r->thread_of[task], tid);
}

static void record_init(record *r, int n_threads) {
    for (int i = 0; i < MAX_TASKS; i++) {
        atomic_init(&r->count[i], 0);
        atomic_init(&r->thread_of[i], -1);
    }
    r->n_threads = n_threads;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Every task of the job ran once, on a thread of the pool; no other task ran. */
static void check_record(record *r, int n_tasks) {
    for (int i = 0; i < MAX_TASKS; i++) {
        assert_int_equal(atomic_load(&r->count[i]), i < n_tasks ? 1 : 0);
        if (i < n_tasks) {
            const int tid = atomic_load(&r->thread_of[i]);
            assert_true(tid >= 0 && tid < r->n_threads);
        }
    }
}

static void check_job(cake_threadpool *p, int n_threads, int n_tasks) {
    static record r;
    record_init(&r, n_threads);
    cake_threadpool_run(p, n_tasks, record_task, &r);
    check_record(&r, n_tasks);
    /* A single task runs on the caller without waking anyone. */
    if (n_tasks == 1) assert_int_equal(atomic_load(&r.thread_of[0]), 0);
}

static void test_sizes(void **state) {
    (void)state;
    assert_int_equal(cake_threadpool_size(NULL), 1);
    assert_null(cake_threadpool_create(0));
    for (int n = 1; n <= 4; n++) {
        cake_threadpool *p = cake_threadpool_create(n);
        assert_non_null(p);
        assert_int_equal(cake_threadpool_size(p), n);
        const int tasks[] = {0, 1, 2, 3, 5, 7, 64, 999};
        for (size_t i = 0; i < sizeof(tasks) / sizeof(tasks[0]); i++) check_job(p, n, tasks[i]);
        cake_threadpool_free(p);
    }
    cake_threadpool_free(NULL);
}

static void test_null_pool_runs_serially(void **state) {
    (void)state;
    check_job(NULL, 1, 17);
}

/* Many short jobs back to back: the spin path, and the reuse of the job fields. */
typedef struct {
    atomic_llong sum;
} sum_ctx;

static void add_task(void *ctx, int task, int tid) {
    (void)tid;
    sum_ctx *s = ctx;
    atomic_fetch_add(&s->sum, task + 1);
}

static void test_many_jobs(void **state) {
    (void)state;
    cake_threadpool *p = cake_threadpool_create(3);
    assert_non_null(p);
    sum_ctx s;
    atomic_init(&s.sum, 0);
    long long expect = 0;
    for (int job = 0; job < 5000; job++) {
        const int n = 2 + job % 9;
        cake_threadpool_run(p, n, add_task, &s);
        expect += (long long)n * (n + 1) / 2;
        /* the results of a job are visible once run returns */
        assert_int_equal(atomic_load(&s.sum), expect);
    }
    cake_threadpool_free(p);
}

/* Jobs separated by idle time longer than the spin: workers must sleep and wake. */
static void test_sleep_and_wake(void **state) {
    (void)state;
    cake_threadpool *p = cake_threadpool_create(2);
    assert_non_null(p);
    for (int i = 0; i < 5; i++) {
        sleep_ms(20);
        check_job(p, 2, 10);
    }
    cake_threadpool_free(p);
}

/* A slow task on a worker makes the caller wait past its spin (its sleep path). */
static void slow_task(void *ctx, int task, int tid) {
    if (tid != 0) sleep_ms(15);
    record_task(ctx, task, tid);
}

static void test_slow_worker(void **state) {
    (void)state;
    cake_threadpool *p = cake_threadpool_create(3);
    assert_non_null(p);
    static record r;
    for (int rep = 0; rep < 3; rep++) {
        record_init(&r, 3);
        cake_threadpool_run(p, 6, slow_task, &r);
        check_record(&r, 6);
    }
    cake_threadpool_free(p);
}

/* A task that itself calls run on the same pool: the inner call finds the pool
 * busy and runs serially instead of deadlocking. */
typedef struct {
    cake_threadpool *pool;
    atomic_int inner_total;
    atomic_int inner_not_serial; /* counted, not asserted: this runs on workers */
} nest_ctx;

static void inner_task(void *ctx, int task, int tid) {
    (void)task;
    nest_ctx *c = ctx;
    if (tid != 0) atomic_fetch_add(&c->inner_not_serial, 1); /* serial: thread 0 */
    atomic_fetch_add(&c->inner_total, 1);
}

static void outer_task(void *ctx, int task, int tid) {
    (void)task;
    (void)tid;
    nest_ctx *c = ctx;
    cake_threadpool_run(c->pool, 4, inner_task, c);
}

static void test_nested_run(void **state) {
    (void)state;
    nest_ctx c;
    c.pool = cake_threadpool_create(2);
    assert_non_null(c.pool);
    atomic_init(&c.inner_total, 0);
    atomic_init(&c.inner_not_serial, 0);
    cake_threadpool_run(c.pool, 6, outer_task, &c);
    assert_int_equal(atomic_load(&c.inner_total), 6 * 4);
    assert_int_equal(atomic_load(&c.inner_not_serial), 0);
    cake_threadpool_free(c.pool);
}

/* Two application threads sharing one pool: one gets it, the other runs
 * serially; both jobs complete fully. */
typedef struct {
    cake_threadpool *pool;
    sum_ctx sum;
} share_ctx;

static void *hammer(void *arg) {
    share_ctx *c = arg;
    for (int i = 0; i < 500; i++) cake_threadpool_run(c->pool, 8, add_task, &c->sum);
    return NULL;
}

static void test_concurrent_callers(void **state) {
    (void)state;
    share_ctx c;
    c.pool = cake_threadpool_create(2);
    assert_non_null(c.pool);
    atomic_init(&c.sum.sum, 0);
    pthread_t th[2];
    for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&th[i], NULL, hammer, &c), 0);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&c.sum.sum), 2LL * 500 * 36);
    cake_threadpool_free(c.pool);
}

/* Plain (non-atomic) writes by tasks to disjoint slots are visible to the
 * caller after run returns: the pool provides the happens-before edge. */
static void write_task(void *ctx, int task, int tid) {
    (void)tid;
    int *out = ctx;
    out[task] = task * 3 + 1;
}

static void test_results_visible(void **state) {
    (void)state;
    cake_threadpool *p = cake_threadpool_create(2);
    assert_non_null(p);
    int buf[257];
    for (int rep = 0; rep < 200; rep++) {
        memset(buf, 0, sizeof(buf));
        cake_threadpool_run(p, 257, write_task, buf);
        for (int i = 0; i < 257; i++) assert_int_equal(buf[i], i * 3 + 1);
    }
    cake_threadpool_free(p);
}

/* More threads than this machine has cores, many short jobs: workers that
 * were not scheduled in time join a job late or not at all, and one that
 * wakes up on a stale job must claim nothing of it. Also a slow thread. */
static void test_oversubscribed(void **state) {
    (void)state;
    static record r;
    cake_threadpool *p = cake_threadpool_create(16);
    assert_non_null(p);
    for (int job = 0; job < 3000; job++) {
        const int n_tasks = job % 50;
        record_init(&r, 16);
        cake_threadpool_run(p, n_tasks, record_task, &r);
        check_record(&r, n_tasks);
    }
    record_init(&r, 16);
    cake_threadpool_run(p, 40, slow_task, &r); /* threads other than 0 sleep */
    check_record(&r, 40);
    cake_threadpool_free(p);
}

/* A job of more tasks than one job word holds runs as several. */
static void count_task(void *ctx, int task, int tid) {
    (void)tid;
    atomic_uchar *seen = ctx;
    atomic_fetch_add(&seen[task], 1);
}

static void test_large_job(void **state) {
    (void)state;
    enum { N = 200000 };
    atomic_uchar *seen = calloc(N, sizeof(*seen));
    assert_non_null(seen);
    cake_threadpool *p = cake_threadpool_create(3);
    assert_non_null(p);
    cake_threadpool_run(p, N, count_task, seen);
    for (int i = 0; i < N; i++) assert_int_equal(atomic_load(&seen[i]), 1);
    cake_threadpool_free(p);
    free(seen);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_null_pool_runs_serially),
        cmocka_unit_test(test_many_jobs),
        cmocka_unit_test(test_sleep_and_wake),
        cmocka_unit_test(test_slow_worker),
        cmocka_unit_test(test_nested_run),
        cmocka_unit_test(test_concurrent_callers),
        cmocka_unit_test(test_results_visible),
        cmocka_unit_test(test_oversubscribed),
        cmocka_unit_test(test_large_job),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
