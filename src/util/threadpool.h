/* A fixed pool of worker threads that run one parallel-for at a time.
 * cake_threadpool_run(pool, n_tasks, fn, ctx) calls fn(ctx, i, thread_id) for
 * i in [0, n_tasks) across the pool (the calling thread takes part) and returns
 * when all calls have finished. Tasks are handed out by static striding
 * (thread j runs i = j, j + n_threads, ...) so the assignment is deterministic. */
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
/* Like cake_threadpool_run, but each thread takes the next unclaimed task
 * until none is left, so faster threads do more: which thread runs a task
 * depends on timing. For kernels whose results do not depend on it (each
 * output computed by one task with a fixed order), it evens out threads that
 * run at different speeds (a shared machine, memory contention). */
void cake_threadpool_run_dynamic(cake_threadpool *p, int n_tasks, cake_task_fn fn, void *ctx);

#endif
