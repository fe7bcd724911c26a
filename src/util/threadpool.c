/* A fixed pool of worker threads for the CPU kernels.
 *
 * Decode issues ~100+ parallel-fors per token, each only tens of microseconds
 * long, so handing out a job must be cheap. The caller publishes a job by
 * writing its payload (fn, ctx, base) and then one atomic word, `job`, that
 * holds the job's generation, its task count and the next unclaimed task.
 * Every thread, the caller included (it is thread 0), claims tasks by
 * compare-and-swap on that word until none is left. Workers that finished a
 * job spin on the word for a short while (~0.1 ms) and only then sleep on a
 * condition variable.
 *
 * The caller returns once every task has finished, not once every worker has
 * checked in. On a shared machine a worker's vCPU can be parked for
 * milliseconds. The pool used to wait for every worker at the end of every
 * parallel-for, and a one-token pass of 12-15 ms then took 23-50 ms in one
 * run of ten; now the threads that do run do the work (docs/BENCHMARKS.md).
 *
 * Why a late worker is safe: it reads the payload after it sees a new
 * generation, then claims with a compare-and-swap that expects that same
 * word. A successful claim means the job still had an unclaimed task, so the
 * caller had not yet moved on to write the next job's payload (it does so
 * only after every task has been claimed and finished). A worker that read a
 * newer payload finds the word changed and claims nothing. The generation is
 * 32 bits: a worker would have to stall through 2^32 jobs to be fooled.
 *
 * Sleeping uses the Dekker pattern on sequentially consistent atomics: a
 * sleeper first announces itself (n_sleeping / caller_sleeping), then re-checks
 * the condition under the mutex; the waker first changes the condition, then
 * checks the announcement and only then takes the mutex. One of the two always
 * sees the other, so no wake-up is lost and the fast path never locks.
 *
 * One job at a time: a second concurrent (or nested) call finds the pool busy
 * and runs its tasks serially on its own thread instead of deadlocking. */
#include "util/threadpool.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
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

/* The job word: generation (32 bits) | task count (16) | next task (16). A
 * parallel-for of more tasks runs as several jobs of at most MAX_JOB_TASKS. */
enum { MAX_JOB_TASKS = 0xffff };

static uint64_t job_word(uint32_t gen, int n_tasks, int next) {
    return (uint64_t)gen << 32 | (uint64_t)n_tasks << 16 | (uint64_t)next;
}
static uint32_t job_gen(uint64_t w) {
    return (uint32_t)(w >> 32);
}
static int job_tasks(uint64_t w) {
    return (int)(w >> 16 & 0xffff);
}
static int job_next(uint64_t w) {
    return (int)(w & 0xffff);
}

typedef struct {
    cake_threadpool *pool;
    int id; /* 1..n_threads-1; the caller is 0 */
} worker_arg;

struct cake_threadpool {
    int n_threads;
    int n_started; /* workers actually created */
    pthread_t *threads;
    worker_arg *args;

    /* The current job's payload, written before `job` publishes it. Atomic
     * only because a late worker may read it while the next job's is being
     * written; such a worker's claim then fails (see the top). */
    _Atomic(cake_task_fn) fn;
    _Atomic(void *) ctx;
    atomic_int base; /* task index of the job's first task */

    _Atomic uint64_t job;       /* generation | task count | next task */
    atomic_int n_finished;      /* tasks of the current job that have run */
    atomic_int n_sleeping;      /* workers blocked (or about to block) on work_cv */
    atomic_int caller_sleeping; /* the caller is blocked (or about to) on done_cv */
    atomic_int stop;
    atomic_flag busy; /* a job is in flight */

    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
};

/* Claims and runs tasks of the job in word w until none is left or a newer
 * job replaced it; returns the last word seen. */
static uint64_t run_tasks(cake_threadpool *p, uint64_t w, int id) {
    const cake_task_fn fn = atomic_load(&p->fn);
    void *const ctx = atomic_load(&p->ctx);
    const int base = atomic_load(&p->base);
    const uint32_t gen = job_gen(w);
    while (job_gen(w) == gen && job_next(w) < job_tasks(w)) {
        if (!atomic_compare_exchange_weak(&p->job, &w, w + 1)) continue; /* w reloaded */
        fn(ctx, base + job_next(w), id);
        if (atomic_fetch_add(&p->n_finished, 1) + 1 == job_tasks(w) &&
            atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
        w = atomic_load(&p->job);
    }
    return w;
}

static void *worker_main(void *arg) {
    const worker_arg *wa = arg;
    cake_threadpool *p = wa->pool;
    const int id = wa->id;
    uint32_t seen = 0; /* the last job this worker took part in */
    uint64_t w = atomic_load(&p->job);
    for (;;) {
        for (int spin = 0; job_gen(w) == seen && spin < SPIN_ITERS; spin++) {
            if (atomic_load_explicit(&p->stop, memory_order_relaxed)) break;
            cpu_relax();
            w = atomic_load(&p->job);
        }
        if (job_gen(w) == seen) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->n_sleeping, 1);
            while (job_gen(w = atomic_load(&p->job)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->work_cv, &p->mu);
            atomic_fetch_sub(&p->n_sleeping, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (job_gen(w) == seen) break; /* woken by stop, no new job */
        seen = job_gen(w);
        w = run_tasks(p, w, id); /* a newer job by now: the loop takes it at once */
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
    atomic_init(&p->fn, NULL);
    atomic_init(&p->ctx, NULL);
    atomic_init(&p->base, 0);
    atomic_init(&p->job, job_word(0, 0, 0));
    atomic_init(&p->n_finished, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->caller_sleeping, 0);
    atomic_init(&p->stop, 0);
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

/* Publishes tasks [base, base + n_tasks), takes part, and waits until all of
 * them have run. */
static void run_job(cake_threadpool *p, int base, int n_tasks, cake_task_fn fn, void *ctx) {
    atomic_store(&p->fn, fn);
    atomic_store(&p->ctx, ctx);
    atomic_store(&p->base, base);
    atomic_store(&p->n_finished, 0);
    const uint64_t w = job_word(job_gen(atomic_load(&p->job)) + 1, n_tasks, 0);
    atomic_store(&p->job, w);
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->work_cv);
        pthread_mutex_unlock(&p->mu);
    }

    run_tasks(p, w, 0);

    for (int spin = 0; spin < SPIN_ITERS; spin++) {
        if (atomic_load(&p->n_finished) == n_tasks) return;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->caller_sleeping, 1);
    while (atomic_load(&p->n_finished) != n_tasks) pthread_cond_wait(&p->done_cv, &p->mu);
    atomic_store(&p->caller_sleeping, 0);
    pthread_mutex_unlock(&p->mu);
}

void cake_threadpool_run(cake_threadpool *p, int n_tasks, cake_task_fn fn, void *ctx) {
    if (n_tasks <= 0) return;
    /* Serial cases: no pool, one thread, a single task (not worth a wake-up),
     * or the pool is already running a job (a nested or concurrent call). */
    if (!p || p->n_threads == 1 || n_tasks == 1 || atomic_flag_test_and_set(&p->busy)) {
        for (int i = 0; i < n_tasks; i++) fn(ctx, i, 0);
        return;
    }
    for (int base = 0; base < n_tasks; base += MAX_JOB_TASKS)
        run_job(p, base, n_tasks - base < MAX_JOB_TASKS ? n_tasks - base : MAX_JOB_TASKS, fn, ctx);
    atomic_flag_clear(&p->busy);
}
