/* A fixed pool of worker threads for the CPU kernels.
 *
 * Decode issues ~100+ parallel-fors per token, each only tens of microseconds
 * long, so handing out a job must be cheap. The caller publishes a job by
 * writing (fn, ctx, n_tasks) and bumping an atomic generation counter; workers
 * that finished the previous job spin on that counter for a short while
 * (~0.1 ms) and only then sleep on a condition variable. The caller runs its
 * own share of the tasks (it is thread 0), then waits for the workers the same
 * way: spin on an atomic "done" counter, then sleep.
 *
 * Sleeping uses the Dekker pattern on sequentially consistent atomics: a
 * sleeper first announces itself (n_sleeping / caller_sleeping), then re-checks
 * the condition under the mutex; the waker first changes the condition, then
 * checks the announcement and only then takes the mutex. One of the two always
 * sees the other, so no wake-up is lost and the fast path never locks.
 *
 * cake_threadpool_run assigns tasks by static striding (thread j runs j,
 * j + n, ...), so which thread runs a task never depends on timing;
 * cake_threadpool_run_dynamic hands out tasks from an atomic counter instead,
 * which evens out threads running at different speeds. One job at a time: a
 * second concurrent (or nested) call finds the pool busy and runs its tasks
 * serially on its own thread instead of deadlocking. */
#include "util/threadpool.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* Spin iterations before sleeping. A pause is ~10-60 cycles depending on the
 * core, so this is roughly 50-300 us: longer than the gap between two kernels of
 * one forward pass, shorter than anything a user would notice as busy CPU. */
enum { SPIN_ITERS = 1 << 13 };

typedef struct {
    cake_threadpool *pool;
    int id; /* 1..n_threads-1; the caller is 0 */
} worker_arg;

struct cake_threadpool {
    int n_threads;
    int n_started; /* workers actually created */
    pthread_t *threads;
    worker_arg *args;

    /* The current job: written by the caller before it bumps `gen`, read by the
     * workers after they see the new `gen`. */
    cake_task_fn fn;
    void *ctx;
    int n_tasks;
    int dynamic;     /* tasks taken from `next` instead of by striding */
    atomic_int next; /* next task of a dynamic job */

    atomic_uint gen;            /* job generation */
    atomic_int n_done;          /* workers that finished the current job */
    atomic_int n_sleeping;      /* workers blocked (or about to block) on work_cv */
    atomic_int caller_sleeping; /* the caller is blocked (or about to) on done_cv */
    atomic_int stop;
    atomic_flag busy; /* a job is in flight */

    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
};

static void run_share(cake_threadpool *p, int id) {
    if (p->dynamic) {
        for (int i;
             (i = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed)) < p->n_tasks;)
            p->fn(p->ctx, i, id);
        return;
    }
    for (int i = id; i < p->n_tasks; i += p->n_threads) p->fn(p->ctx, i, id);
}

static void *worker_main(void *arg) {
    const worker_arg *wa = arg;
    cake_threadpool *p = wa->pool;
    const int id = wa->id;
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        for (int spin = 0; g == seen && spin < SPIN_ITERS; spin++) {
            if (atomic_load_explicit(&p->stop, memory_order_relaxed)) break;
            cpu_relax();
            g = atomic_load_explicit(&p->gen, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->n_sleeping, 1);
            while ((g = atomic_load(&p->gen)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->work_cv, &p->mu);
            atomic_fetch_sub(&p->n_sleeping, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (g == seen) break; /* woken by stop, no new job */
        seen = g;
        run_share(p, id);
        if (atomic_fetch_add(&p->n_done, 1) + 1 == p->n_threads - 1 &&
            atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

static void stop_workers(cake_threadpool *p) {
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_started; i++) pthread_join(p->threads[i], NULL);
    p->n_started = 0;
}

cake_threadpool *cake_threadpool_create(int n_threads) {
    if (n_threads < 1) return NULL;
    cake_threadpool *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->n_threads = n_threads;
    atomic_init(&p->gen, 0);
    atomic_init(&p->n_done, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->caller_sleeping, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->next, 0);
    atomic_flag_clear(&p->busy);
    if (pthread_mutex_init(&p->mu, NULL)) {
        free(p);
        return NULL;
    }
    if (pthread_cond_init(&p->work_cv, NULL)) {
        pthread_mutex_destroy(&p->mu);
        free(p);
        return NULL;
    }
    if (pthread_cond_init(&p->done_cv, NULL)) {
        pthread_cond_destroy(&p->work_cv);
        pthread_mutex_destroy(&p->mu);
        free(p);
        return NULL;
    }
    if (n_threads == 1) return p;

    p->threads = calloc((size_t)n_threads - 1, sizeof(*p->threads));
    p->args = calloc((size_t)n_threads - 1, sizeof(*p->args));
    if (!p->threads || !p->args) goto fail;
    /* Workers start with every signal blocked, so signals (SIGINT in the CLI)
     * are delivered to the application's own threads. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < n_threads - 1; i++) {
        p->args[i].pool = p;
        p->args[i].id = i + 1;
        if (pthread_create(&p->threads[i], NULL, worker_main, &p->args[i])) break;
        p->n_started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (p->n_started != n_threads - 1) goto fail;
    return p;

fail:
    cake_threadpool_free(p);
    return NULL;
}

void cake_threadpool_free(cake_threadpool *p) {
    if (!p) return;
    stop_workers(p);
    pthread_cond_destroy(&p->done_cv);
    pthread_cond_destroy(&p->work_cv);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p->args);
    free(p);
}

int cake_threadpool_size(const cake_threadpool *p) {
    return p ? p->n_threads : 1;
}

static void run_job(cake_threadpool *p, int n_tasks, cake_task_fn fn, void *ctx, int dynamic) {
    if (n_tasks <= 0) return;
    /* Serial cases: no pool, one thread, a single task (not worth a wake-up),
     * or the pool is already running a job (a nested or concurrent call). */
    if (!p || p->n_threads == 1 || n_tasks == 1 || atomic_flag_test_and_set(&p->busy)) {
        for (int i = 0; i < n_tasks; i++) fn(ctx, i, 0);
        return;
    }
    const int n_workers = p->n_threads - 1;
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    p->dynamic = dynamic;
    atomic_store(&p->next, 0);
    atomic_store(&p->n_done, 0);
    atomic_fetch_add(&p->gen, 1);
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->work_cv);
        pthread_mutex_unlock(&p->mu);
    }

    run_share(p, 0);

    for (int spin = 0; spin < SPIN_ITERS; spin++) {
        if (atomic_load_explicit(&p->n_done, memory_order_acquire) == n_workers) goto done;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->caller_sleeping, 1);
    while (atomic_load(&p->n_done) != n_workers) pthread_cond_wait(&p->done_cv, &p->mu);
    atomic_store(&p->caller_sleeping, 0);
    pthread_mutex_unlock(&p->mu);
done:
    atomic_flag_clear(&p->busy);
}

void cake_threadpool_run(cake_threadpool *p, int n_tasks, cake_task_fn fn, void *ctx) {
    run_job(p, n_tasks, fn, ctx, 0);
}

void cake_threadpool_run_dynamic(cake_threadpool *p, int n_tasks, cake_task_fn fn, void *ctx) {
    run_job(p, n_tasks, fn, ctx, 1);
}
