#include "server/sched.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/err.h"

#define N_KINDS 3 /* cake_pass_kind, in priority order */

/* How long a step waits for the sequences whose decode pass the last step
 * finished: each samples its token and asks for the next pass within tens
 * of microseconds, and a step started without them would carry one
 * sequence while the others queue for the step after. */
#define GATHER_NS 1000000

/* A forward pass a request's thread waits on. */
typedef struct pass {
    cake_context *seq;
    const cake_token *tokens;
    int n, done; /* tokens in all; computed so far (earlier steps) */
    cake_pos pos0;
    float *logits;
    int finished, rc;
    char *err;
    size_t errlen;
    struct pass *next;
} pass;

struct sched {
    cake_context *engine;
    int budget;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* a pass was queued, or stop */
    pthread_cond_t done_cv; /* a step finished passes */
    pass *head[N_KINDS], *tail[N_KINDS];
    int stop;
    /* The step being run (the scheduler thread's): a piece has at least one
     * token, so a step carries at most budget pieces. */
    pass **picked;
    cake_batch_seq *pieces;
    int *kind_of;
    /* The sequences the last step finished a decode pass of, that have
     * neither asked for their next pass nor left (sched_release) yet. */
    cake_context **owed;
    int n_owed;
    struct timespec gather_until;
    sched_counters totals;
};

/* Runs the picked pieces as one forward pass. Should the pass be refused
 * (a sequence's tokens or positions out of range), each piece is run alone,
 * so that only the bad one fails. */
static void run_step(sched *s, pass **picked, cake_batch_seq *b, int nb) {
    char err[256];
    if (!cake_forward_batch(s->engine, b, nb, err, sizeof(err))) return;
    for (int i = 0; i < nb; i++)
        if (nb == 1 || cake_forward_batch(s->engine, &b[i], 1, err, sizeof(err))) {
            picked[i]->rc = -1;
            cake_err(picked[i]->err, picked[i]->errlen, "%s", err);
        }
}

/* Takes seq off the owed list, if it is there (under the mutex). */
static void settle_owed(sched *s, const cake_context *seq) {
    for (int i = 0; i < s->n_owed; i++)
        if (s->owed[i] == seq) {
            s->owed[i] = s->owed[--s->n_owed];
            pthread_cond_signal(&s->work_cv);
            return;
        }
}

static int before(const struct timespec *a, const struct timespec *b) {
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

static void *sched_main(void *arg) {
    sched *s = arg;
    pass **picked = s->picked;
    cake_batch_seq *b = s->pieces;
    int *kind_of = s->kind_of;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (s->n_owed > 0) { /* wait for them, a little */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (before(&now, &s->gather_until)) {
                pthread_cond_timedwait(&s->work_cv, &s->mu, &s->gather_until);
                continue;
            }
            s->n_owed = 0;
        }
        int nb = 0, left = s->budget;
        for (int k = 0; k < N_KINDS; k++)
            for (pass *p = s->head[k]; p && left > 0; p = p->next) {
                const int take = p->n - p->done < left ? p->n - p->done : left;
                b[nb] = (cake_batch_seq){p->seq, p->tokens + p->done, take, p->pos0 + p->done,
                                         p->done + take == p->n ? p->logits : NULL};
                kind_of[nb] = k;
                picked[nb++] = p;
                left -= take;
            }
        if (!nb) {
            if (s->stop) break;
            pthread_cond_wait(&s->work_cv, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        run_step(s, picked, b, nb);
        pthread_mutex_lock(&s->mu);
        sched_counters *t = &s->totals;
        t->steps++;
        t->shared_steps += nb > 1;
        if (nb > t->max_sequences) t->max_sequences = nb;
        for (int i = 0; i < nb; i++) {
            picked[i]->done += b[i].n;
            t->tokens[kind_of[i]] += (uint64_t)b[i].n;
            picked[i]->finished = picked[i]->done == picked[i]->n || picked[i]->rc;
            if (picked[i]->finished && kind_of[i] == CAKE_PASS_DECODE)
                s->owed[s->n_owed++] = picked[i]->seq;
        }
        clock_gettime(CLOCK_MONOTONIC, &s->gather_until);
        s->gather_until.tv_nsec += GATHER_NS;
        if (s->gather_until.tv_nsec >= 1000000000) {
            s->gather_until.tv_sec++;
            s->gather_until.tv_nsec -= 1000000000;
        }
        /* The picked passes lead their queues; the finished ones leave. */
        for (int k = 0; k < N_KINDS; k++)
            while (s->head[k] && s->head[k]->finished)
                if (!(s->head[k] = s->head[k]->next)) s->tail[k] = NULL;
        pthread_cond_broadcast(&s->done_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int sched_create(cake_context *engine, sched **out, char *err, size_t errlen) {
    *out = NULL;
    sched *s = calloc(1, sizeof(*s));
    if (!s) return cake_err(err, errlen, "out of memory");
    s->engine = engine;
    s->budget = cake_context_max_batch(engine);
    s->picked = malloc((size_t)s->budget * sizeof(*s->picked));
    s->pieces = malloc((size_t)s->budget * sizeof(*s->pieces));
    s->kind_of = malloc((size_t)s->budget * sizeof(*s->kind_of));
    s->owed = malloc((size_t)s->budget * sizeof(*s->owed));
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->work_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&s->done_cv, NULL);
    if (!s->picked || !s->pieces || !s->kind_of || !s->owed) {
        cake_err(err, errlen, "out of memory");
        goto fail;
    }
    if (pthread_create(&s->thread, NULL, sched_main, s)) {
        cake_err(err, errlen, "cannot start the scheduler thread");
        goto fail;
    }
    *out = s;
    return 0;
fail:
    pthread_cond_destroy(&s->done_cv);
    pthread_cond_destroy(&s->work_cv);
    pthread_mutex_destroy(&s->mu);
    free(s->picked);
    free(s->pieces);
    free(s->kind_of);
    free(s->owed);
    free(s);
    return -1;
}

int sched_forward(sched *s, cake_context *seq, cake_pass_kind kind, const cake_token *tokens, int n,
                  cake_pos pos0, float *logits, char *err, size_t errlen) {
    if (n < 1) return cake_err(err, errlen, "forward: no tokens");
    if ((unsigned)kind >= N_KINDS) kind = CAKE_PASS_PREFILL;
    pass p = {.seq = seq,
              .tokens = tokens,
              .n = n,
              .pos0 = pos0,
              .logits = logits,
              .err = err,
              .errlen = errlen};
    pthread_mutex_lock(&s->mu);
    if (s->tail[kind])
        s->tail[kind]->next = &p;
    else
        s->head[kind] = &p;
    s->tail[kind] = &p;
    settle_owed(s, seq);
    pthread_cond_signal(&s->work_cv);
    while (!p.finished) pthread_cond_wait(&s->done_cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return p.rc;
}

void sched_release(sched *s, const cake_context *seq) {
    pthread_mutex_lock(&s->mu);
    settle_owed(s, seq);
    pthread_mutex_unlock(&s->mu);
}

void sched_counters_get(sched *s, sched_counters *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->totals;
    pthread_mutex_unlock(&s->mu);
}

void sched_free(sched *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    pthread_cond_destroy(&s->done_cv);
    pthread_cond_destroy(&s->work_cv);
    pthread_mutex_destroy(&s->mu);
    free(s->picked);
    free(s->pieces);
    free(s->kind_of);
    free(s->owed);
    free(s);
}
