/* A fixed pool of worker threads that run one parallel-for at a time.
 * cake_threadpool_run(pool, n_tasks, fn, ctx) calls fn(ctx, i, thread_id) for
 * i in [0, n_tasks) across the pool (the calling thread takes part, as thread
 * 0) and returns when all calls have finished. Each thread takes the next
 * unclaimed task until none is left, so faster threads do more, and a thread
 * the machine has not scheduled does none: which thread runs a task depends on
 * timing. Kernels keep their results independent of it (each output computed
 * by one task in a fixed order); thread_id only picks per-thread scratch. */
#ifndef CAKE_THREADPOOL_H
#define CAKE_THREADPOOL_H

typedef struct cake_threadpool cake_threadpool;
typedef void (*cake_task_fn)(void *ctx, int task, int thread_id);

/* n_threads >= 1 (the caller counts as one). NULL on failure. */
cake_threadpool *cake_threadpool_create(int n_threads);
void cake_threadpool_free(cake_threadpool *p);      /* accepts NULL */
int cake_threadpool_size(const cake_threadpool *p); /* 1 for NULL */
/* pool may be NULL: runs every task on the calling thread. */
void cake_threadpool_run(cake_threadpool *p, int n_tasks, cake_task_fn fn, void *ctx);

#endif
